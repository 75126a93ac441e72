"""The last hour per tag, the last value per tag and the recent events, for the status page.

Fed by a buffer listener (what the buffer committed, so the page shows what will be delivered,
not what a driver merely read) and kept in memory only: the page is a glance at the gateway, the
history is on the broker. Memory is bounded whatever the plant: a fixed number of buckets per
series, a cap on the number of series (a misconfigured device with thousands of tags cannot grow
it), a fixed number of events, and strings cut short.

The listener runs on every commit, so it does the least it can: a dictionary lookup and a few
comparisons per reading; downsampling happens as it goes (one bucket of min/max/sum/count per
:data:`BUCKET_S`), never at request time over raw readings.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.records import Block, Event, Quality, Value, now_ns

WINDOW_S = 3600
"""How far back the trend reaches."""
BUCKET_S = 30
"""One point of the trend per this many seconds: 120 points an hour, finer than a sparkline shows."""
MAX_SERIES = 4096
"""Tags followed at most; readings of further tags are counted in ``dropped_series`` and not kept."""
MAX_EVENTS = 50
"""Recent events kept (the newest)."""
MAX_TEXT = 80
"""Characters of a string value or an event summary kept."""

_BUCKETS = WINDOW_S // BUCKET_S
_BUCKET_NS = BUCKET_S * 1_000_000_000


@dataclass(frozen=True)
class LastValue:
    ts_ns: int
    value: Value
    quality: Quality


@dataclass
class _Series:
    unit: str | None
    last: LastValue | None = None
    buckets: deque[list[float]] = field(default_factory=lambda: deque(maxlen=_BUCKETS))
    """``[bucket index, min, max, sum, count]``, oldest first; the index is ``ts // BUCKET_S``."""

    def add(self, ts_ns: int, value: float) -> None:
        idx = ts_ns // _BUCKET_NS
        buckets = self.buckets
        if not buckets or idx > buckets[-1][0]:
            buckets.append([idx, value, value, value, 1.0])
            return
        # A reading for an earlier bucket (a late block): into its bucket while the bucket is kept.
        for b in reversed(buckets):
            if b[0] == idx:
                b[1] = min(b[1], value)
                b[2] = max(b[2], value)
                b[3] += value
                b[4] += 1
                return
            if b[0] < idx:
                return


@dataclass(frozen=True)
class RecentEvent:
    ts_ns: int
    device: str
    kind: str
    severity: str
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts_ns,
            "device": self.device,
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
        }


class TrendRecorder:
    """:meth:`on_committed` is a buffer listener; :meth:`series` and :meth:`events` answer the status
    API. ``clock`` says what "the last hour" is relative to (a test fixes it)."""

    def __init__(self, clock: Callable[[], int] = now_ns) -> None:
        self._clock = clock
        self._series: dict[tuple[str, str], _Series] = {}
        self._events: deque[RecentEvent] = deque(maxlen=MAX_EVENTS)
        self.dropped_series = 0
        """Tags not followed because :data:`MAX_SERIES` were followed already (each counted once)."""
        self._dropped: set[tuple[str, str]] = set()

    def on_committed(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        for block in blocks:
            self._add_block(block)
            if block.events:
                for event in block.events:
                    self._add_event(event)
        for event in events:
            self._add_event(event)

    def _add_block(self, block: Block) -> None:
        ts = block.acq_ts_ns
        quality = block.quality
        for i, (tag, value) in enumerate(zip(block.tags, block.values, strict=False)):
            key = (block.device, tag)
            series = self._series.get(key)
            if series is None:
                series = self._new_series(key, block.units[i] if i < len(block.units) else None)
                if series is None:
                    continue
            q = quality[i] if quality is not None else Quality.GOOD
            shown = value[:MAX_TEXT] + "…" if isinstance(value, str) and len(value) > MAX_TEXT else value
            series.last = LastValue(ts, shown, q)
            if q is not Quality.BAD and isinstance(value, int | float) and math.isfinite(value):
                series.add(ts, float(value))

    def _new_series(self, key: tuple[str, str], unit: str | None) -> _Series | None:
        if len(self._series) >= MAX_SERIES:
            if key not in self._dropped and len(self._dropped) < MAX_SERIES:
                self._dropped.add(key)
                self.dropped_series += 1
            return None
        series = self._series[key] = _Series(unit)
        return series

    def _add_event(self, event: Event) -> None:
        parts = [f"{k}={v}" for k, v in event.data.items() if not isinstance(v, dict | list)]
        summary = " ".join(parts)
        if len(summary) > MAX_TEXT:
            summary = summary[: MAX_TEXT - 1] + "…"
        self._events.append(RecentEvent(event.ts_ns, event.device, event.kind, str(event.severity), summary))

    def events(self) -> list[dict[str, Any]]:
        """The recent events, newest first."""
        return [e.as_dict() for e in reversed(self._events)]

    def series(self, device: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """The series of ``device`` (every device when ``None``) and ``tag`` (every tag when ``None``),
        each with its last value and its points of the last hour (``[ts_ns, min, max, mean]``, the
        bucket's start as its time), sorted by device and tag."""
        oldest = (self._clock() // _BUCKET_NS) - _BUCKETS + 1
        out = []
        for (dev, name), s in sorted(self._series.items()):
            if (device is not None and dev != device) or (tag is not None and name != tag):
                continue
            last = s.last
            out.append(
                {
                    "device": dev,
                    "tag": name,
                    "unit": s.unit,
                    "last": None
                    if last is None
                    else {"ts": last.ts_ns, "value": last.value, "quality": str(last.quality)},
                    "points": [
                        [int(b[0]) * _BUCKET_NS, b[1], b[2], b[3] / b[4]] for b in s.buckets if b[0] >= oldest
                    ],
                }
            )
        return out
