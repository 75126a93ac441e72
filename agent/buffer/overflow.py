"""What a full buffer gives up, and how the loss is accounted so a consumer can still explain
every seq that never arrives."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace

from agent.buffer.rows import lost_seqs
from agent.core.events import DataLoss, LossReason

DROP_ORDER = (
    ("delivered_ns IS NOT NULL", "delivered_ns"),
    ("delivered_ns IS NULL AND kind = 'data'", "id"),
    ("delivered_ns IS NULL", "id"),
)
"""What a full buffer gives up, in this order: delivered rows (lossless, oldest delivery first), then
the oldest undelivered readings, and only then undelivered events: events (alarms, the audit trail)
are few and small, and losing them to a flood of readings would hide what happened. Each selection
walks a partial index, so a full buffer costs O(log n) per commit, not a table scan."""


def drop_oldest(
    conn: sqlite3.Connection, live_pages: Callable[[], int], low_water: int, in_flight: Sequence[int] = ()
) -> tuple[dict[str, DataLoss], int]:
    """Inside the commit transaction: drop rows in :data:`DROP_ORDER`, never those ``in_flight`` (the
    broker may have them: they are delivered or not by its acknowledgement, not lost here), until
    ``live_pages()`` is at most ``low_water``. Returns the undelivered loss per device and the
    readings newly lost."""
    lost: dict[str, DataLoss] = {}
    counted = 0
    spare = " AND id NOT IN (SELECT value FROM json_each(?))" if in_flight else ""
    spare_args = (json.dumps(list(in_flight)),) if in_flight else ()
    for where, order in DROP_ORDER:
        while (live := live_pages()) > low_water:
            # two queries: min() and max() together would scan; alone each is one b-tree descent
            lo = conn.execute("SELECT min(id) FROM records").fetchone()[0]
            hi = conn.execute("SELECT max(id) FROM records").fetchone()[0]
            if lo is None:
                break
            per_row = live / (hi - lo + 1)  # ids are dense enough for an estimate
            batch = max(16, math.ceil((live - low_water) / per_row * 1.1))
            gone = conn.execute(
                "DELETE FROM records WHERE id IN "
                f"(SELECT id FROM records WHERE {where}{spare} ORDER BY {order} LIMIT ?) "
                "RETURNING kind, device, seq_first, n, acq_ts_ns, delivered_ns, "
                "CASE kind WHEN 'event' THEN body END",
                (*spare_args, batch),
            ).fetchall()
            for kind, device, seq_first, n, ts, delivered, body in gone:
                if delivered is None:
                    counted += _tally(lost, kind, device, seq_first, n, ts, body)
            if len(gone) < batch:
                break
    return lost, counted


def _tally(
    lost: dict[str, DataLoss], kind: str, device: str, seq_first: int, n: int, ts: int, body: str | None
) -> int:
    """Add one dropped undelivered row to its device's loss; returns the readings newly lost.

    A dropped ``data_loss`` event is folded in rather than counted: its readings were counted when
    it was made, and the new event must still account for them, or the consumer could no longer
    explain that older gap."""
    first_seq, last_seq = lost_seqs(seq_first, n)
    row = DataLoss(LossReason.BUFFER_FULL, first_seq=first_seq, last_seq=last_seq, first_ts=ts, last_ts=ts)
    newly = 0
    if kind == "data":
        row, newly = replace(row, readings=n, rows=1), n
    else:
        try:
            row = row.merged(DataLoss.from_body(json.loads(body or "{}")))
        except ValueError:  # any other event (or a loss event this agent cannot read): one lost event
            row = replace(row, rows=1, events=1)
    lost[device] = lost[device].merged(row) if device in lost else row
    return newly
