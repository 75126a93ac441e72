"""The synchronous store: one connection, used from one thread (the agent's buffer thread, or a
CLI process). It commits records as chained segments with their seqs and driver state, enforces
the size limit, records delivery, prunes what retention no longer needs, quarantines what fails
its integrity check, and answers inspection queries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.buffer.integrity import Replaced, check_and_move_aside
from agent.buffer.overflow import UNDELIVERED, drop_oldest, record_gaps
from agent.buffer.rows import (
    SEGMENT_VIEW,
    CommitResult,
    Row,
    StoredRecord,
    StoredSegment,
    encode,
    unencodable_row,
)
from agent.buffer.schema import (
    COUNTERS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SEGMENT_COLUMNS,
    Upgrade,
    create,
    insert_segment,
)
from agent.buffer.seqs import SEQ_RESERVE, Sequencer
from agent.buffer.verify import BreakKind, BufferReport, check_conn
from agent.core import chain
from agent.core.events import DataLoss, LossReason, Segments, merge_ranges
from agent.core.records import AGENT_DEVICE, Block, Event, Severity, dumps, now_ns

log = logging.getLogger("cleanroom.buffer")


@dataclass(frozen=True, slots=True)
class PreviousRun:
    """The last run did not stop cleanly: what it had committed when it died."""

    last_ts_ns: int | None
    """Highest acquisition time committed (None: nothing was)."""
    last_seq: int | None
    """Highest seq committed (None: none was)."""


@dataclass(frozen=True, slots=True)
class Removed:
    """Segments taken out of delivery state or out of the file (replay, retention)."""

    segments: int
    readings: int
    intervals: tuple[Segments, ...]


@dataclass(frozen=True, slots=True)
class KeyChange:
    """The agent's key differs from the one some streams were signed with (or they were unsigned):
    what :meth:`Buffer.adopt_key` changed and audited."""

    old: str | list[str | None] | None
    """The public id of the key those streams were signed with (None: unsigned), a list when they differ."""
    new: str | None
    signed_from: dict[str, int]
    """Per changed stream, its first ``i`` signed with the new key."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """What a quarantine set aside: the loss events to commit (they need seqs) and the ids."""

    ids: tuple[int, ...]
    events: tuple[Event, ...]


class Buffer:
    """The synchronous core: one connection, used from one thread (the agent's buffer thread, or
    a CLI process). Every method is one transaction."""

    def __init__(self, cfg: BufferConfig, agent_id: str | None, key: bytes | None = None) -> None:
        """``agent_id`` None: a tool (CLI) that adopts the owner recorded in the file. ``key``: the
        HMAC key segments are signed with and checked against."""
        self.cfg = cfg
        self.agent_id = agent_id
        self.key = key
        self.clock: Callable[[], Mapping[str, Any]] = dict
        """Clock state put in each segment, read once per commit."""
        self._sources: dict[str, dict[str, Any]] = {}
        self._conn: sqlite3.Connection | None = None
        self._page_size = 4096
        self._budget_pages = 0
        self._claimed: set[int] = set()
        """Segment ids handed to the forwarder and not yet acknowledged: overflow never drops them."""
        self._claims_lock = threading.Lock()
        self.replaced: Replaced | None = None
        """Set by :meth:`open` when a damaged file was moved aside and a fresh one started."""
        self.previous_run: PreviousRun | None = None
        """Set by :meth:`begin_run` when the last run did not stop cleanly."""
        self._signed_from: dict[str, int] = {}
        """Per stream, the first ``i`` signed with the current key (:meth:`adopt_key`; absent: 0)."""
        self.batch_of: Callable[[str, int], str | None] | None = None
        """The agent's batch resolver (:meth:`AsyncBuffer.set_batch_resolver`), for the loss events
        a commit makes itself; the agent's own records are stamped at submit."""

    def set_source(self, device: str, source: Mapping[str, Any]) -> None:
        """Attribution put in ``device``'s next segments (``agent`` for the agent's streams)."""
        self._sources[device] = dict(source)

    # ------------------------------------------------------------------ open/close

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("buffer is not open")
        return self._conn

    def open(self, readonly: bool = False, repair: bool = False) -> dict[str, str]:
        """Open (creating or migrating unless ``readonly``) and return the driver state.

        ``repair`` (the agent, holding the buffer's lock): a file that fails its integrity check is
        moved aside and a fresh one started (:attr:`replaced` says so), rather than failing every
        start; seqs continue above what the damaged file still shows."""
        path = self.cfg.path
        if repair and not readonly:
            self.replaced = check_and_move_aside(path)
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(f"no buffer database at {path}")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The records are the plant's: readable by the agent's user only, whatever the umask
            # (SQLite gives the -wal and -shm files the main file's mode).
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(path, isolation_level=None)
        self._conn = conn
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self.cfg.synchronous.upper()}")
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            # WAL gets an eighth of the budget: checkpoint (and truncate) before it outgrows it.
            wal_pages = max(4, min(1000, self.cfg.max_bytes // 8 // self._page_size))
            self._budget_pages = max(4, (self.cfg.max_bytes - wal_pages * self._page_size) // self._page_size)
            owner = self.meta("agent_id") if self.schema_version() else None
            if owner is not None and self.agent_id is not None and owner != self.agent_id:
                # Its rows were acquired, and their seqs assigned, by another agent: forwarding them
                # under this agent's id would misattribute them (ALCOA: attributable).
                raise RuntimeError(
                    f"{path} is the buffer of agent {owner!r}, not {self.agent_id!r}: deliver it with "
                    "that agent id, or move the file away to start a new buffer"
                )
            if not readonly:
                conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
                conn.execute(f"PRAGMA journal_size_limit = {wal_pages * self._page_size}")
                self._migrate(Upgrade(owner or self.agent_id or "", self.key))
                if self.replaced is not None:
                    conn.execute(
                        "UPDATE meta SET value = ? WHERE key IN ('next_seq', 'committed_seq')",
                        (str(self.replaced.next_seq),),
                    )
            version = self.schema_version()
            if version != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{path} has buffer schema {version}, this agent uses {SCHEMA_VERSION}: "
                    "start the agent (or a writing command) once to migrate it"
                )
            if self.agent_id is None:  # a tool working on whatever agent's buffer this is
                self.agent_id = owner or ""
            elif owner is None and not readonly:
                conn.execute("INSERT INTO meta(key, value) VALUES ('agent_id', ?)", (self.agent_id,))
            return dict(conn.execute("SELECT key, value FROM kv").fetchall())
        except BaseException:
            self.close()
            raise

    def schema_version(self) -> int:
        meta = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        if self.conn.execute(meta).fetchone() is None:
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, up: Upgrade) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.cfg.path} has buffer schema {version}, newer than this agent ({SCHEMA_VERSION}): "
                "refusing to touch it"
            )
        if version == 0:
            with self._transaction():
                create(self.conn)
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                MIGRATIONS[target](self.conn, up)
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(target),))
            log.info("buffer %s migrated to schema %d", self.cfg.path, target)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _transaction(self) -> _Txn:
        return _Txn(self.conn)

    def begin_run(self) -> PreviousRun | None:
        """The agent starts: note whether the last run stopped cleanly (:attr:`previous_run`), and
        mark this one as running until :meth:`end_run`."""
        with self._transaction():
            was = self.meta("run")
            self.previous_run = None
            if was == "running":
                last_ts = self.meta("last_acq_ts")
                committed = int(self.meta("committed_seq") or 0)
                self.previous_run = PreviousRun(
                    None if last_ts is None else int(last_ts), committed - 1 if committed else None
                )
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('run', 'running')")
        return self.previous_run

    def end_run(self) -> None:
        """A clean stop: the next start has nothing to explain."""
        with self._transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('run', 'stopped')")

    # ------------------------------------------------------------------ integrity

    def adopt_key(self, seqs: Sequencer | None = None) -> KeyChange | None:
        """The agent starts with its key (or none): every stream signed with another key, or with
        none, is signed with this one from its next segment on (``signed_from``), so the segments
        before it are not MAC-checked: enabling or rotating the key never quarantines the backlog.
        The change and its audit record are one transaction: no stream changes key unaudited.

        Call before :meth:`check_at_open`; ``seqs``: the agent's, for the audit record's seq."""
        current = None if self.key is None else chain.key_id(self.key)
        change: KeyChange | None = None
        with self._transaction():
            rows = self.conn.execute("SELECT stream, next_i, key_id FROM chain ORDER BY stream").fetchall()
            changed = [(str(s), int(n), k) for s, n, k in rows if k != current]
            if changed:  # a stream exists only once something was committed to it
                self.conn.executemany(
                    "UPDATE chain SET key_id = ?, signed_from = next_i WHERE stream = ?",
                    [(current, s) for s, _, _ in changed],
                )
                olds = {k for _, _, k in changed}
                change = KeyChange(
                    old=next(iter(olds)) if len(olds) == 1 else sorted(olds, key=lambda k: k or ""),
                    new=current,
                    signed_from={s: n for s, n, _ in changed},
                )
                event = Auditor(lambda e: None, self.agent_id or "").record(
                    "integrity_key_change",
                    "buffer",
                    old=change.old,
                    new=change.new,
                    reason="the agent's HMAC key is not the one its streams were signed with: "
                    "each is signed with it from signed_from on",
                    extra={"signed_from": change.signed_from},
                    severity=Severity.WARNING,
                )
                self._commit_in([event], seqs, CommitResult())
            self._signed_from = {
                str(s): int(f) for s, f in self.conn.execute("SELECT stream, signed_from FROM chain")
            }
        if change is not None:
            log.warning(
                "buffer %s: HMAC key changed from %s to %s: segments from %s on are signed with it",
                *(self.cfg.path, change.old, change.new, change.signed_from),
            )
        return change

    def verify(self, key: bytes | None = None) -> BufferReport:
        """The stored chains checked (:mod:`agent.buffer.verify`), on this connection."""
        k = self.key if key is None else key
        return check_conn(self.conn, k, str(self.cfg.path), self.agent_id)

    def check_at_open(self) -> Quarantine:
        """Every stored segment checked; the suspect ones quarantined (never sent). Rows missing
        without a record cannot be set aside: they are logged, and a verifier reports them."""
        report = self.verify()
        bad = {b.segment_id: b for b in report.breaks if b.segment_id is not None}
        for b in report.breaks:
            if b.segment_id is None:
                log.error(
                    "buffer %s: stream %s segments %d..%d: %s (%s)",
                    *(self.cfg.path, b.stream, b.first_i, b.last_i, b.kind, b.detail),
                )
        return self.quarantine({i: f"{b.kind}: {b.detail}" for i, b in bad.items()})

    def quarantine(self, problems: Mapping[int, str]) -> Quarantine:
        """Move segments out of ``segments`` into ``quarantine`` with their problem, record their
        ``i`` as a gap, and return the ``data_loss`` events (one per segment) to commit."""
        if not problems:
            return Quarantine((), ())
        events: list[Event] = []
        now = now_ns()
        ids = json.dumps(sorted(problems))
        with self._transaction():
            rows = self.conn.execute(
                f"SELECT id, {SEGMENT_COLUMNS} FROM segments WHERE id IN (SELECT value FROM json_each(?))",
                (ids,),
            ).fetchall()
            for row in rows:
                self.conn.execute(
                    f"INSERT INTO quarantine(id, {SEGMENT_COLUMNS}, problem, ts) "
                    f"VALUES ({','.join('?' * 17)})",
                    (*row, problems[row[0]], now),
                )
            self.conn.execute("DELETE FROM segments WHERE id IN (SELECT value FROM json_each(?))", (ids,))
            self.conn.execute("DELETE FROM delivered WHERE id IN (SELECT value FROM json_each(?))", (ids,))
            record_gaps(self.conn, [(r[1], r[2]) for r in rows], "quarantined")
            lost = 0
            for seg_id, stream, i, device, kind, readings, records, _, _, seqs, first, last, *_ in rows:
                ranges = merge_ranges(tuple(r) for r in json.loads(seqs))
                loss = DataLoss(
                    LossReason.QUARANTINED,
                    readings=readings,
                    rows=records,
                    events=0 if kind == "data" else records,
                    first_seq=ranges[0][0] if ranges else None,
                    last_seq=ranges[-1][1] if ranges else None,
                    first_ts=first,
                    last_ts=last,
                    seqs=ranges,
                    segments=(Segments(stream, i, i),),
                    detail=f"stream {stream} segment {i}: {problems[seg_id]}"[:300],
                )
                lost += readings
                events.append(loss.event(device))
                log.error(
                    "buffer %s: segment %d of %s quarantined: %s", self.cfg.path, i, stream, problems[seg_id]
                )
            self._add("lost_readings_total", lost)
        return Quarantine(tuple(r[0] for r in rows), tuple(events))

    # ------------------------------------------------------------------ commit

    def commit(
        self, items: Sequence[Block | Event], seqs: Sequencer | None = None, delivered: Sequence[int] = ()
    ) -> CommitResult:
        """Commit ``items`` (and the state of their blocks) in one transaction, as segments: the
        records of each stream, in commit order, chained to that stream's head. ``delivered``: the
        segments the broker acknowledged since the last commit, marked in the same transaction (one
        fsync for both, where a transaction of their own would cost another).

        The agent's items carry the seqs they got at acquisition, and ``seqs`` hands out those of the
        events this commit adds (``data_loss``); a tool's items (``seqs`` None) get theirs here, from
        the stored top, read inside the write transaction so a tool beside a running agent never
        takes a seq the agent holds. Either way the stored top ends above every seq committed. On
        failure nothing is committed; a tool's items keep no seq, the agent's keep theirs."""
        result = CommitResult()
        try:
            with self._transaction():
                if delivered:
                    result.delivered_readings = self._mark_in(delivered, now_ns())
                if items:
                    self._commit_in(items, seqs, result)
        except BaseException:
            if seqs is None:
                for item in items:
                    if isinstance(item, Block):
                        item.seq_first = None
                    else:
                        item.seq = None
            raise
        self.unclaim(delivered)
        return result

    def _commit_in(
        self, items: Sequence[Block | Event], seqs: Sequencer | None, result: CommitResult
    ) -> None:
        """:meth:`commit` inside a transaction already begun (which a key change shares)."""
        conn = self.conn
        top = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        take = seqs.take if seqs is not None else _Counter(top).take
        rows = self._assign(items, take, result)
        self._seal(rows)
        if result.state:
            conn.executemany(
                "INSERT INTO kv(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(result.state.items()),
            )
        self._add("committed_readings_total", result.readings)
        self._add("lost_readings_total", result.unencodable)
        rows += self._enforce_limit(take, result.events)
        high = max((seq + n for _, _, seq, n, _, _ in rows), default=top)
        new_top = max(top, high, seqs.reserve(top) if seqs is not None else 0)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(new_top),))
        conn.execute(
            "UPDATE meta SET value = max(CAST(value AS INTEGER), ?) WHERE key = 'committed_seq'",
            (high,),
        )
        last_ts = max((r[4] for r in rows if r[0] == "data"), default=None)
        if last_ts is not None:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('last_acq_ts', ?) ON CONFLICT(key) "
                "DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
                (last_ts,),
            )

    def _seal(self, rows: Sequence[Row]) -> None:
        """Inside the commit transaction: the rows as segments, one stream's records together, data
        split at ``segment_max_readings``; the heads read and moved in the same transaction (a tool
        may have committed to a stream since)."""
        if not rows:
            return
        groups: dict[str, list[Row]] = {}
        for row in rows:
            kind, device = row[0], row[1]
            groups.setdefault("agent/audit" if kind == "audit" else f"{device}/{kind}", []).append(row)
        conn = self.conn
        heads: dict[str, tuple[int, str]] = {
            s: (n, h)
            for s, n, h in conn.execute(
                "SELECT stream, next_i, head FROM chain WHERE stream IN (SELECT value FROM json_each(?))",
                (json.dumps(list(groups)),),
            )
        }
        clock = self.clock()
        agent = self.agent_id or ""
        limit = self.cfg.segment_max_readings
        for stream, recs in groups.items():
            kind = recs[0][0]
            device = AGENT_DEVICE if kind == "audit" else recs[0][1]
            source = self._sources.get(device)
            i, prev = heads.get(stream, (0, chain.GENESIS))
            for part in _split(recs, limit) if kind == "data" else (recs,):
                bodies: list[str] = []
                spans: list[tuple[int, int]] = []
                readings, seq_first, seq_last = 0, part[0][2], part[0][2]
                first_ts = last_ts = part[0][4]
                for _, _, seq, n, ts, body in part:  # one pass: this runs for every record
                    bodies.append(body)
                    if n:
                        spans.append((seq, seq + n - 1))
                        readings += n
                    seq_first, seq_last = min(seq_first, seq), max(seq_last, seq + max(n, 1) - 1)
                    first_ts, last_ts = min(first_ts, ts), max(last_ts, ts)
                payload = chain.build_payload(
                    kind=kind, agent=agent, device=device, stream=stream, i=i, prev=prev,
                    source=source, clock=clock, bodies=bodies, key=self.key,
                )  # fmt: skip
                digest = chain.digest(payload)
                insert_segment(
                    conn,
                    (stream, i, device, kind, readings if kind == "data" else 0, len(part), seq_first,
                     seq_last,
                     json.dumps(merge_ranges(spans)), first_ts, last_ts, prev, digest, payload),
                )  # fmt: skip
                i, prev = i + 1, digest
            heads[stream] = (i, prev)
        key_id = None if self.key is None else chain.key_id(self.key)
        conn.executemany(  # a new stream is signed with the current key from its first segment
            "INSERT INTO chain(stream, next_i, head, key_id, signed_from) VALUES (?, ?, ?, ?, 0) "
            "ON CONFLICT(stream) DO UPDATE SET next_i = excluded.next_i, head = excluded.head",
            [(s, *heads[s], key_id) for s in groups],
        )

    @staticmethod
    def _assign(
        items: Sequence[Block | Event], take: Callable[[int], int], result: CommitResult
    ) -> list[Row]:
        """Rows for ``items``; an item without a seq takes one from ``take``. A record that cannot be
        encoded even after sanitising (a bug upstream) is replaced by a ``data_loss`` event for its
        seqs: one bad record must neither stall the buffer nor vanish silently."""
        rows: list[Row] = []
        for item in items:
            kind: chain.Kind
            if isinstance(item, Block):
                kind, n, ts = "data", len(item), item.acq_ts_ns
                if item.seq_first is None:
                    item.seq_first = take(n)
                seq = item.seq_first
                result.readings += n
            else:
                kind, n, ts = ("audit" if item.kind == "audit" else "events"), 1, item.ts_ns
                if item.seq is None:
                    item.seq = take(1)
                seq = item.seq
            try:
                rows.append((kind, item.device, seq, n, ts, encode(item)))
            except Exception as exc:
                log.exception(
                    "device %s: a %s record cannot be encoded; recorded as data_loss", item.device, kind
                )
                rows.append(unencodable_row(item, seq, n, ts, exc, result, take(1)))
            else:
                if item.state:
                    result.state.update(item.state)
        return rows

    # ------------------------------------------------------------------ seqs

    def sequencer(self, floor: int = 0) -> Sequencer:
        """The agent's seq source, its first window reserved in the file, starting right after the
        highest committed seq (or ``floor``: the highest a stop recorded as lost). Seqs a crashed run
        handed out but never committed are handed out again: they never reached the broker, so no
        seq comes to mean two readings there. A disk that refuses even this small write does not
        stop the start: the window is what the file already holds, the first commit extends it."""
        start = max(int(self.meta("committed_seq") or 0), floor)
        top = int(self.meta("next_seq") or 0)
        try:
            with self._transaction():
                self.conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(start + SEQ_RESERVE),)
                )
        except sqlite3.Error as exc:
            log.warning(
                "buffer %s: cannot reserve seqs (%s); reserving at the next commit", self.cfg.path, exc
            )
            return Sequencer(start, max(start, top))
        return Sequencer(start, start + SEQ_RESERVE)

    def release(self, seqs: Sequencer) -> None:
        """Give back the unused rest of the agent's window, so a clean restart continues without a gap."""
        with self._transaction():
            top = int(self.conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
            back = seqs.release(top)
            if back is not None:
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(back),))

    def _add(self, counter: str, amount: int) -> None:
        if amount:
            self.conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = ?", (amount, counter)
            )

    def live_bytes(self) -> int:
        """Pages in use (not the file size: freed pages are reused before the file grows)."""
        conn = self.conn
        pages = (
            conn.execute("PRAGMA page_count").fetchone()[0]
            - conn.execute("PRAGMA freelist_count").fetchone()[0]
        )
        return int(pages) * self._page_size

    def _live_pages(self) -> int:
        return self.live_bytes() // self._page_size

    def _enforce_limit(self, take: Callable[[int], int], events: list[Event]) -> list[Row]:
        """Inside the commit transaction: once the live pages exceed the budget, drop segments until
        they are back under 90 % of it, and commit one loss event per device that lost undelivered
        segments. Segments in flight to the broker are not dropped: their fate is the broker's
        acknowledgement, and counting them lost would count what the broker may well have."""
        if self._live_pages() <= self._budget_pages:
            return []
        with self._claims_lock:
            in_flight = sorted(self._claimed)
        lost, counted = drop_oldest(self.conn, self._live_pages, self._budget_pages * 9 // 10, in_flight)
        self._add("lost_readings_total", counted)
        rows: list[Row] = []
        for device, loss in sorted(lost.items()):
            seq = take(1)
            event = loss.event(device, seq=seq)
            if self.batch_of is not None:
                event.batch = self.batch_of(device, event.ts_ns)
            rows.append(("events", device, seq, 1, event.ts_ns, dumps(event.body())))
            events.append(event)
            log.error(
                "buffer full (%d bytes): dropped %d undelivered records (%d readings) of %s, seq %s..%s",
                *(self.cfg.max_bytes, loss.rows, loss.readings, device),
                *(loss.first_seq, loss.last_seq),
            )
        self._seal(rows)
        return rows

    # ------------------------------------------------------------------ delivery

    def pending(self, after_id: int, limit: int, claim: bool = False) -> list[StoredSegment]:
        """Undelivered segments after ``after_id``; ``claim``: they are being sent, so overflow keeps
        them until :meth:`mark_delivered` or :meth:`unclaim` (claimed here, on the buffer thread, so
        no commit can drop a segment between being read and being published)."""
        query = (
            f"SELECT {SEGMENT_VIEW} FROM segments s WHERE s.id > ? AND {UNDELIVERED} ORDER BY s.id LIMIT ?"
        )
        rows = [StoredSegment(*r) for r in self.conn.execute(query, (after_id, limit)).fetchall()]
        if claim:
            with self._claims_lock:
                self._claimed.update(r.id for r in rows)
        return rows

    def last_segment_id(self) -> int:
        """The id of the newest stored segment (0 for none): a sender that records it when its
        session begins knows which segments waited in the buffer (Sparkplug's ``is_historical``)."""
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM segments").fetchone()[0])

    def take_for_sending(self, after_id: int, limit: int) -> tuple[list[StoredSegment], Quarantine]:
        """:meth:`pending`, claimed, each segment checked (hash, and MAC with a key) right before it
        leaves: what fails is quarantined instead (the loss events are the caller's to commit)."""
        rows = self.pending(after_id, limit, claim=True)
        problems: dict[int, str] = {}
        for r in rows:
            if chain.digest(r.payload) != r.hash:
                problems[r.id] = f"{BreakKind.HASH_MISMATCH}: payload does not match its hash"
            elif r.i < self._signed_from.get(r.stream, 0):
                continue  # signed before the current key (or not at all): its link was checked at open
            elif self.key is not None and not chain.mac_ok(r.payload, self.key):
                problems[r.id] = f"{BreakKind.MAC_BAD}: MAC is missing or not the key's"
        if not problems:
            return rows, Quarantine((), ())
        self.unclaim(problems)
        return [r for r in rows if r.id not in problems], self.quarantine(problems)

    def unclaim(self, ids: Iterable[int]) -> None:
        """Segments no longer in flight (not sent after all, refused by the broker, or the sender stopped)."""
        with self._claims_lock:
            self._claimed.difference_update(ids)

    def mark_delivered(self, ids: Sequence[int], when_ns: int | None = None) -> int:
        """Mark segments delivered (idempotent) and no longer in flight; returns the readings newly marked."""
        with self._transaction():
            readings = self._mark_in(ids, now_ns() if when_ns is None else when_ns)
        self.unclaim(ids)
        return readings

    def _mark_in(self, ids: Sequence[int], when: int) -> int:
        """:meth:`mark_delivered` inside a transaction already begun (a commit's, or its own)."""
        readings = 0
        for start in range(0, len(ids), 500):
            chunk = json.dumps(list(ids[start : start + 500]))
            readings += int(
                self.conn.execute(
                    f"SELECT coalesce(sum(n_readings), 0) FROM segments s WHERE s.id IN "
                    f"(SELECT value FROM json_each(?)) AND {UNDELIVERED}",
                    (chunk,),
                ).fetchone()[0]
            )
            self.conn.execute(
                "INSERT OR IGNORE INTO delivered(id, ns) SELECT id, ? FROM segments "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (when, chunk),
            )
        self._add("delivered_readings_total", readings)
        return readings

    def mark_undelivered(
        self, device: str | None = None, since_ns: int | None = None, until_ns: int | None = None
    ) -> Removed:
        """Replay: delivered segments in the selection become undelivered (their rows untouched)."""
        where, params = _selection(device, since_ns, until_ns)
        with self._transaction():
            done = self.conn.execute(
                f"SELECT s.id, s.stream, s.i, s.n_readings FROM segments s JOIN delivered d ON d.id = s.id "
                f"WHERE 1 = 1{where}",
                params,
            ).fetchall()
            self.conn.execute(
                "DELETE FROM delivered WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps([r[0] for r in done]),),
            )
        return Removed(len(done), sum(r[3] for r in done), _intervals((r[1], r[2]) for r in done))

    def prune(self, now: int | None = None) -> Removed:
        """Delete delivered segments whose delivery is older than ``retention``, recording the removed
        ``i`` intervals in ``chain_gaps`` (reason ``retention``)."""
        cutoff = (now_ns() if now is None else now) - int(self.cfg.retention * 1e9)
        with self._transaction():
            gone = self.conn.execute(
                "DELETE FROM segments WHERE id IN (SELECT id FROM delivered WHERE ns < ?) "
                "RETURNING stream, i, n_readings",
                (cutoff,),
            ).fetchall()
            self.conn.execute("DELETE FROM delivered WHERE ns < ?", (cutoff,))
            intervals = record_gaps(self.conn, ((s, i) for s, i, _ in gone), "retention")
        return Removed(len(gone), sum(r[2] for r in gone), tuple(intervals))

    # ------------------------------------------------------------------ inspection

    def records(
        self,
        device: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kind: str | None = "data",
    ) -> Iterator[StoredRecord]:
        """The records of the stored segments (delivered or not), in commit order, for export:
        ``kind`` ``data`` (blocks), ``event`` (events and audit records) or None (both)."""
        where, params = _selection(device, since_ns, until_ns)
        if kind == "data":
            where += " AND s.kind = 'data'"
        elif kind is not None:
            where += " AND s.kind <> 'data'"
        cur = self.conn.execute(
            f"SELECT s.id, s.device, s.kind, s.payload FROM segments s WHERE 1 = 1{where} ORDER BY s.id",
            params,
        )
        for seg_id, seg_device, seg_kind, payload in cur:
            data = seg_kind == "data"
            try:
                items = json.loads(payload)["blocks" if data else "events"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"segment {seg_id} of {self.cfg.path} is not a readable segment: "
                    "check the file with cleanroom-agent verify --buffer"
                ) from None
            for item in items:
                ts = item["ts"]
                if (since_ns is not None and ts < since_ns) or (until_ns is not None and ts >= until_ns):
                    continue
                yield StoredRecord(
                    seg_id, "data" if data else "event", seg_device, item["seq"],
                    item["n"] if data else 1, ts, dumps(item),
                )  # fmt: skip

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def stats(self, now: int | None = None) -> dict[str, Any]:
        """Depth and counters from one read snapshot (another process may be writing)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            depth_segments, depth_records, depth_readings = conn.execute(
                "SELECT count(*), coalesce(sum(n_records), 0), coalesce(sum(n_readings), 0) "
                f"FROM segments s WHERE {UNDELIVERED}"
            ).fetchone()
            segments = conn.execute("SELECT count(*) FROM segments").fetchone()[0]
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
            oldest = conn.execute(
                f"SELECT first_ts FROM segments s WHERE {UNDELIVERED} ORDER BY s.id LIMIT 1"
            ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            live = self.live_bytes()
        finally:
            conn.execute("COMMIT")
        t = now_ns() if now is None else now
        return {
            "path": str(self.cfg.path),
            "depth_records": int(depth_records),
            "depth_readings": int(depth_readings),
            "depth_segments": int(depth_segments),
            "segments": int(segments),
            "quarantined": int(quarantined),
            "oldest_undelivered_age_s": None if oldest is None else round((t - oldest[0]) / 1e9, 3),
            "size_bytes": live,
            "file_bytes": _file_bytes(self.cfg.path),
            "max_bytes": self.cfg.max_bytes,
            "next_seq": int(meta["committed_seq"]),  # one past the highest committed seq
            "seq_reserved_to": int(meta["next_seq"]),
            **{k: int(meta.get(k, 0)) for k in COUNTERS},
            "schema_version": SCHEMA_VERSION,
        }


def _split(recs: list[Row], limit: int) -> Iterator[list[Row]]:
    """Data records in parts of at most ``limit`` readings (a block larger than that goes alone)."""
    part: list[Row] = []
    readings = 0
    for r in recs:
        if part and readings + r[3] > limit:
            yield part
            part, readings = [], 0
        part.append(r)
        readings += r[3]
    if part:
        yield part


def _intervals(removed: Iterable[tuple[str, int]]) -> tuple[Segments, ...]:
    per: dict[str, list[tuple[int, int]]] = {}
    for stream, i in removed:
        per.setdefault(stream, []).append((i, i))
    return tuple(Segments(s, lo, hi) for s in sorted(per) for lo, hi in merge_ranges(per[s]))


class _Txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error): the write lock is taken up front so a
    concurrent CLI writer makes us wait (busy_timeout) instead of failing mid-transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # SQLite rolls back by itself on some errors (SQLITE_FULL): a second ROLLBACK would fail and
        # hide the real error; a failed COMMIT must not leave the transaction open for the next one.
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
        finally:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")


class _Counter:
    """A tool's seq source: the stored top, read inside its write transaction."""

    def __init__(self, top: int) -> None:
        self._next = top

    def take(self, n: int) -> int:
        first = self._next
        self._next += n
        return first


def _selection(device: str | None, since_ns: int | None, until_ns: int | None) -> tuple[str, tuple[Any, ...]]:
    """Segments of ``device`` whose records' times overlap ``since``..``until``."""
    where, params = "", list[Any]()
    if device is not None:
        where += " AND s.device = ?"
        params.append(device)
    if since_ns is not None:
        where += " AND s.last_ts >= ?"
        params.append(since_ns)
    if until_ns is not None:
        where += " AND s.first_ts < ?"
        params.append(until_ns)
    return where, tuple(params)


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total
