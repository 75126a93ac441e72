"""What a batch's review reads: the records of a buffer file or of a capture, read-only, and the
verdict of the existing verifier over the same records.

A buffer is read in one SQLite read transaction (WAL: the agent may be committing meanwhile), so
the chains checked and the records reported are one snapshot. Events and audit records are read
whole (they are few, and the batch's own ``batch_context`` events say where its data is); blocks
only for the batch's devices and time window, so a report on a large buffer stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.buffer.verify import BufferReport
from agent.core import chain
from agent.integrity.capture import Captured, CaptureError, read_capture
from agent.integrity.verify import CaptureReport, verify_capture

END_OF_TIME = 2**63 - 1
"""The end of an open interval (a batch not ended yet), in ns: beyond any time a record has."""


class ReportInputError(Exception):
    """The input cannot be reported on (missing, not a buffer or capture, unreadable): one line,
    exit code 2."""


@dataclass(frozen=True, slots=True)
class Rec:
    """One committed block or event, as stored, with the segment it is in."""

    stream: str
    i: int
    device: str
    """The device whose stream holds it (``agent`` for the agent's events and the audit trail)."""
    kind: str
    """``block`` for readings, else the event kind (``audit`` for audit records)."""
    seq: int
    ts: int
    """Acquisition time (blocks) or the event's time, ns."""
    body: Mapping[str, Any]

    @property
    def batch(self) -> str | None:
        """The batch ref the agent stamped on it (None: no batch, or an agent before batch context)."""
        ref = self.body.get("batch")
        return ref if isinstance(ref, str) else None

    @property
    def data(self) -> Mapping[str, Any]:
        data = self.body.get("data")
        return data if isinstance(data, Mapping) else {}


@dataclass(frozen=True, slots=True)
class Span:
    """A stored segment's place and the times of its records."""

    stream: str
    i: int
    first_ts: int
    last_ts: int


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of the verifier in a common form, whichever verifier it came from. ``unit`` says
    what ``first``..``last`` count: chain positions (``i``), seqs, or time (``ns``)."""

    what: Literal["break", "gap", "duplicate", "quarantined"]
    kind: str
    where: str | None
    """A stream (``i``), ``device/group`` (``ns``), ``agent`` (seqs), None: the whole input."""
    unit: Literal["i", "seq", "ns"]
    first: int | None
    last: int | None
    problem: bool
    """It fails the verification (unexplained, or data lost)."""
    cause: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class Verification:
    verifier: Literal["buffer", "capture"]
    ok: bool
    mac_checked: bool
    findings: tuple[Finding, ...]


@dataclass(slots=True)
class Collected:
    """Everything read from the input."""

    kind: Literal["buffer", "capture"]
    path: str
    agent: str | None
    events: list[Rec]
    spans: dict[str, list[Span]]
    verification: Verification
    blocks: Iterable[Rec] = ()
    """Read once, by the report (:func:`buffer_blocks` streams them from an open buffer)."""


# --------------------------------------------------------------------------- parsing


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _records(stream: str, i: int, device: str, doc: Mapping[str, Any]) -> Iterator[Rec]:
    """The well-formed records of a segment document; anything else is the verifier's to report."""
    data = "blocks" in doc
    items = doc.get("blocks" if data else "events")
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        seq, ts = _int(item.get("seq")), _int(item.get("ts"))
        kind = "block" if data else item.get("kind")
        if seq is None or ts is None or not isinstance(kind, str):
            continue
        yield Rec(stream, i, device, kind, seq, ts, item)


def _span(stream: str, i: int, recs: Sequence[Rec]) -> Span | None:
    if not recs:
        return None
    return Span(stream, i, min(r.ts for r in recs), max(r.ts for r in recs))


# --------------------------------------------------------------------------- buffer


def _buffer_findings(report: BufferReport) -> Verification:
    findings = [
        Finding("break", str(b.kind), b.stream, "i", b.first_i, b.last_i, True, None, b.detail)
        for b in report.breaks
    ]
    findings += [
        Finding("gap", "removed", g.stream, "i", g.first_i, g.last_i, False, g.reason,
                f"segments removed on purpose ({g.reason})")
        for g in report.gaps
    ]  # fmt: skip
    findings += [
        Finding("quarantined", "quarantined", q.stream, "i", q.i, q.i, True, "quarantined", q.problem)
        for q in report.quarantined
    ]
    return Verification("buffer", report.ok, report.mac_checked, tuple(findings))


@contextlib.contextmanager
def open_buffer(path: Path) -> Iterator[Buffer]:
    """The buffer at ``path``, read-only, inside one read transaction."""
    if not path.is_file():
        raise ReportInputError(f"no buffer database at {path}")
    buf = Buffer(BufferConfig(path=path), None)
    try:
        buf.open(readonly=True)
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        raise ReportInputError(f"{path} is not a readable cleanroom-edge buffer: {exc}") from None
    try:
        buf.conn.execute("BEGIN")
        yield buf
    except sqlite3.Error as exc:
        raise ReportInputError(f"{path}: {exc}") from None
    finally:
        buf.close()


def read_buffer(buf: Buffer, key: bytes | None) -> Collected:
    """Every event and audit record of an open buffer, the time span of every stored segment, and
    the stored chains checked (:mod:`agent.buffer.verify`)."""
    verification = _buffer_findings(buf.verify(key))
    spans: dict[str, list[Span]] = {}
    for stream, i, first, last in buf.conn.execute(
        "SELECT stream, i, first_ts, last_ts FROM segments ORDER BY stream, i"
    ):
        spans.setdefault(str(stream), []).append(Span(str(stream), int(i), int(first), int(last)))
    events: list[Rec] = []
    for stream, i, device, payload in buf.conn.execute(
        "SELECT stream, i, device, payload FROM segments WHERE kind <> 'data' ORDER BY id"
    ):
        events += _records(str(stream), int(i), str(device), _doc(payload))
    path = str(buf.cfg.path)
    return Collected("buffer", path, buf.agent_id or None, events, spans, verification)


def buffer_blocks(buf: Buffer, devices: Iterable[str], since: int, until: int | None) -> Iterator[Rec]:
    """The blocks of ``devices`` acquired in ``since``..``until`` (None: open), one segment at a
    time: a batch of two weeks is never all in memory."""
    last = END_OF_TIME if until is None else until
    for device in sorted(set(devices)):
        rows = buf.conn.execute(
            "SELECT stream, i, device, payload FROM segments WHERE kind = 'data' AND device = ? "
            "AND last_ts >= ? AND first_ts <= ? ORDER BY id",
            (device, since, last),
        )
        for stream, i, dev, payload in rows:
            for r in _records(str(stream), int(i), str(dev), _doc(payload)):
                if since <= r.ts <= last:
                    yield r


def _doc(payload: bytes | str) -> Mapping[str, Any]:
    """A stored payload's document; a damaged one holds no records (verify reports it), and one
    edited into text (the sqlite3 CLI's ``replace()``) is read as what it says."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------- capture


def _capture_findings(report: CaptureReport) -> Verification:
    findings = [
        Finding("break", b.kind, b.stream, "i", b.i, b.i, True, None, b.detail) for b in report.breaks
    ]
    for g in report.gaps:
        unit: Literal["i", "seq", "ns"] = "ns" if g.kind == "time" else "seq" if g.kind == "seqs" else "i"
        detail = {"segments": "segments missing", "seqs": "seqs missing", "time": "no readings",
                  "restart": "the chain started again at i 0"}[g.kind]  # fmt: skip
        findings.append(
            Finding("gap", g.kind, g.where, unit, g.first, g.last, g.cause is None, g.cause, detail)
        )
    findings += [
        Finding("duplicate", "duplicate", d.stream, "i", d.i, d.i, d.cause is None, d.cause,
                "a second copy of a segment")
        for d in report.duplicates
    ]  # fmt: skip
    return Verification("capture", report.ok, report.mac_checked, tuple(findings))


def read_capture_file(path: Path, key: bytes | None) -> Collected:
    """Every record of a capture's segments (first copy of each), and the capture verified
    (:mod:`agent.integrity.verify`)."""
    try:
        messages = read_capture(path)
    except CaptureError as exc:
        raise ReportInputError(f"{path}: {exc}") from None
    report = verify_capture(messages, key)
    return collect_messages(str(path), messages, report)


def collect_messages(path: str, messages: Sequence[Captured], report: CaptureReport) -> Collected:
    seen: set[str] = set()
    events: list[Rec] = []
    blocks: list[Rec] = []
    spans: dict[str, list[Span]] = {}
    for m in messages:
        try:
            seg = chain.parse(m.payload)
        except chain.ChainFormatError:
            continue  # a status, or something the verifier reports
        if seg.hash in seen or (report.agent is not None and seg.doc.get("agent") != report.agent):
            continue
        seen.add(seg.hash)
        device = seg.doc.get("device")
        recs = list(_records(seg.link.stream, seg.link.i, str(device), seg.doc))
        (blocks if "blocks" in seg.doc else events).extend(recs)
        span = _span(seg.link.stream, seg.link.i, recs)
        if span is not None:
            spans.setdefault(span.stream, []).append(span)
    for s in spans.values():
        s.sort(key=lambda x: x.i)
    return Collected("capture", path, report.agent, events, spans, _capture_findings(report), blocks)
