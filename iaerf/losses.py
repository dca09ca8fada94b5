"""Baseline losses: LDAM (Cao et al. 2019) and the class-balanced weights of DRW (Cui et al. 2019).

Both are plain torch and run wherever the logits live (CPU or GPU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ldam_margins", "class_balanced_weights", "LDAMLoss"]


def _check_counts(counts) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"counts must be a 1-D sequence of >= 2 per-class counts, got shape {tuple(counts.shape)}")
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
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _check_counts(counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w * (len(n) / w.sum())).float()


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss: CE(z - s * m_y * onehot(y), weight).

    ``logits`` [N, C] are expected to already carry the scale s (iaerf's :class:`~iaerf.models.NormedLinear`
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
