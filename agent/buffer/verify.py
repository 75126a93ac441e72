"""Checking the chains stored in a buffer file: what the agent does at every start (and quarantines
by), and what ``cleanroom-agent verify --buffer`` reports.

Every stored segment must hash to its ``hash`` column, name the previous segment of its stream by
the hash of that segment's payload, carry a valid MAC when there is a key, and the last segment
must be the stream's head in the ``chain`` table. Segments before the stream's ``signed_from`` were
signed with an earlier key (or none) and are not MAC-checked: the key was enabled or rotated after
them (an audited ``integrity_key_change``); their hashes and links still are. An ``i`` that is not
stored must be covered by a ``chain_gaps`` row (removed on purpose: retention, a full buffer,
quarantine), or it was removed behind the agent's back. So a row edited, deleted or bit-flipped
with any SQLite tool is found.

A segment is trusted only when its own hash is what its successor (or the stream head) says: when
a link does not match, it is the *older* segment that is suspect (it may have been rewritten with a
consistent ``hash`` column), and that is the one reported (and quarantined by the agent).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from agent.core import chain
from agent.core.events import merge_ranges
from agent.core.records import dumps

VERIFIED_SCHEMA = 4
"""The buffer schema whose chains this module understands."""


class BreakKind(StrEnum):
    """Why a stored chain does not hold (closed: a renderer may act on each value)."""

    HASH_MISMATCH = "hash_mismatch"
    """The payload does not hash to the row's ``hash``: the payload was altered."""
    PREV_MISMATCH = "prev_mismatch"
    """The next segment (or genesis) names another hash: this segment was replaced or rewritten."""
    MISSING = "missing"
    """``i`` values neither stored nor recorded as removed on purpose."""
    HEAD_MISMATCH = "head_mismatch"
    """The stream head in ``chain`` is not the hash of the last stored segment (or is absent)."""
    MAC_BAD = "mac_bad"
    """The MAC is not the key's."""
    MAC_MISSING = "mac_missing"
    """A key was given but the payload carries no MAC."""
    SHAPE = "shape"
    """The payload's chain member does not match the row (stream, i, prev), or ``i`` is beyond the head."""


@dataclass(frozen=True, slots=True)
class Break:
    """One finding that the stored chain does not explain. ``segment_id`` is the row to quarantine
    (None for missing rows or a damaged head)."""

    stream: str
    first_i: int
    last_i: int
    kind: BreakKind
    detail: str
    segment_id: int | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """An ``i`` interval removed on purpose, as recorded in ``chain_gaps``."""

    stream: str
    first_i: int
    last_i: int
    reason: str
    ts_ns: int


@dataclass(frozen=True, slots=True)
class QuarantinedSegment:
    """A segment the agent set aside because it failed a check (never sent)."""

    stream: str | None
    i: int | None
    problem: str
    ts_ns: int


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """What is stored of one stream."""

    stream: str
    first_i: int | None
    """Lowest stored ``i`` (None: nothing stored)."""
    last_i: int | None
    next_i: int | None
    """The head's next ``i`` in ``chain`` (None: no head)."""
    segments: int
    records: int
    readings: int
    key_id: str | None = None
    """The public id of the key its segments are signed with from ``signed_from`` on (None: unsigned)."""
    signed_from: int = 0
    mac_unchecked: int = 0
    """Stored segments before ``signed_from``, whose MAC was not checked (counted only with a key)."""


@dataclass(frozen=True, slots=True)
class _Head:
    """A stream's row in ``chain``."""

    next_i: int
    hash: str
    key_id: str | None
    signed_from: int


@dataclass(frozen=True, slots=True)
class BufferReport:
    """Everything :func:`check_buffer` found; ``ok`` when every stored chain holds and nothing was
    quarantined."""

    path: str
    agent: str | None
    streams: list[StreamSummary] = field(default_factory=list)
    segments: int = 0
    records: int = 0
    gaps: list[Gap] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)
    quarantined: list[QuarantinedSegment] = field(default_factory=list)
    mac_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.quarantined


