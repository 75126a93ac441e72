"""The exception report of one batch, as typed findings: what a reviewer must look at, and nothing
a clean batch does not need.

Which records are the batch's: a device's blocks and events name the batch context of their
acquisition time in their ``batch`` member (``{batch_id}#{n}``), so counts and point events
(alarms) are joined by that ref, exactly as the agent stamped them. What lasts (an excursion, an
outage, a loss) belongs to the batch when its interval overlaps the device's time in the batch,
from its ``batch_context`` start to its end: an excursion that began before the start is still the
batch's problem. The agent's own records (restarts, configuration changes, the audit trail) name no
batch; they count when they fall in the batch's time window and concern one of its devices or the
whole agent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.core.batch import BatchContext, split_ref
from agent.core.records import AGENT_DEVICE
from agent.review.collect import END_OF_TIME, Collected, Finding, Rec

SCHEMA = "cleanroom-edge/batch-report/1"
PLOT_WINDOW_NS = 600 * 1_000_000_000
"""Readings plotted on either side of an excursion: ten minutes show how it came and went."""

CHANGE_ACTIONS = frozenset({
    "config_change", "limits_load", "model_load", "model_refused", "model_mode", "model_unload",
    "integrity_key_change", "agent_start", "agent_stop", "buffer_replaced", "buffer_prune",
    "batch_restore_failed",
})  # fmt: skip
"""Audit actions that change what the agent measures or judges with."""
CHANGE_EVENTS = frozenset({"profile_mismatch", "model_disabled", "drift"})
"""Device events that say the instrument or a model is not what it was validated as."""
BATCH_ACTIONS = frozenset({"batch_start", "batch_step", "batch_end"})
"""The batch's own assignment changes: in the header, not among the exceptions."""
REFERENCE_NOTE = "no reference sample of the batch's devices entered: none recorded"


class BatchNotFound(LookupError):
    """No ``batch_context`` event names the batch; ``known`` lists the batch ids that one does."""

    def __init__(self, batch_id: str, known: Sequence[str]) -> None:
        self.batch_id, self.known = batch_id, tuple(known)
        listed = ", ".join(known) if known else "none (no batch_context event in it)"
        super().__init__(f"batch {batch_id!r} is not in this input; batches it holds: {listed}")


@dataclass(frozen=True, slots=True)
class Classification:
    """A particle counter's room, from the limits configuration: what its excursions are judged by."""

    grade: str | None = None
    iso_class_at_rest: int | None = None
    iso_class_in_operation: int | None = None


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class ContextChange:
    """A start, step or end of the batch on one device: when, by whom, from which source, why."""

    device: str
    ref: str
    phase: str
    step: str | None
    ts: int
    source: str
    actor: str
    reason: str


@dataclass(frozen=True, slots=True)
class Interval:
    """A device's time in the batch; ``end_ts`` None: not ended in this input."""

    device: str
    start_ts: int
    end_ts: int | None


@dataclass(frozen=True, slots=True)
class Header:
    batch_id: str
    coi_id: str | None
    product: str | None
    devices: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    start_ts: int
    end_ts: int | None
    intervals: tuple[Interval, ...]
    changes: tuple[ContextChange, ...]
    refs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RecordCount:
    device: str
    readings: int
    bad: int
    uncertain: int
    events: int


@dataclass(frozen=True, slots=True)
class Excursion:
    device: str
    tag: str
    limit_kind: str | None
    level: str | None
    limit: float | None
    start_ts: int
    end_ts: int | None
    """None: still beyond the limit at the end of the input."""
    peak: float | None
    duration_s: float | None
    classification: str | None
    """Annex 1 grade or ISO class of the room, where the event or the limits configuration says."""


@dataclass(frozen=True, slots=True)
class Alarm:
    device: str
    ts: int
    condition: str | None
    source: str | None
    message: str | None
    severity_ua: int | None
    active: bool | None
    acked: bool | None
    event_type: str | None


