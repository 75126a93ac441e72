"""Verify a capture offline: is what arrived downstream complete, unaltered and in order, and is
every gap explained by the agent's own records? (docs/integrity.md, "Verifying a capture").

Nothing here needs the gateway: the chain (``chain.stream``, ``chain.i``, ``chain.prev``, the hash of
each payload, the optional MAC) and the explanations (``data_loss``, ``seq_skip``, ``agent_restart``,
``device_state``, ``clock_step``, the audit trail, the session of each ``online`` status) all travel
in the messages; so does ``integrity_key_change``, which says from which ``i`` on each stream is
signed with the key. A finding names the capture lines it rests on, so a reviewer can look at the
evidence himself.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core import chain
from agent.core.records import AGENT_DEVICE
from agent.integrity.capture import Captured

BreakKind = Literal[
    "altered",  # a segment's hash is not the prev its successor names
    "inserted",  # a second segment claims an i, and it is not the one the chain links
    "conflict",  # several segments claim an i and the chain does not tell which is genuine
    "bad_mac",  # the MAC is not the key's
    "missing_mac",  # a key was given and the segment carries no MAC
    "moved",  # the topic is not {prefix}/{chain.stream}
    "malformed",  # not a segment, not a status: nothing the agent publishes looks like it
    "reorder",  # a segment arrived after a later one of its stream
    "bad_genesis",  # segment 0 does not start from GENESIS
    "seq_conflict",  # two different segments claim the same seq
    "foreign_agent",  # a segment of another agent in this agent's capture
    "empty",  # no segment at all: nothing was verified
    "quarantined",  # the agent found a stored segment damaged and set it aside: data was lost
    "status_bad_mac",  # a key was given and a status message is unsigned or not signed with it
]

GapKind = Literal["segments", "seqs", "time", "restart"]

TIME_GAP_FACTOR = 3.0
"""A pause between two blocks of one poll group longer than this many times its median interval..."""
TIME_GAP_MIN_NS = 2_000_000_000
"""...and longer than this is a time gap that needs a recorded cause (jitter below it is not)."""


@dataclass(frozen=True, slots=True)
class Break:
    """A finding that is never explained: the capture is not what the agent published."""

    kind: BreakKind
    stream: str | None
    i: int | None
    lines: tuple[int, ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Something missing: chain positions (``segments``: ``first``..``last`` are i), seqs, a pause in
    acquisition (``time``: ns), or a chain that started afresh (``restart``). ``cause`` is the
    agent's record that explains it, None when nothing does."""

    kind: GapKind
    where: str
    first: int
    last: int
    cause: str | None
    lines: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A second copy of a segment (same hash). ``cause`` None: a replay nothing the agent recorded
    explains."""

    stream: str
    i: int
    lines: tuple[int, int]
    cause: str | None


@dataclass(frozen=True, slots=True)
class StreamSummary:
    stream: str
    first_i: int
    last_i: int
    segments: int
    records: int
    readings: int
    mac_unchecked: int = 0
    """Segments from before the key took effect (``integrity_key_change``) without a valid MAC:
    they rest on the hash chain alone, anchored by the first signed segment after them."""


@dataclass(frozen=True, slots=True)
class CaptureReport:
    messages: int
    agent: str | None
    prefix: str | None
    sessions: tuple[str, ...]
    mac_checked: bool
    streams: tuple[StreamSummary, ...]
    seq_window: tuple[int, int] | None
    """[S, E]: the seqs every data stream covers in this capture, checked for completeness."""
    gaps: tuple[Gap, ...]
    duplicates: tuple[Duplicate, ...]
    breaks: tuple[Break, ...]

    @property
    def problems(self) -> int:
        """Unexplained findings: any one fails the verification."""
        return (
            len(self.breaks)
            + sum(g.cause is None for g in self.gaps)
            + sum(d.cause is None for d in self.duplicates)
        )

    @property
    def ok(self) -> bool:
        return self.problems == 0

    @property
    def records(self) -> int:
        return sum(s.records for s in self.streams)

    @property
    def readings(self) -> int:
        return sum(s.readings for s in self.streams)

    @property
    def mac_unchecked(self) -> int:
        return sum(s.mac_unchecked for s in self.streams)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class _Arrival:
    pos: int
    line: int
    topic: str
    payload: bytes
    seg: chain.Segment


@dataclass(slots=True)
class _Event:
    line: int
    device: str
    seq: int
    ts: int
    kind: str
    data: Mapping[str, Any]
    suspect: bool
    """In a segment already reported (inserted, bad MAC): it explains nothing."""


@dataclass(slots=True)
class _Block:
    line: int
    device: str
    group: str
    seq: int
    n: int
    ts: int
    suspect: bool


@dataclass(slots=True)
class _Status:
    pos: int
    line: int
    status: str
    session: str | None


@dataclass(slots=True)
class _State:
    """What the checks gather as they go."""

    breaks: list[Break] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    duplicates: list[tuple[_Arrival, _Arrival]] = field(default_factory=list)
    restarts: list[tuple[str, int, int]] = field(default_factory=list)
    """(stream, last i before, line of the new segment 0)"""
    not_in_chain: set[str] = field(default_factory=set)
    """Hashes of segments found inserted or with a bad or missing MAC: their records are not the
    agent's, and explain nothing."""
    mac_unchecked: set[str] = field(default_factory=set)
    """Hashes of segments below their stream's ``signed_from`` that carry no valid MAC."""


