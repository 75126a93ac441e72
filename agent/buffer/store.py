"""The durable store-and-forward buffer: the one stage between acquisition and the sinks.

Everything a driver reads or the agent decides is committed here before anyone else
sees it: the forwarder publishes only committed rows and marks them delivered only when
the broker acknowledged them, so a crash, a broker outage or a full disk never turns
into silent loss. Loss that cannot be avoided (the buffer is full) is itself recorded as
a ``data_loss`` event, committed and forwarded like any other record.

Storage is SQLite in WAL mode, one connection, used from one dedicated thread so the
event loop never waits on disk. A row is a *record*: one committed :class:`Block` (all
readings of one poll; reading ``i`` has seq ``seq_first + i``) or one :class:`Event`.
The canonical JSON body is stored as text, so the JSON encoder splices it into payloads
without re-encoding and an integrity chain can later hash exactly the forwarded bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlite_utils
from pydantic import Field

from agent.core.records import Block, Event, Quality, Reason, Severity, Value, dumps, now_ns
from cleanroom_common.fields import ByteSize, Duration, Strict

log = logging.getLogger("cleanroom.buffer")

SCHEMA_VERSION = 2
CLOSE_ATTEMPTS = 3
"""Commit attempts on close before giving up (loudly) on records the disk will not take."""
QUEUE_LIMIT_BATCHES = 10
"""Records held in memory while commits fail, in ``commit_max_records`` batches. Beyond it the oldest
queued readings are shed: counted, and reported as ``data_loss`` once the disk takes data again,
rather than growing until the process is killed for memory and loses the whole queue."""
AGENT_DEVICE = "agent"


DROP_ORDER = (
    ("delivered_ns IS NOT NULL", "delivered_ns"),
    ("delivered_ns IS NULL AND kind = 'data'", "id"),
    ("delivered_ns IS NULL", "id"),
)
"""What a full buffer gives up, in this order: delivered rows (lossless, oldest delivery first), then
the oldest undelivered readings, and only then undelivered events: events (alarms, the audit trail)
are few and small, and losing them to a flood of readings would hide what happened. Each selection
walks a partial index, so a full buffer costs O(log n) per commit, not a table scan."""


class BufferConfig(Strict):
    """The ``buffer:`` section: where and how readings are kept until the broker has them."""

    path: Path = Path("/var/lib/cleanroom-edge/buffer.db")
    """SQLite database file. Created (with its directory) on first start; an existing file is migrated
    in place, never discarded, so an upgrade keeps the undelivered backlog."""
    max_bytes: ByteSize = Field(default=2 * 1024**3, ge=64 * 1024)
    """Upper bound of the live data (used database pages, including the WAL, which is checkpointed
    to stay within an eighth of it). When full, the oldest delivered rows are dropped first, then
    the oldest undelivered readings (events last), and the loss is recorded as a ``data_loss``
    event. Lowering it deletes nothing at start; the following commits enforce it by the same rule."""
    synchronous: Literal["off", "normal", "full", "extra"] = "full"
    """SQLite durability of a commit. ``full`` (default): a committed record survives a power loss,
    at the price of one fsync per group commit (about ten per second with the default interval).
    ``normal``: in WAL mode a process crash (kill -9) loses nothing, but a power loss can lose the
    last commits. ``extra`` also syncs the directory; ``off`` leaves durability to the OS (tests
    only: a power loss can corrupt the file)."""
    retention: Duration = 7 * 86400.0
    """How long delivered rows are kept after delivery (for ``buffer export`` and ``buffer replay``)
    before they are pruned."""
    commit_interval: Duration = Field(default=0.1, gt=0)
    """Group-commit period: submitted records are committed together at most this long after the first
    of them was submitted. It bounds the latency added by the buffer and sets the fsync rate."""
    commit_max_records: int = Field(default=2000, gt=0)
    """Commit early once this many records (blocks plus events) are waiting, bounding memory and
    transaction size under bursts."""
    prune_interval: Duration = Field(default=60.0, gt=0)
    """How often delivered rows older than ``retention`` are pruned."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One committed row as the sinks see it; ``body`` is the canonical JSON text."""

    id: int
    kind: Literal["data", "event"]
    device: str
    seq_first: int
    n: int
    acq_ts_ns: int
    body: str


@dataclass
class CommitResult:
    """What one commit did: the events it added itself (``data_loss``) and the state it stored."""

    events: list[Event] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    readings: int = 0
    unencodable: int = 0


_COUNTERS = ("committed_readings_total", "delivered_readings_total", "lost_readings_total")

_RECORD_COLUMNS = "id, kind, device, seq_first, n, acq_ts_ns, body"