@dataclass(frozen=True, slots=True)
class TopSignal:
    signal: str
    tag: str | None
    contribution: float | None
    value: float | None
    unit: str | None


@dataclass(frozen=True, slots=True)
class Anomaly:
    device: str
    binding: str | None
    model: str | None
    shadow: bool
    start_ts: int
    end_ts: int | None
    peak_score: float | None
    threshold: float | None
    top_signals: tuple[TopSignal, ...]


@dataclass(frozen=True, slots=True)
class ReferenceSample:
    """An offline sample compared with the online probe (a ``reference_sample`` event)."""

    device: str
    tag: str
    sample_ts: int
    offline: float | None
    online: float | None
    """None: no good online reading near the sample time (not compared)."""
    unit: str | None
    difference: float | None
    limit: float | None
    within: bool | None
    """False: the difference exceeds the profile's limit (the probe drifted)."""
    severity: str | None
    sample_id: str | None
    actor: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class ReferenceSamples:
    recorded: bool
    """Any sample of the batch's devices was entered."""
    note: str
    samples: tuple[ReferenceSample, ...] = ()


@dataclass(frozen=True, slots=True)
class Gap:
    """Data missing from the batch's record, with its cause (``explained`` False: none recorded)."""

    kind: str
    """``data_loss``, ``device_outage``, ``agent_restart``, ``clock_step`` or ``chain`` (the verifier's)."""
    device: str | None
    from_ts: int | None
    to_ts: int | None
    cause: str
    detail: str | None
    readings_lost: int | None
    explained: bool


@dataclass(frozen=True, slots=True)
class Change:
    ts: int
    kind: str
    """The audit action, or the event kind."""
    device: str | None
    actor: str | None
    reason: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class OperatorAction:
    ts: int
    action: str
    target: str | None
    actor: str
    reason: str | None
    device: str | None


@dataclass(frozen=True, slots=True)
class Conflict:
    ts: int
    kind: str
    """``batch_conflict`` (sources disagree) or ``batch_refused`` (a command was refused)."""
    device: str | None
    source: str | None
    actor: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class Plot:
    """The readings around one excursion (``excursion``: its index in ``excursions``)."""

    excursion: int
    device: str
    tag: str
    unit: str | None
    limit: float | None
    from_ts: int
    to_ts: int
    ts: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """The part of a stream that holds the batch's records, as checked."""

    stream: str
    first_i: int | None
    last_i: int | None
    segments: int


@dataclass(frozen=True, slots=True)
class Integrity:
    verifier: str
    """``buffer`` (``verify --buffer``'s checks) or ``capture`` (``verify --capture``'s)."""
    ok: bool
    """No unexplained finding in the part of the record that holds the batch."""
    input_ok: bool
    """The whole input verified clean (findings elsewhere do not concern this batch)."""
    mac_checked: bool
    streams: tuple[StreamCheck, ...]
    findings: tuple[Finding, ...]


@dataclass(frozen=True, slots=True)
class SignOff:
    reviewer: str | None = None
    date: str | None = None
    decision: str | None = None


@dataclass(frozen=True, slots=True)
class Source:
    kind: str
    path: str
    agent: str | None


@dataclass(frozen=True, slots=True)
class BatchReport:
    schema: str
    generated_ts: int
    source: Source
    header: Header
    records: tuple[RecordCount, ...]
    excursions: tuple[Excursion, ...]
    alarms: tuple[Alarm, ...]
    anomalies: tuple[Anomaly, ...]
    reference_samples: ReferenceSamples
    gaps: tuple[Gap, ...]
    changes: tuple[Change, ...]
    operator_actions: tuple[OperatorAction, ...]
    conflicts: tuple[Conflict, ...]
    plots: tuple[Plot, ...]
    integrity: Integrity
    sign_off: SignOff = field(default_factory=SignOff)


