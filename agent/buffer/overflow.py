"""What a full buffer gives up, and how the loss is accounted so a consumer can still explain
every seq that never arrives, and a verifier every ``i`` missing from a stream."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from agent.core.events import DataLoss, LossReason, Segments, merge_ranges
from agent.core.records import now_ns

UNDELIVERED = "NOT EXISTS (SELECT 1 FROM delivered d WHERE d.id = s.id)"

DROP_ORDER = (
    "SELECT d.id FROM delivered d{spare_d} ORDER BY d.id LIMIT ?",
    "SELECT s.id FROM segments s WHERE s.kind = 'data' AND "
    + UNDELIVERED
    + "{spare_s} ORDER BY s.id LIMIT ?",
    "SELECT s.id FROM segments s WHERE " + UNDELIVERED + "{spare_s} ORDER BY s.id LIMIT ?",
)
"""What a full buffer gives up, whole segments, in this order: delivered ones (lossless, oldest
first), then the oldest undelivered readings, and only then undelivered events: events
(alarms, the audit trail) are few and small, and losing them to a flood of readings would hide
what happened."""


def record_gaps(conn: sqlite3.Connection, removed: Iterable[tuple[str, int]], reason: str) -> list[Segments]:
    """Record in ``chain_gaps`` the ``i`` intervals of the removed ``(stream, i)``; returns them."""
    per: dict[str, list[tuple[int, int]]] = {}
    for stream, i in removed:
        per.setdefault(stream, []).append((i, i))
    out = [Segments(stream, lo, hi) for stream in sorted(per) for lo, hi in merge_ranges(per[stream])]
    ts = now_ns()
    conn.executemany(
        "INSERT INTO chain_gaps(stream, first_i, last_i, reason, ts) VALUES (?, ?, ?, ?, ?)",
        [(s.stream, s.first_i, s.last_i, reason, ts) for s in out],
    )
    return out


def drop_oldest(
    conn: sqlite3.Connection, live_pages: Callable[[], int], low_water: int, in_flight: Sequence[int] = ()
) -> tuple[dict[str, DataLoss], int]:
    """Inside the commit transaction: drop segments in :data:`DROP_ORDER`, never those ``in_flight``
    (the broker may have them: they are delivered or not by its acknowledgement, not lost here),
    until ``live_pages()`` is at most ``low_water``. Returns the undelivered loss per device and the
    readings newly lost."""
    lost: dict[str, DataLoss] = {}
    counted = 0
    flight = json.dumps(list(in_flight))
    spare_d = " WHERE d.id NOT IN (SELECT value FROM json_each(?))" if in_flight else ""
    spare_s = " AND s.id NOT IN (SELECT value FROM json_each(?))" if in_flight else ""
    spare_args = (flight,) if in_flight else ()
    removed: list[tuple[str, int]] = []
    for select in DROP_ORDER:
        query = select.format(spare_d=spare_d, spare_s=spare_s)
        while (live := live_pages()) > low_water:
            lo = conn.execute("SELECT min(id) FROM segments").fetchone()[0]
            hi = conn.execute("SELECT max(id) FROM segments").fetchone()[0]
            if lo is None:
                break
            per_row = live / (hi - lo + 1)  # ids are dense enough for an estimate
            batch = max(4, math.ceil((live - low_water) / per_row * 1.1))
            ids = [r[0] for r in conn.execute(query, (*spare_args, batch)).fetchall()]
            if not ids:
                break
            marks = json.dumps(ids)
            delivered = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM delivered WHERE id IN (SELECT value FROM json_each(?))", (marks,)
                )
            }
            gone = conn.execute(
                "DELETE FROM segments WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, stream, i, "
                "device, kind, n_readings, n_records, seqs, first_ts, last_ts, "
                "CASE kind WHEN 'data' THEN NULL ELSE payload END",
                (marks,),
            ).fetchall()
            conn.execute("DELETE FROM delivered WHERE id IN (SELECT value FROM json_each(?))", (marks,))
            for seg_id, stream, i, device, kind, readings, records, seqs, first_ts, last_ts, payload in gone:
                removed.append((stream, i))
                if seg_id not in delivered:
                    counted += _tally(
                        lost, stream, i, device, kind, readings, records, seqs, first_ts, last_ts, payload
                    )
            if len(ids) < batch:
                break
    record_gaps(conn, removed, "buffer_full")
    return lost, counted


def _tally(
    lost: dict[str, DataLoss],
    stream: str,
    i: int,
    device: str,
    kind: str,
    readings: int,
    records: int,
    seqs: str,
    first_ts: int,
    last_ts: int,
    payload: bytes | None,
) -> int:
    """Add one dropped undelivered segment to its device's loss; returns the readings newly lost.

    A dropped ``data_loss`` event is folded in rather than counted: its readings were counted when
    it was made, and the new event must still account for them, or the consumer could no longer
    explain that older gap."""
    ranges = merge_ranges(tuple(r) for r in json.loads(seqs))
    first_seq, last_seq = (ranges[0][0], ranges[-1][1]) if ranges else (None, None)
    row = DataLoss(
        LossReason.BUFFER_FULL,
        first_seq=first_seq,
        last_seq=last_seq,
        first_ts=first_ts,
        last_ts=last_ts,
        seqs=ranges,
        segments=(Segments(stream, i, i),),
    )
    newly = 0
    if kind == "data":
        row, newly = replace(row, readings=readings, rows=records), readings
    else:
        for item in _events(payload):
            try:
                inner = DataLoss.from_body(item)
            except ValueError:  # any other event (or a loss event this agent cannot read): one lost event
                row = replace(row, rows=row.rows + 1, events=row.events + 1)
            else:
                row = row.merged(replace(inner, seqs=_exact(inner)))
    lost[device] = lost[device].merged(row) if device in lost else row
    return newly


def _exact(loss: DataLoss) -> tuple[tuple[int, int], ...] | None:
    """The seqs a folded loss event explained: its exact ranges, or its span when it has none."""
    if loss.seqs is None and loss.first_seq is not None and loss.last_seq is not None:
        return ((loss.first_seq, loss.last_seq),)
    return loss.seqs


def _events(payload: bytes | None) -> list[dict[str, object]]:
    try:
        doc = json.loads(payload or b"{}")
    except ValueError:
        return []
    events = doc.get("events") if isinstance(doc, dict) else None
    return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []
