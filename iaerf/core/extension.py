"""Loading of the native extension ``iaerf._C``, and what it and triton provide.

Importing this module loads iaerf._C, whose kernels register with the dispatcher; the fused ops' schemas, and
the choice of an implementation per device, belong to :mod:`iaerf.ops.registry`, which imports this module first,
so every kernel iaerf._C compiled is registered when it reads the dispatcher. The triton queries read values
cached at import, so Dynamo traces them without a graph break.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch

_C = None
_LOAD_ERROR: str | None = None

try:  # the extension registers its kernels (and its internal ops) with the dispatcher on import
    from iaerf import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # noqa: BLE001 - any failure means "use the pure-torch paths", with the reason kept
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def extension_error() -> str | None:
    """Why ``iaerf._C`` could not be imported (None when it was)."""
    return _LOAD_ERROR


def has_native_op(name: str) -> bool:
    """True when iaerf._C is loaded and ``torch.ops.iaerf.<name>`` is defined (for the internal ops that iaerf._C
    defines itself, such as ``cpu_capability``; a fused op's kernels are reported by :mod:`iaerf.ops.registry`)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.iaerf, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def built_with_cuda() -> bool:
    return has_native_op("built_with_cuda") and bool(torch.ops.iaerf.built_with_cuda())


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