# --------------------------------------------------------------------------- the batch


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def known_batches(events: Iterable[Rec]) -> list[str]:
    return sorted({b for e in events if e.kind == BatchContext.KIND and (b := _str(e.data.get("batch_id")))})


class Batch:
    """The batch as its ``batch_context`` events say: devices, their time in it, its refs."""

    def __init__(self, batch_id: str, events: Sequence[Rec], input_start: int) -> None:
        """``input_start``: the earliest record of the input, where a batch whose start the input
        does not hold (a capture begun during it) is taken to begin."""
        contexts = [e for e in events if e.kind == BatchContext.KIND and e.data.get("batch_id") == batch_id]
        if not contexts:
            raise BatchNotFound(batch_id, known_batches(events))
        self.id = batch_id
        contexts.sort(key=lambda e: (self._from(e), e.seq))
        self.contexts = contexts
        self.refs: dict[str, set[str]] = defaultdict(set)
        self.intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
        groups: dict[tuple[str, ...], None] = {}
        open_at: dict[str, int] = {}
        for e in contexts:
            device, phase, at = e.device, e.data.get("phase"), self._from(e)
            if (ref := _str(e.data.get("ref"))) is not None:
                self.refs[device].add(ref)
            group = e.data.get("group")
            if isinstance(group, list) and group:
                groups[tuple(str(d) for d in group)] = None
            if phase == "end":  # without its start in the input: it began before the input did
                self.intervals[device].append((open_at.pop(device, input_start), at))
            elif device not in open_at:
                open_at[device] = at
        for device, at in open_at.items():
            self.intervals[device].append((at, END_OF_TIME))
        self.devices = tuple(sorted(self.intervals))
        self.groups = tuple(groups)
        self.start = min(a for iv in self.intervals.values() for a, _ in iv)
        self.end = max(b for iv in self.intervals.values() for _, b in iv)

    @staticmethod
    def _from(e: Rec) -> int:
        at = _int(e.data.get("from_ts"))
        return e.ts if at is None else at

    def stamped(self, r: Rec) -> bool:
        """The agent stamped this record of one of the batch's devices with a ref of the batch
        (``{batch_id}#{n}``: any of its changes, also those before the input began)."""
        if r.batch is None or r.device not in self.intervals:
            return False
        try:
            return split_ref(r.batch)[0] == self.id
        except ValueError:
            return False

    def overlaps(self, device: str | None, first: int | None, last: int | None) -> bool:
        """``first``..``last`` (None: open) meets the device's time in the batch (None or the agent:
        the batch's window)."""
        lo = -1 if first is None else first
        hi = END_OF_TIME if last is None else last
        if device is None or device == AGENT_DEVICE:
            return lo <= self.end and hi >= self.start
        return any(lo <= b and hi >= a for a, b in self.intervals.get(device, ()))

    def mentions(self, data: Mapping[str, Any]) -> bool:
        """An audit record or command about this batch, whatever device or time it names."""
        if self.id in (data.get("target"), data.get("batch_id")):
            return True
        return any(
            isinstance(v := data.get(k), Mapping) and v.get("batch_id") == self.id
            for k in ("new", "old", "claimed")
        )

    def header(self) -> Header:
        starts = [e for e in self.contexts if e.data.get("phase") == "start"] or self.contexts
        first = starts[0].data
        changes = tuple(
            ContextChange(
                e.device, str(e.data.get("ref", "")), str(e.data.get("phase", "")), _str(e.data.get("step")),
                self._from(e), str(e.data.get("source", "")), str(e.data.get("actor", "")),
                str(e.data.get("reason", "")),
            )
            for e in self.contexts
        )  # fmt: skip
        intervals = tuple(
            Interval(d, a, None if b == END_OF_TIME else b)
            for d in self.devices
            for a, b in self.intervals[d]
        )
        refs = tuple(sorted({r for refs in self.refs.values() for r in refs}))
        return Header(
            self.id, _str(first.get("coi_id")), _str(first.get("product")), self.devices, self.groups,
            self.start, None if self.end == END_OF_TIME else self.end, intervals, changes, refs,
        )  # fmt: skip


