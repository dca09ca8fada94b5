"""Paired comparisons over seeds: a method against its control run on the same seed and batch order."""
from __future__ import annotations

import math

__all__ = ["paired_difference", "format_paired"]


def paired_difference(method, control, confidence: float = 0.95) -> dict:
    """Mean of ``method[i] - control[i]`` over seeds with a two-sided Student-t interval, and the win count.

    Args:
        method, control: equal-length sequences of one number per seed (e.g. test error in %; lower is better).
    Returns:
        ``{"n", "mean", "low", "high", "wins", "losses", "ties"}``: ``wins`` counts seeds where the method is lower;
        ``low`` / ``high`` are None for a single seed (no spread to estimate).
    """
    a, b = [float(x) for x in method], [float(x) for x in control]
    if len(a) != len(b) or not a:
        raise ValueError(f"method and control need the same non-zero number of seeds, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    low = high = None
    if n > 1:
        from scipy.stats import t

        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "low": low, "high": high, "wins": sum(x < 0 for x in d),
            "losses": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d)}


def format_paired(p: dict) -> str:
    """``"+0.40 [-0.12, +0.92], 1/5"``: mean difference, interval, seeds won / seeds."""
    interval = f" [{p['low']:+.2f}, {p['high']:+.2f}]" if p["low"] is not None else ""
    return f"{p['mean']:+.2f}{interval}, {p['wins']}/{p['n']}"
