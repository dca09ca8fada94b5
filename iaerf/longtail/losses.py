"""Baseline losses: LDAM (Cao et al. 2019), the class-balanced weights of DRW (Cui et al. 2019, "Class-balanced loss
based on effective number of samples"), and the per-point losses of the fine-tuning baselines: the logit-adjusted loss
(Menon et al. 2021, "Long-tail learning via logit adjustment"), which at tau = 1 is Balanced Softmax (Ren et al. 2020,
"Balanced meta-softmax for long-tailed visual recognition"), and class-balanced cross-entropy.

All are plain torch and run wherever the logits live (CPU or GPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from iaerf.core.losses import loss_from_logits
from iaerf.influence.task import InfluenceTask

__all__ = ["PerExampleLDAM", "ldam_task", "ldam_margins", "class_balanced_weights", "LDAMLoss", "log_prior", "logit_adjusted_cross_entropy",
           "class_balanced_point_weights", "class_balanced_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def _check_counts(counts) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"counts must be a 1-D sequence of >= 2 per-class counts, got shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()):
        raise ValueError(f"counts must be finite, got {counts.tolist()}")
    if bool((counts <= 0).any()):
        raise ValueError("counts: every class needs at least one training example")
    return counts


def ldam_margins(counts, max_m: float = 0.5) -> torch.Tensor:
    """LDAM margins m_j proportional to n_j^(-1/4), rescaled so the largest is ``max_m``. counts [C] -> [C] float32."""
    if not max_m > 0:
        raise ValueError(f"max_m must be > 0, got {max_m}")
    m = _check_counts(counts).pow(-0.25)
    return (m * (max_m / m.max())).float()


def class_balanced_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """DRW / class-balanced weights w_j = (1 - b) / (1 - b^n_j), normalised to sum to C. counts [C] -> [C] float32.

    b = 0.9999 is the CIFAR value. For tiny data sets (digits: n_j <= 124) b = 0.9999 makes w_j ~ 1/n_j (plain inverse
    frequency); iaerf's digits preset uses b = 0.996, which keeps b^n_max at CIFAR's 0.9999^5000 ~ 0.61.
    """
    return _class_balanced_weights64(_check_counts(counts), beta).float()


def _class_balanced_weights64(n: torch.Tensor, beta: float) -> torch.Tensor:
    """:func:`class_balanced_weights` in float64 for checked counts n [C] (the one implementation of the formula)."""
    if not 0.0 <= beta < 1.0:  # also refuses NaN
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(float(beta), dtype=torch.float64), n))
    return w * (len(n) / w.sum())


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss: CE(z - s * m_y * onehot(y), weight).

    ``logits`` [N, C] are expected to already carry the scale s (iaerf's :class:`~iaerf.longtail.models.NormedLinear`
    outputs s * cos), so this equals the reference CE(s * (cos - m_y onehot)). ``weight`` [C] (DRW) may be set later
    with :meth:`set_weight`. Returns the (weighted) mean over the batch.
    """

    def __init__(self, counts, max_m: float = 0.5, s: float = 30.0, weight: torch.Tensor | None = None):
        super().__init__()
        if not s > 0:
            raise ValueError(f"s must be > 0, got {s}")
        self.s = float(s)
        self.register_buffer("margins", ldam_margins(counts, max_m))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def set_weight(self, weight: torch.Tensor | None) -> None:
        self.weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=self.margins.device)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.margins.numel():
            raise ValueError(f"logits must be [N, {self.margins.numel()}], got {tuple(logits.shape)}")
        margins = self.margins.to(logits.device, logits.dtype)
        shifted = logits.scatter_add(1, target[:, None], -(self.s * margins[target])[:, None])
        weight = None if self.weight is None else self.weight.to(logits.device, logits.dtype)
        return F.cross_entropy(shifted, target, weight=weight)


def _check_logits(logits: torch.Tensor, target: torch.Tensor, num_classes: int, reduction: str) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a floating [N, C] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} columns but counts has {num_classes} classes")
    if not isinstance(target, torch.Tensor) or target.shape != (logits.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor [{logits.shape[0]}] (one class index per row of logits), "
                         f"got {tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def log_prior(counts) -> torch.Tensor:
    """log pi [C] (float64), pi_j = n_j / sum_k n_k: the training class frequencies. counts [C] -> [C].

    The one place of the prior of logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment"):
    the logit-adjusted *loss* trains on z + tau log pi (:func:`logit_adjusted_cross_entropy`), *post-hoc* adjustment
    predicts with z - tau log pi. float64 so that a float64 model gets exact offsets; cast with ``.to(logits)``.
    Every count must be finite and > 0 (log 0 = -inf would make a class untrainable or, post hoc, always predicted).
    """
    n = _check_counts(counts)
    return torch.log(n / n.sum())


def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0 (0: no adjustment), got {tau!r}")
    return float(tau)


def logit_adjusted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, counts, tau: float = 1.0,
                                 reduction: str = "mean") -> torch.Tensor:
    """Logit-adjusted loss L_i = CE(z_i + tau log pi, y_i) (Menon et al. 2021, Eq. 10 there; at tau = 1 it is the
    Balanced Softmax of Ren et al. 2020, "Balanced meta-softmax for long-tailed visual recognition").

    Adding log pi_j to class j's logit during training lets the raw logits z learn the *balanced* scores: a head
    class's large prior already pays for its large share of the data, so the model need not push z_head up.

    Args:
        logits: [N, C] floating. target: [N] integer class indices. counts: [C] training counts (all > 0).
        tau: >= 0; 0 gives plain cross-entropy. reduction: "mean", "sum" or "none" ([N]).
    Returns the loss in the logits' floating dtype (float64 for float64 logits).
    """
    n = _check_counts(counts)
    tau = check_tau(tau)
    _check_logits(logits, target, len(n), reduction)
    offsets = (tau * log_prior(n)).to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits + offsets, target, reduction=reduction)


