"""Typed events: what parts hand each other, so that every producer writes the same shape.

A ``data_loss`` event is raised by the buffer (it had to drop or could not store records)
and by drivers (the device itself lost records before the agent read them). A consumer
reconciles seq gaps and time gaps against these events, so they must all say the same
thing the same way: one reason vocabulary, exact counts, seqs where seqs existed, and
times in nanoseconds like every other time in a payload (docs/payloads.md, ``data_loss``).
The ``device_state`` events mark a device's outage in the same stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from agent.core.compat import FIELDS, Compat, DeviceCompat, Outcome, Reported
from agent.core.records import AGENT_DEVICE, Event, Severity


class LossReason(StrEnum):
    """Why data was lost. Closed: a consumer may act on each value."""

    BUFFER_FULL = "buffer_full"
    """The buffer reached ``max_bytes`` and dropped the oldest undelivered rows."""
    UNENCODABLE = "unencodable"
    """A record could not be serialised (a bug upstream); this event stands in for it."""
    NOT_COMMITTED = "not_committed"
    """The disk refused commits: readings held in memory beyond ``buffer.hold_max_records``, or still
    held when a stop ran out of ``buffer.close_timeout``, were given up (their seqs stay unused)."""
    BUFFER_CORRUPT = "buffer_corrupt"
    """The buffer file failed its integrity check at start and was moved aside; its undelivered rows
    were not forwarded (``detail`` names the file they may be recovered from). ``last_seq`` is the
    fresh buffer's first seq - 1 and ``first_seq`` is null: which seqs below it the damaged file
    held is not known, so every seq below it that never arrives is this loss."""
    DEVICE_BUFFER_WRAPPED = "device_buffer_wrapped"
    """The device's record buffer rotated past records the agent had not read yet."""
    DEVICE_BUFFER_CLEARED = "device_buffer_cleared"
    """The device's record buffer was cleared while it held records the agent had not read."""
    DEVICE_QUEUE_FULL = "device_queue_full"
    """The device dropped records from its full output queue (it counts them)."""
    QUARANTINED = "quarantined"
    """A stored segment failed its integrity check (hash, chain link, MAC, shape) and was moved to
    the buffer's quarantine instead of being sent; ``segments`` names it, ``seqs`` the seqs its row
    claims."""


def _seq_span(a: int | None, b: int | None, pick: Callable[[int, int], int]) -> int | None:
    """Combine two seq bounds with ``pick`` (min or max); None (no seqs were lost) adds nothing."""
    if a is None:
        return b
    if b is None:
        return a
    return pick(a, b)


def _ts_span(a: int | None, b: int | None, pick: Callable[[int, int], int]) -> int | None:
    """Combine two time bounds with ``pick`` (min or max); None (not known) stays unknown, or the
    interval would claim to contain a loss it does not."""
    return None if a is None or b is None else pick(a, b)


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data_loss {key} must be an integer or null, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Segments:
    """Segments ``first_i``..``last_i`` of one stream (a ``data_loss`` names what it removed)."""

    stream: str
    first_i: int
    last_i: int

    def data(self) -> dict[str, Any]:
        return {"stream": self.stream, "first_i": self.first_i, "last_i": self.last_i}


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, and adjacent ranges joined: the one exact form of a set of seqs or ``i``."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def _ranges_union(
    a: tuple[tuple[int, int], ...] | None, b: tuple[tuple[int, int], ...] | None
) -> tuple[tuple[int, int], ...] | None:
    if a is None or b is None:
        return a if b is None else b
    return merge_ranges((*a, *b))


def _segments_union(
    a: tuple[Segments, ...] | None, b: tuple[Segments, ...] | None
) -> tuple[Segments, ...] | None:
    if a is None or b is None:
        return a if b is None else b
    per: dict[str, list[tuple[int, int]]] = {}
    for s in (*a, *b):
        per.setdefault(s.stream, []).append((s.first_i, s.last_i))
    return tuple(Segments(stream, lo, hi) for stream in sorted(per) for lo, hi in merge_ranges(per[stream]))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data_loss {what} must be an integer, not {value!r}")
    return value


def _opt_ranges(value: Any) -> tuple[tuple[int, int], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == 2 for r in value):
        raise ValueError(f"data_loss seqs must be a list of [first, last] pairs, not {value!r}")
    return tuple((_int(r[0], "seqs"), _int(r[1], "seqs")) for r in value)