def _migrate_v1(db: sqlite_utils.Database) -> None:
    """The original layout: records, driver state, sequence counter."""
    db.table("records").create(
        {
            "id": int,
            "kind": str,
            "device": str,
            "seq_first": int,
            "n": int,
            "acq_ts_ns": int,
            "body": str,
            "delivered_ns": int,
        },
        pk="id",
        not_null={"kind", "device", "seq_first", "n", "acq_ts_ns", "body"},
    )
    db.execute("CREATE INDEX records_undelivered ON records(id) WHERE delivered_ns IS NULL")
    db.table("kv").create({"key": str, "value": str}, pk="key", not_null={"value"})
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null={"value"})
    db.table("meta").insert_all([{"key": "next_seq", "value": "0"}, {"key": "schema_version", "value": "1"}])


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Export and replay select by device and time, retention and overflow by delivery time;
    persistent counters make ``stats`` survive restarts. Counters start from what the rows still
    show (pruned history is unknown)."""
    db.table("records").create_index(
        ["device", "acq_ts_ns"], index_name="records_device_ts", if_not_exists=True
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS records_delivered ON records(delivered_ns) WHERE delivered_ns IS NOT NULL"
    )
    committed = db.execute("SELECT coalesce(sum(n), 0) FROM records WHERE kind = 'data'").fetchone()[0]
    delivered = db.execute(
        "SELECT coalesce(sum(n), 0) FROM records WHERE kind = 'data' AND delivered_ns IS NOT NULL"
    ).fetchone()[0]
    db.table("meta").upsert_all(
        [
            {"key": "committed_readings_total", "value": str(committed)},
            {"key": "delivered_readings_total", "value": str(delivered)},
            {"key": "lost_readings_total", "value": "0"},
        ],
        pk="key",
    )


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _migrate_v1, 2: _migrate_v2}
"""Schema version -> the step that produces it from the previous version. Steps only add."""


def _plain(v: Any) -> Value | ValueError:
    """A reading as a JSON value, or the reason it cannot be one. numpy scalars (``float32``,
    ``int64``: not JSON) become their Python value."""
    if v is None or isinstance(v, bool | int | str):
        return v
    item = getattr(v, "item", None)
    if not isinstance(v, float) and callable(item):
        v = item()
    if isinstance(v, float):
        return v if math.isfinite(v) else ValueError("not finite")
    if isinstance(v, bool | int | str):
        return v
    return ValueError(f"{type(v).__name__} is not a reading value")


def _sanitize(block: Block) -> None:
    """A driver should hand over JSON values only (NaN/inf as bad quality); make it so here rather
    than lose, or stall, the whole group commit because of one value."""
    n = len(block.values)
    quality = list(block.quality) if block.quality is not None else [Quality.GOOD] * n
    reasons: list[str | None] = list(block.reasons) if block.reasons is not None else [None] * n
    for i, v in enumerate(block.values):
        plain = _plain(v)
        if isinstance(plain, ValueError):
            block.values[i] = None
            quality[i] = Quality.BAD
            reasons[i] = str(Reason.DECODE_ERROR)
        else:
            block.values[i] = plain
    block.quality, block.reasons = quality, reasons


def _jsonable(obj: Any) -> Any:
    """Event data as JSON: numpy scalars and arrays to Python, non-finite floats to null, anything
    else unknown to its text (an event must be recorded, even if imperfectly)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, bool | int | float | str):
        return _jsonable(obj.tolist())
    plain = _plain(obj)
    if not isinstance(plain, ValueError):
        return plain
    return None if isinstance(obj, float) else str(obj)


_Row = tuple[str, str, int, int, int, str]
"""(kind, device, seq_first, n, acq_ts_ns, body) of one ``records`` row."""


def _unencodable(
    item: Block | Event, seq: int, n: int, ts: int, exc: Exception, result: CommitResult
) -> _Row:
    """The ``data_loss`` row standing in for a record that could not be stored (seqs ``seq``..)."""
    block = isinstance(item, Block)
    if isinstance(item, Block):
        item.seq_first = None  # never stored: listeners must not see it
        result.unencodable += n
    else:
        item.seq = None
    data = {"reason": "unencodable", "readings": n if block else 0, "rows": 1, "events": 0 if block else 1,
            "first_seq": seq, "last_seq": seq + n - 1, "first_ts": ts, "last_ts": ts,
            "error": f"{type(exc).__name__}: {exc}"[:300]}  # fmt: skip
    loss = Event(item.device, "data_loss", Severity.ALARM, data, seq=seq + n)
    result.events.append(loss)
    return ("event", item.device, seq + n, 1, loss.ts_ns, dumps(loss.body()))