def class_balanced_point_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights of class-balanced cross-entropy for per-point losses: the DRW weights of
    :func:`class_balanced_weights` (Cui et al. 2019), rescaled so that their mean over the *training points* is 1,
    i.e. sum_j n_j w_j = sum_j n_j. counts [C] -> [C] float64.

    Why rescale: ``F.cross_entropy(weight=w)`` (LDAM-DRW's DRW) divides by the batch's sum of weights, which makes a
    point's loss depend on which batch it lands in; the sum-to-C weights without that division shrink the loss by the
    mean weight (about 0.2 on a long-tailed set), i.e. a silently smaller lr. With mean 1 over the training points,
    w_{y_i} CE_i is a fixed per-point loss (Algorithm 1's energy term adds to it point by point) whose gradient has
    the scale of plain CE, so "same lr as the CE control" is a fair comparison. Only the scale differs from DRW.
    """
    n = _check_counts(counts)
    w = _class_balanced_weights64(n, beta)
    return w * (n.sum() / (n * w).sum())


def class_balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, counts, beta: float = 0.9999,
                                 reduction: str = "mean") -> torch.Tensor:
    """Class-balanced cross-entropy L_i = w_{y_i} CE(z_i, y_i), w from :func:`class_balanced_point_weights` (Cui et
    al. 2019, "Class-balanced loss based on effective number of samples": w_j proportional to
    (1 - beta) / (1 - beta^n_j); beta = 0.9999 is CIFAR's, the digits preset uses 0.996).

    Args:
        logits: [N, C] floating. target: [N] integer class indices. counts: [C] training counts (all > 0).
        beta: in [0, 1); 0 gives plain cross-entropy. reduction: "mean" (plain mean of w_{y_i} CE_i over the N rows,
            not a weighted mean: see :func:`class_balanced_point_weights`), "sum" or "none" ([N]).
    Returns the loss in the logits' floating dtype.
    """
    n = _check_counts(counts)
    _check_logits(logits, target, len(n), reduction)
    w = class_balanced_point_weights(n, beta).to(device=logits.device, dtype=logits.dtype)
    return _reduce(w[target] * loss_from_logits(logits, target), reduction)


class PerExampleLDAM(nn.Module):
    """Per-example LDAM loss ``[b, K], [b] -> [b]``: :class:`LDAMLoss` on each example, times the
    DRW class weight of its label.

    LDAMLoss with DRW weights averages as sum_i w_{y_i} l_i / sum_i w_{y_i}; the mean of the per-example form
    w_{y_i} l_i differs from it on the full training set by the constant factor n / sum_i w_{y_i}. Without
    weight_decay and damping that factor only rescales every influence; with them, multiply them by
    sum_i w_{y_i} / n to take H of the exact DRW objective.
    """

    def __init__(self, class_counts, max_m: float = 0.5, s: float = 30.0, drw_weights=None):
        super().__init__()
        self.ldam = LDAMLoss(class_counts, max_m=max_m, s=s)  # unweighted: the DRW weight multiplies below
        num_classes = self.ldam.margins.numel()
        if drw_weights is not None:
            drw_weights = torch.as_tensor(drw_weights, dtype=torch.float32)
            if drw_weights.shape != (num_classes,) or not bool(torch.isfinite(drw_weights).all()):
                raise ValueError(f"drw_weights must be {num_classes} finite per-class weights (one per class of "
                                 f"class_counts), got shape {tuple(drw_weights.shape)}")
        self.register_buffer("drw_weights", drw_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # vmap over examples: LDAMLoss reduces over its batch, a batch of one is the per-example loss
        per_example = torch.func.vmap(lambda z, y: self.ldam(z[None], y[None]))(logits, labels)
        if self.drw_weights is None:
            return per_example
        return per_example * self.drw_weights.to(logits.device, logits.dtype)[labels]


def ldam_task(class_counts, max_m: float = 0.5, s: float = 30.0, drw_weights=None, **fields) -> InfluenceTask:
    """The influence task of an LDAM(-DRW) model: H and the loss influence use its own training loss
    (:class:`PerExampleLDAM`; ``drw_weights [K]`` e.g. :func:`class_balanced_weights`), the measurement stays the plain
    cross-entropy (what the model is evaluated on). ``fields`` are further :class:`iaerf.InfluenceTask` fields."""
    fields.setdefault("measurement", loss_from_logits)
    return InfluenceTask(train_loss=PerExampleLDAM(class_counts, max_m=max_m, s=s, drw_weights=drw_weights), **fields)
