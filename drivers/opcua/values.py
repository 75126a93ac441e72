"""OPC UA DataValues as the agent's readings: value, quality, reason and source time.

Quality. Good status → good; ``Uncertain*`` → uncertain, value kept, the status name as
reason; ``Bad*`` → bad, value dropped, the status name as reason. Each reading keeps the
server's SourceTimestamp (ServerTimestamp where the device gave none) as
``source_ts_ns``; the acquisition time is the agent's clock.
"""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from agent.core.driver import PollGroup
from agent.core.records import Block, Quality, Reason, Value


def _ts_ns(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return calendar.timegm(dt.timetuple()) * 1_000_000_000 + dt.microsecond * 1000


def _scalar(v: Any) -> tuple[Value, str | None]:
    """An OPC UA variant value as a payload value, or the reason it cannot be one."""
    if v is None or isinstance(v, bool | str):
        return v, None
    if isinstance(v, int):
        return int(v), None
    if isinstance(v, float):
        return (v, None) if math.isfinite(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, datetime):
        return v.isoformat(), None
    if isinstance(v, ua.LocalizedText):
        return v.Text, None
    return None, "unsupported_type"


class Converted:
    """Columns of one group's (or subset's) readings, filled from DataValues."""

    __slots__ = ("quality", "raw", "reasons", "src")

    def __init__(self, n: int) -> None:
        self.raw: list[Value] = [None] * n
        self.quality: list[Quality] = [Quality.GOOD] * n
        self.reasons: list[str | None] = [None] * n
        self.src: list[int | None] = [None] * n

    def set(self, i: int, dv: ua.DataValue) -> None:
        status = dv.StatusCode
        self.src[i] = _ts_ns(dv.SourceTimestamp or dv.ServerTimestamp)
        if status is not None and not status.is_good():
            name = status.name
            if status.is_uncertain():
                self.quality[i], self.reasons[i] = Quality.UNCERTAIN, name
            else:
                self.quality[i], self.reasons[i] = Quality.BAD, name
                return
        value, why = _scalar(dv.Value.Value if dv.Value is not None else None)
        if why is not None:
            self.quality[i], self.reasons[i] = Quality.BAD, why
            return
        self.raw[i] = value

    def bad(self, i: int, reason: str) -> None:
        self.quality[i], self.reasons[i] = Quality.BAD, reason

    def finish(self, group: PollGroup, acq_ts_ns: int) -> Block:
        return group.finish(
            self.raw, acq_ts_ns=acq_ts_ns, quality=self.quality, reasons=self.reasons, source_ts_ns=self.src
        )