def _encode(item: Block | Event) -> str:
    try:
        return dumps(item.body())
    except (TypeError, ValueError):
        pass
    if isinstance(item, Block):
        log.warning("device %s group %s: values that are not JSON were made bad", item.device, item.group)
        _sanitize(item)
    else:
        log.warning("event %s of %s: data that is not JSON was converted", item.kind, item.device)
        item.data = _jsonable(item.data)
    return dumps(item.body())


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

    # ------------------------------------------------------------------ open/close

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("buffer is not open")
        return self._conn

    def open(self, readonly: bool = False) -> dict[str, str]:
        """Open (creating or migrating unless ``readonly``) and return the driver state."""
        path = self.cfg.path
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

    def commit(self, items: Sequence[Block | Event]) -> CommitResult:
        """Assign seqs in order and commit ``items`` (and the state of their blocks) in one
        transaction; on failure nothing is committed and the items keep no seq.

        The next seq is read inside the write transaction, so another writer on the same file
        (``buffer replay`` recording its audit event while the agent runs) never reuses a seq."""
        result = CommitResult()
        try:
            with self._transaction():
                conn = self.conn
                seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
                rows = self._assign(items, seq, result)
                seq = rows[-1][2] + rows[-1][3] if rows else seq
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
                seq = self._enforce_limit(seq, result.events)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(seq),))
        except BaseException:
            for item in items:
                if isinstance(item, Block):
                    item.seq_first = None
                else:
                    item.seq = None
            raise
        return result

    @staticmethod
    def _assign(items: Sequence[Block | Event], seq: int, result: CommitResult) -> list[_Row]:
        """Rows for ``items``, seqs from ``seq`` on. A record that cannot be encoded even after
        sanitising (a bug upstream) is replaced by a ``data_loss`` event right after its seqs: one
        bad record must neither stall the buffer nor vanish silently."""
        rows: list[_Row] = []
        for item in items:
            if isinstance(item, Block):
                kind, n, ts = "data", len(item), item.acq_ts_ns
                item.seq_first = seq
                result.readings += n
            else:
                kind, n, ts = "event", 1, item.ts_ns
                item.seq = seq
            try:
                rows.append((kind, item.device, seq, n, ts, _encode(item)))
            except Exception as exc:
                log.exception(
                    "device %s: a %s record cannot be encoded; recorded as data_loss", item.device, kind
                )
                rows.append(_unencodable(item, seq, n, ts, exc, result))
                seq += 1
            else:
                if item.state:
                    result.state.update(item.state)
            seq += n
        return rows

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

    def _enforce_limit(self, seq: int, events: list[Event]) -> int:
        """Inside the commit transaction: drop delivered rows, then the oldest undelivered, until
        the live pages are back under 90 % of the budget; record undelivered losses as events."""
        if self._live_pages() <= self._budget_pages:
            return seq
        conn = self.conn
        low_water = self._budget_pages * 9 // 10
        lost: dict[str, dict[str, Any]] = {}
        counted = 0
        for where, order in DROP_ORDER:
            while (live := self._live_pages()) > low_water:
                # two queries: min() and max() together would scan; alone each is one b-tree descent
                lo = conn.execute("SELECT min(id) FROM records").fetchone()[0]
                hi = conn.execute("SELECT max(id) FROM records").fetchone()[0]
                if lo is None:
                    break
                per_row = live / (hi - lo + 1)  # ids are dense enough for an estimate
                batch = max(16, math.ceil((live - low_water) / per_row * 1.1))
                gone = conn.execute(
                    "DELETE FROM records WHERE id IN "
                    f"(SELECT id FROM records WHERE {where} ORDER BY {order} LIMIT ?) "
                    "RETURNING kind, device, seq_first, n, acq_ts_ns, delivered_ns, "
                    "CASE kind WHEN 'event' THEN body END",
                    (batch,),
                ).fetchall()
                for kind, device, seq_first, n, ts, delivered, body in gone:
                    if delivered is None:
                        counted += _tally(lost, kind, device, seq_first, n, ts, body)
                if len(gone) < batch:
                    break
        self._add("lost_readings_total", counted)
        for device, data in sorted(lost.items()):
            event = Event(device=device, kind="data_loss", severity=Severity.ALARM, data=data, seq=seq)
            conn.execute(
                "INSERT INTO records(kind, device, seq_first, n, acq_ts_ns, body) VALUES ('event',?,?,1,?,?)",
                (device, seq, event.ts_ns, dumps(event.body())),
            )
            seq += 1
            events.append(event)
            log.error(
                "buffer full (%d bytes): dropped %d undelivered rows (%d readings) of %s, seq %d..%d",
                *(self.cfg.max_bytes, data["rows"], data["readings"], device),
                *(data["first_seq"], data["last_seq"]),
            )
        return seq

    # ------------------------------------------------------------------ delivery

    def pending(self, after_id: int, limit: int) -> list[StoredRecord]:
        rows = self.conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE delivered_ns IS NULL AND id > ? "
            "ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [StoredRecord(*r) for r in rows]

    def mark_delivered(self, ids: Sequence[int], when_ns: int | None = None) -> int:
        """Mark rows delivered (idempotent); returns the readings newly marked."""
        when = now_ns() if when_ns is None else when_ns
        readings = 0
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
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE 1 = 1{where} ORDER BY id", params
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
            "next_seq": int(meta["next_seq"]),
            **{k: int(meta.get(k, 0)) for k in _COUNTERS},
            "schema_version": SCHEMA_VERSION,
        }