# --------------------------------------------------------------------------- sections


def _classification(data: Mapping[str, Any], cls: Classification | None) -> str | None:
    """The room's grade or class for a particle excursion: the event's own word first."""
    state = _str(data.get("state"))
    where = f" ({state.replace('_', ' ')})" if state else ""
    if (grade := _str(data.get("grade"))) is not None:
        return f"Annex 1 grade {grade}{where}"
    if (iso := _int(data.get("iso_class"))) is not None:
        return f"ISO 14644-1 class {iso}{where}"
    if cls is None or not str(data.get("limit_kind", "")).startswith("particles_"):
        return None
    if cls.grade is not None:
        return f"Annex 1 grade {cls.grade}{where}"
    iso = cls.iso_class_at_rest if state == "at_rest" else cls.iso_class_in_operation
    return None if iso is None else f"ISO 14644-1 class {iso}{where}"


def _excursions(
    batch: Batch, events: Sequence[Rec], classes: Mapping[str, Classification]
) -> tuple[Excursion, ...]:
    runs: dict[tuple[Any, ...], dict[str, Rec]] = {}
    for e in events:
        if e.kind != "excursion" or e.device not in batch.intervals:
            continue
        d = e.data
        start = _int(d.get("start_ts"))
        key = (e.device, d.get("tag"), d.get("limit_kind"), d.get("level"), e.ts if start is None else start)
        runs.setdefault(key, {})[str(d.get("phase"))] = e
    out = []
    for (device, tag, kind, level, start), run in runs.items():
        end = run.get("end")
        end_ts = None if end is None else _int(end.data.get("end_ts")) or end.ts
        if not batch.overlaps(device, start, end_ts):
            continue
        d = (end or run.get("start") or next(iter(run.values()))).data
        out.append(
            Excursion(
                device, str(tag), _str(kind), _str(level), _num(d.get("limit")), start, end_ts,
                _num(d.get("peak")), None if end is None else _num(end.data.get("duration_s")),
                _classification(d, classes.get(device)),
            )
        )  # fmt: skip
    return tuple(sorted(out, key=lambda x: (x.start_ts, x.device, x.tag)))


def _alarms(batch: Batch, events: Sequence[Rec]) -> tuple[Alarm, ...]:
    """Device alarms stamped with the batch; a notification repeated by a condition refresh after a
    reconnect keeps its ``event_id`` and is listed once."""
    seen: set[str] = set()
    out = []
    for e in events:
        if e.kind != "alarm" or not batch.stamped(e):
            continue
        d = e.data
        if (eid := _str(d.get("event_id"))) is not None:
            if eid in seen:
                continue
            seen.add(eid)
        out.append(
            Alarm(e.device, e.ts, _str(d.get("condition")), _str(d.get("source")), _str(d.get("message")),
                  _int(d.get("severity_ua")), _bool(d.get("active")), _bool(d.get("acked")),
                  _str(d.get("event_type")))
        )  # fmt: skip
    return tuple(out)


def _reference_samples(batch: Batch, events: Sequence[Rec]) -> ReferenceSamples:
    """Samples of the batch's devices drawn during their time in it (entered maybe after its end,
    when the lab's result came back), or entered while the device held it."""
    out = []
    for e in events:
        if e.kind != "reference_sample":
            continue
        d = e.data
        at = _int(d.get("sample_ts"))
        if not (batch.stamped(e) or (at is not None and batch.overlaps(e.device, at, at))):
            continue
        out.append(
            ReferenceSample(
                e.device, _str(d.get("tag")) or "", e.ts if at is None else at, _num(d.get("offline")),
                _num(d.get("online")), _str(d.get("unit")), _num(d.get("difference")), _num(d.get("limit")),
                _bool(d.get("within")), _str(e.body.get("severity")), _str(d.get("sample_id")),
                _str(d.get("actor")), _str(d.get("reason")),
            )
        )  # fmt: skip
    out.sort(key=lambda r: (r.sample_ts, r.device, r.tag))
    return ReferenceSamples(bool(out), "" if out else REFERENCE_NOTE, tuple(out))


