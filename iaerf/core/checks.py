"""Argument checks shared across the package: every error names the argument and what was expected."""
from __future__ import annotations

import math

__all__ = ["check_number", "check_count"]
def check_number(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float: a finite number >= 0 (> 0 when ``positive``), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int = 1, why: str = "") -> int:
    """``value`` when it is an int >= ``minimum`` (a bool is not), else ValueError naming ``name`` (and ``why``,
    e.g. " (resamples for the interval)")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {want}{why}, got {value!r}")
    return value
