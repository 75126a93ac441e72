"""Readings as the short decimals the device meant, not binary noise: ``95.1``, never
``95.10000000000001`` (a register of 951 scaled by 0.1) nor ``95.0999984741211`` (the float32
the device sent for 95.1).

Two sources of noise, two cures, both vectorised for the poll-group hot path:

* Arithmetic: ``raw × scale + offset`` in binary floating point. A tag's ``precision`` (decimal
  places) rounds it away; unset, it is derived from the scale and offset, which is exact for a
  whole-number raw value (an integer register): ``951 × 0.1`` has at most the decimals of
  ``0.1``. Rounding is ``rint(x × 10^p) / 10^p``, numpy's ``round``, with a per-tag ``p``: the
  quotient of two exactly representable numbers is correctly rounded, so the result is the
  double nearest the decimal, which Python and JSON print in its short form.
* Single precision: a float32 widened to a double shows the float32's binary expansion.
  :func:`shortest_float32` turns each into the double nearest the shortest decimal that reads
  back as the same float32 (what ``str(numpy.float32(x))`` prints), without a per-value string
  round trip.

A device's value as it sent it (``raw``) is never touched: only the engineering value is.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_DECIMALS = 12
"""Most decimal places a derived precision keeps (a scale such as 1/3 has no finite decimal form)."""
_EXACT_POW10 = 22
"""Largest power of ten a double holds exactly."""
_WHOLE = 2.0**52
"""Doubles of this magnitude have no fractional part to round."""
_F32_DIGITS = (6, 7, 8, 9)
"""Significant digits tried, shortest first: every float32 round-trips with 9 (FLT_DECIMAL_DIG),
and below 7 there is at most one candidate (the 6-digit grid is coarser than float32's)."""

Floats = npt.NDArray[np.float64]
_EXPONENTS = np.arange(-_EXACT_POW10, _EXACT_POW10 + 1)
_UP: Floats = 10.0 ** np.maximum(_EXPONENTS, 0).astype(np.float64)
_DOWN: Floats = 10.0 ** np.maximum(-_EXPONENTS, 0).astype(np.float64)
"""10^k for k in -22..22 (at index k + 22) as ``_UP / _DOWN``, each an exact power of ten, one of
them 1: looked up, since ``10.0 ** array`` costs more than the rest of the work."""


def decimals_of(x: float) -> int:
    """Decimal places of the shortest form of ``x`` (``0.1`` → 1, ``0.05`` → 2, ``2.0`` → 0,
    ``1e-05`` → 5), at most :data:`MAX_DECIMALS`."""
    if not math.isfinite(x):
        return 0
    exponent = Decimal(repr(x)).normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return min(max(0, -exponent), MAX_DECIMALS)


def derived_precision(scale: float, offset: float) -> int | None:
    """Decimal places of ``raw × scale + offset`` for a whole-number raw value; ``None`` for the
    identity transform, which adds none."""
    if scale == 1.0 and offset == 0.0:
        return None
    return max(decimals_of(scale), decimals_of(offset))


def round_one(x: float, p10: float) -> float:
    """:meth:`Rounding.apply` for one value (``p10`` = 10^decimals)."""
    scaled = x * p10
    return x if not abs(scaled) < _WHOLE else round(scaled) / p10


def rint_one(x: float, p10: float) -> float:
    """:meth:`Rounding.apply` for one value, to the same bits: ``rint(x × p10) / p10``, ``x``
    itself where that cannot round (non-finite, or too large to have a fraction). A zero keeps
    the sign ``rint`` gives it (``-0.0``), which :func:`round_one` (Python's ``round``, an
    integer) loses: the array path of a poll group must not print ``0.0`` where numpy prints
    ``-0.0``."""
    scaled = x * p10
    if not abs(scaled) < _WHOLE:
        return x
    r = round(scaled)
    return (r if r else math.copysign(0.0, scaled)) / p10


class Rounding:
    """The per-tag rounding of one poll group, compiled once: each tag's explicit ``precision``,
    else its derived one, which only applies where the raw value was a whole number."""

    def __init__(self, explicit: Sequence[int | None], derived: Sequence[int | None]) -> None:
        p10 = [10.0**e if e is not None else 10.0**d if d is not None else math.nan
               for e, d in zip(explicit, derived, strict=True)]  # fmt: skip
        self.p10: Floats = np.array(p10, dtype=np.float64)
        only_whole = [e is None and d is not None for e, d in zip(explicit, derived, strict=True)]
        self.only_whole: npt.NDArray[np.bool_] | None = np.array(only_whole) if any(only_whole) else None

    @classmethod
    def of(cls, explicit: Sequence[int | None], derived: Sequence[int | None]) -> Rounding | None:
        """``None`` when no tag rounds: the common case of unscaled registers costs nothing."""
        if all(e is None and d is None for e, d in zip(explicit, derived, strict=True)):
            return None
        return cls(explicit, derived)

    def apply(self, values: Floats, raw: npt.NDArray[Any]) -> Floats:
        """``values`` (the engineering values of the group's tags, in order) rounded; ``raw`` is
        what they were computed from (an integer array is all whole numbers)."""
        p10 = self.p10
        if self.only_whole is not None and raw.dtype.kind not in "iu":  # not an integer array
            with np.errstate(invalid="ignore"):
                fractional = np.rint(raw) != raw
            p10 = np.where(self.only_whole & fractional, np.nan, p10)
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = values * p10
            keep = ~(np.abs(scaled) < _WHOLE)  # NaN p10 (no rounding), NaN/inf values, huge values
            return np.where(keep, values, np.rint(scaled) / p10)

    def per_tag(self) -> list[tuple[float | None, bool]]:
        """Each tag's (10^decimals or None when it is not rounded, whether only whole raw values
        are): the rounding of one value at a time, as plain floats."""
        only_whole = self.only_whole.tolist() if self.only_whole is not None else [False] * len(self.p10)
        return [
            (None if math.isnan(p10) else p10, bool(whole))
            for p10, whole in zip(self.p10.tolist(), only_whole, strict=True)
        ]


def shortest_float32(values: npt.ArrayLike) -> Floats:
    """Each float32 as the double nearest its shortest round-tripping decimal (``95.1`` for the
    float32 nearest 95.1, where widening gives ``95.0999984741211``). Non-finite values and zero
    pass unchanged.

    Vectorised: for 6, 7, 8, 9 significant digits the value is rounded as :class:`Rounding` does
    (by an exact power of ten) and kept where it reads back as the same float32; the first digit
    count that does gives the shortest decimal, and the nearest one where two have that length.
    The few values beyond the exact powers of ten (magnitudes below 1e-16 or above 1e22) take
    numpy's shortest repr one by one."""
    x32 = np.asarray(values, dtype=np.float32)
    x = x32.astype(np.float64)
    if x.ndim == 1 and len(x) <= SMALL_FLOAT32:
        return _shortest_float32_small(x)
    out = x.copy()
    todo = np.isfinite(x) & (x != 0)
    if not todo.any():
        return out
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        magnitude = np.floor(np.log10(np.abs(np.where(todo, x, 1.0))))
        # every digit count's power of ten exact: 10^(d-1-m) for d in 6..9 within 10^±22
        exact = (
            todo
            & (magnitude >= _F32_DIGITS[-1] - 1 - _EXACT_POW10)
            & (magnitude <= _F32_DIGITS[0] - 1 + _EXACT_POW10)
        )
        at = np.where(exact, _F32_DIGITS[0] - 1 - magnitude + _EXACT_POW10, _EXACT_POW10).astype(np.intp)
        for _ in _F32_DIGITS:
            up, down = _UP.take(at), _DOWN.take(at)  # 10^decimals as a product or a quotient of exact ones
            candidate = np.rint(x * up / down) * down / up
            ok = exact & (candidate.astype(np.float32) == x32)
            np.copyto(out, candidate, where=ok)
            todo &= ~ok
            exact &= ~ok
            if not exact.any():
                break
            at += 1
    for i in np.flatnonzero(todo):
        out[i] = shortest_float32_one(float(x32[i]))
    return out


SMALL_FLOAT32 = 16
"""Arrays of at most this many values take :func:`_shortest_float32_small`: the vectorised search
costs some 45 µs whatever the length (two dozen numpy calls), the loop 1 to 3 µs a value (a
poll group's few float32 registers)."""

_UP_LIST: list[float] = _UP.tolist()
_DOWN_LIST: list[float] = _DOWN.tolist()
_FLOAT32 = struct.Struct("<f")


def _shortest_float32_small(x: Floats) -> Floats:
    """:func:`shortest_float32` of a few widened float32 values, value by value to the same bits:
    the same magnitudes (numpy's ``log10``), the same candidates (``rint(x × up / down) × down /
    up``, Python's ``round`` being ``rint`` away from zero), the same read-back as a float32 (a
    candidate beyond float32's range is not one, as numpy's cast to infinity says)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitudes: list[float] = np.floor(np.log10(np.abs(x))).tolist()
    out: list[float] = []
    lowest, highest = _F32_DIGITS[-1] - 1 - _EXACT_POW10, _F32_DIGITS[0] - 1 + _EXACT_POW10
    for v, m in zip(x.tolist(), magnitudes, strict=True):
        if v == 0.0 or v - v != 0.0:  # zero, NaN and infinities pass unchanged
            out.append(v)
            continue
        if lowest <= m <= highest:
            at = int(_F32_DIGITS[0] - 1 - m + _EXACT_POW10)
            for _ in _F32_DIGITS:
                up, down = _UP_LIST[at], _DOWN_LIST[at]
                candidate = float(round(v * up / down)) * down / up
                try:
                    same = _FLOAT32.unpack(_FLOAT32.pack(candidate))[0] == v
                except OverflowError:
                    same = False
                if same:
                    out.append(candidate)
                    break
                at += 1
            else:
                out.append(shortest_float32_one(v))
        else:
            out.append(shortest_float32_one(v))
    return np.array(out, dtype=np.float64)


def shortest_float32_one(x: float) -> float:
    """One value of :func:`shortest_float32`, by numpy's shortest repr of the float32 (about 1 µs:
    for values that arrive one by one, such as an OPC UA ``Float``). A value no float32 can hold
    (a double beyond its range handed over as a Float) is returned as it is, not as infinity."""
    with np.errstate(over="ignore"):
        x32 = np.float32(x)
    return float(str(x32)) if np.isfinite(x32) else x