def _top(value: Any) -> tuple[TopSignal, ...]:
    out = []
    for s in value if isinstance(value, list) else ():
        if isinstance(s, Mapping) and isinstance(s.get("signal"), str):
            out.append(TopSignal(s["signal"], _str(s.get("tag")), _num(s.get("contribution")),
                                 _num(s.get("value")), _str(s.get("unit"))))  # fmt: skip
    return tuple(out)


def _anomalies(batch: Batch, events: Sequence[Rec]) -> tuple[Anomaly, ...]:
    runs: dict[tuple[Any, ...], dict[str, Rec]] = {}
    for e in events:
        if e.kind == "anomaly" and e.device in batch.intervals:
            start = _int(e.data.get("start_ts"))
            key = (e.device, e.data.get("binding"), e.ts if start is None else start)
            runs.setdefault(key, {})[str(e.data.get("phase"))] = e
    out = []
    for (device, binding, start), run in runs.items():
        end = run.get("end")
        end_ts = None if end is None else _int(end.data.get("end_ts")) or end.ts
        if not batch.overlaps(device, start, end_ts):
            continue
        d = (end or next(iter(run.values()))).data
        model = d.get("model")
        name = f"{model.get('id')} {model.get('version')}" if isinstance(model, Mapping) else _str(model)
        out.append(
            Anomaly(device, _str(binding), name, bool(d.get("shadow")), start, end_ts,
                    _num(d.get("peak_score")), _num(d.get("threshold")), _top(d.get("top_signals")))
        )  # fmt: skip
    return tuple(sorted(out, key=lambda x: (x.start_ts, x.device)))


def _gaps(batch: Batch, events: Sequence[Rec], relevant: Sequence[Finding]) -> tuple[Gap, ...]:
    out: list[Gap] = []
    states: dict[str, list[Rec]] = defaultdict(list)
    for e in events:
        d = e.data
        mine = e.device == AGENT_DEVICE or e.device in batch.intervals
        if e.kind == "data_loss" and mine:
            lo, hi = _int(d.get("first_ts")), _int(d.get("last_ts"))
            if batch.stamped(e) or batch.overlaps(
                e.device, e.ts if lo is None else lo, e.ts if hi is None else hi
            ):
                readings = _int(d.get("readings"))
                out.append(Gap("data_loss", e.device, lo, hi, str(d.get("reason")), _str(d.get("detail")),
                               readings, True))  # fmt: skip
        elif e.kind == "device_state" and e.device in batch.intervals:
            states[e.device].append(e)
        elif e.kind == "agent_restart":
            lo, hi = _int(d.get("from_ts")), _int(d.get("until_ts"))
            if batch.overlaps(None, lo, hi):
                out.append(Gap("agent_restart", None, lo, hi, "agent restart after an unclean stop",
                               None, None, True))  # fmt: skip
        elif e.kind == "clock_step":
            lo, hi = _int(d.get("wall_before_ns")), _int(d.get("wall_after_ns"))
            if batch.overlaps(None, e.ts, e.ts):
                out.append(Gap("clock_step", None, lo, hi, "the gateway clock stepped",
                               f"step {d.get('step_s')} s", None, True))  # fmt: skip
    for device, seq in states.items():
        down: Rec | None = None
        for e in sorted(seq, key=lambda r: r.seq):
            if e.data.get("state") == "disconnected" and down is None:
                down = e
            elif e.data.get("state") == "connected" and down is not None:
                out += _outage(batch, device, down, e.ts)
                down = None
        if down is not None:
            out += _outage(batch, device, down, None)
    for f in relevant:
        if f.what == "gap" and (f.problem or f.cause == "retention"):
            detail = f"{f.detail} ({f.unit} {f.first}..{f.last})"
            out.append(
                Gap("chain", f.where, f.first, f.last, f.cause or "UNEXPLAINED", detail, None, not f.problem)
            )
    return tuple(out)