def _prefix_of(topic: str, stream: str) -> str | None:
    suffix = "/" + stream
    return topic[: -len(suffix)] if topic.endswith(suffix) and len(topic) > len(suffix) else None


def verify_capture(
    messages: Sequence[Captured], key: bytes | None = None, prefix: str | None = None
) -> CaptureReport:
    """Check a capture; ``prefix`` defaults to the one most segments were published under."""
    st = _State()
    arrivals: list[_Arrival] = []
    statuses: list[_Status] = []
    others: list[tuple[Captured, str]] = []
    for pos, m in enumerate(messages):
        if not m.payload:
            continue  # a retained message cleared: nothing was published
        try:
            arrivals.append(_Arrival(pos, m.line, m.topic, m.payload, chain.parse(m.payload)))
            continue
        except chain.ChainFormatError as exc:
            problem = str(exc)
        status = _status_of(pos, m)
        if status is not None:
            statuses.append(status)
        else:
            others.append((m, problem))

    if prefix is None:
        guesses = Counter(p for a in arrivals if (p := _prefix_of(a.topic, a.seg.link.stream)) is not None)
        prefix = guesses.most_common(1)[0][0] if guesses else None
    agents = Counter(str(a.seg.doc.get("agent")) for a in arrivals)
    agent = agents.most_common(1)[0][0] if agents else None

    # The agent's own status topic; captures of agents before issue 13 have it without the agent id.
    status_topics = {f"{prefix}/{AGENT_DEVICE}/status/{agent}", f"{prefix}/{AGENT_DEVICE}/status"}
    statuses = [s for s in statuses if messages[s.pos].topic in status_topics]
    if key is not None:
        statuses = _signed_statuses(statuses, messages, key, st, _first_key_change(arrivals, key))
    for m, problem in others:
        st.breaks.append(
            Break("malformed", None, None, (m.line,), f"on {m.topic}: not a segment ({problem})")
        )
    if not arrivals:
        st.breaks.append(Break("empty", None, None, (), "the capture holds no segment: nothing to verify"))

    kept: list[_Arrival] = []
    for a in arrivals:
        link = a.seg.link
        if str(a.seg.doc.get("agent")) != agent:
            st.breaks.append(
                Break("foreign_agent", link.stream, link.i, (a.line,),
                      f"segment of agent {a.seg.doc.get('agent')!r} in the capture of agent {agent!r}")
            )  # fmt: skip
            continue
        if a.topic != f"{prefix}/{link.stream}":
            st.breaks.append(
                Break("moved", link.stream, link.i, (a.line,),
                      f"published on {a.topic}, but its chain says {prefix}/{link.stream}")
            )  # fmt: skip
        kept.append(a)

    if key is not None:
        _check_macs(kept, key, _signed_from(kept, key), st)

    by_stream: dict[str, list[_Arrival]] = defaultdict(list)
    for a in kept:
        by_stream[a.seg.link.stream].append(a)
    unique_by_stream = {s: _dedupe(arr, st) for s, arr in by_stream.items()}
    for stream, unique in unique_by_stream.items():
        for epoch in _epochs(stream, unique, st):
            _check_epoch(stream, epoch, st)

    blocks, events = _records(unique_by_stream, st)
    explain = _Explanations([e for e in events if not e.suspect])
    _explain_segment_gaps(st, explain)
    _quarantines(explain, st)
    seq_window = _check_seqs(unique_by_stream, blocks, events, explain, st)
    _check_time([b for b in blocks if not b.suspect], explain, st)
    duplicates = [_explain_duplicate(first, copy, statuses, explain) for first, copy in st.duplicates]

    return CaptureReport(
        messages=len(messages),
        agent=agent,
        prefix=prefix,
        sessions=tuple(dict.fromkeys(s.session for s in statuses if s.session is not None)),
        mac_checked=key is not None,
        streams=tuple(_summary(s, u, st) for s, u in sorted(unique_by_stream.items())),
        seq_window=seq_window,
        gaps=tuple(st.gaps),
        duplicates=tuple(duplicates),
        breaks=tuple(st.breaks),
    )


