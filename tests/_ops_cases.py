"""Shared helpers for the fused-op tests: available backends, the devices the Triton kernels run on, float64
ground truth."""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from _cuda import cuda_path_missing, needs_cuda
from iaerf.core import extension as _extension
from iaerf.ops import registry

HAS_CPP = all(registry.has_compiled_kernel(op, "cpu") for op in ("energy_ce_forward", "logsumexp"))
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or _extension.triton_interpreting()
)

# Every implementation that can run on CPU tensors here (Triton through TRITON_INTERPRET=1, set by conftest).
CPU_BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="iaerf._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not available")),
]
# Backends that take float64 / fp16 / bf16 logits on CPU (the Triton interpreter has no bf16 arithmetic).
CPU_BACKENDS_ANY_DTYPE = CPU_BACKENDS[:2]

# Where the Triton kernels run: CPU tensors through the interpreter (the proof before a GPU exists) and CUDA.
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not available")),
    pytest.param("cuda", marks=needs_cuda),
]
# label -> (op file, launcher name): the labels the spies record
TRITON_LAUNCHERS = {
    "energy_ce_forward": ("energy_cross_entropy", "triton_forward"),
    "energy_ce_backward": ("energy_cross_entropy", "triton_backward"),
    "logsumexp_forward": ("logsumexp", "triton_forward"),
    "logsumexp_backward": ("logsumexp", "triton_backward"),
}


def triton_backend(device: str, logits: torch.Tensor, native_op: str) -> str:
    """The backend argument that runs the Triton kernels on these logits: forced on CPU (interpreter), the
    default dispatch on CUDA, where a dispatch to anything else is a missing CUDA path (see _cuda)."""
    if device == "cpu":
        return "triton"
    impl = registry.select_backend(native_op, logits, None)
    if impl != "triton":
        cuda_path_missing(f"backend=None runs {impl!r}, not Triton, on CUDA {logits.dtype} logits")
    return None


def spy_triton_launchers(monkeypatch) -> list[str]:
    """Record the label of every Triton launcher called from now on (proof that the Triton path ran, directly on
    CPU or through the op's registered CUDA kernel)."""
    calls: list[str] = []
    for label, (module_name, name) in TRITON_LAUNCHERS.items():
        module = importlib.import_module(f"iaerf.ops.{module_name}")
        real = getattr(module, name)

        def spy(*args, _real=real, _label=label, **kwargs):
            calls.append(_label)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def make_case(n: int, k: int, *, scale: float = 3.0, ignore_frac: float = 0.2, seed: int = 0,
              dtype=torch.float32, ignore_index: int = -100):
    """Random logits [n, k], targets with some ignored rows, per-row coefficients in [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, k, (n,), generator=g)
    if n:
        target[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    coef = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    return logits, target, coef


def fp64_energy_ce(logits, target, coef, ignore_index: int = -100):
    """Ground truth in float64 from torch's own ops: (per-row loss, ce, lse, grad of loss.sum() w.r.t. logits)."""
    z = logits.detach().double().requires_grad_()
    coef = coef.double() if isinstance(coef, torch.Tensor) else torch.tensor(float(coef), dtype=torch.float64)
    valid = target != ignore_index
    ce = F.cross_entropy(z, target, reduction="none", ignore_index=ignore_index)
    lse = torch.logsumexp(z, dim=1)
    loss = torch.where(valid, ce - coef * lse, torch.zeros((), dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), ce.detach(), lse.detach(), grad
