"""The buffer file's layout and the steps that bring an older file up to it.

A step only adds (tables, indexes, counters), so an upgrade keeps every undelivered row.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

SCHEMA_VERSION = 3

COUNTERS = ("committed_readings_total", "delivered_readings_total", "lost_readings_total")
"""Persistent counters in ``meta``: ``stats`` survives restarts."""


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


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """Seqs are handed out at acquisition from a window reserved ahead (``next_seq`` is its top);
    ``committed_seq`` is one past the highest committed seq, where the next start continues. Before,
    both were the same number."""
    db.execute("INSERT INTO meta(key, value) SELECT 'committed_seq', value FROM meta WHERE key = 'next_seq'")


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
}
"""Schema version -> the step that produces it from the previous version. Steps only add."""
