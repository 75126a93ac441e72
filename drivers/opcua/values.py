"""OPC UA DataValues as the agent's readings: value, quality, reason and source time.

Quality. Good status → good; ``Uncertain*`` → uncertain, value kept, the status name as
reason; ``Bad*`` → bad, value dropped, the status name as reason (named without the info
bits, so ``BadSensorFailure`` with an overflow bit is still ``BadSensorFailure``). Each
reading keeps the server's SourceTimestamp (ServerTimestamp where the device gave none) as
``source_ts_ns``; the acquisition time is the agent's clock.

Odd values. A server is a device like any other and may send anything its stack can
encode: NaN, an Int64 beyond what a double holds, an array, a structure, a timestamp in
the year 9999. Whatever cannot be a reading becomes a bad one saying why (the value is
never forced into another type); nothing raises. Integers stay exact within Int64/UInt64
(the wire's widest); a source time that does not fit the buffer's 64-bit nanoseconds
(before 1970, after 2262) is dropped, and the reading keeps its acquisition time.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from agent.core.driver import PollGroup
from agent.core.records import Block, Quality, Reason, Value

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
"""Int64 and UInt64, the widest integers OPC UA encodes."""
_TS_MAX_NS = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS_CODE_MASK = 0xFFFF0000
"""Severity, sub-code and structure-changed bits: the part of a StatusCode that has a name."""
UNSUPPORTED = "unsupported_type"


def _ts_ns(dt: Any) -> int | None:
    if not isinstance(dt, datetime):
        return None
    try:
        aware = dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
        delta = aware - _EPOCH
    except (OverflowError, ValueError):
        return None
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    return ns if 0 <= ns <= _TS_MAX_NS else None


def _scalar(v: Any) -> tuple[Value, str | None]:
    """An OPC UA variant value as a payload value, or the reason it cannot be one."""
    if v is None or isinstance(v, bool):
        return v, None
    if isinstance(v, str):
        return (v, None) if _encodable(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, int):
        return (int(v), None) if _INT_MIN <= v <= _INT_MAX else (None, Reason.OUT_OF_RANGE)
    if isinstance(v, float):
        return (float(v), None) if math.isfinite(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, datetime):
        return v.isoformat(), None
    if isinstance(v, ua.LocalizedText):
        return _scalar(v.Text) if v.Text is None or isinstance(v.Text, str) else (None, UNSUPPORTED)
    return None, UNSUPPORTED


def _encodable(s: str) -> bool:
    """A string with lone surrogates cannot be stored or published as UTF-8."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def status_name(code: int) -> str:
    """The status code's name, info bits aside."""
    return ua.StatusCode(ua.UInt32(code & _STATUS_CODE_MASK)).name


class Converted:
    """Columns of one group's (or subset's) readings, filled from DataValues."""

    __slots__ = ("quality", "raw", "reasons", "src")

    def __init__(self, n: int) -> None:
        self.raw: list[Value] = [None] * n
        self.quality: list[Quality] = [Quality.GOOD] * n
        self.reasons: list[str | None] = [None] * n
        self.src: list[int | None] = [None] * n

    def set(self, i: int, dv: ua.DataValue) -> None:
        if not isinstance(dv, ua.DataValue):
            self.bad(i, UNSUPPORTED)
            return
        self.src[i] = _ts_ns(dv.SourceTimestamp) or _ts_ns(dv.ServerTimestamp)
        status = dv.StatusCode
        if status is not None:
            code = status.value if isinstance(status, ua.StatusCode) else None
            if not isinstance(code, int) or not 0 <= code <= 0xFFFFFFFF:
                self.bad(i, Reason.DECODE_ERROR)
                return
            if not status.is_good():
                name = status_name(code)
                if status.is_uncertain():
                    self.quality[i], self.reasons[i] = Quality.UNCERTAIN, name
                else:
                    self.bad(i, name)
                    return
        variant = dv.Value
        if variant is not None and not isinstance(variant, ua.Variant):
            self.bad(i, UNSUPPORTED)
            return
        value, why = _scalar(variant.Value if variant is not None else None)
        if why is not None:
            self.bad(i, why)
            return
        self.raw[i] = value

    def bad(self, i: int, reason: str) -> None:
        self.quality[i], self.reasons[i], self.raw[i] = Quality.BAD, reason, None

    def finish(self, group: PollGroup, acq_ts_ns: int) -> Block:
        return group.finish(
            self.raw, acq_ts_ns=acq_ts_ns, quality=self.quality, reasons=self.reasons, source_ts_ns=self.src
        )
