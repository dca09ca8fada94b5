"""The registry of iaerf's fused ops: each op is declared once, by :func:`register_op` in its op file, and
:func:`backend_info` / :func:`kernel_choice` / :func:`select_backend` read what was declared.

An op is one entry of the dispatcher, ``torch.ops.iaerf.<name>``. Its schema is written only in its op file
(iaerf/ops/<op>.py) and defined here; iaerf._C only registers kernels for it (``TORCH_LIBRARY_IMPL`` in
csrc/cpu/<op>.cpp and csrc/cuda/<op>_cuda.cpp), which the dispatcher accepts before or after the definition.
:func:`register_op` also registers the fake implementation (torch.compile / FakeTensor tracing) and, when given and
triton is usable, the Triton launcher as the op's CUDA kernel. The dispatcher, not Python, then picks the kernel
for the tensors' device, so a compiled graph holds the op itself: no graph break on either device.

What remains a choice in Python -- the plain-torch reference where no kernel serves the device (no extension, no
triton), a forced ``backend=`` argument, the reference under torch.func transforms -- is made by
:func:`kernel_choice` and :func:`select_backend` alone, and :func:`backend_info` reports the same decisions, so
what is reported is what runs. Both are traceable by Dynamo: the dispatcher is queried once, at registration, and
the answers are kept.

Triton runs as an ordinary CUDA kernel of a custom op rather than through ``torch.library.triton_op``: that
defines an op of its own and cannot add a kernel to one whose CPU kernel comes from C++.

The internal ops ``cpu_capability()`` and ``built_with_cuda()`` (what iaerf._C was built with, not fused ops) keep
their C++ definitions (csrc/cpu/dispatch.cpp, csrc/module.cpp) and are not in this registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from iaerf.core import extension

__all__ = ["backend_info"]

DEVICE_TYPES = ("cpu", "cuda")
BACKENDS = (None, "auto", "triton", "cpp", "reference")

_LIB = torch.library.Library("iaerf", "FRAGMENT")


@dataclass(frozen=True)
class RegisteredOp:
    """One op of the registry.

    name: ``torch.ops.iaerf.<name>``; schema: "name(args) -> results", as its op file declares it;
    compiled: the device types ("cpu", "cuda") that iaerf._C has a kernel for; triton: whether its CUDA kernel is
    a Triton launcher registered by :func:`register_op`.
    """

    name: str
    schema: str
    compiled: frozenset[str]
    triton: bool


# op name -> its registration
OPS: dict[str, RegisteredOp] = {}
# public function name -> the op whose kernels serve it (the rows of backend_info)
PUBLIC_FUNCTIONS: dict[str, str] = {}


def register_op(schema: str, *, fake: Callable, cuda_triton: Callable | None = None,
                public: str | None = None) -> RegisteredOp:
    """Declare the op ``schema`` ("name(args) -> results"): define it in the ``iaerf`` namespace, record which
    devices iaerf._C compiled a kernel for, register its fake implementation and, when cuda_triton is given and
    triton is usable, that launcher as its CUDA kernel. public: the public function it serves, reported by
    :func:`backend_info`.
    """
    name = schema.split("(", 1)[0]
    if name in OPS:
        raise ValueError(f"schema: torch.ops.iaerf.{name} is already registered ({OPS[name].schema})")
    defined = _defined_schema(name)
    if defined is None:
        _LIB.define(schema)
    elif defined != schema:  # an iaerf._C built from older sources, which defined its ops itself
        raise RuntimeError(f"torch.ops.iaerf.{name} is already defined as {defined!r}, not as its op file declares "
                           f"({schema!r}): rebuild iaerf._C (python setup.py build_ext --inplace)")
    # Read now, while only iaerf._C's kernels are registered: the dispatcher cannot tell a C++ kernel from the
    # Triton one added below.
    compiled = frozenset(d for d in DEVICE_TYPES
                         if torch._C._dispatch_has_kernel_for_dispatch_key(f"iaerf::{name}", d.upper()))
    torch.library.register_fake(f"iaerf::{name}", fake, lib=_LIB)
    triton = cuda_triton is not None and extension.triton_status()[0]
    if triton:
        _LIB.impl(name, cuda_triton, "CUDA")
    OPS[name] = op = RegisteredOp(name, schema, compiled, triton)
    if public is not None:
        register_public_function(public, name)
    return op


def _defined_schema(name: str) -> str | None:
    """The schema of ``iaerf::<name>`` as the dispatcher holds it (without the namespace), or None if undefined."""
    try:
        return str(torch._C._dispatch_find_schema_or_throw(f"iaerf::{name}", "").schema()).removeprefix("iaerf::")
    except RuntimeError:
        return None


def register_public_function(public: str, op: str) -> None:
    """Report the public function ``public`` in :func:`backend_info` as served by ``torch.ops.iaerf.<op>`` (a
    function with no op of its own, such as energy over logsumexp)."""
    if op not in OPS:
        raise ValueError(f"op: torch.ops.iaerf.{op} is not registered (register_op it first)")
    PUBLIC_FUNCTIONS[public] = op


def has_compiled_kernel(op: str, device_type: str) -> bool:
    """Whether iaerf._C compiled a kernel of the registered op ``op`` for ``device_type`` ("cpu" / "cuda")."""
    return op in OPS and device_type in OPS[op].compiled


def kernel_choice(op: str, device: torch.device | str) -> tuple[str, str]:
    """The implementation of ``torch.ops.iaerf.<op>``'s default call on ``device``: ``(name, reason)`` with name in
    {"triton", "cpp", "cuda", "reference"}.

    CUDA: its Triton kernel when registered and triton is usable, else its compiled CUDA kernel, else the
    plain-torch reference; CPU: its compiled C++ kernel, else the reference. IAERF_FORCE_REFERENCE=1 forces the
    reference everywhere.
    """
    device = torch.device(device)
    if os.environ.get("IAERF_FORCE_REFERENCE", "0") == "1":
        return "reference", "IAERF_FORCE_REFERENCE=1"
    registered = OPS.get(op)
    if device.type == "cuda":
        if registered is not None and registered.triton:
            ok, why = extension.triton_status()
            if ok:
                return "triton", why
        if has_compiled_kernel(op, "cuda"):
            return "cuda", f"torch.ops.iaerf.{op} (CUDA kernel compiled in)"
        return "reference", "no Triton and no CUDA kernels for this op" + _why_no_extension()
    if device.type == "cpu":
        if has_compiled_kernel(op, "cpu"):
            return "cpp", f"torch.ops.iaerf.{op} (fused C++ kernel)"
        return "reference", "native C++ op unavailable" + _why_no_extension()
    return "reference", f"no fused kernel for device type {device.type!r}"


def _why_no_extension() -> str:
    error = extension.extension_error()
    return f" ({error})" if error else ""


def needs_reference_for_ad() -> bool:
    """True inside torch.func transforms (grad, jvp, vmap, hessian, ...) and while forward-mode AD
    (torch.autograd.forward_ad) is active: the fused kernels have no batching or forward-mode rules, so the
    differentiable reference runs there (documented fallback). Reverse mode, including double backward, stays on
    the fused path.

    While torch.compile traces, the interpreter stack is not informative (dynamo answers non-None), and dynamo
    traces the autograd.Function itself, so the fused path is kept there.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def select_backend(op: str, logits: torch.Tensor, backend: str | None) -> str:
    """Return "triton", "cpp", "cuda" or "reference" for a fused op's call on these [N, K] logits.

    "triton" (on CUDA), "cpp" and "cuda" all call torch.ops.iaerf.<op>, whose registered kernel for the device
    runs; "triton" on CPU tensors (the interpreter) calls the Triton launcher directly. backend=None/"auto" follows
    :func:`kernel_choice` (the rule backend_info reports), with two refinements: under torch.func transforms or
    forward-mode AD the differentiable reference runs (documented fallback), and float64 logits, which the Triton
    kernels do not take, run the reference on CUDA. A forced backend that cannot run raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {[b for b in BACKENDS if b is not None]}, got {backend!r}")
    if needs_reference_for_ad():
        return "reference"
    device_type = logits.device.type
    if backend in (None, "auto"):
        impl, _ = kernel_choice(op, logits.device)
        if impl == "triton" and logits.dtype == torch.float64:
            return "reference"
        return impl
    if backend == "triton":
        ok, why = extension.triton_status()
        if not ok:
            raise ValueError(f"backend='triton' is unavailable: {why}")
        if not OPS[op].triton:
            raise ValueError(f"backend='triton' is unavailable: no Triton kernel was registered for "
                             f"torch.ops.iaerf.{op} when iaerf.ops was imported")
        if device_type == "cpu" and not extension.triton_interpreting():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if logits.dtype == torch.float64:
            raise ValueError("backend='triton' does not take float64 logits; use backend='cpp' or 'reference'")
        return "triton"
    if backend == "cpp":
        if device_type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, logits are on {logits.device}")
        if not has_compiled_kernel(op, "cpu"):
            raise ValueError(f"backend='cpp' is unavailable: torch.ops.iaerf.{op} is not built" + _why_no_extension())
        return "cpp"
    return "reference"


def backend_info() -> dict:
    """Describe the implementation of every public op function on every device type.

    Returns a dict ``{"extension": {...}, "triton": {...}, "ops": {op: {device: {"impl": str, "reason": str}}}}``;
    "impl" is one of "triton", "cpp", "cuda", "reference".

    >>> import iaerf
    >>> info = iaerf.backend_info()
    >>> sorted(info["ops"]["logsumexp"])
    ['cpu', 'cuda']
    """
    triton_ok, triton_why = extension.triton_status()
    ops = {}
    for public, op in sorted(PUBLIC_FUNCTIONS.items()):
        ops[public] = {}
        for device in DEVICE_TYPES:
            impl, reason = kernel_choice(op, device)
            if device == "cuda" and not torch.cuda.is_available():
                reason += " [no CUDA device on this machine]"
            ops[public][device] = {"impl": impl, "reason": reason}
    return {
        "extension": {
            "loaded": extension.extension_loaded(),
            "error": extension.extension_error(),
            "built_with_cuda": extension.built_with_cuda(),
        },
        "triton": {"available": triton_ok, "detail": triton_why, "interpreter": extension.triton_interpreting()},
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "ops": ops,
    }
