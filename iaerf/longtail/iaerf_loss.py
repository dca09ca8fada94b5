"""Algorithm 1's per-batch loss as a module a user drops into their own training loop: :class:`IAERFLoss`.

    loss = mean_i (L_i + c_i E_i),     E_i = -logsumexp f(x_i),     c = coefficients[indices]

L_i is the per-example training loss (cross-entropy by default, through the fused
:func:`iaerf.ops.energy_regularized_cross_entropy`; any ``train_loss(logits [b, K], labels [b]) -> [b]`` otherwise),
and c_i = -beta I_val(x_i) / max_i |I_val(x_i)| (:func:`energy_coefficients`) is addressed by each example's index
in the training set, which is why the loop must know the indices of its batches. :func:`iaerf.longtail.finetune`
steps through this very module, so a user's loop and iaerf's own give the same loss and the same per-sample cap.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from iaerf.core.losses import loss_from_logits
from iaerf.influence.task import InfluenceTask
from iaerf.ops import energy, energy_regularized_cross_entropy

__all__ = ["IAERFLoss", "IAERFLossParts", "energy_coefficients", "cap_per_sample", "LOSS_CAPS"]

LOSS_CAPS = ("none", "per_sample")


def energy_coefficients(influence: torch.Tensor, beta: float) -> torch.Tensor:
    """c_i = -beta * I_val(x_i) / max_i |I_val(x_i)|  (Algorithm 1 line 3 and Eq. 10). influence [n] -> [n] float32."""
    if not isinstance(influence, torch.Tensor):
        raise TypeError(f"influence must be a torch.Tensor, got {type(influence).__name__}")
    if influence.dim() != 1 or influence.numel() == 0:
        raise ValueError(f"influence must be a non-empty 1-D tensor [n_train], got shape {tuple(influence.shape)}")
    if not bool(torch.isfinite(influence).all()):
        raise ValueError("influence contains NaN or inf")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    i_max = influence.abs().max()
    if float(i_max) == 0.0:
        raise ValueError("influence is zero for every training point (I_max = 0): nothing to regularize")
    return (-float(beta) * influence.double() / i_max.double()).float()


def cap_per_sample(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                   base: torch.Tensor | None = None) -> torch.Tensor:
    """Scale c_i so that |c_i E_i| <= L_i (App. B, per-sample reading); logits [B, K], y [B], c [B] -> [B] in the
    logits' dtype. L_i: ``base`` [B] (a training loss other than CE, detached) or, when None, CE_i. A negative L_i
    (a loss that can go below 0) leaves no room for an energy term: its c_i becomes 0."""
    e = energy(logits).to(logits.dtype)
    ce = loss_from_logits(logits, y) if base is None else base.to(logits.dtype)
    c = c.to(logits.dtype)
    term = (c * e).abs()
    scale = torch.where(term > ce, ce.clamp_min(0) / term.clamp_min(torch.finfo(term.dtype).tiny),
                        torch.ones_like(term))
    return c * scale


class IAERFLossParts(NamedTuple):
    """What :meth:`IAERFLoss.forward` returns with ``return_parts=True``: the scalar ``loss`` (with its graph) and,
    detached, per example ``[b]``: ``train_loss`` (L_i), ``energy`` (E_i), ``cross_entropy`` (CE_i, the same
    tensor as ``train_loss`` for the default loss) and the ``coefficients`` c_i used (after the cap)."""

    loss: torch.Tensor
    train_loss: torch.Tensor
    energy: torch.Tensor
    cross_entropy: torch.Tensor
    coefficients: torch.Tensor


class IAERFLoss(nn.Module):
    """mean_i (L_i + c_i E_i) over a batch, c = ``coefficients[indices]`` (Algorithm 1 / Eq. 10).

    Args:
        coefficients: c [n], one finite real per training point (:func:`energy_coefficients`, or
            :meth:`from_influence`); a buffer, so ``.to(device)`` moves it.
        train_loss: ``train_loss(logits [b, K], labels [b]) -> [b]``, the per-example L_i (e.g.
            :attr:`iaerf.InfluenceTask.train_loss`); None (or iaerf's default cross-entropy) takes the fused
            energy-CE op. An ``nn.Module`` loss becomes a submodule (``.to(device)`` moves its weights too).
        energy_cap: "none" (Eq. 10 as written) or "per_sample" (App. B: where |c_i E_i| > L_i, c_i is scaled down
            to |c_i E_i| = L_i, on the current batch, detached). App. B's "global" reading rescales all
            coefficients once per run: pass coefficients so scaled (:func:`iaerf.longtail.finetune` does).

    ``forward(logits [b, K], labels [b], indices [b])`` -> scalar loss; ``indices`` are the examples' positions in
    the training set the coefficients belong to (integer tensor, any device).
    """

    def __init__(self, coefficients: torch.Tensor, *, train_loss: Callable | None = None, energy_cap: str = "none"):
        super().__init__()
        if not isinstance(coefficients, torch.Tensor):
            raise TypeError(f"coefficients must be a torch.Tensor [n_train], got {type(coefficients).__name__}")
        if coefficients.dim() != 1 or coefficients.numel() == 0 or not coefficients.is_floating_point():
            raise ValueError(f"coefficients must be a non-empty floating 1-D tensor [n_train], got "
                             f"{coefficients.dtype} {tuple(coefficients.shape)}")
        if not bool(torch.isfinite(coefficients).all()):
            at = int((~torch.isfinite(coefficients)).nonzero()[0])
            raise ValueError(f"coefficients must be finite, got {float(coefficients[at])} at index {at}")
        if train_loss is not None and not callable(train_loss):
            raise TypeError(f"train_loss must be callable (logits [b, K], labels [b]) -> [b] or None, got "
                            f"{type(train_loss).__name__}")
        if energy_cap not in LOSS_CAPS:
            hint = (" ('global' rescales every coefficient once per run: pass coefficients so scaled, as "
                    "finetune(energy_cap='global') does)" if energy_cap == "global" else "")
            raise ValueError(f"energy_cap must be one of {LOSS_CAPS}, got {energy_cap!r}{hint}")
        self.register_buffer("coefficients", coefficients.detach())
        self.train_loss = None if train_loss is loss_from_logits else train_loss
        self.energy_cap = energy_cap

    @classmethod
    def from_influence(cls, influence: torch.Tensor, beta: float, **kwargs) -> "IAERFLoss":
        """The loss with c = :func:`energy_coefficients` (influence [n], beta); ``kwargs`` as the constructor's."""
        return cls(energy_coefficients(influence, beta), **kwargs)

    def _check(self, logits, labels, indices) -> torch.Tensor:
        """``indices`` checked (shapes, dtype, range) and on the coefficients' device."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
            got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a floating tensor [b, K], got {got}")
        b = logits.shape[0]
        for name, t in (("labels", labels), ("indices", indices)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor [b] = [{b}] (one per row of logits), got {got}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor of training-set positions, got {indices.dtype}")
        n = self.coefficients.shape[0]
        if b and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise IndexError(f"indices must lie in [0, {n}) (one coefficient per training point), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices.to(self.coefficients.device)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, *,
                return_parts: bool = False):
        """mean_i (L_i + c_i E_i) of the batch (a scalar in the logits' dtype; float32 for lower precisions), or
        :class:`IAERFLossParts` when ``return_parts``."""
        c = self.coefficients[self._check(logits, labels, indices)]
        capped = self.energy_cap == "per_sample"
        if self.train_loss is None:  # plain CE: the fused energy-CE op, one pass over the logits
            if capped:
                c = cap_per_sample(logits.detach(), labels, c)
            parts = energy_regularized_cross_entropy(logits, labels, c, reduction="mean", return_parts=True)
            if not return_parts:
                return parts.loss
            return IAERFLossParts(parts.loss, parts.cross_entropy.detach(), parts.energy.detach(),
                                  parts.cross_entropy.detach(), c.detach())
        base = self.train_loss(logits, labels)  # L_i [b]
        if not isinstance(base, torch.Tensor) or tuple(base.shape) != (logits.shape[0],):
            InfluenceTask(train_loss=self.train_loss).check_outputs(logits, labels, "loss")  # raises its message
            raise ValueError(f"train_loss returned {type(base).__name__} {getattr(base, 'shape', '')} on a batch of "
                             f"{logits.shape[0]}; it must return one value per example")
        e = energy(logits)  # of the raw logits: the E whose influence I_val measured
        if capped:
            c = cap_per_sample(logits.detach(), labels, c, base.detach())
        loss = (base + c.to(e.dtype) * e).mean()
        if not return_parts:
            return loss
        with torch.no_grad():  # reported beside L_i, so that every variant's history reads alike
            ce = loss_from_logits(logits, labels)
        return IAERFLossParts(loss, base.detach(), e.detach(), ce, c.detach())

    def extra_repr(self) -> str:
        loss = "cross-entropy" if self.train_loss is None else getattr(self.train_loss, "__name__", None) or \
            type(self.train_loss).__name__
        return f"n={self.coefficients.shape[0]}, train_loss={loss}, energy_cap={self.energy_cap!r}"
