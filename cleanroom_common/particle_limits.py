"""Airborne particle limits from the standards: EU GMP Annex 1 grades and ISO 14644-1 classes.

The agent's limit rules judge readings against these numbers and the particle-counter
simulator sets its rooms' background from them, so a simulated room and the rule that
watches it cannot disagree about what a grade allows.
"""

from __future__ import annotations

import math
from typing import Literal

Grade = Literal["A", "B", "C", "D"]
RoomState = Literal["at_rest", "in_operation"]

ISO_SLOPE = 2.08
"""ISO 14644-1 size exponent: the concentration at or above size D falls as D^-2.08."""

ISO_APPLICABLE: dict[float, tuple[int, int]] = {
    0.1: (1, 6),
    0.2: (2, 6),
    0.3: (2, 6),
    0.5: (3, 9),
    1.0: (4, 9),
    5.0: (6, 9),
}
"""ISO 14644-1:2015 Table 1: the classes (first, last) for which a size has a limit."""

GMP_ACTION: dict[tuple[Grade, RoomState], tuple[float | None, float | None]] = {
    ("A", "at_rest"): (3520, 29),
    ("A", "in_operation"): (3520, 29),
    ("B", "at_rest"): (3520, 29),
    ("B", "in_operation"): (352_000, 2930),
    ("C", "at_rest"): (352_000, 2930),
    ("C", "in_operation"): (3_520_000, 29_300),
    ("D", "at_rest"): (3_520_000, 29_300),
    ("D", "in_operation"): (None, None),
}
"""EU GMP Annex 1 (2022) maximum particles/m³ (0.5 µm, 5.0 µm) by grade and state;
grade D in operation is set by risk assessment (configure it explicitly)."""


def iso_class_limit(iso_class: float, size_um: float) -> float | None:
    """ISO 14644-1 concentration limit (particles/m³ ≥ ``size_um``) for a class, or None
    where the standard gives none. Cn = 10^N x (0.1/D)^2.08, rounded to no more than
    three significant figures and to a whole number (as Table 1 is)."""
    first, last = ISO_APPLICABLE.get(size_um, (0, -1))
    if not first <= iso_class <= last:
        return None
    cn = 10**iso_class * (0.1 / size_um) ** ISO_SLOPE
    digits = 3 - 1 - math.floor(math.log10(cn))
    return float(round(round(cn, digits)))
