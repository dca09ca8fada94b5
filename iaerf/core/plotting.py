"""Figure helpers shared by the ground-truth scatter and the application's figures: matplotlib on the Agg backend
(files only, no display), atomic PNG writes, Pearson's R."""
from __future__ import annotations

import numpy as np

from iaerf.core.io import atomic_write

__all__ = ["pyplot", "save_figure", "pearson_r"]
def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    pyplot().close(fig)
    return path


def pearson_r(a, b) -> float:
    """Pearson correlation of two 1-D arrays (float64); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"pearson_r needs two equal-length arrays of >= 2 values, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