def _opt_segments(value: Any) -> tuple[Segments, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, Mapping) for s in value):
        raise ValueError(f"data_loss segments must be a list of objects, not {value!r}")
    out = []
    for s in value:
        stream = s.get("stream")
        if not isinstance(stream, str):
            raise ValueError(f"data_loss segment stream must be text, not {stream!r}")
        out.append(Segments(stream, _int(s.get("first_i"), "first_i"), _int(s.get("last_i"), "last_i")))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class DataLoss:
    """What was lost, as exactly as the raiser knows it.

    Counts are exact (an estimate belongs in ``detail``). ``readings``, ``rows`` and ``events``
    are what the agent itself lost (rows of the buffer: blocks and events, of which ``events``
    were events); ``records`` is what the device lost before the agent read it (``None``: the
    device does not say). ``first_seq``..``last_seq`` is the seq range the lost rows had (``None``
    where no seqs were assigned: shed before commit, or lost at the device). ``first_seq`` alone
    ``None`` means open below, every seq up to ``last_seq``: a ``buffer_corrupt`` loss, or a loss a
    dropped one was folded into. ``first_ts``..``last_ts``
    (ns) is a time interval containing every lost acquisition: for the buffer's reasons the times
    of the first and last lost row, for a device's the times of the records kept on either side of
    the gap (``None``: not known on that side).
    """

    KIND: ClassVar[str] = "data_loss"

    reason: LossReason
    readings: int = 0
    rows: int = 0
    events: int = 0
    records: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: int | None = None
    last_ts: int | None = None
    group: str | None = None
    """The poll group whose records were lost (device reasons)."""
    detail: str | None = None
    """Human-readable context: the encoding error, the device's own loss counter, an estimate."""
    seqs: tuple[tuple[int, int], ...] | None = None
    """The exact seq ranges lost (``first_seq``..``last_seq`` may span seqs that were not lost:
    other streams interleave); None where the raiser does not know them range by range."""
    segments: tuple[Segments, ...] | None = None
    """The stored segments removed, per stream as ``i`` intervals (buffer reasons)."""

    def __post_init__(self) -> None:
        counts = (self.readings, self.rows, self.events, 0 if self.records is None else self.records)
        if min(counts) < 0:
            raise ValueError(f"data_loss counts must not be negative: {self}")
        if self.first_seq is not None and self.last_seq is None:
            raise ValueError(f"data_loss seq range needs an end when it has a start: {self}")
        for lo, hi in ((self.first_seq, self.last_seq), (self.first_ts, self.last_ts)):
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"data_loss range {lo}..{hi} is reversed")

    @property
    def open_below(self) -> bool:
        """Every seq up to ``last_seq`` (the lower end is not known)."""
        return self.first_seq is None and self.last_seq is not None

    def merged(self, other: DataLoss) -> DataLoss:
        """This loss and ``other`` as one (this one's reason, group and detail): counts add up and
        the ranges cover both, so folding never drops a count a consumer must see."""
        records = None
        if self.records is not None or other.records is not None:
            records = (self.records or 0) + (other.records or 0)
        return DataLoss(
            reason=self.reason,
            readings=self.readings + other.readings,
            rows=self.rows + other.rows,
            events=self.events + other.events,
            records=records,
            first_seq=None
            if self.open_below or other.open_below
            else _seq_span(self.first_seq, other.first_seq, min),
            last_seq=_seq_span(self.last_seq, other.last_seq, max),
            first_ts=_ts_span(self.first_ts, other.first_ts, min),
            last_ts=_ts_span(self.last_ts, other.last_ts, max),
            group=self.group,
            detail=self.detail,
            seqs=_ranges_union(self.seqs, other.seqs),
            segments=_segments_union(self.segments, other.segments),
        )

    def data(self) -> dict[str, Any]:
        """The event's ``data`` object: every key always present (null when unknown)."""
        return {
            "reason": str(self.reason),
            "readings": self.readings,
            "rows": self.rows,
            "events": self.events,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "group": self.group,
            "detail": self.detail,
            **({} if self.seqs is None else {"seqs": [list(r) for r in self.seqs]}),
            **({} if self.segments is None else {"segments": [s.data() for s in self.segments]}),
        }

    def event(self, device: str, *, seq: int | None = None, ts_ns: int | None = None) -> Event:
        """The ``data_loss`` event of ``device`` to commit (severity alarm: loss always needs a look)."""
        if ts_ns is None:
            return Event(device, self.KIND, Severity.ALARM, self.data(), seq=seq)
        return Event(device, self.KIND, Severity.ALARM, self.data(), ts_ns=ts_ns, seq=seq)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> DataLoss:
        """Read back an event body (stored, published, or ``{"kind": ..., "data": ...}``); ValueError
        if it is not a ``data_loss`` event or its data is not this shape."""
        if body.get("kind") != cls.KIND:
            raise ValueError(f"not a {cls.KIND} event: kind {body.get('kind')!r}")
        data = body.get("data")
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.KIND} event without a data object")
        try:
            reason = LossReason(str(data.get("reason")))
        except ValueError:
            raise ValueError(f"unknown data_loss reason {data.get('reason')!r}") from None
        group, detail = data.get("group"), data.get("detail")
        if not (isinstance(group, str | None) and isinstance(detail, str | None)):
            raise ValueError(f"data_loss group and detail must be text or null: {group!r}, {detail!r}")
        return cls(
            reason,
            readings=_opt_int(data, "readings") or 0,
            rows=_opt_int(data, "rows") or 0,
            events=_opt_int(data, "events") or 0,
            records=_opt_int(data, "records"),
            first_seq=_opt_int(data, "first_seq"),
            last_seq=_opt_int(data, "last_seq"),
            first_ts=_opt_int(data, "first_ts"),
            last_ts=_opt_int(data, "last_ts"),
            group=group,
            detail=detail,
            seqs=_opt_ranges(data.get("seqs")),
            segments=_opt_segments(data.get("segments")),
        )

    @classmethod
    def from_event(cls, event: Event) -> DataLoss:
        """The loss an (uncommitted or committed) event describes; ValueError as in :meth:`from_body`."""
        return cls.from_body({"kind": event.kind, "data": event.data})