def _status_of(pos: int, m: Captured) -> _Status | None:
    if not (m.topic.endswith("/agent/status") or "/agent/status/" in m.topic):
        return None
    try:
        doc = json.loads(m.payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
        return None
    session = doc.get("session")
    return _Status(pos, m.line, doc["status"], session if isinstance(session, str) else None)


def _signed_statuses(
    statuses: list[_Status], messages: Sequence[Captured], key: bytes, st: _State, keyed_at: int | None
) -> list[_Status]:
    """The status messages signed with the key. Any other one is reported and then ignored: a
    forged ``online`` of a new session would pass off a replay as a re-send. An unsigned status that
    arrived before the agent's signed record of the key being configured (``keyed_at``) is ignored
    without a finding: the agent had no key then (its old retained ``offline`` included)."""
    kept: list[_Status] = []
    for s in statuses:
        payload = messages[s.pos].payload
        if chain.mac_ok(payload, key):
            kept.append(s)
            continue
        unsigned = chain.split_mac(payload)[1] is None
        if unsigned and keyed_at is not None and s.pos < keyed_at:
            continue
        how = "unsigned" if unsigned else "its MAC is not the key's"
        st.breaks.append(
            Break("status_bad_mac", None, None, (s.line,),
                  f"{s.status} status of session {s.session}: {how}; it explains no duplicate")
        )  # fmt: skip
    return kept


KEY_CHANGE = "integrity_key_change"


def _key_changes(arrivals: Iterable[_Arrival], key: bytes) -> Iterator[tuple[_Arrival, dict[str, Any]]]:
    """The ``integrity_key_change`` audit records signed with the key, with their arrival."""
    for a in arrivals:
        if a.seg.link.stream != "agent/audit" or not chain.mac_ok(a.payload, key):
            continue
        for item in a.seg.items:
            data = item.get("data") if isinstance(item, dict) else None
            if isinstance(data, dict) and data.get("action") == KEY_CHANGE:
                yield a, data


def _first_key_change(arrivals: Iterable[_Arrival], key: bytes) -> int | None:
    return min((a.pos for a, _ in _key_changes(arrivals, key)), default=None)


def _signed_from(arrivals: Iterable[_Arrival], key: bytes) -> dict[str, int]:
    """Per stream, the first i the agent signed with this key, from the ``integrity_key_change``
    audit records that are themselves signed with it: the backlog stored before the key was
    configured (or rotated) is sent as it was stored, without a MAC or with the old key's."""
    signed_from: dict[str, int] = {}
    for _, data in _key_changes(arrivals, key):
        held = data.get("signed_from")
        for stream, i in held.items() if isinstance(held, dict) else ():
            if isinstance(stream, str) and (i := _int(i)) is not None:
                signed_from[stream] = max(i, signed_from.get(stream, 0))
    return signed_from


def _check_macs(arrivals: Iterable[_Arrival], key: bytes, signed_from: Mapping[str, int], st: _State) -> None:
    seen: set[str] = set()
    for a in arrivals:
        if a.seg.hash in seen:
            continue  # a copy: the first one was reported
        seen.add(a.seg.hash)
        link = a.seg.link
        if link.i < signed_from.get(link.stream, 0):
            if not chain.mac_ok(a.payload, key):
                st.mac_unchecked.add(a.seg.hash)
        elif a.seg.mac is None:
            st.breaks.append(
                Break("missing_mac", link.stream, link.i, (a.line,), "no MAC, and the agent signs with a key")
            )
            st.not_in_chain.add(a.seg.hash)
        elif not chain.mac_ok(a.payload, key):
            st.breaks.append(
                Break("bad_mac", link.stream, link.i, (a.line,),
                      "the MAC is not the key's: forged, or altered after signing")
            )  # fmt: skip
            st.not_in_chain.add(a.seg.hash)


def _dedupe(arrivals: list[_Arrival], st: _State) -> list[_Arrival]:
    """The first arrival of each segment; every further copy is paired with the copy before it,
    so each re-send needs a reconnect of its own."""
    last: dict[str, _Arrival] = {}
    unique: list[_Arrival] = []
    for a in arrivals:
        if a.seg.hash in last:
            st.duplicates.append((last[a.seg.hash], a))
        else:
            unique.append(a)
        last[a.seg.hash] = a
    return unique


def _epochs(stream: str, unique: list[_Arrival], st: _State) -> list[list[_Arrival]]:
    """A stream starts afresh at i 0 from GENESIS when the agent moved a damaged buffer aside;
    each run of the chain is checked on its own, the restart needs a recorded cause."""
    epochs: list[list[_Arrival]] = [[]]
    for a in unique:
        link = a.seg.link
        if link.i == 0 and link.prev == chain.GENESIS and epochs[-1]:
            before = max(x.seg.link.i for x in epochs[-1])
            st.restarts.append((stream, before, a.line))
            epochs.append([])
        epochs[-1].append(a)
    return epochs


def _check_epoch(stream: str, arrivals: list[_Arrival], st: _State) -> None:
    at: dict[int, list[_Arrival]] = defaultdict(list)
    for a in arrivals:
        at[a.seg.link.i].append(a)
    chosen: dict[int, _Arrival] = {}
    for i in sorted(at):
        chosen[i] = _choose(stream, i, at, chosen.get(i - 1), st)
    top: _Arrival | None = None
    for a in arrivals:
        if a.seg.hash in st.not_in_chain:
            continue  # reported as inserted: where it arrived says nothing more
        if top is not None and a.seg.link.i < top.seg.link.i:
            st.breaks.append(
                Break("reorder", stream, a.seg.link.i, (top.line, a.line),
                      f"segment {a.seg.link.i} arrived after segment {top.seg.link.i}")
            )  # fmt: skip
        else:
            top = a
    order = sorted(chosen)
    first = chosen[order[0]]
    if order[0] == 0 and first.seg.link.prev != chain.GENESIS:
        st.breaks.append(
            Break("bad_genesis", stream, 0, (first.line,), "segment 0 does not name GENESIS as its prev")
        )
    for i, j in itertools.pairwise(order):
        if j != i + 1:
            st.gaps.append(Gap("segments", stream, i + 1, j - 1, None, (chosen[i].line, chosen[j].line)))
            continue
        if chosen[j].seg.link.prev != chosen[i].seg.hash:
            st.breaks.append(
                Break("altered", stream, i, (chosen[i].line, chosen[j].line),
                      f"segment {i} does not hash to the prev segment {j} names: one of them was altered")
            )  # fmt: skip


def _choose(
    stream: str, i: int, at: Mapping[int, list[_Arrival]], before: _Arrival | None, st: _State
) -> _Arrival:
    """The segment at i the chain links (its prev is the chosen i-1, its hash the prev of an i+1);
    every other claimant of i is reported."""
    candidates = at[i]
    if len(candidates) == 1:
        return candidates[0]
    nexts = {n.seg.link.prev for n in at.get(i + 1, [])}

    def score(a: _Arrival) -> int:
        linked_before = before is not None and a.seg.link.prev == before.seg.hash
        return int(linked_before) + int(a.seg.hash in nexts) + int(a.seg.hash not in st.not_in_chain)

    ranked = sorted(candidates, key=lambda a: (-score(a), a.pos))
    best = ranked[0]
    tie = score(ranked[1]) == score(best)
    for other in ranked[1:]:
        st.not_in_chain.add(other.seg.hash)
        if tie:
            st.breaks.append(
                Break("conflict", stream, i, (best.line, other.line),
                      f"two different segments claim i {i}; the chain does not tell which is genuine")
            )  # fmt: skip
        else:
            st.breaks.append(
                Break("inserted", stream, i, (other.line,),
                      f"a second segment {i} the chain does not link (the linked one is line {best.line})")
            )  # fmt: skip
    return best


# --------------------------------------------------------------------------- records


def _records(unique_by_stream: Mapping[str, list[_Arrival]], st: _State) -> tuple[list[_Block], list[_Event]]:
    blocks: list[_Block] = []
    events: list[_Event] = []
    for stream, unique in unique_by_stream.items():
        for a in unique:
            suspect = a.seg.hash in st.not_in_chain
            device = str(a.seg.doc.get("device"))
            for item in a.seg.items:
                rec = _record(a, device, item, suspect)
                if rec is None:
                    st.breaks.append(
                        Break(
                            "malformed",
                            stream,
                            a.seg.link.i,
                            (a.line,),
                            f"a record without seq/ts: {item!r:.80}",
                        )
                    )
                elif isinstance(rec, _Block):
                    blocks.append(rec)
                else:
                    events.append(rec)
    return blocks, events


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _record(a: _Arrival, device: str, item: Any, suspect: bool) -> _Block | _Event | None:
    if not isinstance(item, dict):
        return None
    seq, ts = _int(item.get("seq")), _int(item.get("ts"))
    if seq is None or ts is None:
        return None
    if "blocks" in a.seg.doc:
        n = _int(item.get("n"))
        if n is None or n < 1:
            return None
        return _Block(a.line, device, str(item.get("group")), seq, n, ts, suspect)
    data = item.get("data")
    kind = str(item.get("kind"))
    return _Event(a.line, device, seq, ts, kind, data if isinstance(data, dict) else {}, suspect)


def _summary(stream: str, unique: list[_Arrival], st: _State) -> StreamSummary:
    genuine = [a for a in unique if a.seg.hash not in st.not_in_chain] or unique
    readings = sum(
        n
        for a in genuine
        if "blocks" in a.seg.doc
        for b in a.seg.items
        if (n := _int(b.get("n"))) is not None
    )
    return StreamSummary(
        stream=stream,
        first_i=min(a.seg.link.i for a in genuine),
        last_i=max(a.seg.link.i for a in genuine),
        segments=len(genuine),
        records=sum(len(a.seg.items) for a in genuine),
        readings=readings,
        mac_unchecked=sum(a.seg.hash in st.mac_unchecked for a in genuine),
    )


# --------------------------------------------------------------------------- explanations


@dataclass(frozen=True, slots=True)
class _Cover:
    first: int
    last: int
    cause: str
    line: int


def _ranges(value: Any) -> list[tuple[int, int]]:
    """``[[first, last], ...]`` as published; anything else is no range."""
    out: list[tuple[int, int]] = []
    if isinstance(value, list):
        for r in value:
            if isinstance(r, list) and len(r) == 2:
                a, b = _int(r[0]), _int(r[1])
                if a is not None and b is not None and a <= b:
                    out.append((a, b))
    return out


class _Explanations:
    """The agent's own records that explain gaps, gathered once from the capture's events."""

    def __init__(self, events: list[_Event]) -> None:
        self.seq_losses: list[_Cover] = []
        self.segment_losses: dict[str, list[_Cover]] = defaultdict(list)
        self.ts_losses: list[tuple[str, int, int, str, int]] = []
        self.corrupt: list[_Event] = []
        self.quarantined: list[_Event] = []
        self.points: list[tuple[int, str, int]] = []
        """(ts, what, line): agent_start / agent_stop audit records."""
        self.intervals: list[tuple[int, int, str, int, str | None]] = []
        """(from, until, what, line, device or None for every device)."""
        self.replays: list[_Event] = []
        outages: dict[str, list[_Event]] = defaultdict(list)
        for e in sorted(events, key=lambda e: e.seq):
            if e.kind in ("data_loss", "seq_skip"):
                self._loss(e)
            elif e.kind == "audit":
                action = e.data.get("action")
                if action in ("agent_start", "agent_stop"):
                    self.points.append((e.ts, f"audit {action}", e.line))
                elif action == "buffer_replay":
                    self.replays.append(e)
            elif e.kind == "agent_restart":
                lo, hi = _int(e.data.get("from_ts")), _int(e.data.get("until_ts"))
                lo, hi = (e.ts if lo is None else lo), (e.ts if hi is None else hi)
                self.intervals.append((lo, hi, "agent restart after a crash (agent_restart)", e.line, None))
            elif e.kind == "clock_step":
                lo, hi = _int(e.data.get("wall_before_ns")), _int(e.data.get("wall_after_ns"))
                lo, hi = (lo, hi) if lo is not None and hi is not None else (e.ts, e.ts)
                self.intervals.append((min(lo, hi), max(lo, hi), "clock step (clock_step)", e.line, None))
            elif e.kind == "device_state":
                outages[e.device].append(e)
        for device, states in outages.items():
            down: _Event | None = None
            for e in sorted(states, key=lambda e: e.ts):
                self.intervals.append(
                    (e.ts, e.ts, f"device {e.data.get('state')} (device_state)", e.line, device)
                )
                if e.data.get("state") == "disconnected" and down is None:
                    down = e
                elif e.data.get("state") == "connected" and down is not None:
                    self.intervals.append((down.ts, e.ts, "device outage (device_state)", down.line, device))
                    down = None
            if down is not None:
                self.intervals.append((down.ts, 2**63, "device outage (device_state)", down.line, device))

    def _loss(self, e: _Event) -> None:
        reason = str(e.data.get("reason"))
        cause = f"{e.kind} {reason}"
        if reason == "buffer_corrupt":
            self.corrupt.append(e)
        elif reason == "quarantined":
            self.quarantined.append(e)
        seqs = _ranges(e.data.get("seqs"))
        lo, hi = _int(e.data.get("first_seq")), _int(e.data.get("last_seq"))
        if reason == "buffer_corrupt" and lo is None:
            lo = 0  # whatever the moved-aside file held: every seq below the fresh buffer's first
        if not seqs and lo is not None and hi is not None and lo <= hi:
            seqs = [(lo, hi)]
        self.seq_losses.extend(_Cover(a, b, cause, e.line) for a, b in seqs)
        segments = e.data.get("segments")
        for s in segments if isinstance(segments, list) else []:
            if isinstance(s, dict) and isinstance(s.get("stream"), str):
                a, b = _int(s.get("first_i")), _int(s.get("last_i"))
                if a is not None and b is not None:
                    self.segment_losses[s["stream"]].append(_Cover(a, b, cause, e.line))
        i = _int(e.data.get("i"))
        if isinstance(e.data.get("stream"), str) and i is not None:  # one quarantined segment
            self.segment_losses[e.data["stream"]].append(_Cover(i, i, cause, e.line))
        t0, t1 = _int(e.data.get("first_ts")), _int(e.data.get("last_ts"))
        if t0 is not None and t1 is not None:
            self.ts_losses.append((e.device, t0, t1, cause, e.line))


def _split(first: int, last: int, covers: Iterable[_Cover]) -> list[tuple[int, int, _Cover | None]]:
    """``first..last`` cut into the pieces each cover explains and the pieces none does."""
    out: list[tuple[int, int, _Cover | None]] = []
    cursor = first
    for c in sorted(covers, key=lambda c: c.first):
        if c.last < cursor or c.first > last:
            continue
        if c.first > cursor:
            out.append((cursor, c.first - 1, None))
        end = min(c.last, last)
        out.append((max(c.first, cursor), end, c))
        cursor = end + 1
        if cursor > last:
            return out
    if cursor <= last:
        out.append((cursor, last, None))
    return out


def _explain_segment_gaps(st: _State, ex: _Explanations) -> None:
    explained: list[Gap] = []
    for g in st.gaps:
        for a, b, c in _split(g.first, g.last, ex.segment_losses.get(g.where, [])):
            cause, lines = (None, g.lines) if c is None else (f"{c.cause} (line {c.line})", (c.line,))
            explained.append(Gap("segments", g.where, a, b, cause, lines))
    st.gaps = explained
    for stream, before, line in st.restarts:
        cause = None
        if ex.corrupt:
            cause = f"buffer moved aside: data_loss buffer_corrupt (line {ex.corrupt[0].line})"
        st.gaps.append(Gap("restart", stream, before, 0, cause, (line,)))


def _quarantines(ex: _Explanations, st: _State) -> None:
    """A quarantine explains its gap, and still fails the verification: the data it held is lost."""
    for e in ex.quarantined:
        named = e.data.get("segments")
        where = named[0] if isinstance(named, list) and named and isinstance(named[0], dict) else {}
        stream = where.get("stream")
        detail = "the agent found it damaged in its buffer and never sent it (data_loss quarantined)"
        st.breaks.append(
            Break("quarantined", stream if isinstance(stream, str) else None, _int(where.get("first_i")),
                  (e.line,), detail)
        )  # fmt: skip


def _merge(intervals: list[tuple[int, int, int]], reported: set[int], st: _State) -> list[tuple[int, int]]:
    """Union of (first, last, line) seq intervals. Two segments claiming one seq are reported once
    per later-arrived segment (the suspect: the first arrival was already accepted), unless one of
    them is already reported (``reported``: lines)."""
    merged: list[tuple[int, int]] = []
    clashes: dict[int, tuple[int, int, set[int]]] = {}
    cur_line = 0
    for a, b, line in sorted(intervals):
        if merged and a <= merged[-1][1]:
            if line != cur_line and not {line, cur_line} & reported:
                suspect, other = max(line, cur_line), min(line, cur_line)
                lo, hi, others = clashes.get(suspect, (a, a, set()))
                clashes[suspect] = (min(lo, a), max(hi, min(b, merged[-1][1])), others | {other})
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
                cur_line = line
        elif merged and a == merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], b)
            cur_line = line
        else:
            merged.append((a, b))
            cur_line = line
    for suspect, (lo, hi, others) in sorted(clashes.items()):
        earlier = ", ".join(map(str, sorted(others)))
        st.breaks.append(
            Break("seq_conflict", None, None, (suspect, *sorted(others)),
                  f"seqs {lo}..{hi} of line {suspect} were already carried by line(s) {earlier}")
        )  # fmt: skip
    return merged


