"""The agent's view of the buffer: submitting never blocks the event loop; records get their seqs at
submit (acquisition), are group-committed on the buffer thread, and listeners are told, on the loop,
what each commit stored. The forwarder's delivery marks ride along in the next commit's transaction.

While the disk refuses commits (full, I/O errors) submitted records are held in memory with their
seqs, up to ``hold_max_records``; beyond it the oldest held readings are given up as ``data_loss``
with their seqs. A stop commits what it can within ``close_timeout`` and records the rest in a small
file next to the buffer (``{buffer}.uncommitted``) that the next start turns into ``data_loss``
events, so no reading disappears without its seqs being explained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.buffer.integrity import Replaced
from agent.buffer.lock import BufferLock
from agent.buffer.rows import CommitResult, StoredSegment, lost_seqs
from agent.buffer.seqs import Sequencer
from agent.buffer.store import Buffer, KeyChange, PreviousRun, Quarantine, Removed
from agent.core.backoff import backoff_delay
from agent.core.events import DataLoss, LossReason, SeqSkip
from agent.core.records import AGENT_DEVICE, Block, Event
from agent.core.supervise import Supervisor

log = logging.getLogger("cleanroom.buffer")

COMMIT_RETRY_MIN = 0.2
"""Wait after the first failed commit; doubles per failure up to ``COMMIT_RETRY_MAX`` seconds."""
COMMIT_RETRY_MAX = 5.0
CLOSE_SLACK_S = 2.0
"""How long past ``close_timeout`` a close waits for a commit already running on the buffer thread
(a commit is never abandoned halfway if it can be helped: its outcome decides what is lost)."""

Listener = Callable[[Sequence[Block], Sequence[Event]], None]
BatchResolver = Callable[[str, int], str | None]
"""``(device, acquisition ts_ns) -> ref``: the batch context a device held at a time, or None."""


def _loss_of(item: Block | Event) -> DataLoss:
    """One given-up record as a ``not_committed`` loss (it has its seqs: they were assigned at submit)."""
    reason = LossReason.NOT_COMMITTED
    if isinstance(item, Block):
        first, last = (None, None) if item.seq_first is None else lost_seqs(item.seq_first, len(item))
        ts = item.acq_ts_ns
        return DataLoss(
            reason, readings=len(item), rows=1, first_seq=first, last_seq=last, first_ts=ts, last_ts=ts
        )
    ts = item.ts_ns
    return DataLoss(reason, rows=1, events=1, first_seq=item.seq, last_seq=item.seq, first_ts=ts, last_ts=ts)


def _tally(tally: dict[str, DataLoss], items: Iterable[Block | Event]) -> None:
    for item in items:
        loss = _loss_of(item)
        known = tally.get(item.device)
        tally[item.device] = loss if known is None else known.merged(loss)


class AsyncBuffer:
    """The agent's view of the buffer: non-blocking submit (seqs assigned there), group commit on the
    buffer thread, listeners told on the loop after each commit."""

    def __init__(self, cfg: BufferConfig, agent_id: str, key: bytes | None = None) -> None:
        """``key``: the HMAC key every segment is signed with (and checked against before sending)."""
        self.cfg = cfg
        self.agent_id = agent_id
        self.core = Buffer(cfg, agent_id, key)
        self._lock = BufferLock(cfg.path)
        self._carry_file = Path(f"{cfg.path}.uncommitted")
        self._seqs: Sequencer | None = None
        self._exec: ThreadPoolExecutor | None = None
        self._read_exec: ThreadPoolExecutor | None = None
        self._reader: Buffer | None = None
        """A read-only connection of its own for :meth:`stats`, used only on ``_read_exec``."""
        self._state: dict[str, str] = {}
        self._queue: list[Block | Event] = []
        self._first_queued = 0.0
        self._last_queued = 0.0
        self._sources_idle = False
        """Set by :meth:`sources_idle` after the last submit: the burst is over, no pause to wait for."""
        self._last_commit = 0.0
        """When the last transaction of the committer began (monotonic)."""
        self._submitted = 0
        self._settled = 0
        """Submitted records committed or given up (accounted as lost): what :meth:`flush` waits for."""
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._close_requested = asyncio.Event()
        self._flush_waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self.tasks = Supervisor("buffer", log)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._flush_now = False
        self._marks: list[int] = []
        """Segments the broker acknowledged, to be marked delivered with the next commit."""
        self._first_mark = 0.0
        self._marks_hurried = False
        """Set by :meth:`hurry_marks`: the waiting marks go at once, not ``mark_interval`` after the first."""
        self._mark_waiters: list[asyncio.Future[None]] = []
        self._marking = 0
        """How many of ``_marks`` the running commit carries."""
        self.commit_errors = 0
        self._committing = 0
        self._shed_tally: dict[str, DataLoss] = {}
        self.shed_readings = 0
        self._carried: list[Event] = []
        """Loss events carried over from the last stop: the file is removed once they are committed."""
        self.replaced: Replaced | None = None
        """Set by :meth:`open` when the buffer file was damaged and a fresh one started."""
        self.key_change: KeyChange | None = None
        """Set by :meth:`open` when the agent's key is not the one its streams were signed with
        (committed and audited there)."""
        self._batch_of: BatchResolver | None = None

    @property
    def clock(self) -> Callable[[], Mapping[str, Any]]:
        """Clock state put in each segment (read on the buffer thread at every commit)."""
        return self.core.clock

    @clock.setter
    def clock(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        self.core.clock = fn

    def set_source(self, stream_device: str, source: Mapping[str, Any]) -> None:
        """Attribution put in that device's next segments (``agent`` for the agent's streams)."""
        self.core.set_source(stream_device, source)

    def set_batch_resolver(self, resolve: BatchResolver | None) -> None:
        """Where every record's ``batch`` comes from (:meth:`_stamp`); also used by the store for
        the loss events it makes itself, so ``resolve`` must be safe to call from the buffer thread."""
        self._batch_of = resolve
        self.core.batch_of = resolve

    @property
    def previous_run(self) -> PreviousRun | None:
        """After :meth:`open`: set when the last run did not stop cleanly."""
        return self.core.previous_run

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._exec is None:
            raise RuntimeError("buffer is not open")
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def on_buffer_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the buffer thread, the connection's only thread (tests make the disk full)."""
        return await self._call(fn)

    async def open(self, on_state: Callable[[Mapping[str, str]], None] | None = None) -> None:
        """Lock the buffer (:class:`~agent.buffer.lock.BufferInUse` if another agent has it), check and
        open it, reserve seqs. The lock comes first: a second agent must not even look at the file,
        let alone move it aside. ``on_state`` gets the stored state before the loss events found at
        open are submitted (the batch registry restores from it, so they are stamped with the
        batches their devices held)."""
        self._lock.acquire()
        self._carried = self._read_carried()
        floor = max(
            (e.data["last_seq"] + 1 for e in self._carried if e.data["last_seq"] is not None), default=0
        )
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer")
        try:
            self._state = await self._call(self.core.open, False, True)
            await self._call(self.core.begin_run)
            self._seqs = await self._call(self.core.sequencer, floor)
            self.key_change = await self._call(self.core.adopt_key, self._seqs)
            quarantined: Quarantine = await self._call(self._check_at_open)
        except BaseException:
            await self._call(self.core.close)
            self._exec.shutdown(wait=True)
            self._exec = None
            self._lock.release()
            raise
        self.replaced = self.core.replaced
        self._closing = False
        self._close_requested.clear()
        self._task = self.tasks.spawn("buffer-committer", self._committer).task
        if on_state is not None:
            on_state(self._state)
        if self.replaced is not None:
            self._enqueue([self._corrupt_loss(self.replaced, self._seqs.next)])
        if self._carried:
            log.warning("recording %d data_loss events the last stop could not commit", len(self._carried))
            self._enqueue(list(self._carried))
        if quarantined.events:
            self._enqueue(list(quarantined.events))

    def _check_at_open(self) -> Quarantine:
        """Every stored segment checked before anything is sent (about 0.5 s per 100 MB, logged)."""
        started = time.monotonic()
        result = self.core.check_at_open()
        log.info("buffer %s: chains checked in %.2fs", self.cfg.path, time.monotonic() - started)
        return result

    def _corrupt_loss(self, replaced: Replaced, first_seq: int) -> Event:
        """The damaged file's loss: every seq below the fresh buffer's first (``first_seq``) that
        never arrives is explained by it, as the file held them, or nobody did."""
        estimate = (
            ""
            if replaced.undelivered_readings is None
            else f"; by its own counters it held {replaced.undelivered_readings} undelivered readings"
        )
        detail = (
            f"{self.cfg.path} failed its integrity check ({replaced.problem}); moved unchanged to "
            f"{replaced.moved_to}{estimate}"
        )
        last_seq = first_seq - 1 if first_seq > 0 else None
        return DataLoss(LossReason.BUFFER_CORRUPT, last_seq=last_seq, detail=detail).event(AGENT_DEVICE)

    def _read_carried(self) -> list[Event]:
        """The loss the last stop could not commit (its seqs are not handed out again)."""
        try:
            text = self._carry_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error(
                "cannot read %s (%s): the loss it records is only in the last run's log",
                self._carry_file,
                exc,
            )
            return []
        try:
            return [
                DataLoss.from_body({"kind": DataLoss.KIND, "data": e["data"]}).event(str(e["device"]))
                for e in json.loads(text)["losses"]
            ]
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s is not a loss record (%s): the loss it records is only in the last run's log; removed",
                *(self._carry_file, exc),
            )
            self._carry_file.unlink(missing_ok=True)
            return []

    async def close(self, within_s: float | None = None) -> None:
        """Commit everything submitted within ``within_s`` (default ``close_timeout``), record what the
        disk still refuses for the next start, close the database and release the lock."""
        if self._exec is None:
            return
        timeout = self.cfg.close_timeout if within_s is None else within_s
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        self._close_requested.set()
        stuck = False
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout + CLOSE_SLACK_S)
            if not done:
                stuck = True
                log.error(
                    "a buffer commit is still running %.1fs after close began: closing without it", timeout
                )
                self._task.cancel()
            self._task = None
        if self._marks:  # arrived after the last commit: the forwarder sends them again next start
            self._marking = len(self._marks)
            self._marked(RuntimeError("buffer closed before the delivery marks were committed"))
        if self._read_exec is not None:
            reader, self._reader = self._reader, None
            if reader is not None:
                self._read_exec.submit(reader.close)
            self._read_exec.shutdown(wait=not stuck)
            self._read_exec = None
        if stuck:
            self._exec.shutdown(wait=False)
        else:
            if self._seqs is not None:
                try:
                    await self._call(self.core.release, self._seqs)
                    await self._call(self.core.end_run)
                except sqlite3.Error as exc:
                    log.warning("could not give back unused seqs (%s): the next start skips them", exc)
            await self._call(self.core.close)
            self._exec.shutdown(wait=True)
        self._exec = None
        self._lock.release()

    def _read_stats(self) -> dict[str, Any]:
        if self._reader is None:
            reader = Buffer(self.cfg, self.core.agent_id)
            reader.open(readonly=True)
            self._reader = reader
        return self._reader.stats()

    def state(self) -> Mapping[str, str]:
        return self._state

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        """A stopped part (a forwarder replaced by a reload) stops being told of commits."""
        if cb in self._listeners:
            self._listeners.remove(cb)

    def submit(self, blocks: Sequence[Block] = (), events: Sequence[Event] = ()) -> None:
        """Queue records for the next commit; each gets its seq now (a block's readings ``first + i``)."""
        # While closing, the committer still drains the queue, so a listener reacting to the last
        # commits (a limit event) is not lost; once it has finished, submitting is a bug.
        if self._task is None or self._task.done():
            raise RuntimeError("buffer is not open: nothing can be submitted")
        self._enqueue([*blocks, *events] if events else blocks)
        if self.commit_errors and len(self._queue) - self._committing > self.cfg.hold_max_records:
            self._shed()  # only while the disk refuses: a burst the committer is working through is kept

    def _enqueue(self, items: Sequence[Block | Event]) -> None:
        seqs = self._seqs
        if seqs is None:
            raise RuntimeError("buffer is not open: nothing can be submitted")
        first = len(self._queue) <= self._committing
        self._last_queued = now = time.monotonic()
        self._sources_idle = False
        if first:
            # The oldest record not in the running commit: the next commit is due commit_interval
            # after it arrived, however long the running one takes.
            self._first_queued = now
        if self._batch_of is not None:
            self._stamp(items, self._batch_of)
        seqs.assign(items)
        self._queue.extend(items)
        self._submitted += len(items)
        if first or len(self._queue) >= self.cfg.commit_max_records:
            # Only these bring the next commit forward (:meth:`_due`); a later submit can only put it
            # off, which the committer finds when its wait ends: waking it for every block would
            # cost a wake-up and a new timer per submit for nothing.
            self._wake.set()
        if seqs.skipped:
            skipped, seqs.skipped = seqs.skipped, []
            self._enqueue([SeqSkip(first, last).event() for first, last in skipped])

    @staticmethod
    def _stamp(items: Sequence[Block | Event], batch_of: BatchResolver) -> None:
        """Every record entering the buffer gets the batch its device held at its acquisition time
        (not at submit: a counter's backfilled records, or a limit event about an earlier reading,
        get the context of their own time). An agent-level event concerns a device only when its
        data names one."""
        for item in items:
            if isinstance(item, Block):
                item.batch = batch_of(item.device, item.acq_ts_ns)
                continue
            device = item.device
            if device == AGENT_DEVICE:
                named = item.data.get("device")
                if not isinstance(named, str):
                    continue
                device = named
            item.batch = batch_of(device, item.ts_ns)

    def _shed(self) -> None:
        """Give up the oldest held blocks beyond ``hold_max_records`` (never the batch being committed)."""
        excess = len(self._queue) - self._committing - self.cfg.hold_max_records
        kept: list[Block | Event] = []
        shed: list[Block] = []
        for item in self._queue[self._committing :]:
            if excess > 0 and isinstance(item, Block):
                excess -= 1
                shed.append(item)
            else:
                kept.append(item)
        self._queue[self._committing :] = kept
        _tally(self._shed_tally, shed)
        self.shed_readings += sum(len(b) for b in shed)
        self._settled += len(shed)

    async def flush(self, within_s: float | None = None) -> bool:
        """Wait until everything submitted so far is committed or accounted as lost; False when that
        did not happen within ``within_s`` (the disk refuses) or the close gave records up."""
        target = self._submitted
        if self._settled >= target:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, fut))
        self._flush_now = True
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), within_s)
        except TimeoutError:
            return False

    async def _committer(self) -> None:
        cfg = self.cfg
        last_prune = time.monotonic()
        while True:
            if not (self._queue or self._marks):
                if self._closing:
                    return
                self._wake.clear()
                timeout = max(0.0, cfg.prune_interval - (time.monotonic() - last_prune))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                if self._queue or self._marks:
                    continue
            elif not (self._closing or self._flush_now or len(self._queue) >= cfg.commit_max_records):
                self._wake.clear()
                delay = self._due() - time.monotonic()
                if delay > 0:
                    # Whether woken or timed out, the due time is taken again: submits since may
                    # have put it off (``commit_pause``), never beyond ``commit_interval``.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            if self._queue:
                await self._commit_some()
            elif self._marks:
                await self._mark_some()
            if time.monotonic() - last_prune >= cfg.prune_interval and not self._closing:
                last_prune = time.monotonic()
                try:
                    pruned: Removed = await self._call(self.core.prune)
                except sqlite3.Error:
                    log.exception("buffer prune failed")
                else:
                    if pruned.segments:
                        self._audit_prune(pruned)

    def _due(self) -> float:
        """When the next commit is due. Records: once submits have paused for ``commit_pause`` (the
        polls of one grid instant have all come in) and the last commit began ``commit_interval``
        ago, and never later than ``commit_interval`` after the oldest of them arrived; so at most
        one transaction per interval, whatever the rate of submits, and a burst goes in one commit
        rather than its first block alone. When the sources say the burst is over
        (:meth:`sources_idle`) there is no pause to wait for. Acknowledgements are never urgent:
        they ride along with the records' commit, or go alone ``mark_interval`` after the first of
        them."""
        cfg = self.cfg
        due = math.inf
        if self._queue:
            pause = 0.0 if self._sources_idle else cfg.commit_pause
            settled = max(self._last_queued + pause, self._last_commit + cfg.commit_interval)
            due = min(self._first_queued + cfg.commit_interval, settled)
        if self._marks:
            due = min(due, self._first_mark + (0.0 if self._marks_hurried else cfg.mark_interval))
        return due

    def sources_idle(self) -> None:
        """Every poll running has handed its blocks over (the scheduler's count of polls fell to
        zero): what waits is committed without waiting for ``commit_pause``, still at most once
        per ``commit_interval``."""
        if self._queue and not self._sources_idle:
            self._sources_idle = True
            self._wake.set()

    def hurry_marks(self) -> None:
        """Commit the waiting delivery marks now rather than ``mark_interval`` after the first: a
        stopping forwarder waits for them, and they are what keeps a restart from sending again."""
        if self._marks and not self._marks_hurried:
            self._marks_hurried = True
            self._wake.set()

    def _take_marks(self) -> list[int]:
        self._marking = len(self._marks)
        self._marks_hurried = False
        return self._marks[: self._marking]

    def _marked(self, error: BaseException | None) -> None:
        """The running commit's acknowledgements are marked (or not: ``error``, and the forwarder
        sends them again later: a duplicate, never a loss); their waiters are told."""
        done, self._marks = self._marks[: self._marking], self._marks[self._marking :]
        waiters = self._mark_waiters[: len(done)] if done else []
        if done:
            del self._mark_waiters[: len(done)]
        self._marking = 0
        for fut in dict.fromkeys(waiters):
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _mark_some(self) -> None:
        """Acknowledgements with no records to commit beside them: a transaction of their own."""
        self._last_commit = time.monotonic()
        ids = self._take_marks()
        try:
            await self._call(self.core.commit, (), self._seqs, ids)
        except Exception as exc:  # the forwarder logs it
            self._marked(exc)
        else:
            self._marked(None)

    def _audit_prune(self, pruned: Removed) -> None:
        """Retention removed delivered segments from the file: the audit trail says which."""
        log.info("pruned %d delivered segments older than %ss", pruned.segments, self.cfg.retention)
        Auditor(lambda e: self._enqueue([e]), self.agent_id).record(
            "buffer_prune",
            str(self.cfg.path),
            reason=f"retention: delivered more than {self.cfg.retention:g}s ago",
            new={"segments": pruned.segments, "readings": pruned.readings},
            extra={"segments": [s.data() for s in pruned.intervals]},
        )

    async def _commit_some(self) -> None:
        batch = self._queue[: self.cfg.commit_max_records]
        self._committing = len(batch)
        self._last_commit = time.monotonic()
        marks = self._take_marks()
        try:
            result: CommitResult = await self._call(self.core.commit, batch, self._seqs, marks)
        except Exception as exc:  # disk full, I/O error, locked past busy_timeout...
            # Keep the batch held with its seqs and retry; a close gives up at its deadline. The
            # acknowledgements are not held: their segments are sent again later (a duplicate).
            self._marked(exc)
            self._committing = 0
            self.commit_errors += 1
            if self._closing and time.monotonic() >= self._close_deadline:
                self._give_up(exc)
                return
            log.error("buffer commit of %d records failed (%s); holding them and retrying", len(batch), exc)
            delay = backoff_delay(self.commit_errors, COMMIT_RETRY_MIN, COMMIT_RETRY_MAX)
            if self._closing:  # one more try right at the deadline
                await asyncio.sleep(min(delay, max(0.0, self._close_deadline - time.monotonic())))
                return
            with contextlib.suppress(TimeoutError):  # a close cuts the wait short
                await asyncio.wait_for(self._close_requested.wait(), delay)
            return
        self.commit_errors = 0
        self._marked(None)
        del self._queue[: len(batch)]
        self._committing = 0
        if self._carried:
            left = [e for e in self._carried if not any(e is item for item in batch)]
            if not left:
                self._carry_file.unlink(missing_ok=True)
            self._carried = left
        if self._shed_tally:  # the disk takes data again: say what could not wait for it
            shed, self._shed_tally = self._shed_tally, {}
            for device, loss in sorted(shed.items()):
                log.error(
                    "%d readings of %s (seq %s..%s) were given up while commits failed",
                    *(loss.readings, device, loss.first_seq, loss.last_seq),
                )
            self._enqueue([loss.event(device) for device, loss in sorted(shed.items())])
        self._settled += len(batch)
        self._flush_now = False
        self._state.update(result.state)
        blocks = [b for b in batch if isinstance(b, Block) and b.seq_first is not None]
        events = [e for e in batch if isinstance(e, Event) and e.seq is not None] + result.events
        for cb in list(self._listeners):
            try:
                cb(blocks, events)
            except Exception:
                log.exception("buffer listener %r failed", cb)
        self._settle_waiters(True)

    def _settle_waiters(self, committed: bool) -> None:
        still: list[tuple[int, asyncio.Future[bool]]] = []
        for target, fut in self._flush_waiters:
            if self._settled >= target:
                if not fut.done():
                    fut.set_result(committed)
            else:
                still.append((target, fut))
        self._flush_waiters = still
        if still:
            self._flush_now = True

    def _give_up(self, exc: Exception) -> None:
        """Close ran out of time: account for every record still held, log it, and leave it for the
        next start (carried-over loss events stay in their file, which is not removed)."""
        lost = [i for i in self._queue if not any(i is e for e in self._carried)]
        tally, self._shed_tally = self._shed_tally, {}
        _tally(tally, lost)
        firsts = [x.first_seq for x in tally.values() if x.first_seq is not None]
        lasts = [x.last_seq for x in tally.values() if x.last_seq is not None]
        log.error(
            "closing: %d records (%d readings, seq %s..%s) could not be committed within close_timeout "
            "(%s); they are recorded as data_loss at the next start",
            *(len(lost), sum(b.readings for b in tally.values()), min(firsts, default=None)),
            *(max(lasts, default=None), exc),
        )
        self._record_for_next_start(tally)
        self._settled += len(self._queue)
        self._queue.clear()
        self._settle_waiters(False)

    def _record_for_next_start(self, tally: Mapping[str, DataLoss]) -> None:
        if not tally:
            return
        entries: list[Any] = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            entries = list(json.loads(self._carry_file.read_text(encoding="utf-8"))["losses"])
        entries += [{"device": device, "data": loss.data()} for device, loss in sorted(tally.items())]
        tmp = self._carry_file.with_name(self._carry_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"losses": entries}), encoding="utf-8")
            tmp.replace(self._carry_file)
        except OSError as exc:
            log.error("cannot record the loss for the next start in %s (%s): this log is its only record",
                      self._carry_file, exc)  # fmt: skip

    async def pending(self, after_id: int, limit: int) -> list[StoredSegment]:
        result: list[StoredSegment] = await self._call(self.core.pending, after_id, limit)
        return result

    async def last_segment_id(self) -> int:
        result: int = await self._call(self.core.last_segment_id)
        return result

    async def take_for_sending(self, after_id: int, limit: int) -> list[StoredSegment]:
        """:meth:`pending`, claimed as in flight: overflow keeps them until they are marked delivered
        or :meth:`unclaim` ed, so a loss count never includes what the broker may have. Each is
        checked (hash, MAC) first; one that fails is quarantined, never returned, and its loss
        committed."""
        result: tuple[list[StoredSegment], Quarantine] = await self._call(
            self.core.take_for_sending, after_id, limit
        )
        segments, quarantined = result
        if quarantined.events:
            self._enqueue(list(quarantined.events))
        return segments

    def unclaim(self, ids: Iterable[int]) -> None:
        self.core.unclaim(ids)

    def mark_delivered_soon(self, ids: Sequence[int]) -> asyncio.Future[None]:
        """Mark segments delivered with the next commit (with the records waiting, or in a transaction of
        their own ``mark_interval`` from now when none come): the delivery marks of a busy
        forwarder cost no fsync of their own, and never hold up a commit queued behind them. The
        future is done once they are marked, or fails with what the commit raised."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not ids:
            fut.set_result(None)
            return fut
        if self._task is None or self._task.done():
            raise RuntimeError("buffer is not open")
        first = len(self._marks) <= self._marking  # the first not in the running commit
        if first:
            self._first_mark = time.monotonic()
            self._wake.set()  # later ones ride along: they do not change when the commit is due
        self._marks.extend(ids)
        self._mark_waiters.extend([fut] * len(ids))
        return fut

    async def mark_delivered(self, ids: Sequence[int]) -> None:
        """:meth:`mark_delivered_soon`, awaited."""
        await self.mark_delivered_soon(ids)

    async def stats(self) -> dict[str, Any]:
        """Counted on a read-only connection on a thread of its own: a status request never queues
        behind a commit, nor holds one up, however long counting a large backlog takes (about
        140 ms for a million rows)."""
        if self._exec is None:
            raise RuntimeError("buffer is not open")
        if self._read_exec is None:
            self._read_exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-read")
        loop = asyncio.get_running_loop()
        out: dict[str, Any] = await loop.run_in_executor(self._read_exec, self._read_stats)
        if self._seqs is not None:
            # A running agent assigns seqs at acquisition: its next seq counts the queued records
            # too, where the file alone (``buffer stats``) knows only the committed high mark.
            out["next_seq"] = self._seqs.next
        out["queued_records"] = len(self._queue)
        out["commit_errors"] = self.commit_errors
        out["shed_readings"] = self.shed_readings
        return out