def _tally(
    lost: dict[str, dict[str, Any]], kind: str, device: str, seq_first: int, n: int, ts: int, body: str | None
) -> int:
    """Add one dropped undelivered row to its device's loss record; returns the readings newly lost.

    A dropped ``data_loss`` event is folded in rather than counted: its readings were counted when
    it was made, and the new event must still account for them, or the consumer could no longer
    explain that older gap."""
    first_seq, last_seq, first_ts, last_ts = seq_first, seq_first + n - 1, ts, ts
    readings = rows = events = newly = 0
    previous = json.loads(body) if body is not None else None
    if previous is not None and previous["kind"] == "data_loss":
        old = previous["data"]
        readings, rows, events = old["readings"], old["rows"], old["events"]
        first_seq, last_seq = min(first_seq, old["first_seq"]), max(last_seq, old["last_seq"])
        first_ts, last_ts = min(first_ts, old["first_ts"]), max(last_ts, old["last_ts"])
    elif kind == "data":
        readings = newly = n
        rows = 1
    else:
        rows = events = 1
    d = lost.setdefault(
        device,
        {"reason": "buffer_full", "readings": 0, "rows": 0, "events": 0,
         "first_seq": first_seq, "last_seq": last_seq, "first_ts": first_ts, "last_ts": last_ts},
    )  # fmt: skip
    d["readings"] += readings
    d["rows"] += rows
    d["events"] += events
    d["first_seq"], d["last_seq"] = min(d["first_seq"], first_seq), max(d["last_seq"], last_seq)
    d["first_ts"], d["last_ts"] = min(d["first_ts"], first_ts), max(d["last_ts"], last_ts)
    return newly


class _Txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error): the write lock is taken up front so a
    concurrent CLI writer makes us wait (busy_timeout) instead of failing mid-transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


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


# ---------------------------------------------------------------------- async facade

Listener = Callable[[Sequence[Block], Sequence[Event]], None]


