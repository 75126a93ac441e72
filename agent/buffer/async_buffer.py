"""The agent's view of the buffer: submitting never blocks the event loop; records are group-committed
on the buffer thread and listeners are told, on the loop, what each commit stored (with seqs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.buffer.config import BufferConfig
from agent.buffer.rows import CommitResult, StoredRecord
from agent.buffer.store import Buffer
from agent.core.backoff import backoff_delay
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event

log = logging.getLogger("cleanroom.buffer")

CLOSE_ATTEMPTS = 3
"""Commit attempts on close before giving up (loudly) on records the disk will not take."""
QUEUE_LIMIT_BATCHES = 10
"""Records held in memory while commits fail, in ``commit_max_records`` batches. Beyond it the oldest
queued readings are shed: counted, and reported as ``data_loss`` once the disk takes data again,
rather than growing until the process is killed for memory and loses the whole queue."""
COMMIT_RETRY_MIN = 0.2
"""Wait after the first failed commit; doubles per failure up to ``COMMIT_RETRY_MAX`` seconds."""
COMMIT_RETRY_MAX = 5.0

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
        self._shed_tally: dict[str, DataLoss] = {}
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
                shed = DataLoss(LossReason.NOT_COMMITTED, readings=len(item), rows=1, first_ts=ts, last_ts=ts)
                known = self._shed_tally.get(item.device)
                self._shed_tally[item.device] = shed if known is None else known.merged(shed)
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
            await asyncio.sleep(backoff_delay(self.commit_errors, COMMIT_RETRY_MIN, COMMIT_RETRY_MAX))
            return
        self.commit_errors = 0
        del self._queue[: len(batch)]
        self._committing = 0
        if self._shed_tally:  # the disk takes data again: say what could not wait for it
            for device, loss in sorted(self._shed_tally.items()):
                log.error("%d readings of %s were shed while commits failed", loss.readings, device)
                self._queue.append(loss.event(device))
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
