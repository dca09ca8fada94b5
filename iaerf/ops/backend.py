"""``iaerf.backend_info()``: which implementation each op uses on which device, and why.

It reads the registry that the op files fill when they register their torch.library ops (see
iaerf.ops._library.public_op; importing this module imports :mod:`iaerf.ops` first, so every op file has
registered), so a new op is reported without an entry here.
"""
from __future__ import annotations

import torch

from iaerf.core import extension as _extension

__all__ = ["backend_info"]

# public op name -> (torch.ops.iaerf op carrying its kernels, whether that op's CUDA kernel is Triton)
_OPS: dict[str, tuple[str, bool]] = {}


def register_op(name: str, native_op: str, *, triton: bool) -> None:
    """Record that the public function ``name`` runs ``torch.ops.iaerf.<native_op>`` (Triton on CUDA if triton)."""
    _OPS[name] = (native_op, triton)


# head_hvp is dispatched by iaerf/hessian/head_hessian.py through kernel_choice (C++ on CPU, the CUDA C++ kernel on CUDA).
register_op("head_hvp", "head_hvp", triton=False)


def backend_info() -> dict:
    """Describe the implementation of every op on every device type.

    Returns a dict ``{"extension": {...}, "triton": {...}, "ops": {op: {device: {"impl": str, "reason": str}}}}``;
    "impl" is one of "triton", "cpp", "cuda", "reference".

    >>> import iaerf
    >>> info = iaerf.backend_info()
    >>> sorted(info["ops"]["logsumexp"])
    ['cpu', 'cuda']
    """
    triton_ok, triton_why = _extension.triton_status()
    ops = {}
    for op, (native, triton_serves) in sorted(_OPS.items()):
        ops[op] = {}
        for device in ("cpu", "cuda"):
            impl, reason = _extension.kernel_choice(device, triton_ok=triton_serves, native_op=native)
            if device == "cuda" and not torch.cuda.is_available():
                reason += " [no CUDA device on this machine]"
            ops[op][device] = {"impl": impl, "reason": reason}
    return {
        "extension": {
            "loaded": _extension.extension_loaded(),
            "error": _extension.extension_error(),
            "built_with_cuda": _extension.built_with_cuda(),
        },
        "triton": {"available": triton_ok, "detail": triton_why, "interpreter": _extension.triton_interpreting()},
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "ops": ops,
    }