class AsyncBuffer:
    """The agent's view of the buffer: non-blocking submit, group commit on the buffer thread,
    listeners told on the loop after each commit (with seqs assigned)."""

    def __init__(self, cfg: BufferConfig, agent_id: str) -> None:
        self.cfg = cfg
        self.core = Buffer(cfg, agent_id)
        self._exec: ThreadPoolExecutor | None = None
        self._state: dict[str, str] = {}
        self._queue: list[Block | Event] = []
        self._first_queued = 0.0
        self._submitted = 0
        self._committed = 0
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._flush_now = False
        self.commit_errors = 0
        self._committing = 0
        self._shed_tally: dict[str, dict[str, Any]] = {}
        self.shed_readings = 0

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._exec is None:
            raise RuntimeError("buffer is not open")
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def open(self) -> None:
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer")
        try:
            self._state = await self._call(self.core.open)
        except BaseException:
            self._exec.shutdown(wait=True)
            self._exec = None
            raise
        self._closing = False
        self._task = asyncio.create_task(self._committer(), name="buffer-committer")

    async def close(self) -> None:
        """Commit everything submitted, then close the database."""
        if self._exec is None:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._call(self.core.close)
        self._exec.shutdown(wait=True)
        self._exec = None

    def state(self) -> Mapping[str, str]:
        return self._state

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def submit(self, blocks: Sequence[Block] = (), events: Sequence[Event] = ()) -> None:
        # While closing, the committer still drains the queue, so a listener reacting to the last
        # commits (a limit event) is not lost; once it has finished, submitting is a bug.
        if self._task is None or self._task.done():
            raise RuntimeError("buffer is not open: nothing can be submitted")
        if not self._queue:
            self._first_queued = time.monotonic()
        self._queue.extend(blocks)
        self._queue.extend(events)
        self._submitted += len(blocks) + len(events)
        if self.commit_errors and len(self._queue) > self.cfg.commit_max_records * QUEUE_LIMIT_BATCHES:
            self._shed()  # only while the disk refuses: a burst the committer is working through is kept
        self._wake.set()

    def _shed(self) -> None:
        """Drop the oldest queued blocks beyond the memory limit (never the batch being committed)."""
        excess = len(self._queue) - self.cfg.commit_max_records * QUEUE_LIMIT_BATCHES
        kept: list[Block | Event] = []
        for item in self._queue[self._committing :]:
            if excess > 0 and isinstance(item, Block):
                excess -= 1
                ts = item.acq_ts_ns
                t = self._shed_tally.setdefault(
                    item.device,
                    {"reason": "not_committed", "readings": 0, "rows": 0, "first_ts": ts, "last_ts": ts},
                )
                t["readings"] += len(item)
                t["rows"] += 1
                t["first_ts"], t["last_ts"] = min(t["first_ts"], ts), max(t["last_ts"], ts)
                self.shed_readings += len(item)
                self._committed += 1  # settled for flush(): it will never be committed
            else:
                kept.append(item)
        self._queue[self._committing :] = kept

    async def flush(self) -> None:
        target = self._submitted
        if self._committed >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, fut))
        self._flush_now = True
        self._wake.set()
        await fut

    async def _committer(self) -> None:
        cfg = self.cfg
        last_prune = time.monotonic()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                timeout = max(0.0, cfg.prune_interval - (time.monotonic() - last_prune))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            elif not (self._closing or self._flush_now or len(self._queue) >= cfg.commit_max_records):
                self._wake.clear()
                delay = cfg.commit_interval - (time.monotonic() - self._first_queued)
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                        continue
                    except TimeoutError:
                        pass
            if self._queue:
                await self._commit_some()
            if time.monotonic() - last_prune >= cfg.prune_interval:
                last_prune = time.monotonic()
                try:
                    pruned = await self._call(self.core.prune)
                    if pruned:
                        log.info("pruned %d delivered rows older than %ss", pruned, cfg.retention)
                except sqlite3.Error:
                    log.exception("buffer prune failed")

    async def _commit_some(self) -> None:
        batch = self._queue[: self.cfg.commit_max_records]
        self._committing = len(batch)
        try:
            result: CommitResult = await self._call(self.core.commit, batch)
        except Exception as exc:  # disk full, I/O error, locked past busy_timeout...
            # Keep the batch queued and retry: nothing submitted is dropped, flush() keeps waiting.
            self._committing = 0
            self.commit_errors += 1
            if self._closing and self.commit_errors >= CLOSE_ATTEMPTS:
                log.error("closing with %d records NOT committed: %s", len(self._queue), exc)
                self._queue.clear()
                self._fail_waiters(exc)
                return
            log.error("buffer commit of %d records failed (%s); retrying", len(batch), exc)
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(self.commit_errors, 6)))
            return
        self.commit_errors = 0
        del self._queue[: len(batch)]
        self._committing = 0
        if self._shed_tally:  # the disk takes data again: say what could not wait for it
            for device, data in sorted(self._shed_tally.items()):
                log.error("%d readings of %s were shed while commits failed", data["readings"], device)
                self._queue.append(Event(device, "data_loss", Severity.ALARM, data))
                self._submitted += 1
            self._shed_tally = {}
        if self._queue:
            self._first_queued = time.monotonic()
        self._committed += len(batch)
        self._flush_now = False
        self._state.update(result.state)
        blocks = [b for b in batch if isinstance(b, Block) and b.seq_first is not None]
        events = [e for e in batch if isinstance(e, Event) and e.seq is not None] + result.events
        for cb in list(self._listeners):
            try:
                cb(blocks, events)
            except Exception:
                log.exception("buffer listener %r failed", cb)
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._flush_waiters:
            if self._committed >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._flush_waiters = still
        if still:
            self._flush_now = True

    def _fail_waiters(self, exc: Exception) -> None:
        for _, fut in self._flush_waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._flush_waiters = []

    async def pending(self, after_id: int, limit: int) -> list[StoredRecord]:
        result: list[StoredRecord] = await self._call(self.core.pending, after_id, limit)
        return result

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        if ids:
            await self._call(self.core.mark_delivered, list(ids))

    async def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = await self._call(self.core.stats)
        out["queued_records"] = len(self._queue)
        out["commit_errors"] = self.commit_errors
        out["shed_readings"] = self.shed_readings
        return out