def _outage(batch: Batch, device: str, down: Rec, until: int | None) -> list[Gap]:
    """The outage from ``down`` to ``until`` (None: not back in this input), if the batch's."""
    if not batch.overlaps(device, down.ts, until):
        return []
    d = down.data
    return [Gap("device_outage", device, down.ts, until, f"device disconnected ({d.get('reason')})",
                _str(d.get("detail")), None, True)]  # fmt: skip


def _detail(d: Mapping[str, Any]) -> str | None:
    parts = [f"{k} {d[k]}" for k in ("old", "new") if d.get(k) is not None]
    return "; ".join(parts) or None


def _devices_named(d: Mapping[str, Any]) -> list[str]:
    """The devices an audit record concerns: its ``device``, or those its request named (a refused
    command is audited by the agent, naming the request)."""
    if isinstance(device := d.get("device"), str):
        return [device]
    new = d.get("new")
    if not isinstance(new, Mapping):
        return []
    named = new.get("devices", new.get("device"))
    return (
        [named]
        if isinstance(named, str)
        else [x for x in named if isinstance(x, str)]
        if isinstance(named, list)
        else []
    )


def _audits(
    batch: Batch, events: Sequence[Rec]
) -> tuple[tuple[Change, ...], tuple[OperatorAction, ...], list[Rec]]:
    changes: list[Change] = []
    actions: list[OperatorAction] = []
    refused: list[Rec] = []
    for e in events:
        d = e.data
        if e.kind in CHANGE_EVENTS and batch.stamped(e):
            detail = _str(d.get("detail")) or _str(d.get("reason")) or _str(d.get("outcome"))
            changes.append(Change(e.ts, e.kind, e.device, None, None, detail))
            continue
        if e.kind != "audit":
            continue
        named = _devices_named(d)
        mine = [n for n in named if n in batch.intervals]
        about = batch.mentions(d) or ((not named or bool(mine)) and batch.overlaps(None, e.ts, e.ts))
        action, actor = str(d.get("action")), str(d.get("actor", ""))
        if not about or (action in BATCH_ACTIONS and (mine or batch.mentions(d))):
            continue
        device = ", ".join(mine or named) or None
        if action == "batch_refused":
            refused.append(e)
        if action in CHANGE_ACTIONS:
            changes.append(Change(e.ts, action, device, actor, _str(d.get("reason")), _detail(d)))
        if not actor.startswith("agent:"):
            actions.append(
                OperatorAction(e.ts, action, _str(d.get("target")), actor, _str(d.get("reason")), device)
            )
    return tuple(changes), tuple(actions), refused


def _conflicts(batch: Batch, events: Sequence[Rec], refused: Sequence[Rec]) -> tuple[Conflict, ...]:
    out = []
    for e in events:
        if e.kind != "batch_conflict" or e.device not in batch.intervals:
            continue
        if batch.stamped(e) or batch.overlaps(e.device, e.ts, e.ts) or batch.mentions(e.data):
            d = e.data
            out.append(Conflict(e.ts, e.kind, e.device, _str(d.get("source")), _str(d.get("actor")),
                                _str(d.get("detail"))))  # fmt: skip
    for e in refused:  # audited by the agent, naming who asked (``requested_by``)
        d = e.data
        detail = f"{d.get('target')} refused ({d.get('refusal')}): {d.get('reason')}"
        device = ", ".join(_devices_named(d)) or None
        out.append(Conflict(e.ts, "batch_refused", device, _str(d.get("source")),
                            _str(d.get("requested_by")) or _str(d.get("actor")), detail))  # fmt: skip
    return tuple(sorted(out, key=lambda c: c.ts))


