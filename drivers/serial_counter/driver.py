"""Particle counter on a serial line, Lasair-like ASCII protocol (docs/simulators.md).

The device queue is the buffer. The counter queues one record per sample; the driver
reads the *oldest* queued record (``CTD2``, which does not remove it) and hands it to the
agent as one Block whose ``state`` is the watermark: the record's digest (a hash of its
full text, timestamp included), timestamp and the instrument serial. The buffer commits
block and watermark in one transaction. Only on a later poll, once the committed
watermark equals that record, does the driver pop it (``CPQ``). So:

* a crash after commit and before ``CPQ`` leaves the record at the head of the device
  queue; on restart the committed watermark (``ctx.state``, loaded from the buffer)
  names it, and it is popped without being emitted again;
* a crash before commit loses nothing either: the record is still queued and is read
  and emitted again;
* ``CPQ`` is only ever sent right after ``CTD2`` showed the committed record at the head,
  so a lost or garbled ``CPQ`` reply is harmless: the next poll sees the record again and
  pops it then. Popping blindly could discard a record never committed.

That is at-least-once reading plus exact de-duplication by the watermark, i.e. each
record is committed exactly once, provided ``ctx.state`` reflects commits as they happen
(the scheduler should pass a live view of the buffer's state); if it holds only the state
loaded at start, the driver also accepts the buffer having kept a sequence number on the
emitted block (``seq_first``, set just before the commit transaction, taken back if it
fails) for half a second as proof of commit. The driver never clears the device queue, starts or
stops sampling, or sets the clock.

The next record only becomes visible after the pop, so at most one record is ever
uncommitted. Group ``mode`` decides how fast the queue drains: ``subscribe`` (the
default) runs a drain task that emits a record, waits for its commit (one buffer commit
interval, ~0.1 s), pops it and goes on, so a 3,000-record backlog after an outage clears
in minutes; the group interval is then the idle period when the queue is empty and the
scheduler's liveness check. ``poll`` hands out at most one new record per poll interval.

Records the counter itself dropped (its queue holds 3,000; a longer outage overflows it)
cannot be recovered, but they are not lost silently: the counter's dropped-record count
(``CST``) is committed with each record's watermark, and an increase becomes a
``data_loss`` event (how many, between which record times) attached to the next block,
so it is committed in the same transaction and never reported twice.

A record that is older than the watermark but not the same record (the device clock was
set back) is emitted, flagged ``uncertain`` (``timestamp_before_watermark``), never
dropped. A record whose text cannot be parsed is emitted as bad readings
(``decode_error``) and then popped like any other, so one corrupt record cannot block the
queue forever yet leaves a trace.

The parts, one job each: :mod:`cleanroom_common.serial_counter` (the protocol: framing,
checksum, commands, records; shared with the simulator), :mod:`.port` (the serial port in
its own thread), :mod:`.readings` (a record as a block, status bits as quality),
:mod:`.config` (the models). This module owns the draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, cast

from agent.core.driver import (
    IDENTITY_UNAVAILABLE,
    ConnectionBase,
    DeviceContext,
    DeviceError,
    DeviceIdentity,
    Driver,
    Emit,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
    identity_text,
)
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event, Reason
from agent.core.supervise import Supervised
from cleanroom_common.serial_counter import (
    ERR_UNKNOWN,
    NO_RECORD,
    Command,
    CounterRecord,
    FrameError,
    parse_record,
    parse_status,
    reply_body,
)
from drivers.serial_counter.config import Connection, Group, Profile, Tag
from drivers.serial_counter.port import PortLink
from drivers.serial_counter.readings import record_block

log = logging.getLogger("cleanroom.drivers.serial_counter")

_NUMBERED_GRACE_S = 0.5
"""With a ``ctx.state`` that does not follow commits, a block numbered this long ago
counts as committed: far longer than a commit transaction takes."""


def record_digest(text: str) -> str:
    """A record's identity in the watermark: its full text, timestamp included."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _Inflight:
    """A record handed to the agent and not yet known to be committed."""

    digest: str
    block: Block
    since: float
    out_of_order: bool
    events: list[Event]
    """Events that ride on the block (kept: the scheduler takes them off the block it submits)."""
    numbered_since: float | None = None
    """When the block was first seen numbered by the buffer (``seq_first`` set)."""

    def numbered_for(self, now: float) -> float:
        """How long the buffer has kept a sequence number on the block: it sets one just
        before its commit transaction and takes it back if the transaction fails."""
        if self.block.seq_first is None:
            self.numbered_since = None
            return 0.0
        if self.numbered_since is None:
            self.numbered_since = now
        return now - self.numbered_since


