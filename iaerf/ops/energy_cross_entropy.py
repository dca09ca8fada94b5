"""Energy-regularized cross-entropy of Algorithm 1, fused: l_i = CE(z_i, y_i) + c_i E(z_i), E = -logsumexp.

With c_i = -beta I_val(x_i) / I_max this is the fine-tuning loss of Algorithm 1; its logits gradient is
(1 - c_i) softmax(z_i) - onehot(y_i) (paper Eq. 14, with beta_x = c_i). The fused forward makes one pass over
each row. The gradient then comes either from the saved fp32 lse [N] (Triton, fp16/bf16: the backward reads the
logits once and writes the gradient once) or, on CPU for fp32/fp64, from the softmax the forward kept, turned into
the gradient in place (the exp, not memory traffic, bounds a CPU; see csrc/cpu/softmax_rows.h).

This file holds the op's registration (torch.ops.iaerf.energy_ce_forward / energy_ce_backward: C++ on CPU, the
Triton launchers below on CUDA; see iaerf.ops.registry), its autograd and its public function and module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from iaerf.ops import _checks, registry
from iaerf.ops.reference import (acc_dtype, empty_like_logits, empty_rows, reference_energy_ce, reference_logsumexp,
                                 upcast)

__all__ = ["EnergyCEParts", "EnergyRegularizedCrossEntropy", "energy_regularized_cross_entropy"]


def _kernels():
    from iaerf.ops import _triton_kernels

    return _triton_kernels


def triton_forward(logits, target, coef, ignore_index: int):
    """Triton launcher: logits [N, K] (fp32/fp16/bf16), target [N] int, coef 0-dim or [N] fp32 ->
    (loss, ce, lse), each [N] fp32."""
    tk = _kernels()
    logits = tk.row_major(logits)
    N, K = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    ce = torch.empty_like(loss)
    lse = torch.empty_like(loss)
    if N == 0:
        return loss, ce, lse
    coef, coef_stride = tk.coef_arg(coef)
    rows, block, chunked, num_warps, grid = tk.tiling(N, K)
    with tk.on_device(logits):
        tk._forward_kernel[(grid,)](
            logits, logits.stride(0), target.contiguous(), coef, coef_stride, loss, ce, lse, N, K, ignore_index,
            HAS_TARGET=True, ROWS=rows, BLOCK=block, CHUNKED=chunked, num_warps=num_warps,
        )
    return loss, ce, lse


def triton_backward(grad, logits, target, coef, lse, ignore_index: int):
    """Triton launcher: grad [N] fp32 (any stride) -> grad_logits [N, K] in the logits' dtype."""
    return _kernels().launch_backward(grad, logits, lse, target, coef, ignore_index)


def _fake_forward(logits, target, energy_coef, ignore_index):
    return tuple(empty_rows(logits) for _ in range(3))


# The CUDA kernels look the launchers up at call time, so that a test can spy on them. The *_with_probs /
# *_from_probs_ pair (fp32/fp64, CPU only: the softmax kept for an in-place backward, and the forward's count of
# rows not ignored, the "mean" divisor) has no Triton kernel.
registry.register_op(
    "energy_ce_forward(Tensor logits, Tensor target, Tensor energy_coef, int ignore_index) "
    "-> (Tensor loss, Tensor cross_entropy, Tensor lse)",
    fake=_fake_forward, cuda_triton=lambda *args: triton_forward(*args), public="energy_regularized_cross_entropy")
registry.register_op(
    "energy_ce_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor energy_coef, Tensor lse, "
    "int ignore_index) -> Tensor",
    fake=lambda grad_loss, logits, *_: empty_like_logits(logits), cuda_triton=lambda *args: triton_backward(*args))
registry.register_op(
    "energy_ce_forward_with_probs(Tensor logits, Tensor target, Tensor energy_coef, int ignore_index) "
    "-> (Tensor loss, Tensor cross_entropy, Tensor lse, Tensor probs, Tensor num_valid)",
    fake=lambda logits, *args: (*_fake_forward(logits, *args), empty_like_logits(logits),
                                logits.new_empty((), dtype=acc_dtype(logits))))
