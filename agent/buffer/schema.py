"""The buffer file's layout and the steps that bring an older file up to it.

An upgrade keeps every undelivered row: steps 1-3 only add; step 4 turns each undelivered record
into a segment of its stream (the stored unit since issue 12) and drops the delivered ones, which
predate the chain and have no place in it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.core import chain

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 4

COUNTERS = ("committed_readings_total", "delivered_readings_total", "lost_readings_total")
"""Persistent counters in ``meta``: ``stats`` survives restarts."""


def _utils(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """sqlite_utils only where an old file is brought up to date: importing it costs about 4 MB of
    RSS that a running agent, whose file is current, never needs."""
    import sqlite_utils

    return sqlite_utils.Database(conn)


def _migrate_v1(conn: sqlite3.Connection, up: Upgrade) -> None:
    """The original layout: records, driver state, sequence counter."""
    db = _utils(conn)
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


def _migrate_v2(conn: sqlite3.Connection, up: Upgrade) -> None:
    """Export and replay select by device and time, retention and overflow by delivery time;
    persistent counters make ``stats`` survive restarts. Counters start from what the rows still
    show (pruned history is unknown)."""
    db = _utils(conn)
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


def _migrate_v3(conn: sqlite3.Connection, up: Upgrade) -> None:
    """Seqs are handed out at acquisition from a window reserved ahead (``next_seq`` is its top);
    ``committed_seq`` is one past the highest committed seq, where the next start continues. Before,
    both were the same number."""
    conn.execute(
        "INSERT INTO meta(key, value) SELECT 'committed_seq', value FROM meta WHERE key = 'next_seq'"
    )


SEGMENT_COLUMNS = (
    "stream, i, device, kind, n_readings, n_records, seq_first, seq_last, seqs, first_ts, last_ts, "
    "prev, hash, payload"
)
"""The columns a commit writes into ``segments``, in the order :func:`insert_segment` takes them."""

SegmentRow = tuple[str, int, str, str, int, int, int, int, str, int, int, str, str, bytes]


def create_v4_tables(conn: sqlite3.Connection) -> None:
    """Segments, delivery apart from them, the stream heads, the record of removals, the quarantine.
    As few b-trees as will do (every one costs a page of the smallest buffers' budget): ``kv`` and
    ``meta`` are rebuilt without their rowid, ``delivered`` has no index on its time (prune scans it).

    Delivery state lives in its own table so a segment row, once written, is never updated:
    ``buffer replay`` only deletes from ``delivered``. ``chain_gaps`` is append-only and lets a
    verifier tell an ``i`` interval removed on purpose from one removed behind the agent's back.
    ``chain.key_id`` names the key a stream's segments are signed with from ``signed_from`` on (None:
    unsigned): segments before it were signed with another key or none, and are not MAC-checked, so
    enabling or rotating the key never quarantines the backlog."""
    script = """
        CREATE TABLE segments (
            id INTEGER PRIMARY KEY, stream TEXT NOT NULL, i INTEGER NOT NULL, device TEXT NOT NULL,
            kind TEXT NOT NULL, n_readings INTEGER NOT NULL, n_records INTEGER NOT NULL,
            seq_first INTEGER NOT NULL, seq_last INTEGER NOT NULL, seqs TEXT NOT NULL,
            first_ts INTEGER NOT NULL, last_ts INTEGER NOT NULL, prev TEXT NOT NULL,
            hash TEXT NOT NULL, payload BLOB NOT NULL, UNIQUE (stream, i));
        CREATE INDEX segments_device_ts ON segments(device, first_ts);
        CREATE TABLE delivered (id INTEGER PRIMARY KEY, ns INTEGER NOT NULL);
        CREATE TABLE chain (
            stream TEXT PRIMARY KEY, next_i INTEGER NOT NULL, head TEXT NOT NULL, key_id TEXT,
            signed_from INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
        CREATE TABLE chain_gaps (
            stream TEXT NOT NULL, first_i INTEGER NOT NULL, last_i INTEGER NOT NULL,
            reason TEXT NOT NULL, ts INTEGER NOT NULL);
        CREATE TABLE quarantine (
            id INTEGER PRIMARY KEY, stream TEXT, i INTEGER, device TEXT, kind TEXT, n_readings INTEGER,
            n_records INTEGER, seq_first INTEGER, seq_last INTEGER, seqs TEXT, first_ts INTEGER,
            last_ts INTEGER, prev TEXT, hash TEXT, payload BLOB, problem TEXT NOT NULL, ts INTEGER NOT NULL);
        """
    _run(conn, script)


def _run(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):  # executescript would commit the migration's transaction
        if statement.strip():
            conn.execute(statement)


def _migrate_v4(conn: sqlite3.Connection, up: Upgrade) -> None:
    """Every undelivered record becomes a segment of its own (its payload built as a commit builds
    it, without attribution or clock state: those were not recorded), chained per stream in id
    order; delivered records are dropped with the old table."""
    create_v4_tables(conn)
    _run(
        conn,
        "".join(
            f"CREATE TABLE {t}_v4 (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
            f"INSERT INTO {t}_v4 SELECT key, value FROM {t}; DROP TABLE {t};"
            f"ALTER TABLE {t}_v4 RENAME TO {t};"
            for t in ("kv", "meta")
        ),
    )
    heads: dict[str, tuple[int, str]] = {}
    cur = conn.execute(
        "SELECT kind, device, seq_first, n, acq_ts_ns, body FROM records "
        "WHERE delivered_ns IS NULL ORDER BY id"
    )
    for kind, device, seq_first, n, ts, body in cur.fetchall():
        if kind == "data":
            seg_kind: chain.Kind = "data"
        else:
            seg_kind = "audit" if json.loads(body).get("kind") == "audit" else "events"
        seg_device = "agent" if seg_kind == "audit" else device
        stream = chain.stream_of(device, seg_kind)
        i, prev = heads.get(stream, (0, chain.GENESIS))
        payload = chain.build_payload(
            kind=seg_kind, agent=up.agent, device=seg_device, stream=stream, i=i, prev=prev,
            source=None, clock=None, bodies=[body], key=up.key,
        )  # fmt: skip
        digest = chain.digest(payload)
        last = seq_first + max(n, 1) - 1
        insert_segment(
            conn,
            (stream, i, seg_device, seg_kind, n if kind == "data" else 0, 1, seq_first, last,
             json.dumps([[seq_first, last]] if n else []), ts, ts, prev, digest, payload),
        )  # fmt: skip
        heads[stream] = (i + 1, digest)
    key_id = None if up.key is None else chain.key_id(up.key)
    conn.executemany(
        "INSERT INTO chain(stream, next_i, head, key_id, signed_from) VALUES (?, ?, ?, ?, 0)",
        [(s, i, h, key_id) for s, (i, h) in heads.items()],
    )
    conn.execute("DROP TABLE records")


def insert_segment(conn: sqlite3.Connection, row: SegmentRow) -> int:
    """Insert one segment row; returns its id."""
    cur = conn.execute(f"INSERT INTO segments({SEGMENT_COLUMNS}) VALUES ({','.join('?' * 14)})", row)
    return int(cur.lastrowid or 0)


def create(conn: sqlite3.Connection) -> None:
    """A new file gets the current layout at once: migrating it up from the first layout would
    leave the dropped tables' pages on the free list, pages a full disk would still hand out."""
    create_v4_tables(conn)
    _run(
        conn,
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;",
    )
    conn.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?)",
        [("next_seq", "0"), ("committed_seq", "0"), ("schema_version", str(SCHEMA_VERSION))]
        + [(k, "0") for k in COUNTERS],
    )


@dataclass(frozen=True, slots=True)
class Upgrade:
    """What building segments during a migration needs: the payload's agent and the MAC key."""

    agent: str
    key: bytes | None = None


MIGRATIONS: dict[int, Callable[[sqlite3.Connection, Upgrade], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
}
"""Schema version -> the step that produces it from the previous version."""
