"""The one percentile rule for every figure the agent reports (round-trip times, poll jitter,
model evaluation delays), so a p99 in ``status`` and a median in a model card mean the same.

Linear interpolation between the two nearest ranks (numpy's default, Hyndman & Fan type 7):
the median of an even count is the mean of the middle two, as people expect of a median.
An infinite value (a fault a model never detected) stays infinite, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile (0 <= q <= 1) of ``values``; None when there are none."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = q * (len(ordered) - 1)
    i = math.floor(rank)
    lo = ordered[i]
    frac = rank - i
    if frac == 0.0 or lo == ordered[i + 1]:
        return lo
    return lo + (ordered[i + 1] - lo) * frac