class SerialCounterDriver(Driver):
    """Drains a particle counter's record queue, one record per poll, exactly once."""

    protocol: ClassVar[str] = "serial_counter"
    Tag: ClassVar[type[TagBase]] = Tag
    Group: ClassVar[type[GroupSpec]] = Group
    Connection: ClassVar[type[ConnectionBase]] = Connection
    Profile: ClassVar[type[ProfileBase]] = Profile
    supports_subscribe: ClassVar[bool] = True

    def backfills(self, group: PollGroup) -> bool:
        """The counter queues its records while we are away; they are drained on reconnect."""
        return True

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.conn = cast(Connection, ctx.connection)
        self._link: PortLink | None = None
        self._inflight: _Inflight | None = None
        self._lost_baseline: int | None = None
        """The counter's dropped-record count as of the last emitted record."""
        self._cst_supported = True
        self._drain: Supervised | None = None
        self.serial_number: str | None = None
        self._identity_logged = False
        last_ts = ctx.state.get("last_ts")
        self._newest_ts: int | None = int(last_ts) if last_ts and last_ts.isdigit() else None
        """Newest record time handed out (committed or not): records at or before it are out of order."""

    async def _command(self, cmd: Command, idempotent: bool = True) -> str:
        link = self._link
        if link is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        t = time.perf_counter()
        try:
            payload = await link.command(cmd, idempotent)
            if payload == ERR_UNKNOWN and cmd is not Command.STATUS:
                raise DeviceError("device_error", f"{cmd}: the device does not know this command")
        except DeviceError as exc:
            self.ctx.stats.error(exc.reason)
            raise
        self.ctx.stats.request_done(time.perf_counter() - t)
        return payload

    async def _device_lost(self) -> int | None:
        """Records the counter dropped from its full queue since it started (``CST``)."""
        if not (self.conn.loss_counter and self._cst_supported):
            return None
        reply = await self._command(Command.STATUS)
        if reply == ERR_UNKNOWN:
            log.info("%s: counter has no CST command; device-side record loss is not tracked", self.ctx.id)
            self._cst_supported = False
            return None
        try:
            return parse_status(reply).lost
        except FrameError:
            self.ctx.stats.error(Reason.DECODE_ERROR)
            return None

    def _loss_events(self, group: PollGroup, lost: int | None, record: CounterRecord | None) -> list[Event]:
        """A ``data_loss`` event when the counter dropped records since the committed count."""
        known = self._committed_state().get("device_lost", "")
        baseline = (
            self._lost_baseline
            if self._lost_baseline is not None
            else int(known)
            if known.isdigit()
            else None
        )
        if lost is None:
            return []
        self._lost_baseline = lost
        # A count below the baseline means the counter restarted (its count starts at 0).
        new = lost if baseline is None or lost < baseline else lost - baseline
        if new <= 0:
            return []
        self.ctx.stats.error("device_records_lost")
        after = self._newest_ts
        before = record.ts_ns if record is not None else None
        detail = f"the counter has dropped {lost} records since it started"
        if after is not None and before is not None and after > before:
            # The device clock was set back: its times no longer bound the gap.
            detail += f"; its clock went back (record before the gap at {after} ns)"
            after = None
        loss = DataLoss(
            LossReason.DEVICE_QUEUE_FULL,
            records=new,
            first_ts=after,
            last_ts=before,
            group=group.name,
            detail=detail,
        )
        return [loss.event(self.ctx.id)]

    async def connect(self) -> None:
        self._link = PortLink(self.conn, self.ctx.id, self.ctx.stats.error)
        try:
            await self._link.open()
            self.serial_number = await self._read_serial()
        except BaseException:
            await self.close()
            raise
        self.ctx.identify(DeviceIdentity(serial=self.serial_number))
        known = self.ctx.state.get("serial")
        if known and self.serial_number and known != self.serial_number:
            log.warning(
                "%s: serial number %s differs from %s of the committed watermark: another instrument; "
                "its queue is drained from the start",
                self.ctx.id,
                self.serial_number,
                known,
            )
            self._newest_ts = None

    async def _read_serial(self) -> str | None:
        """The instrument's serial number (``CSN``), the one identity the protocol reports; ``None``
        when the counter does not know the command or its reply is unusable (counted as
        ``identity_unavailable``, logged once): a counter that cannot say who it is still
        counts. Silence or a dead port still fails the connect: that is the link, not identity."""
        try:
            reply = await self._command(Command.SERIAL)
        except DeviceError as exc:
            if exc.reason not in ("device_error", Reason.DECODE_ERROR):
                raise
            reply = ""
        serial = (
            identity_text(reply_body(Command.SERIAL, reply))
            if reply.startswith(Command.SERIAL.reply)
            else None
        )
        if serial is None:
            self.ctx.stats.error(IDENTITY_UNAVAILABLE)
            if not self._identity_logged:
                self._identity_logged = True
                log.warning("%s: no usable serial number from CSN (reply %r)", self.ctx.id, reply[:40])
        return serial

    async def close(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain.task
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    # ------------------------------------------------------------------ draining

    def _committed_state(self) -> Mapping[str, str]:
        """The committed watermark, if it belongs to the instrument now on the port."""
        state = self.ctx.state
        # An unknown serial (either side) matches: the digest covers the record's full text,
        # serial number included, so another instrument's records never pass as committed.
        known = state.get("serial") or None
        return state if known is None or self.serial_number in (None, known) else {}

    def _committed(self) -> str | None:
        """Digest of the newest record the buffer has committed (see module docstring)."""
        committed = self._committed_state().get("last_digest")
        inflight = self._inflight
        if inflight is not None and (
            committed == inflight.digest or inflight.numbered_for(time.monotonic()) >= _NUMBERED_GRACE_S
        ):
            committed = inflight.digest
        return committed

    async def _head(self) -> tuple[str, CounterRecord | None] | None:
        """The oldest queued record: (its text, parsed record or None if unparsable)."""
        reply = await self._command(Command.READ_OLDEST)
        if reply.startswith(NO_RECORD):
            return None
        text = reply_body(Command.READ_OLDEST, reply)
        try:
            return text, parse_record(text)
        except FrameError as exc:
            self.ctx.stats.error(Reason.DECODE_ERROR)
            log.warning("%s: undecodable record %r: %s", self.ctx.id, text[:80], exc)
            return text, None

    async def read(self, group: PollGroup) -> list[Block]:
        if self._drain is not None:
            # Subscribe mode: this is the scheduler's liveness check of the drain task (which
            # also reports its failure to the scheduler as it happens, through ``ctx.tasks``).
            self._drain.raise_failure()
            return []
        block = await self._next_block(group)
        return [] if block is None else [block]

    async def subscribe(self, group: PollGroup, emit: Emit) -> None:
        self._drain = self.ctx.tasks.spawn(
            f"drain:{self.ctx.id}", lambda: self._drain_loop(group, emit), restart=False
        )

    async def _drain_loop(self, group: PollGroup, emit: Emit) -> None:
        """Runs until cancelled; whatever it raises ends it and reaches the scheduler through
        ``ctx.tasks``, which reconnects (and so starts the drain again) with backoff."""
        while True:
            block = await self._next_block(group)
            if block is None:
                await asyncio.sleep(group.interval_s)
                continue
            emit(block)
            await self._until_committed(block)

    async def _until_committed(self, block: Block) -> None:
        """Poll the committed watermark (the buffer offers no commit event to drivers),
        at most ``commit_wait``; after that the record is handed out again."""
        for _ in range(max(1, int(self.conn.commit_wait / 0.02))):
            if self._committed() == self._digest_of(block):
                return
            await asyncio.sleep(0.02)

    def _digest_of(self, block: Block) -> str | None:
        inflight = self._inflight
        return inflight.digest if inflight is not None and inflight.block is block else None

    async def _next_block(self, group: PollGroup) -> Block | None:
        """Pop what is committed; the next record as a block, or None (queue empty, or the
        record handed out last is still waiting for its commit)."""
        while True:
            head = await self._head()
            if head is None:
                return None
            text, record = head
            digest = record_digest(text)
            if digest == self._committed():
                # Committed earlier (this run, or before a crash): now it may go.
                await self._command(Command.POP_OLDEST, idempotent=False)
                self._inflight = None
                continue
            break
        inflight = self._inflight
        if inflight is not None and inflight.digest == digest:
            if time.monotonic() - inflight.since < self.conn.commit_wait:
                return None  # handed out, not yet committed: wait, never pop
            self.ctx.stats.error("commit_wait_expired")
            log.warning(
                "%s: record %s not committed after %.0fs; emitting it again",
                self.ctx.id,
                digest,
                self.conn.commit_wait,
            )
            out_of_order, events = inflight.out_of_order, inflight.events
        else:
            out_of_order = (
                record is not None and self._newest_ts is not None and record.ts_ns <= self._newest_ts
            )
            events = self._loss_events(group, await self._device_lost(), record)
            if record is not None and not out_of_order:
                self._newest_ts = record.ts_ns
        block = self._block(group, text, record, out_of_order)
        block.events = list(events) or None
        if self._lost_baseline is not None and block.state is not None:
            block.state["device_lost"] = str(self._lost_baseline)
        self._inflight = _Inflight(digest, block, time.monotonic(), out_of_order, events)
        return block

    def _block(self, group: PollGroup, text: str, record: CounterRecord | None, out_of_order: bool) -> Block:
        state = {"last_digest": record_digest(text), "serial": self.serial_number or ""}
        if record is None:
            block = group.bad(Reason.DECODE_ERROR)
            block.state = {**state, "last_ts": str(self._newest_ts or "")}
            return block
        state["last_ts"] = str(max(record.ts_ns, self._newest_ts or 0))
        return record_block(group, record, out_of_order, state, text if self.ctx.record_raw else None)