def _check_seqs(
    unique_by_stream: Mapping[str, list[_Arrival]],
    blocks: list[_Block],
    events: list[_Event],
    ex: _Explanations,
    st: _State,
) -> tuple[int, int] | None:
    intervals = [(b.seq, b.seq + b.n - 1, b.line) for b in blocks] + [(e.seq, e.seq, e.line) for e in events]
    reported = {b.line for b in blocks if b.suspect} | {e.line for e in events if e.suspect}
    covered = _merge(intervals, reported, st)
    spans: dict[str, tuple[int, int]] = {}
    for b in blocks:
        if b.suspect:
            continue
        stream = chain.stream_of(b.device, "data")
        lo, hi = spans.get(stream, (b.seq, b.seq + b.n - 1))
        spans[stream] = (min(lo, b.seq), max(hi, b.seq + b.n - 1))
    data_streams = [s for s in unique_by_stream if s in spans]
    if not data_streams:
        return None
    start = max(spans[s][0] for s in data_streams)
    end = min(spans[s][1] for s in data_streams)
    if start > end:
        return None
    cursor = start
    for lo, hi in [*covered, (end + 1, end + 1)]:
        if hi < cursor:
            continue
        if lo > cursor:
            _seq_gap(cursor, min(lo - 1, end), ex, st)
        cursor = max(cursor, hi + 1)
        if cursor > end:
            break
    return start, end