@dataclass(slots=True)
class _Scan:
    """What one pass over the blocks gathers: blocks are never all held (a two-week batch)."""

    tally: dict[str, list[int]]
    """Per device: readings, bad, uncertain, events."""
    points: list[tuple[list[int], list[float], list[str | None]]]
    """Per excursion: the times and values of its plot, and the tag's unit."""
    seqs: tuple[int, int] | None = None
    """The lowest and highest seq of the batch's records."""

    def seq(self, seq: int, last: int) -> None:
        lo, hi = self.seqs or (seq, last)
        self.seqs = (min(lo, seq), max(hi, last))


def _plot_range(x: Excursion, batch: Batch) -> tuple[int, int]:
    end = x.end_ts if x.end_ts is not None else batch.end
    return x.start_ts - PLOT_WINDOW_NS, min(END_OF_TIME, end + PLOT_WINDOW_NS)


def _scan(
    batch: Batch, blocks: Iterable[Rec], events: Sequence[Rec], excursions: Sequence[Excursion]
) -> _Scan:
    scan = _Scan({d: [0, 0, 0, 0] for d in batch.devices}, [([], [], [None]) for _ in excursions])
    ranges = [(x, *_plot_range(x, batch), scan.points[n]) for n, x in enumerate(excursions)]
    for e in events:
        if batch.stamped(e):
            scan.tally[e.device][3] += 1
            scan.seq(e.seq, e.seq)
    for b in blocks:
        n = _int(b.body.get("n")) or 0
        if batch.stamped(b):
            quality = b.body.get("quality")
            q = quality if isinstance(quality, list) else []
            t = scan.tally[b.device]
            t[0] += n
            t[1] += q.count("bad")
            t[2] += q.count("uncertain")
            scan.seq(b.seq, b.seq + max(n, 1) - 1)
        for x, lo, hi, (ts, values, unit) in ranges:
            if b.device == x.device and lo <= b.ts <= hi:
                _point(b, x.tag, ts, values, unit)
    return scan


def _point(b: Rec, tag: str, ts: list[int], values: list[float], unit: list[str | None]) -> None:
    """The good numeric reading of ``tag`` in ``b``, if it has one."""
    tags, vals, quality, units = (b.body.get(k) for k in ("tags", "values", "quality", "units"))
    if not isinstance(tags, list) or not isinstance(vals, list) or tag not in tags:
        return
    at = tags.index(tag)
    good = not isinstance(quality, list) or (at < len(quality) and quality[at] == "good")
    if good and at < len(vals) and (v := _num(vals[at])) is not None:
        ts.append(b.ts)
        values.append(v)
        if isinstance(units, list) and at < len(units) and isinstance(units[at], str):
            unit[0] = units[at]


def _plots(excursions: Sequence[Excursion], scan: _Scan, batch: Batch) -> tuple[Plot, ...]:
    out = []
    for n, (x, (ts, values, unit)) in enumerate(zip(excursions, scan.points, strict=True)):
        lo, hi = _plot_range(x, batch)
        if hi == END_OF_TIME:  # still beyond the limit, the batch not ended: up to the last reading
            hi = max([x.start_ts, *ts]) + PLOT_WINDOW_NS
        order = sorted(range(len(ts)), key=ts.__getitem__)
        out.append(Plot(n, x.device, x.tag, unit[0], x.limit, lo, hi, tuple(ts[i] for i in order),
                        tuple(values[i] for i in order)))  # fmt: skip
    return tuple(out)


# --------------------------------------------------------------------------- integrity


