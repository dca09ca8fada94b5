"""Loading of the native extension ``iaerf._C`` and the rules that pick an implementation per device.

Every dispatch decision in iaerf goes through :func:`kernel_choice`, and :func:`iaerf.backend_info` reports the
same decisions, so what is reported is what runs. It is traceable by Dynamo once the ops are registered (the
dispatcher and triton queries are answered from values cached at import), so a compiled default call has no
graph break.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

_C = None
_LOAD_ERROR: str | None = None

try:  # the extension registers torch.ops.iaerf.* on import
    from iaerf import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # noqa: BLE001 - any failure means "use the pure-torch paths", with the reason kept
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def extension_error() -> str | None:
    """Why ``iaerf._C`` could not be imported (None when it was)."""
    return _LOAD_ERROR


def has_native_op(name: str) -> bool:
    """True when ``torch.ops.iaerf.<name>`` is registered (by the compiled extension)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.iaerf, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def built_with_cuda() -> bool:
    return has_native_op("built_with_cuda") and bool(torch.ops.iaerf.built_with_cuda())


# (op, device type) -> whether iaerf._C compiled a kernel in. Filled by the first query, which
# iaerf.ops._library.define makes at import, before it adds the Triton CUDA kernels (the dispatcher cannot tell a
# C++ kernel from a Python one later) and before any torch.compile trace (Dynamo cannot trace the dispatcher query;
# it traces the dict lookup).
_NATIVE_KERNELS: dict[tuple[str, str], bool] = {}


def has_native_kernel(name: str, device_type: str) -> bool:
    """True when ``torch.ops.iaerf.<name>`` has a kernel for ``device_type`` ("cpu" / "cuda") compiled in."""
    key = (name, device_type)
    if key not in _NATIVE_KERNELS:
        _NATIVE_KERNELS[key] = has_native_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"iaerf::{name}", device_type.upper())
    return _NATIVE_KERNELS[key]


def _triton_version() -> str | None:
    """The installed triton's version, read without importing triton (TRITON_INTERPRET must be set first, and
    Dynamo cannot trace an import); None when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable but not installed as a distribution
        return "(version unknown)"


_TRITON_VERSION = _triton_version()


def triton_status() -> tuple[bool, str]:
    """Whether Triton can run, and why (not installed / no CUDA and no interpreter / ok)."""
    if os.environ.get("IAERF_DISABLE_TRITON", "0") == "1":
        return False, "disabled by IAERF_DISABLE_TRITON=1"
    if _TRITON_VERSION is None:
        return False, "triton is not installed (pip install triton)"
    return True, "triton " + _TRITON_VERSION


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_choice(device: torch.device | str, *, triton_ok: bool = True, native_op: str | None = None) -> tuple[str, str]:
    """Pick the implementation for a fused op on ``device``.

    Returns ``(name, reason)`` with name in {"triton", "cpp", "cuda", "reference"}:
      - CUDA tensors: Triton when installed (``triton_ok``), else the native CUDA op ``native_op`` when built, else
        the plain-autograd reference;
      - CPU tensors: the fused C++ op ``native_op`` when the extension is loaded, else the reference.
    """
    device = torch.device(device)
    if os.environ.get("IAERF_FORCE_REFERENCE", "0") == "1":
        return "reference", "IAERF_FORCE_REFERENCE=1"
    if device.type == "cuda":
        if triton_ok:
            ok, why = triton_status()
            if ok:
                return "triton", why
        if native_op is not None and has_native_kernel(native_op, "cuda"):
            return "cuda", f"torch.ops.iaerf.{native_op} (CUDA kernel compiled in)"
        return "reference", "no Triton and no CUDA kernels for this op" + _why_no_extension()
    if device.type == "cpu":
        if native_op is not None and has_native_kernel(native_op, "cpu"):
            return "cpp", f"torch.ops.iaerf.{native_op} (fused C++ kernel)"
        return "reference", "native C++ op unavailable" + _why_no_extension()
    return "reference", f"no fused kernel for device type {device.type!r}"


def _why_no_extension() -> str:
    return f" ({_LOAD_ERROR})" if _LOAD_ERROR else ""
