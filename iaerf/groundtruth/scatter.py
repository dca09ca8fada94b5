"""Predicted-vs-actual scatter with Pearson R in the title (the layout of the paper's Fig. 1), written atomically."""
from __future__ import annotations

import numpy as np

from iaerf.core.plotting import pearson_r, pyplot, save_figure

__all__ = ["scatter_predicted_vs_actual"]


def scatter_predicted_vs_actual(predicted, actual, path: str, title: str = "") -> float:
    """Scatter ``predicted [N]`` (x) against ``actual [N]`` (y), N >= 2, to the PNG ``path``; returns Pearson R."""
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    actual = np.asarray(actual, dtype=np.float64).ravel()
    if predicted.shape != actual.shape or predicted.size < 2:
        raise ValueError(f"predicted and actual must hold the same number (>= 2) of values, got {predicted.size} "
                         f"and {actual.size}")
    if not (np.isfinite(predicted).all() and np.isfinite(actual).all()):
        raise ValueError("predicted and actual must be finite")
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty str, got {path!r}")
    r = pearson_r(predicted, actual)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter(predicted, actual, s=14)
    ax.set(xlabel="predicted (influence)", ylabel="actual (re-optimised)",
           title=f"{title + ': ' if title else ''}Pearson R = {r:.3f}")
    save_figure(fig, path)
    return r
