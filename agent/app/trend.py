"""The last hour per tag, the last value per tag and the recent events, for the status page.

Fed by a buffer listener (what the buffer committed, so the page shows what will be delivered,
not what a driver merely read) and kept in memory only: the page is a glance at the gateway, the
history is on the broker. Memory is bounded whatever the plant: a fixed number of buckets per
series, a cap on the number of series (a misconfigured device with thousands of tags cannot grow
it), a fixed number of events, and strings cut short.

The listener runs on every commit, on the event loop, so it does the least it can: a poll group
is sampled at most once per :data:`SAMPLE_S` (a group polled at 100 ms, or 10,000 registers a
second, costs the page no more than one poll a second), the tags it follows are resolved once per
group, and downsampling happens as it goes (one bucket of min/max/sum/count per
:data:`BUCKET_S`), never at request time over raw readings. The trend is a glance, not a record:
a spike shorter than the sample period may not show in it; the data on the broker has it.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.core.records import Block, Event, Quality, Value, now_ns

WINDOW_S = 3600
"""How far back the trend reaches."""
BUCKET_S = 30
"""One point of the trend per this many seconds: 120 points an hour, finer than a sparkline shows."""
SAMPLE_S = 1.0
"""A poll group's readings enter the trend at most once per this many seconds."""
MAX_SERIES = 2560
"""Tags followed at most; readings of further tags are counted in ``dropped_series`` and not kept."""
MAX_EVENTS = 50
"""Recent events kept (the newest)."""
MAX_TEXT = 80
"""Characters of a string value or an event summary kept."""

_BUCKETS = WINDOW_S // BUCKET_S
_BUCKET_NS = BUCKET_S * 1_000_000_000
_SAMPLE_NS = int(SAMPLE_S * 1_000_000_000)
_MAX_INDEX = 2**31 - 1
"""The largest bucket index a slot holds (32 bits: 30 s buckets reach the year 4000); a reading
stamped later is left out of the trend rather than failing the listener."""


_NUMBERS = (int, float)
"""What a trend counts (``bool`` too, as 0 and 1). A tuple: ``isinstance`` against ``int | float``
takes nearly twice as long, and runs once per followed tag and sample."""


class LastValue(NamedTuple):
    """A tag's last reading. A tuple: made for every followed tag at every sample, it builds in
    less than half a frozen dataclass's time."""

    ts_ns: int
    value: Value
    quality: Quality


@dataclass
class _Series:
    """One tag: its last value and a ring of :data:`_BUCKETS` buckets in two flat arrays (about
    2.4 KB a tag, allocated once: an hour of trend for :data:`MAX_SERIES` tags stays under 7 MB,
    where a list per bucket grew to some 30 KB a tag)."""

    unit: str | None
    last: LastValue | None = None
    held: array[int] = field(default_factory=lambda: array("i", [-1]) * _BUCKETS)
    """The bucket index (``ts // BUCKET_S``) each slot holds; -1: none yet. 32-bit (up to
    :data:`_MAX_INDEX`): 64-bit indexes cost 1.2 MB more at :data:`MAX_SERIES` tags."""
    agg: array[float] = field(default_factory=lambda: array("f", [0.0]) * (4 * _BUCKETS))
    """Per slot: min, max, sum, count."""

    def add(self, idx: int, slot: int, value: float) -> None:
        """Count ``value`` in bucket ``idx`` (``ts // BUCKET_S``, at most :data:`_MAX_INDEX`), which
        lives in ``slot`` (``idx % _BUCKETS``): both computed once per sample for a whole group."""
        held = self.held[slot]
        agg, o = self.agg, slot * 4
        if held != idx:
            if held > idx:  # older than what the slot holds now: out of the window
                return
            self.held[slot] = idx
            agg[o] = agg[o + 1] = agg[o + 2] = value
            agg[o + 3] = 1.0
            return
        agg[o] = min(agg[o], value)
        agg[o + 1] = max(agg[o + 1], value)
        agg[o + 2] += value
        agg[o + 3] += 1.0

    def points(self, oldest: int) -> list[list[float]]:
        """``[ts_ns, min, max, mean]`` of the buckets from index ``oldest`` on, oldest first. The
        buckets are single precision (half the memory): values are given to 7 significant digits,
        what single precision holds, and the mean is kept within min..max against its rounding."""
        agg = self.agg
        out: list[list[float]] = []
        for idx, slot in sorted((idx, slot) for slot, idx in enumerate(self.held) if idx >= oldest):
            lo, hi, total, n = agg[4 * slot : 4 * slot + 4]
            out.append([idx * _BUCKET_NS, _f32(lo), _f32(hi), _f32(min(max(total / n, lo), hi))])
        return out


def _f32(v: float) -> float:
    return float(f"{v:.7g}")


@dataclass
class _Group:
    """A poll group as the trend follows it: its tags (the group's own tuple: a new tuple means
    the group changed, e.g. on a reload), their series, and when it was last sampled."""

    tags: Sequence[str]
    followed: list[tuple[int, _Series]]
    sampled_ns: int = -(2**63)


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
        self._groups: dict[tuple[str, str, int], _Group] = {}
        """By device, group and its tag tuple's identity: a group read in several requests hands
        over one block (one tuple) per request, each sampled on its own."""

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
        key = (block.device, block.group, id(block.tags))
        group = self._groups.get(key)
        if group is None or group.tags is not block.tags:
            if len(self._groups) >= MAX_SERIES:  # tuples made afresh per poll: start over, bounded
                self._groups.clear()
            group = self._groups[key] = _Group(block.tags, self._follow(block))
        elif ts - group.sampled_ns < _SAMPLE_NS:
            return
        group.sampled_ns = ts
        quality = block.quality
        values = block.values
        n = len(values)
        idx = ts // _BUCKET_NS
        slot = idx % _BUCKETS if idx <= _MAX_INDEX else -1  # -1: too late for a bucket
        good, bad = Quality.GOOD, Quality.BAD
        for i, series in group.followed:
            if i >= n:
                continue
            value = values[i]
            q = good if quality is None else quality[i]
            shown = value[:MAX_TEXT] + "…" if isinstance(value, str) and len(value) > MAX_TEXT else value
            series.last = LastValue(ts, shown, q)
            if slot >= 0 and q is not bad and isinstance(value, _NUMBERS) and math.isfinite(value):
                series.add(idx, slot, float(value))

    def _follow(self, block: Block) -> list[tuple[int, _Series]]:
        """The series of a group's tags, by position (tags beyond :data:`MAX_SERIES` left out)."""
        followed: list[tuple[int, _Series]] = []
        for i, tag in enumerate(block.tags):
            key = (block.device, tag)
            series = self._series.get(key)
            if series is None:
                series = self._new_series(key, block.units[i] if i < len(block.units) else None)
            if series is not None:
                followed.append((i, series))
        return followed

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
                    "points": s.points(oldest),
                }
            )
        return out
