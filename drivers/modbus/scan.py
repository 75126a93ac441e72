"""Which addresses of a Modbus table a device answers, found with as few requests as the
device allows and within a request budget and a deadline; no I/O here (the caller supplies
the read), so the search can be tested on any register map without a device.

A read of ``count`` registers (or bits) from ``start`` either returns data or is refused
(an exception reply such as illegal data address). A refused read says only that *some*
address in it is unreadable, or that the device will not read across that point. The walk:

* **Blocks.** From the start of the range, read whole blocks (the largest request the device
  accepts); each block read extends the current run of readable addresses.
* **Binary search on refusal.** When a block is refused, the first address alone is read:
  refused, it is unreadable; answered, a binary search finds the longest readable read from
  there, which ends the run.
* **Unreadable stretches, one address at a time.** A refused read of several addresses
  cannot say which are readable, so past the end of a run single addresses are read until
  one answers; from there the walk reads blocks again. A sparse map therefore costs about one
  request per unreadable address: the budget, the deadline and ``--start``/``--end`` bound it.

A run is a sequence of reads that were answered as read, block after block from the run's
start, so the driver's read plan for a poll group holding exactly that run
(:func:`drivers.modbus.plan.coalesce`: greedy, ``max_count`` at a time, from the first
address) sends only requests the device answered during the scan. Two runs may touch (a
device that refuses reads across some boundary): they stay apart.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from cleanroom_common.modbus import Table

Read = Callable[[Table, int, int], Awaitable[bool]]
"""``(table, start, count)`` → answered (True) or refused (False). May raise :class:`Stop`
(the deadline passed) or :class:`Unsupported` (the device has no such table)."""


class Stop(Exception):
    """The scan must stop: the request budget or the deadline is used up."""

    def __init__(self, reason: str, final: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
        """Nothing more may be sent at all (the deadline), not only in this table (the budget)."""


class Unsupported(Exception):
    """The device does not implement the table's read function (exception 1, illegal function)."""


class Budget:
    """Requests and time the whole scan may spend. Each table gets an equal share of what is
    left when it starts, so a sparse first table cannot starve the others; what one table does
    not use goes to those after it."""

    def __init__(
        self, max_requests: int, deadline_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_requests = max_requests
        self.clock = clock
        self.started = clock()
        self.deadline = self.started + deadline_s
        self.used = 0
        self._cap = max_requests

    def share(self, tables_left: int) -> None:
        """Open the next table: it may use its share of the requests left."""
        self._cap = self.used + (self.max_requests - self.used) // max(1, tables_left)

    def time_left(self) -> float:
        return self.deadline - self.clock()

    def spend(self) -> None:
        """Account for one request about to be sent; :class:`Stop` when none may be."""
        if self.time_left() <= 0:
            raise Stop("deadline reached", final=True)
        if self.used >= self._cap:
            final = self.used >= self.max_requests
            raise Stop(f"request budget ({self.max_requests}) used up", final=final)
        self.used += 1

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started


@dataclass
class TableScan:
    """What the walk of one table found."""

    table: Table
    start: int
    end: int
    """Last address of the requested range (inclusive)."""
    runs: list[tuple[int, int]] = field(default_factory=list)
    """Readable runs as ``(first address, count)``, in address order."""
    next_address: int | None = None
    """Where the walk stopped early (``stopped``): addresses from here on were not scanned."""
    stopped: str = ""
    """Why the walk stopped before ``end`` (budget, deadline); empty when it finished."""
    unsupported: bool = False
    """The device refused the table's read function itself (illegal function) before it had
    answered any read of the table."""
    requests: int = 0

    @property
    def readable(self) -> int:
        return sum(n for _, n in self.runs)


async def scan_table(result: TableScan, max_count: int, read: Read) -> None:
    """Walk ``result.start..result.end`` (inclusive) of ``result.table`` in reads of at most
    ``max_count``, recording into ``result`` as it goes: a walk cut short by :class:`Stop`
    (re-raised) still reports what it found."""
    table, start, end = result.table, result.start, result.end
    runs = result.runs
    open_run = False

    answered = False

    async def probe(address: int, count: int) -> bool:
        nonlocal answered
        try:
            ok = await read(table, address, count)
        except Unsupported:
            if answered:
                return False  # some devices say "illegal function" for an unmapped address
            raise
        answered = answered or ok
        return ok

    def extend(address: int, count: int) -> None:
        nonlocal open_run
        if open_run and sum(runs[-1]) == address:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((address, count))
        open_run = True

    pos = start
    known_good = False  # the address at pos answered a read of its own
    try:
        while pos <= end:
            n = min(max_count, end + 1 - pos)
            if n == 1 and known_good:
                extend(pos, 1)
                pos += 1
                known_good = False
                continue
            if await probe(pos, n):
                extend(pos, n)
                pos += n
                known_good = False
                continue
            if known_good or (n > 1 and await probe(pos, 1)):
                lo, hi = 1, n  # a read of lo answers, a read of hi is refused
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if await probe(pos, mid):
                        lo = mid
                    else:
                        hi = mid
                extend(pos, lo)
                pos += lo
            else:
                pos += 1
            open_run = False
            while pos <= end and not await probe(pos, 1):
                pos += 1
            known_good = True
    except Stop as stop:
        result.stopped, result.next_address = stop.reason, pos
        raise
    except Unsupported:
        result.unsupported = True


async def scan_tables(
    tables: Sequence[Table],
    start: int,
    end: int,
    max_count: Callable[[Table], int],
    read: Read,
    budget: Budget,
) -> list[TableScan]:
    """Walk every table in turn, each within its share of the budget (see :class:`Budget`);
    after the deadline the tables not yet walked are reported as not scanned."""
    out: list[TableScan] = []
    final = ""
    for i, table in enumerate(tables):
        if final:
            out.append(TableScan(table, start, end, next_address=start, stopped=final))
            continue
        budget.share(len(tables) - i)
        scan = TableScan(table, start, end)
        used = budget.used
        try:
            await scan_table(scan, max_count(table), read)
        except Stop as stop:
            if stop.final:
                final = stop.reason
        scan.requests = budget.used - used
        out.append(scan)
    return out
