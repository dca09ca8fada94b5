"""torch.library registration, shared by the op files: each op file declares its ops through :func:`define`.

An op is one entry of the dispatcher, ``torch.ops.iaerf.<name>``: its CPU kernel is the C++ kernel of ``iaerf._C``
(which defines the schema when it is built), its CUDA kernel the Triton launcher registered here, and its fake
implementation (for torch.compile / FakeTensor tracing) registered next to them. Without the extension the schema
is defined here from the same string, so that the Triton kernel still has an op to live on (the CPU then runs the
reference). The dispatcher, not Python, picks the kernel for the tensors' device, so a compiled graph holds the op
itself: no graph break on either device.

Triton runs as an ordinary CUDA kernel of a custom op rather than through ``torch.library.triton_op`` (torch >= 2.6,
so every supported torch has it): ``triton_op`` defines its own op and cannot add a kernel to one whose schema and
CPU kernel come from C++.
"""
from __future__ import annotations

from typing import Callable

import torch

from iaerf.ops import backend as _backend
from iaerf.core import extension as _extension

_LIB = torch.library.Library("iaerf", "FRAGMENT")

# The ops whose CUDA kernel is a Triton launcher (registered at import when triton is usable).
TRITON_KERNELS: set[str] = set()
# name -> the schema its op file declares (iaerf._C must define the same one; tests compare them).
SCHEMAS: dict[str, str] = {}


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"iaerf::{name}", "")
    except RuntimeError:
        return False
    return True


def define(schema: str, *, fake: Callable, triton: Callable | None = None) -> None:
    """Register the op ``schema`` ("name(args) -> results", as iaerf._C defines it): its fake implementation and,
    when triton is given and usable, its CUDA kernel."""
    name = schema.split("(", 1)[0]
    SCHEMAS[name] = schema
    if not _defined(name):
        _LIB.define(schema)
    for device_type in ("cpu", "cuda"):
        _extension.has_native_kernel(name, device_type)  # cached now, while only C++ kernels are registered
    torch.library.register_fake(f"iaerf::{name}", fake, lib=_LIB)
    if triton is not None and _extension.triton_status()[0]:
        _LIB.impl(name, triton, "CUDA")
        TRITON_KERNELS.add(name)


def define_native(name: str, *, fake: Callable) -> None:
    """Register the fake implementation of an op that only iaerf._C provides (a CPU-only variant), if it is built."""
    if _extension.has_native_op(name):
        _extension.has_native_kernel(name, "cpu")
        torch.library.register_fake(f"iaerf::{name}", fake, lib=_LIB)


def public_op(name: str, native_op: str) -> None:
    """Report the public function ``name`` in :func:`iaerf.backend_info` as served by ``torch.ops.iaerf.<native_op>``
    (call after :func:`define` of that op)."""
    _backend.register_op(name, native_op, triton=native_op in TRITON_KERNELS)


def acc_dtype(logits: torch.Tensor) -> torch.dtype:
    """Dtype of the kernels' results and accumulation: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def empty_rows(logits: torch.Tensor) -> torch.Tensor:
    """A fake [N] result of the accumulation dtype."""
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits))


def empty_like_logits(logits: torch.Tensor) -> torch.Tensor:
    """A fake [N, K] result (gradient, softmax) in the logits' dtype, contiguous."""
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