def _seq_gap(first: int, last: int, ex: _Explanations, st: _State) -> None:
    for a, b, c in _split(first, last, ex.seq_losses):
        cause, lines = (None, ()) if c is None else (f"{c.cause} (line {c.line})", (c.line,))
        st.gaps.append(Gap("seqs", "agent", a, b, cause, lines))


def _check_time(blocks: list[_Block], ex: _Explanations, st: _State) -> None:
    groups: dict[tuple[str, str], list[_Block]] = defaultdict(list)
    for b in blocks:
        groups[(b.device, b.group)].append(b)
    for (device, group), series in sorted(groups.items()):
        series.sort(key=lambda b: b.seq)
        steps = [y.ts - x.ts for x, y in itertools.pairwise(series) if y.ts > x.ts]
        if len(steps) < 2:
            continue
        limit = max(TIME_GAP_FACTOR * statistics.median(steps), TIME_GAP_MIN_NS)
        for x, y in itertools.pairwise(series):
            if y.ts - x.ts > limit:
                cause = _time_cause(device, x, y, ex)
                st.gaps.append(Gap("time", f"{device}/{group}", x.ts, y.ts, cause, (x.line, y.line)))


def _time_cause(device: str, a: _Block, b: _Block, ex: _Explanations) -> str | None:
    """Every recorded cause that overlaps the pause, the agent-wide ones (restart, clock step,
    stop/start) before the device's own (outage, loss)."""
    t0, t1 = a.ts, b.ts
    causes: list[str] = []
    for lo, hi, what, line, dev in sorted(ex.intervals, key=lambda x: x[4] is not None):
        if (dev is None or dev == device) and lo <= t1 and hi >= t0:
            causes.append(f"{what} (line {line})")
    for ts, what, line in ex.points:
        if t0 <= ts <= t1:
            causes.append(f"{what} (line {line})")
    lost_between = (a.seq + a.n, b.seq - 1)
    for c in ex.seq_losses:
        if c.first <= lost_between[1] and c.last >= lost_between[0]:
            causes.append(f"{c.cause} (line {c.line})")
    for dev, lo, hi, what, line in ex.ts_losses:
        if dev == device and lo <= t1 and hi >= t0:
            causes.append(f"{what} (line {line})")
    return "; ".join(dict.fromkeys(causes)) or None