class BufferUnreadable(ValueError):
    """Not a buffer file this agent can check (missing, not SQLite, another schema)."""


def check_buffer(path: Path, key: bytes | None = None) -> BufferReport:
    """Check the buffer at ``path`` opened read-only (it may belong to a running agent); raises
    :class:`BufferUnreadable` when it is not a schema-4 buffer."""
    if not path.is_file():
        raise BufferUnreadable(f"no buffer database at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise BufferUnreadable(f"{path}: {exc}") from None
    with contextlib.closing(conn):
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                raise BufferUnreadable(f"{path} is not a cleanroom-edge buffer")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema_version") != str(VERIFIED_SCHEMA):
                raise BufferUnreadable(
                    f"{path} has buffer schema {meta.get('schema_version')}, verify needs "
                    f"{VERIFIED_SCHEMA}: start the agent once to migrate it"
                )
            conn.execute("BEGIN")  # one snapshot, though an agent may be committing
            try:
                return check_conn(conn, key, str(path), meta.get("agent_id"))
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise BufferUnreadable(f"{path}: {exc}") from None


def check_conn(
    conn: sqlite3.Connection, key: bytes | None, path: str = "", agent: str | None = None
) -> BufferReport:
    """The check itself, on an open connection (the agent's, at start)."""
    heads = {
        str(s): _Head(int(n), str(h), None if k is None else str(k), int(f))
        for s, n, h, k, f in conn.execute("SELECT stream, next_i, head, key_id, signed_from FROM chain")
    }
    gaps = [
        Gap(str(s), int(a), int(b), str(r), int(t))
        for s, a, b, r, t in conn.execute(
            "SELECT stream, first_i, last_i, reason, ts FROM chain_gaps ORDER BY stream, first_i"
        )
    ]
    covered: dict[str, tuple[tuple[int, int], ...]] = {}
    for g in gaps:
        covered[g.stream] = merge_ranges((*covered.get(g.stream, ()), (g.first_i, g.last_i)))
    quarantined = [
        QuarantinedSegment(s, i, str(p), int(t))
        for s, i, p, t in conn.execute("SELECT stream, i, problem, ts FROM quarantine ORDER BY id")
    ]
    report = BufferReport(path, agent, gaps=gaps, quarantined=quarantined, mac_checked=key is not None)
    stored: set[str] = set()
    for stream, rows in _streams(conn):
        stored.add(stream)
        summary = _check_stream(stream, rows, heads.get(stream), covered.get(stream, ()), key, report.breaks)
        report.streams.append(summary)
    for stream in sorted(set(heads) - stored):  # a head, nothing stored: all must be recorded removals
        head = heads[stream]
        _missing(stream, 0, head.next_i - 1, covered.get(stream, ()), report.breaks)
        report.streams.append(
            StreamSummary(stream, None, None, head.next_i, 0, 0, 0, head.key_id, head.signed_from)
        )
    report.streams.sort(key=lambda s: s.stream)
    segments = sum(s.segments for s in report.streams)
    records = sum(s.records for s in report.streams)
    return BufferReport(
        path, agent, report.streams, segments, records, gaps, report.breaks, quarantined, key is not None
    )


_Row = tuple[int, int, str, str, bytes, int, int]
"""(id, i, prev, hash, payload, n_records, n_readings) of one stored segment."""


def _streams(conn: sqlite3.Connection) -> Iterator[tuple[str, list[_Row]]]:
    """Each stream's rows in ``i`` order, one stream in memory at a time."""
    names = [str(r[0]) for r in conn.execute("SELECT DISTINCT stream FROM segments ORDER BY stream")]
    for name in names:
        rows = conn.execute(
            "SELECT id, i, prev, hash, payload, n_records, n_readings FROM segments "
            "WHERE stream = ? ORDER BY i",
            (name,),
        ).fetchall()
        yield name, rows


def _check_stream(
    stream: str,
    rows: list[_Row],
    head: _Head | None,
    covered: tuple[tuple[int, int], ...],
    key: bytes | None,
    breaks: list[Break],
) -> StreamSummary:
    stream_json = dumps(stream)
    # The previous row and its ``hash`` column: a payload altered under an intact column is one
    # finding (hash mismatch), not two; a column rewritten to match is caught by the link.
    last: tuple[_Row, str] | None = None
    signed_from = 0 if head is None else head.signed_from
    unchecked = 0
    for row in rows:
        seg_id, i, prev, stored_hash, payload, _, _ = row
        # An edit made with the sqlite3 shell (``replace(payload, ...)``) stores text, not bytes:
        # the hash check below must report it, not crash on it.
        payload = payload.encode() if isinstance(payload, str) else bytes(payload)
        actual = chain.digest(payload)
        if last is not None and last[0][1] == i - 1:
            if prev != last[1]:
                detail = f"segment {i} names another hash as its predecessor"
                breaks.append(Break(stream, i - 1, i - 1, BreakKind.PREV_MISMATCH, detail, last[0][0]))
        elif i == 0 and prev != chain.GENESIS:
            breaks.append(
                Break(stream, 0, 0, BreakKind.PREV_MISMATCH, "segment 0 does not start at genesis", seg_id)
            )
        lo = 0 if last is None else last[0][1] + 1
        if i > lo:
            _missing(stream, lo, i - 1, covered, breaks)
        if actual != stored_hash:
            breaks.append(
                Break(stream, i, i, BreakKind.HASH_MISMATCH, "payload does not match its hash", seg_id)
            )
        elif f'"chain":{{"stream":{stream_json},"i":{i},"prev":"{prev}"}}'.encode() not in payload:
            breaks.append(
                Break(stream, i, i, BreakKind.SHAPE, "payload chain member does not match the row", seg_id)
            )
        elif key is not None and i < signed_from:
            unchecked += 1
        elif key is not None:
            if chain.split_mac(payload)[1] is None:
                breaks.append(Break(stream, i, i, BreakKind.MAC_MISSING, "no MAC", seg_id))
            elif not chain.mac_ok(payload, key):
                breaks.append(Break(stream, i, i, BreakKind.MAC_BAD, "MAC is not the key's", seg_id))
        last = (row, stored_hash)
    first_i = rows[0][1] if rows else None
    last_i = rows[-1][1] if rows else None
    if head is None:
        breaks.append(Break(stream, first_i or 0, last_i or 0, BreakKind.HEAD_MISMATCH, "stream has no head"))
    elif last is not None:
        next_i, head_hash = head.next_i, head.hash
        if last_i is not None and last_i >= next_i:
            breaks.append(
                Break(stream, next_i, last_i, BreakKind.SHAPE, "segments beyond the stream head", last[0][0])
            )
        elif last_i == next_i - 1:
            if last[1] != head_hash:
                breaks.append(Break(stream, last_i, last_i, BreakKind.HEAD_MISMATCH,
                                    "last segment is not the stream head", last[0][0]))  # fmt: skip
        elif last_i is not None:
            _missing(stream, last_i + 1, next_i - 1, covered, breaks)
    return StreamSummary(
        stream, first_i, last_i, None if head is None else head.next_i, len(rows),
        sum(r[5] for r in rows), sum(r[6] for r in rows), None if head is None else head.key_id,
        signed_from, unchecked,
    )  # fmt: skip


def _missing(
    stream: str, lo: int, hi: int, covered: tuple[tuple[int, int], ...], breaks: list[Break]
) -> None:
    """Report the parts of ``lo``..``hi`` no ``chain_gaps`` row covers."""
    at = lo
    for a, b in covered:
        if b < at:
            continue
        if a > hi:
            break
        if a > at:
            breaks.append(Break(stream, at, a - 1, BreakKind.MISSING, "segments removed without a record"))
        at = max(at, b + 1)
        if at > hi:
            return
    if at <= hi:
        breaks.append(Break(stream, at, hi, BreakKind.MISSING, "segments removed without a record"))
