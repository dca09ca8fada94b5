"""``iaerf.backend_info()``: which implementation each op uses on which device, and why."""
from __future__ import annotations

import torch

from iaerf import _extension

# op name -> (native op used on CPU / CUDA, whether Triton serves CUDA tensors)
_OPS = {
    "logsumexp": ("logsumexp", True),
    "energy": ("logsumexp", True),
    "energy_regularized_cross_entropy": ("energy_ce_forward", True),
    "head_hvp": ("head_hvp", False),
}


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
    for op, (native, triton_serves) in _OPS.items():
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