def _explain_duplicate(
    first: _Arrival, copy: _Arrival, statuses: list[_Status], ex: _Explanations
) -> Duplicate:
    """A copy is a re-send only when the agent's own ``online`` status of a new session arrived
    between the two copies (the forwarder publishes it before paho re-sends), or a recorded
    ``buffer replay`` names the segment; any other copy is a replay."""
    link = first.seg.link
    lines = (first.line, copy.line)
    session = None
    for s in statuses:
        if s.pos > first.pos:
            break
        if s.status == "online":
            session = s.session
    for s in statuses:
        if first.pos < s.pos < copy.pos and s.status == "online" and _newer(s.session, session):
            return Duplicate(
                link.stream, link.i, lines, f"re-sent after reconnect, session {s.session} (line {s.line})"
            )
    for e in ex.replays:
        if _replay_covers(e.data, first.seg):
            return Duplicate(link.stream, link.i, lines, f"buffer replay (audit, line {e.line})")
    return Duplicate(link.stream, link.i, lines, None)


def _session_order(session: str) -> tuple[int, int] | None:
    """``<agent start ns>.<connection attempt>`` as numbers; None when it is not that form."""
    start, _, attempt = session.partition(".")
    return (int(start), int(attempt)) if start.isdigit() and attempt.isdigit() else None


def _newer(session: str | None, than: str | None) -> bool:
    """Whether ``session`` is a later connection than ``than``: an old ``online`` re-published
    between two copies must not pass a replay off as a re-send."""
    if not session:
        return False
    if than is None:
        return True
    a, b = _session_order(session), _session_order(than)
    return a > b if a is not None and b is not None else session != than


def _replay_covers(data: Mapping[str, Any], seg: chain.Segment) -> bool:
    """Whether a ``buffer_replay`` audit record names this segment in its ``segments`` list (in its
    data, or in its ``new`` or ``extra`` member)."""
    for holder in (data, data.get("new"), data.get("extra")):
        if not isinstance(holder, dict):
            continue
        segments = holder.get("segments")
        if isinstance(segments, list):
            return any(
                isinstance(s, dict)
                and s.get("stream") == seg.link.stream
                and (_int(s.get("first_i")) or 0) <= seg.link.i <= (_int(s.get("last_i")) or -1)
                for s in segments
            )
    return False