@dataclass(frozen=True, slots=True)
class DeviceConnected:
    """A device's connection came up (``device_state``, ``state: connected``)."""

    KIND: ClassVar[str] = "device_state"

    previous_error: str | None
    """Why it was down, None on the first connection."""

    def event(self, device: str) -> Event:
        data = {"state": "connected", "previous_error": self.previous_error}
        return Event(device, self.KIND, Severity.INFO, data)


@dataclass(frozen=True, slots=True)
class DeviceDisconnected:
    """A device's connection failed or was lost (``device_state``, ``state: disconnected``); raised
    once per outage, not per retry."""

    KIND: ClassVar[str] = "device_state"

    reason: str
    """A :class:`~agent.core.records.Reason` value or a protocol-specific one."""
    detail: str

    def event(self, device: str) -> Event:
        data = {"state": "disconnected", "reason": self.reason, "detail": self.detail}
        return Event(device, self.KIND, Severity.WARNING, data)


@dataclass(frozen=True, slots=True)
class ProfileMismatch:
    """How a device compares with the ``device:`` block of its profile (``profile_mismatch``), said
    when that changes: a device the profile was not written for (severity warning), one whose
    identity cannot tell (info), and one that matches again after either (info). Its readings go on
    being acquired either way; the event lets a reviewer see which were read with a map that may
    not fit the instrument."""

    KIND: ClassVar[str] = "profile_mismatch"

    profile: str
    compat: Compat
    expected: Mapping[str, list[str] | None]
    """What the profile names per field (:meth:`DeviceCompat.expected`)."""
    reported: Mapping[str, str | None]
    """What the device reported per field, None where it reported nothing readable."""

    @classmethod
    def of(cls, profile: str, device: DeviceCompat, reported: Reported) -> ProfileMismatch:
        """Compare ``reported`` with the profile's ``device:`` block."""
        return cls(
            profile, device.check(reported), device.expected(), {f: getattr(reported, f) for f in FIELDS}
        )

    def data(self) -> dict[str, Any]:
        """The event's ``data``: every key always present."""
        return {
            "outcome": str(self.compat.outcome),
            "profile": self.profile,
            "fields": {k: str(v) for k, v in self.compat.fields.items()},
            "expected": dict(self.expected),
            "reported": dict(self.reported),
            "detail": self.compat.detail,
        }

    def event(self, device: str) -> Event:
        severity = Severity.WARNING if self.compat.outcome is Outcome.MISMATCH else Severity.INFO
        return Event(device, self.KIND, severity, self.data())


@dataclass(frozen=True, slots=True)
class SeqSkip:
    """Seqs the agent will never use (``seq_skip``): a tool wrote to the buffer above the agent's
    reserved window, so the agent continued above it and left the rest of its window unused. It
    lets a verifier explain those seqs rather than count them as lost."""

    KIND: ClassVar[str] = "seq_skip"

    first_seq: int
    last_seq: int

    def event(self) -> Event:
        data = {"first_seq": self.first_seq, "last_seq": self.last_seq, "reason": "window_skipped"}
        return Event(AGENT_DEVICE, self.KIND, Severity.INFO, data)
