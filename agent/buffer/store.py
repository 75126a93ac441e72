"""The synchronous store: one connection, used from one thread (the agent's buffer thread, or a
CLI process). It commits records with their seqs and driver state, enforces the size limit,
records delivery, prunes what retention no longer needs, and answers inspection queries."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.buffer.config import BufferConfig
from agent.buffer.integrity import Replaced, check_and_move_aside
from agent.buffer.overflow import drop_oldest
from agent.buffer.rows import RECORD_COLUMNS, CommitResult, Row, StoredRecord, encode, unencodable_row
from agent.buffer.schema import COUNTERS, MIGRATIONS, SCHEMA_VERSION
from agent.buffer.seqs import SEQ_RESERVE, Sequencer
from agent.core.records import Block, Event, dumps, now_ns

log = logging.getLogger("cleanroom.buffer")


class Buffer:
    """The synchronous core: one connection, used from one thread (the agent's buffer thread, or
    a CLI process). Every method is one transaction."""

    def __init__(self, cfg: BufferConfig, agent_id: str | None) -> None:
        """``agent_id`` None: a tool (CLI) that adopts the owner recorded in the file."""
        self.cfg = cfg
        self.agent_id = agent_id
        self._conn: sqlite3.Connection | None = None
        self._page_size = 4096
        self._budget_pages = 0
        self._claimed: set[int] = set()
        """Row ids handed to the forwarder and not yet acknowledged: overflow never drops them."""
        self._claims_lock = threading.Lock()
        self.replaced: Replaced | None = None
        """Set by :meth:`open` when a damaged file was moved aside and a fresh one started."""

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
            if not readonly:
                conn.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
                conn.execute(f"PRAGMA journal_size_limit = {wal_pages * self._page_size}")
                self._migrate()
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
            owner = self.meta("agent_id")
            if self.agent_id is None:  # a tool working on whatever agent's buffer this is
                self.agent_id = owner or ""
            elif owner is None and not readonly:
                conn.execute("INSERT INTO meta(key, value) VALUES ('agent_id', ?)", (self.agent_id,))
            elif owner is not None and owner != self.agent_id:
                # Its rows were acquired, and their seqs assigned, by another agent: forwarding them
                # under this agent's id would misattribute them (ALCOA: attributable).
                raise RuntimeError(
                    f"{path} is the buffer of agent {owner!r}, not {self.agent_id!r}: deliver it with "
                    "that agent id, or move the file away to start a new buffer"
                )
            return dict(conn.execute("SELECT key, value FROM kv").fetchall())
        except BaseException:
            self.close()
            raise

    def schema_version(self) -> int:
        db = sqlite_utils.Database(self.conn)
        if "meta" not in db.table_names():
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.cfg.path} has buffer schema {version}, newer than this agent ({SCHEMA_VERSION}): "
                "refusing to touch it"
            )
        db = sqlite_utils.Database(self.conn)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                MIGRATIONS[target](db)
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(target),))
            log.info("buffer %s migrated to schema %d", self.cfg.path, target)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _transaction(self) -> _Txn:
        return _Txn(self.conn)

    # ------------------------------------------------------------------ commit

    def commit(self, items: Sequence[Block | Event], seqs: Sequencer | None = None) -> CommitResult:
        """Commit ``items`` (and the state of their blocks) in one transaction.

        The agent's items carry the seqs they got at acquisition, and ``seqs`` hands out those of the
        events this commit adds (``data_loss``); a tool's items (``seqs`` None) get theirs here, from
        the stored top, read inside the write transaction so a tool beside a running agent never
        takes a seq the agent holds. Either way the stored top ends above every seq committed. On
        failure nothing is committed; a tool's items keep no seq, the agent's keep theirs."""
        result = CommitResult()
        try:
            with self._transaction():
                conn = self.conn
                top = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
                take = seqs.take if seqs is not None else _Counter(top).take
                rows = self._assign(items, take, result)
                conn.executemany(
                    "INSERT INTO records(kind, device, seq_first, n, acq_ts_ns, body) VALUES (?,?,?,?,?,?)",
                    rows,
                )
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
        except BaseException:
            if seqs is None:
                for item in items:
                    if isinstance(item, Block):
                        item.seq_first = None
                    else:
                        item.seq = None
            raise
        return result

    @staticmethod
    def _assign(
        items: Sequence[Block | Event], take: Callable[[int], int], result: CommitResult
    ) -> list[Row]:
        """Rows for ``items``; an item without a seq takes one from ``take``. A record that cannot be
        encoded even after sanitising (a bug upstream) is replaced by a ``data_loss`` event for its
        seqs: one bad record must neither stall the buffer nor vanish silently."""
        rows: list[Row] = []
        for item in items:
            if isinstance(item, Block):
                kind, n, ts = "data", len(item), item.acq_ts_ns
                if item.seq_first is None:
                    item.seq_first = take(n)
                seq = item.seq_first
                result.readings += n
            else:
                kind, n, ts = "event", 1, item.ts_ns
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
        """Inside the commit transaction: once the live pages exceed the budget, drop rows until they
        are back under 90 % of it, and commit one loss event per device that lost undelivered rows.
        Rows in flight to the broker are not dropped: their fate is the broker's acknowledgement, and
        counting them lost would count what the broker may well have."""
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
            rows.append(("event", device, seq, 1, event.ts_ns, dumps(event.body())))
            self.conn.execute(
                "INSERT INTO records(kind, device, seq_first, n, acq_ts_ns, body) VALUES (?,?,?,?,?,?)",
                rows[-1],
            )
            events.append(event)
            log.error(
                "buffer full (%d bytes): dropped %d undelivered rows (%d readings) of %s, seq %s..%s",
                *(self.cfg.max_bytes, loss.rows, loss.readings, device),
                *(loss.first_seq, loss.last_seq),
            )
        return rows

    # ------------------------------------------------------------------ delivery

    def pending(self, after_id: int, limit: int, claim: bool = False) -> list[StoredRecord]:
        """Undelivered rows after ``after_id``; ``claim``: they are being sent, so overflow keeps them
        until :meth:`mark_delivered` or :meth:`unclaim` (claimed here, on the buffer thread, so no
        commit can drop a row between being read and being published)."""
        query = (
            f"SELECT {RECORD_COLUMNS} FROM records WHERE delivered_ns IS NULL AND id > ? ORDER BY id LIMIT ?"
        )
        rows = [StoredRecord(*r) for r in self.conn.execute(query, (after_id, limit)).fetchall()]
        if claim:
            with self._claims_lock:
                self._claimed.update(r.id for r in rows)
        return rows

    def unclaim(self, ids: Iterable[int]) -> None:
        """Rows no longer in flight (not sent after all, refused by the broker, or the sender stopped)."""
        with self._claims_lock:
            self._claimed.difference_update(ids)

    def mark_delivered(self, ids: Sequence[int], when_ns: int | None = None) -> int:
        """Mark rows delivered (idempotent) and no longer in flight; returns the readings newly marked."""
        when = now_ns() if when_ns is None else when_ns
        readings = 0
        self.unclaim(ids)
        with self._transaction():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                readings += sum(
                    r[0]
                    for r in self.conn.execute(
                        f"UPDATE records SET delivered_ns = ? WHERE id IN ({marks}) AND delivered_ns IS NULL "
                        "RETURNING CASE kind WHEN 'data' THEN n ELSE 0 END",
                        (when, *chunk),
                    ).fetchall()
                )
            self._add("delivered_readings_total", readings)
        return readings

    def mark_undelivered(
        self, device: str | None = None, since_ns: int | None = None, until_ns: int | None = None
    ) -> tuple[int, int]:
        """Replay: delivered rows in the selection become undelivered; returns (rows, readings)."""
        where, params = _selection(device, since_ns, until_ns)
        with self._transaction():
            done = self.conn.execute(
                f"UPDATE records SET delivered_ns = NULL WHERE delivered_ns IS NOT NULL{where} "
                "RETURNING CASE kind WHEN 'data' THEN n ELSE 0 END",
                params,
            ).fetchall()
        return len(done), sum(r[0] for r in done)

    def prune(self, now: int | None = None) -> int:
        """Delete delivered rows whose delivery is older than ``retention``; returns rows deleted."""
        cutoff = (now_ns() if now is None else now) - int(self.cfg.retention * 1e9)
        with self._transaction():
            cur = self.conn.execute(
                "DELETE FROM records WHERE delivered_ns IS NOT NULL AND delivered_ns < ?", (cutoff,)
            )
        return int(cur.rowcount)

    # ------------------------------------------------------------------ inspection

    def records(
        self,
        device: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        kind: str | None = "data",
    ) -> Iterator[StoredRecord]:
        """Rows (delivered or not) in id order, for export."""
        where, params = _selection(device, since_ns, until_ns)
        if kind is not None:
            where += " AND kind = ?"
            params = (*params, kind)
        cur = self.conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE 1 = 1{where} ORDER BY id", params
        )
        for row in cur:
            yield StoredRecord(*row)

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def stats(self, now: int | None = None) -> dict[str, Any]:
        """Depth and counters from one read snapshot (another process may be writing)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            depth_records, depth_readings = conn.execute(
                "SELECT count(*), coalesce(sum(CASE kind WHEN 'data' THEN n ELSE 0 END), 0) "
                "FROM records WHERE delivered_ns IS NULL"
            ).fetchone()
            oldest = conn.execute(
                "SELECT acq_ts_ns FROM records WHERE delivered_ns IS NULL ORDER BY id LIMIT 1"
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
            "oldest_undelivered_age_s": None if oldest is None else round((t - oldest[0]) / 1e9, 3),
            "size_bytes": live,
            "file_bytes": _file_bytes(self.cfg.path),
            "max_bytes": self.cfg.max_bytes,
            "next_seq": int(meta["committed_seq"]),  # one past the highest committed seq
            "seq_reserved_to": int(meta["next_seq"]),
            **{k: int(meta.get(k, 0)) for k in COUNTERS},
            "schema_version": SCHEMA_VERSION,
        }


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
    where, params = "", list[Any]()
    if device is not None:
        where += " AND device = ?"
        params.append(device)
    if since_ns is not None:
        where += " AND acq_ts_ns >= ?"
        params.append(since_ns)
    if until_ns is not None:
        where += " AND acq_ts_ns < ?"
        params.append(until_ns)
    return where, tuple(params)


def _file_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += Path(f"{path}{suffix}").stat().st_size
    return total