def _stream_range(batch: Batch, collected: Collected, stream: str) -> StreamCheck | None:
    """The stored part of ``stream`` that can hold the batch's records: from the last segment wholly
    before the batch to the first wholly after it, so a gap at either edge is the batch's too."""
    device = stream.split("/", 1)[0]
    spans = collected.spans.get(stream, [])
    inside = [s for s in spans if batch.overlaps(device, s.first_ts, s.last_ts)]
    if not inside:
        return None
    before = [s.i for s in spans if s.i < inside[0].i]
    after = [s.i for s in spans if s.i > inside[-1].i]
    return StreamCheck(stream, max(before, default=inside[0].i), min(after, default=None), len(inside))


def _relevant(
    f: Finding, batch: Batch, checks: Mapping[str, StreamCheck], seqs: tuple[int, int] | None
) -> bool:
    if f.where is None:
        return True
    lo, hi = (-1 if f.first is None else f.first), (END_OF_TIME if f.last is None else f.last)
    if f.unit == "seq":
        return seqs is not None and lo <= seqs[1] and hi >= seqs[0]
    if f.unit == "ns":
        return batch.overlaps(f.where.split("/", 1)[0], lo, hi)
    check = checks.get(f.where)
    if check is None:
        return False
    first = -1 if check.first_i is None else check.first_i
    last = END_OF_TIME if check.last_i is None else check.last_i
    return lo <= last and hi >= first


def _integrity(batch: Batch, collected: Collected, seqs: tuple[int, int] | None) -> Integrity:
    streams = [f"{d}/{k}" for d in batch.devices for k in ("data", "events")]
    streams += ["agent/events", "agent/audit"]
    checks = {s: c for s in streams if (c := _stream_range(batch, collected, s)) is not None}
    v = collected.verification
    findings = tuple(f for f in v.findings if _relevant(f, batch, checks, seqs))
    ok = not any(f.problem for f in findings)
    return Integrity(v.verifier, ok, v.ok, v.mac_checked, tuple(checks.values()), findings)


# --------------------------------------------------------------------------- the report


def build_report(
    collected: Collected,
    batch_id: str,
    *,
    generated_ts: int,
    classes: Mapping[str, Classification] | None = None,
) -> BatchReport:
    """The report of ``batch_id``; :class:`BatchNotFound` when no ``batch_context`` names it.
    ``collected.blocks`` is read once, and must hold at least the batch devices' blocks of the
    batch's window and :data:`PLOT_WINDOW_NS` either side (:func:`window`)."""
    events = sorted(collected.events, key=lambda e: e.seq)
    batch = Batch(batch_id, events, _input_start(collected))
    excursions = _excursions(batch, events, classes or {})
    scan = _scan(batch, collected.blocks, events, excursions)
    integrity = _integrity(batch, collected, scan.seqs)
    changes, actions, refused = _audits(batch, events)
    return BatchReport(
        schema=SCHEMA,
        generated_ts=generated_ts,
        source=Source(collected.kind, collected.path, collected.agent),
        header=batch.header(),
        records=tuple(RecordCount(d, *t) for d, t in scan.tally.items()),
        excursions=excursions,
        alarms=_alarms(batch, events),
        anomalies=_anomalies(batch, events),
        reference_samples=_reference_samples(batch, events),
        gaps=_gaps(batch, events, integrity.findings),
        changes=changes,
        operator_actions=actions,
        conflicts=_conflicts(batch, events, refused),
        plots=_plots(excursions, scan, batch),
        integrity=integrity,
    )


def _input_start(collected: Collected) -> int:
    firsts = [s.first_ts for spans in collected.spans.values() for s in spans]
    return min(firsts or [e.ts for e in collected.events] or [0])


def window(collected: Collected, batch_id: str) -> tuple[tuple[str, ...], int, int | None]:
    """The devices and the time range whose blocks a report of ``batch_id`` reads (with the
    plots' margin); :class:`BatchNotFound` as :func:`build_report`."""
    batch = Batch(batch_id, collected.events, _input_start(collected))
    until = None if batch.end == END_OF_TIME else batch.end + PLOT_WINDOW_NS
    return batch.devices, batch.start - PLOT_WINDOW_NS, until
