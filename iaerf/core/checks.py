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


def check_count(name: str, value) -> int:
    """``value`` when it is an int >= 1 (a bool is not), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
