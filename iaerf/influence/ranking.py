"""The training points of largest influence per test point: the most helpful and most harmful (kronfluence's and
dattri's top-k view of pairwise scores)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from iaerf.core.checks import check_count

__all__ = ["TopInfluences", "top_influences"]


class TopInfluences(NamedTuple):
    """Indices into the training set and their scores, ``[k_test, top]`` (``[top]`` for a ``[n]`` score vector),
    ordered from the strongest: ``helpful`` by most negative score, ``harmful`` by most positive."""

    helpful: torch.Tensor
    helpful_scores: torch.Tensor
    harmful: torch.Tensor
    harmful_scores: torch.Tensor


def top_influences(scores: torch.Tensor, top: int = 10) -> TopInfluences:
    """The ``top`` most helpful and most harmful training points of every row of ``scores``.

    Args:
        scores: ``[k_test, n]`` pairwise influences (:func:`iaerf.loss_influence_on_test`,
            :func:`iaerf.energy_influence_on_test`) or ``[n]`` (:func:`iaerf.loss_influence`), finite. For the loss
            influence (Eq. 4) a negative score means upweighting the training point lowers the test loss (helpful),
            a positive one raises it (harmful); for the energy influence, negative means its energy regularization
            lowers the loss.
        top: how many per row, 1 <= top <= n.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor [k_test, n] or [n], got "
                        f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    n = scores.shape[-1]
    check_count("top", top)
    if top > n:
        raise ValueError(f"top must be at most the number of training points {n}, got {top}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    harmful_scores, harmful = torch.topk(scores, top, dim=-1, largest=True, sorted=True)
    helpful_scores, helpful = torch.topk(scores, top, dim=-1, largest=False, sorted=True)
    return TopInfluences(helpful, helpful_scores, harmful, harmful_scores)
