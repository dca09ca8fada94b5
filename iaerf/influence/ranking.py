"""The training points of largest influence per test point: the most helpful and most harmful (kronfluence's and
dattri's top-k view of pairwise scores)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from iaerf.core.checks import check_count

__all__ = ["TopInfluences", "top_influences"]

# entries sorted at once by top_influences (2^24: 128 MiB of float64 scores plus their int64 order)
_SORT_BLOCK = 2**24


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
            :func:`iaerf.energy_influence_on_test`) or ``[n]`` (:func:`iaerf.loss_influence`), finite (a NaN or Inf
            is a ValueError naming its first position). For the loss influence (Eq. 4) a negative score means
            upweighting the training point lowers the test loss (helpful), a positive one raises it (harmful); for
            the energy influence, negative means its energy regularization lowers the loss.
        top: how many per row, 1 <= top <= n: a larger ``top`` is a ValueError (never silently clamped, so that
            every row has exactly ``top`` entries).

    Ties keep training-set order: among equal scores the lower index comes first, in ``helpful`` and in
    ``harmful`` alike (a stable sort, so the answer does not depend on the device or the kernel). The rows are
    sorted in blocks of about 2^24 entries, so the working memory stays bounded for any k_test.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor [k_test, n] or [n], got "
                        f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    n = scores.shape[-1]
    check_count("top", top)
    if top > n:
        raise ValueError(f"top must be at most the number of training points {n}, got {top}")
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"scores must be finite: scores{list(where)} is {float(scores[where])}")
    rows = scores.reshape(-1, n)
    block = max(1, _SORT_BLOCK // n)
    parts = {True: [], False: []}
    for start in range(0, rows.shape[0], block):
        chunk = rows[start:start + block]
        for descending in (True, False):
            values, order = torch.sort(chunk, dim=-1, descending=descending, stable=True)
            parts[descending].append((values[:, :top], order[:, :top]))
    harmful_scores, harmful = (torch.cat(t).reshape(*scores.shape[:-1], top) for t in zip(*parts[True]))
    helpful_scores, helpful = (torch.cat(t).reshape(*scores.shape[:-1], top) for t in zip(*parts[False]))
    return TopInfluences(helpful, helpful_scores, harmful, harmful_scores)
