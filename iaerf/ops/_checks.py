"""Argument validation shared by the fused ops (the backend is chosen by :mod:`iaerf.ops.registry`).

Everything here runs before any kernel: bad input raises ValueError/TypeError naming the argument. Only metadata
is inspected, except the values of the [N] targets (:func:`check_target_range`) and of an energy_coef tensor
(:func:`coef_tensor`), which the C++ path skips because its op runs the same checks in its own first pass. On CPU
those raise ValueError naming the first bad index; on a GPU they are device-side asserts (see :func:`_raise_if_any`),
so that a training step never waits on the host and stays capturable in a CUDA graph.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from iaerf.ops.reference import acc_dtype

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class (K >= 1), got shape {tuple(logits.shape)}")


def check_target(target, logits: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must have shape [N] = [{logits.shape[0]}], got shape {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _is_vmapped(t: torch.Tensor) -> bool:
    """Whether any functorch wrapper layer of t (grad, jvp, vmap, nested) is a vmap batch."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _value_checks_skipped(t: torch.Tensor) -> bool:
    """Whether data-dependent checks of t cannot run: while torch.compile traces (a data-dependent branch would
    break the graph; the native ops still check their targets there) and for vmap-batched tensors (no Python
    branch exists per batch entry)."""
    return torch.compiler.is_compiling() or _is_vmapped(t)


def _raise_if_any(bad: torch.Tensor, message: Callable[[int | None], str]) -> None:
    """Reject the input when any entry of the bool tensor bad is True.

    On CUDA: a device-side assert carrying message(None), as torch's own CUDA losses do for their targets. Reading
    the flag back on the host would be a sync per call (and make the step impossible to capture in a CUDA graph);
    the price is that a failed assert ends the CUDA context, as any device-side assert does. Meta tensors take the
    same path (they hold no values; their assert is a no-op). Elsewhere (CPU, and devices without an async assert):
    ValueError(message(i)) for the first bad flat index i.
    """
    if bad.device.type in ("cuda", "meta"):
        torch._assert_async(~bad.any(), message(None))
    elif bool(bad.any()):
        raise ValueError(message(int(bad.reshape(-1).nonzero()[0, 0])))


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Reject a target outside [0, K) that is not ignore_index (see :func:`_raise_if_any`: ValueError on CPU, a
    device-side assert on a GPU).

    Skipped as :func:`_value_checks_skipped` says; an out-of-range vmap-batched target then fails inside the
    reference's gather.
    """
    if _value_checks_skipped(target):
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)

    def message(i):
        where = " holds a value" if i is None else f"[{i}] = {int(target[i])} is"
        return f"target{where} outside [0, K) with K = {num_classes} and is not ignore_index ({ignore_index})"

    _raise_if_any(bad, message)


def check_ignore_index(ignore_index) -> None:
    """ignore_index must be a Python int that fits int64 (the native ops' and the Triton kernels' argument)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 ([-2**63, 2**63)), got {ignore_index}")


def _check_representable(name: str, value: float, logits: torch.Tensor, normal: bool) -> None:
    """ValueError naming `name` unless |value| is at most the largest finite value of the accumulation dtype
    (and, with normal=True, at least its smallest normal value)."""
    dtype = acc_dtype(logits)
    info = torch.finfo(dtype)
    low = info.tiny if normal else 0.0
    if low <= abs(value) <= info.max:
        return
    bound = f"in [{info.tiny:.4g}, {info.max:.4g}]" if normal else f"at most {info.max:.4g}"
    wider = "; float64 logits compute in float64" if dtype != torch.float64 else ""
    raise ValueError(f"{name} = {value!r} cannot be represented in {dtype} (the accumulation dtype for "
                     f"{logits.dtype} logits): its magnitude must be {bound}{wider}")


def _real_as_float(value, name: str) -> float:
    """A finite real number as a float, else TypeError / ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} is beyond the float range (an int of {value.bit_length()} bits)") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_temperature(temperature, logits: torch.Tensor) -> float:
    """The temperature T as a float: positive, finite, and a normal number of the accumulation dtype (a T cast to
    0 or inf would make the energy NaN, a subnormal T has lost most of its significant bits)."""
    t = _real_as_float(temperature, "temperature")
    if t <= 0:
        raise ValueError(f"temperature must be positive, got {t}")
    _check_representable("temperature", t, logits, normal=True)
    return t


def coef_tensor(energy_coef, logits: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """energy_coef (a real number, a 0-dim tensor or an [N] tensor) as a tensor of the accumulation dtype.

    Every coefficient must be finite in that dtype; a tensor's values are checked as :func:`_raise_if_any` says,
    unless check_values is False and no cast is needed (the C++ ops check them in their own scan). The cast is an
    autograd op, so a coefficient tensor that requires grad keeps its graph.
    """
    dtype = acc_dtype(logits)
    if isinstance(energy_coef, torch.Tensor):
        if not energy_coef.dtype.is_floating_point:
            raise TypeError(f"energy_coef must be a floating-point tensor or a real number, got {energy_coef.dtype}")
        if energy_coef.dim() != 0 and energy_coef.shape != (logits.shape[0],):
            raise ValueError(
                f"energy_coef must be a scalar or have shape [N] = [{logits.shape[0]}], got shape "
                f"{tuple(energy_coef.shape)}"
            )
        if energy_coef.device != logits.device:
            raise ValueError(f"energy_coef is on {energy_coef.device} but logits are on {logits.device}")
        coef = energy_coef.to(dtype)
        # a cast can turn a finite value infinite (1e300 in float32): that case is checked here, naming the value
        if (check_values or energy_coef.dtype != dtype) and not _value_checks_skipped(coef):
            given = energy_coef.detach().reshape(-1)

            def message(i):
                where = " holds a value that is" if i is None else f"[{i}] = {float(given[i])} is"
                return f"energy_coef{where} not finite in {dtype} (the accumulation dtype for {logits.dtype} logits)"

            _raise_if_any(~torch.isfinite(coef.detach().reshape(-1)), message)
        return coef
    if isinstance(energy_coef, bool) or not isinstance(energy_coef, numbers.Real):
        raise TypeError(f"energy_coef must be a real number or a tensor, got {type(energy_coef).__name__}")
    value = _real_as_float(energy_coef, "energy_coef")
    _check_representable("energy_coef", value, logits, normal=False)
    # torch.full, not torch.tensor: on CUDA it is an async fill rather than a blocking host-to-device copy
    return torch.full((), value, dtype=dtype, device=logits.device)


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {[c for c in choices if c is not None]}, got {value!r}")


def keep_probs(logits: torch.Tensor, impl: str) -> bool:
    """Whether the C++ forward should keep softmax(z) for an in-place backward (see _EnergyCE).

    Only when a backward can follow (grad mode on, logits require grad), for fp32/fp64 logits (the buffer has the
    logits' dtype, and fp16/bf16 softmax would lose the accuracy of confident rows), and not while torch.compile
    traces (a tensor kept on ctx and mutated in backward is outside what dynamo traces).
    """
    return (
        impl == "cpp"
        and logits.requires_grad
        and torch.is_grad_enabled()
        and logits.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )
