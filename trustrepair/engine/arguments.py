"""Checking the numeric arguments of the public functions where they enter: a float that reaches a weight
(a step size, a damping, a learning rate, a tolerance, a score weight) must be a finite real number, so
that a NaN or an infinity is refused by name before it can reach a model.
"""
from __future__ import annotations

import math
import numbers


def finite(name: str, value, *, minimum: float | None = None, positive: bool = False, hint: str = "") -> float:
    """``float(value)``, refusing anything but a finite real number (>= ``minimum``, > 0 with ``positive``).

    Raises:
        ValueError: naming the argument and its value, e.g. ``beta = nan must be a finite number >= 0``.
    """
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (minimum is None or value >= minimum) and (not positive or value > 0))
    if not ok:
        bound = " > 0" if positive else f" >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{name} = {value!r} must be a finite number{bound}{f' ({hint})' if hint else ''}")
    return float(value)