registry.register_op(
    "energy_ce_backward_from_probs_(Tensor grad_loss, Tensor(a!) probs, Tensor target, Tensor energy_coef, "
    "int ignore_index) -> ()",
    fake=lambda *args: None)


class EnergyCEParts(NamedTuple):
    """Result of ``energy_regularized_cross_entropy(..., return_parts=True)``.

    loss: the reduced loss (differentiable). cross_entropy, energy: [N] per-row values from the same pass,
    detached (for logging and plots); ignored rows have cross_entropy 0 and their true energy.
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    energy: torch.Tensor


def _reduce(loss: torch.Tensor, num_valid: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """"none": [N]; "sum"; "mean" over the num_valid non-ignored rows (0/0 = nan when there are none, as
    F.cross_entropy)."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / num_valid
    return loss


def _num_valid(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor | None:
    return (target != ignore_index).sum() if reduction == "mean" else None


class _EnergyCE(torch.autograd.Function):
    """(logits [N, K], target [N], coef 0-dim or [N]) -> (loss, ce [N], lse [N]); only loss is differentiable.

    The reduction happens inside (loss is [N] for "none", else a scalar), so that the small per-call graph of a
    training step is one node: on CPU at K ~ 10 the autograd bookkeeping of a separate sum/div is a visible
    fraction of the step.

    keep_probs (C++ path, fp32/fp64, a backward expected): the forward also returns softmax(z) [N, K], kept on ctx
    and turned into the gradient in place by the first backward (a multiply per element instead of an exp). A
    second backward through the same graph (retain_graph=True) finds it consumed and remakes it with the same
    kernel, so repeated backwards agree bitwise.
    """

    @staticmethod
    def forward(ctx, logits, target, coef, ignore_index: int, impl: str, keep_probs: bool, reduction: str):
        # gradients of the non-differentiable ce and lse stay None instead of zero tensors made per step
        ctx.set_materialize_grads(False)
        ctx.probs = num_valid = None
        if keep_probs:
            loss, ce, lse, ctx.probs, num_valid = torch.ops.iaerf.energy_ce_forward_with_probs(
                logits, target, coef, ignore_index)
        elif impl == "triton" and not logits.is_cuda:  # the interpreter: no CPU kernel of the op is Triton
            loss, ce, lse = triton_forward(logits, target, coef, ignore_index)
        else:
            loss, ce, lse = torch.ops.iaerf.energy_ce_forward(logits, target, coef, ignore_index)
        ctx.impl, ctx.ignore_index, ctx.keep_probs, ctx.reduction = impl, ignore_index, keep_probs, reduction
        if num_valid is None or reduction != "mean":  # the C++ op counted the rows; else count them (or None)
            num_valid = _num_valid(target, ignore_index, reduction)
        ctx.num_valid = num_valid
        ctx.save_for_backward(logits, target, coef, lse)
        ctx.mark_non_differentiable(ce, lse)
        return _reduce(loss, ctx.num_valid, reduction), ce, lse

    @staticmethod
    def backward(ctx, grad, _grad_ce, _grad_lse):
        if grad is None:  # only ce / lse reached the graph's output: they carry no gradient
            return None, None, None, None, None, None, None
        logits, target, coef, lse = ctx.saved_tensors
        # per-row gradient of the (reduced) loss; an expanded view, the kernels read it with stride 0
        if ctx.reduction == "mean":
            grad = (grad / ctx.num_valid).expand(lse.shape)
        elif ctx.reduction == "sum":
            grad = grad.expand(lse.shape)
        grad_logits = grad_coef = None
        if torch.is_grad_enabled():
            # create_graph=True: differentiable ops on the logits, so double backward works. Ignored rows are
            # zeroed first so that NaN/-inf there cannot leak into second-order terms.
            valid = target != ctx.ignore_index
            grad = torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            z = torch.where(valid[:, None], upcast(logits), torch.zeros((), dtype=lse.dtype, device=lse.device))
            probs = torch.softmax(z, dim=1)
            if ctx.needs_input_grad[0]:
                onehot = torch.nn.functional.one_hot(torch.where(valid, target, 0).long(), z.shape[1]).to(z.dtype)
                grad_logits = ((grad * (1 - coef))[:, None] * probs - grad[:, None] * onehot).to(logits.dtype)
            energy = -reference_logsumexp(z)  # max-shifted: its own derivative stays accurate for large logits
        else:
            if ctx.needs_input_grad[0]:
                if ctx.keep_probs:
                    grad_logits, ctx.probs = ctx.probs, None
                    if grad_logits is None:  # consumed by an earlier backward: remake it the same way (bitwise)
                        grad_logits = torch.ops.iaerf.energy_ce_forward_with_probs(logits, target, coef,
                                                                                   ctx.ignore_index)[3]
                    torch.ops.iaerf.energy_ce_backward_from_probs_(grad, grad_logits, target, coef, ctx.ignore_index)
                elif ctx.impl == "triton" and not logits.is_cuda:
                    grad_logits = triton_backward(grad, logits, target, coef, lse, ctx.ignore_index)
                else:
                    grad_logits = torch.ops.iaerf.energy_ce_backward(grad, logits, target, coef, lse, ctx.ignore_index)
            energy = None
        if ctx.needs_input_grad[2]:
            # d l_i / d c_i = E_i, and 0 on ignored rows
            energy = -lse if energy is None else energy
            grad_coef = torch.where(target != ctx.ignore_index, grad * energy, torch.zeros((), dtype=lse.dtype,
                                                                                           device=lse.device))
            if coef.dim() == 0:
                grad_coef = grad_coef.sum()
        return grad_logits, None, grad_coef, None, None, None, None


def energy_regularized_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    energy_coef: float | torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    return_parts: bool = False,
    backend: str | None = None,
):
    """Fused l_i = CE(z_i, y_i) + c_i E(z_i) with E(z) = -logsumexp(z) (Algorithm 1 loss, Eq. 2 energy).

    Args:
        logits: [N, K] float32/float16/bfloat16/float64, any strides (never modified).
        target: [N] integer class indices in [0, K), or ignore_index.
        energy_coef: c, a real number or a tensor of shape [] or [N], finite in the accumulation dtype. A tensor
            that requires grad gets d l_i / d c_i = E_i.
        reduction: "mean" (over non-ignored rows, as F.cross_entropy; nan when there are none), "sum" or "none"
            ([N], ignored rows 0).
        ignore_index: target value (an int64) whose rows contribute 0 loss and get 0 gradient.
        return_parts: also return the per-row cross-entropy and energy from the same pass (detached).
        backend: None/"auto" (iaerf's dispatch rule), or force "triton", "cpp" or "reference".
    Returns:
        the loss (float32, float64 for float64 logits), or :class:`EnergyCEParts` when return_parts.
    """
    _checks.check_logits(logits)
    _checks.check_target(target, logits)
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    _checks.check_ignore_index(ignore_index)
    impl = registry.select_backend("energy_ce_forward", logits, backend)
    # the C++ op checks targets and coefficients itself, in its first pass
    coef = _checks.coef_tensor(energy_coef, logits, check_values=impl != "cpp")
    if impl not in ("cpp", "cuda"):
        _checks.check_target_range(target, logits.shape[1], ignore_index)
    if impl == "reference":
        loss, cross_entropy, lse = reference_energy_ce(logits, target, coef, ignore_index, with_parts=return_parts)
        loss = _reduce(loss, _num_valid(target, ignore_index, reduction), reduction)
    else:
        loss, cross_entropy, lse = _EnergyCE.apply(logits, target, coef, ignore_index, impl,
                                                   _checks.keep_probs(logits, impl), reduction)
    if return_parts:
        return EnergyCEParts(loss, cross_entropy, -lse)
    return loss


class EnergyRegularizedCrossEntropy(torch.nn.Module):
    """Module form of :func:`energy_regularized_cross_entropy`.

    ``forward(logits, target, energy_coef=None)`` uses the constructor's energy_coef when none is passed.
    """

    def __init__(self, energy_coef: float | torch.Tensor = 0.0, reduction: str = "mean", ignore_index: int = -100,
                 backend: str | None = None):
        super().__init__()
        _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
        _checks.check_ignore_index(ignore_index)
        self.energy_coef = energy_coef
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, logits, target, energy_coef=None):
        coef = self.energy_coef if energy_coef is None else energy_coef
        return energy_regularized_cross_entropy(logits, target, coef, self.reduction, self.ignore_index,
                                                backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, backend={self.backend!r}"
