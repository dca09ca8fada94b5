"""The Triton kernels compile to GPU binaries (sm_80, sm_90) for every specialisation the launchers use.

Runs without a GPU: triton.compile targets a GPUTarget directly, so a kernel that works under TRITON_INTERPRET=1
(the CPU tests) but not in the real compiler fails here. It runs in a subprocess because the interpreter mode set
by conftest replaces @triton.jit functions with interpreted ones in this process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    # With a GPU the CUDA tests compile and run the kernels for real (and triton's offline-compile API varies
    # between versions).
    pytest.mark.skipif(torch.cuda.is_available(), reason="covered by the CUDA tests on a GPU machine"),
]

_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from iaerf.ops import _triton_kernels as tk

    def compile_(fn, signature, constexprs, arch):
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
        assert "cubin" in kernel.asm, kernel.asm.keys()

    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            fwd = {"logits_ptr": f"*{dtype}", "stride_row": "i64", "target_ptr": "*i64", "coef_ptr": "*fp32",
                   "coef_stride": "i32", "loss_ptr": "*fp32", "ce_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "K": "i32",
                   "ignore_index": "i32"}
            bwd = {"grad_ptr": "*fp32", "grad_stride": "i32", "logits_ptr": f"*{dtype}", "stride_row": "i64",
                   "target_ptr": "*i64", "coef_ptr": "*fp32", "coef_stride": "i32", "lse_ptr": "*fp32",
                   "out_ptr": f"*{dtype}", "N": "i32", "K": "i32", "ignore_index": "i32"}
            for has_target in (True, False):
                for rows, block in ((1, 1024), (64, 16)):
                    for chunked in (False, True):
                        compile_(tk._forward_kernel, fwd, {"HAS_TARGET": has_target, "ROWS": rows, "BLOCK": block,
                                                           "CHUNKED": chunked}, arch)
                    compile_(tk._backward_kernel, bwd, {"HAS_TARGET": has_target, "ROWS": rows, "BLOCK": block}, arch)
    print("compiled")
    """
)


def test_kernels_compile_to_cubin():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
