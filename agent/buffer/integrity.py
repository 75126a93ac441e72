"""The buffer file's integrity check at start, and what is done with a file that fails it.

A damaged file (a power loss under ``synchronous: off``, a failing flash card, a stray write) used to
fail every start, so the agent restarted in a loop and acquired nothing. A file that fails
``PRAGMA quick_check`` (or that SQLite refuses as corrupt or not a database) is moved aside with a
UTC timestamp, together with its ``-wal`` and ``-shm``, and a fresh buffer is started; the damaged
file is kept unchanged for whoever wants to recover rows from it. quick_check reads every page but
skips the index cross-checks of ``integrity_check``: seconds for a full-size buffer, paid once per
start (docs/operations.md gives the measured cost).

Seqs must not start again at 0 (a consumer de-duplicating by ``(agent, seq)`` would discard the new
readings as repeats): the fresh buffer continues above the highest seq the damaged file still shows,
and when nothing can be read from it, above the current time in microseconds, which no seq counter
of a running agent reaches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cleanroom.buffer")

_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


@dataclass(frozen=True, slots=True)
class Replaced:
    """A damaged buffer file that was moved aside."""

    moved_to: Path
    problem: str
    """What SQLite said: the quick_check findings or the error."""
    next_seq: int
    """Where the fresh buffer's seqs start."""
    undelivered_readings: int | None
    """Undelivered readings by the damaged file's own counters (an estimate: they are in a damaged
    file), None when they could not be read."""


def check_and_move_aside(path: Path) -> Replaced | None:
    """None when ``path`` is absent or passes quick_check; otherwise move it aside and say so. Errors
    that are not damage (permissions, a missing directory) are raised, never taken for damage: the
    file is only moved when SQLite itself says it is damaged."""
    if not path.exists():
        return None
    problem = _damage(path)
    if problem is None:
        return None
    next_seq, undelivered = _salvage(path)
    moved = _move_aside(path)
    log.error(
        "buffer %s is damaged (%s): moved to %s, starting a fresh buffer at seq %d",
        path,
        problem,
        moved,
        next_seq,
    )
    return Replaced(moved, problem, next_seq, undelivered)


def _damage(path: Path) -> str | None:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            findings = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode in _CORRUPT:
            return str(exc)
        raise
    if findings == ["ok"]:
        return None
    return "quick_check: " + "; ".join(findings[:3])[:300]


def _salvage(path: Path) -> tuple[int, int | None]:
    """What the damaged file still says: its highest seq and its undelivered readings."""
    seqs: list[int] = []
    meta: dict[str, str] = {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        with contextlib.suppress(sqlite3.Error, KeyError, ValueError):
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta").fetchall()}
            seqs.append(int(meta["next_seq"]))
        for query in ("SELECT max(seq_last) + 1 FROM segments", "SELECT max(seq_first + n) FROM records"):
            with contextlib.suppress(sqlite3.Error, ValueError, TypeError):  # schema 4, or older
                seqs.append(int(conn.execute(query).fetchone()[0]))
    undelivered = None
    with contextlib.suppress(KeyError, ValueError):
        undelivered = int(meta["committed_readings_total"]) - sum(
            int(meta[k]) for k in ("delivered_readings_total", "lost_readings_total")
        )
    return (max(seqs) if seqs else time.time_ns() // 1000), undelivered


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{moved}{suffix}")
    return moved
