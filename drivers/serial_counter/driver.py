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

Status bits become quality of the count tags: Laser_OK = 0 → bad (``laser_fault``:
counts are not trustworthy); Flow_OK = 0 → concentrations bad and raw counts uncertain
(``flow_fault``: the volume is wrong, the count is not); Sample_Valid = 0 → uncertain
(``sample_invalid``). The record's own end-of-sample time is ``source_ts_ns``.

Serial I/O is blocking request/reply, half duplex, a few hundred bytes per poll: each
port gets one worker thread (a single-thread executor) that owns the pyserial handle, so
commands on a port are serialised by construction and the event loop never blocks. A
thread per port costs ~100 kB and no CPU while waiting in ``read``; a non-blocking fd on
the loop would save the thread but re-implement timeouts and framing that pyserial
already gets right.

Framing: every reply is ``<payload>*<XX>\\r\\n`` with XX the XOR of the payload bytes.
Before each command the input buffer is flushed (dropping any partial or late frame), a
reply is read up to LF within ``timeout``; a bad checksum or garbled line is counted
(``checksum``/``garbled``) and the command, if idempotent, is retried up to ``retries``
times. Replies that answer another command (a late reply) are skipped.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, cast

import numpy as np
from pydantic import Field, create_model, model_validator

from agent.core.driver import (
    ConnectionBase,
    DeviceContext,
    DeviceError,
    Driver,
    Emit,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
)
from agent.core.records import Block, Event, Quality, Reason, Severity
from cleanroom_common.fields import Duration

log = logging.getLogger("cleanroom.drivers.serial_counter")

_T = TypeVar("_T")

_NUMBERED_GRACE_S = 0.5
"""With a ``ctx.state`` that does not follow commits, a block numbered this long ago
counts as committed: far longer than a commit transaction takes."""

_BUSY_PAUSE_S = 0.05

M3_PER_UNIT = {"L": 0.001, "m3": 1.0, "ft3": 0.028316846592}
"""Cubic metres per volume unit a record may be expressed in."""


class FrameError(ValueError):
    """A reply line or record that does not follow the protocol. The only exception the
    framer and record parser raise, whatever bytes arrive; ``kind`` names the counter."""

    def __init__(self, message: str, kind: str = "garbled") -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- framing


def checksum(payload: bytes) -> int:
    x = 0
    for b in payload:
        x ^= b
    return x


def frame(payload: str) -> bytes:
    """A command or reply line with its checksum (commands carry one too, so a command
    damaged on the wire is refused by the device instead of misread)."""
    data = payload.encode("ascii")
    return data + b"*%02X\r\n" % checksum(data)


def parse_reply(line: bytes) -> str:
    """The payload of one reply line, checksum verified."""
    body = line.rstrip(b"\r\n")
    payload, star, xx = body.rpartition(b"*")
    if not star or len(xx) != 2:
        raise FrameError(f"no checksum in reply {line[:40]!r}")
    try:
        expected = int(xx.decode("ascii"), 16)
        text = payload.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        raise FrameError(f"garbled reply {line[:40]!r}") from None
    if not xx.isalnum() or checksum(payload) != expected:
        raise FrameError(f"checksum mismatch in reply {line[:40]!r}", kind="checksum")
    if not text.isprintable():
        raise FrameError(f"control characters in reply {line[:40]!r}")
    return text


@dataclass(frozen=True)
class CounterRecord:
    """One sample record as the counter reports it."""

    text: str
    ts_ns: int
    sensor: str
    serial: str
    laser_ok: bool
    flow_ok: bool
    sample_valid: bool
    sample_time_s: float
    volume: float
    volume_unit: str
    channels: tuple[tuple[float, int], ...]
    """(size µm, cumulative count) pairs, smallest size first."""

    @property
    def volume_m3(self) -> float:
        return self.volume * M3_PER_UNIT[self.volume_unit]


def record_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flag(s: str) -> bool:
    if s not in ("0", "1"):
        raise FrameError(f"status flag {s!r} is not 0/1")
    return s == "1"


def parse_record(text: str) -> CounterRecord:
    """Parse the CSV of an ``RTD2`` reply (docs/simulators.md, record format)."""
    f = text.split(",")
    if len(f) < 11:
        raise FrameError(f"record has {len(f)} fields, expected at least 11")
    try:
        ts = calendar.timegm(time.strptime(f"{f[0]} {f[1]}", "%Y-%m-%d %H:%M:%S"))
        k = int(f[10])
        sample_time, volume = float(f[7]), float(f[8])
        pairs = f[11:]
        if k < 0 or len(pairs) != 2 * k:
            raise FrameError(f"record announces {k} channels but carries {len(pairs) // 2}")
        channels = tuple((float(pairs[2 * i]), int(pairs[2 * i + 1])) for i in range(k))
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError(f"malformed record field: {exc}") from None
    if f[9] not in M3_PER_UNIT:
        raise FrameError(f"unknown volume unit {f[9]!r}")
    if not (np.isfinite(sample_time) and np.isfinite(volume)) or volume < 0:
        raise FrameError("sample time or volume not a finite non-negative number")
    if any(c < 0 or not np.isfinite(s) for s, c in channels):
        raise FrameError("negative count or non-finite channel size")
    return CounterRecord(
        text=text,
        ts_ns=ts * 1_000_000_000,
        sensor=f[2],
        serial=f[3],
        laser_ok=_flag(f[4]),
        flow_ok=_flag(f[5]),
        sample_valid=_flag(f[6]),
        sample_time_s=sample_time,
        volume=volume,
        volume_unit=f[9],
        channels=channels,
    )


# --------------------------------------------------------------------------- config


class Tag(TagBase):
    """One value taken from each sample record."""

    field: Literal[
        "count", "sample_time", "volume", "laser_ok", "flow_ok", "sample_valid", "laser_fault", "flow_fault"
    ] = "count"
    """Record field: a channel's cumulative ``count``, the ``sample_time`` (s), the sampled
    ``volume`` (litres), or a status flag (1/0): ``laser_ok``/``flow_ok``/``sample_valid``, or
    their negations ``laser_fault``/``flow_fault`` (the sense Modbus counters and the shipped
    anomaly model use)."""
    size_um: float | None = Field(default=None, gt=0)
    """For ``count``: the channel (particles ≥ this size, µm) as the counter names it."""
    per: Literal["sample", "m3", "ft3"] = "sample"
    """For ``count``: counts per sample as reported, or a concentration per m³ / ft³
    computed with the record's own sampled volume."""

    @model_validator(mode="after")
    def _count_has_size(self) -> Tag:
        if self.field == "count" and self.size_um is None:
            raise ValueError("a count tag needs size_um (the channel)")
        if self.field != "count" and (self.size_um is not None or self.per != "sample"):
            raise ValueError("size_um and per apply to count tags only")
        return self


class Group(GroupSpec):
    """The record group of one counter (a profile has exactly one: records drain once)."""

    mode: Literal["subscribe", "poll"] = "subscribe"
    """``subscribe``: drain continuously, the next record as soon as the previous one is
    committed; the interval is the idle period and liveness check. ``poll``: at most one
    new record per interval."""


class Connection(ConnectionBase):
    """The serial port of one counter."""

    port: str = Field(min_length=1)
    """Serial device, e.g. ``/dev/ttyUSB0`` or a simulator's ``/dev/pts/N``."""
    baudrate: int = Field(default=9600, gt=0)
    """Line speed (the counter's setting; 9600 on Lasair-like units)."""
    parity: Literal["N", "E", "O"] = "N"
    """Parity bit: none, even or odd."""
    stopbits: Literal[1, 2] = 1
    """Stop bits."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts of a non-destructive command whose reply was garbled or refused as busy."""
    commit_wait: Duration = 30.0
    """How long an emitted record may stay uncommitted before it is emitted again (the
    block was lost on its way to the buffer); the buffer commits far sooner."""
    loss_counter: bool = True
    """Ask the counter (``CST``) how many records it dropped from its full queue, and
    commit each new loss as a ``data_loss`` event with the next record. Counters without
    ``CST`` answer ``ERR UNKNOWN`` and are then not asked again."""


# --------------------------------------------------------------------------- port


class _Port:
    """The pyserial handle and the command/reply exchange; runs only in the port's thread."""

    def __init__(self, conn: Connection, on_error: Callable[[str], None]) -> None:
        import serial

        self.conn = conn
        self._on_error = on_error
        self._serial_exc = serial.SerialException
        try:
            self.ser = serial.Serial(
                conn.port,
                baudrate=conn.baudrate,
                parity=conn.parity,
                stopbits=conn.stopbits,
                timeout=conn.timeout,
                write_timeout=conn.timeout,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(Reason.COMM_ERROR, f"open {conn.port}: {exc}") from exc

    def command(self, cmd: str, replies: tuple[str, ...], idempotent: bool = True) -> str:
        """Send ``cmd`` and return the payload of its reply (one starting with a prefix in ``replies``)."""
        attempts = 1 + (self.conn.retries if idempotent else 0)
        last = ""
        for _ in range(attempts):
            try:
                self.ser.reset_input_buffer()
                self.ser.write(frame(cmd))
                payload = self._reply(replies)
            except FrameError as exc:
                last = str(exc)
                self._on_error(exc.kind)
                continue
            except (self._serial_exc, OSError) as exc:
                raise DeviceError(Reason.COMM_ERROR, f"{self.conn.port}: {exc}") from exc
            if payload.startswith("ERR") and payload != "ERR UNKNOWN":  # unknown: retrying won't help
                last = payload
                self._on_error(
                    "device_" + payload[4:].strip().lower() if len(payload) > 4 else "device_error"
                )
                time.sleep(_BUSY_PAUSE_S)  # in the port's thread: give a busy device a moment
                continue
            return payload
        raise DeviceError(Reason.DECODE_ERROR, f"{cmd}: no valid reply after {attempts} attempt(s): {last}")

    def _reply(self, replies: tuple[str, ...]) -> str:
        deadline = time.monotonic() + self.conn.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceError(Reason.TIMEOUT, f"{self.conn.port}: no reply within {self.conn.timeout}s")
            self.ser.timeout = remaining
            line = self.ser.read_until(b"\n", 4096)
            if not line.endswith(b"\n"):
                if line:
                    self._on_error("partial_frame")
                raise DeviceError(
                    Reason.TIMEOUT, f"{self.conn.port}: no complete reply within {self.conn.timeout}s"
                )
            payload = parse_reply(line)
            if payload.startswith(replies) or payload.startswith("ERR"):
                return payload
            self._on_error("unexpected_reply")  # a late reply to an earlier command: skip it

    def close(self) -> None:
        try:
            self.ser.close()
        except (self._serial_exc, OSError) as exc:
            log.debug("close %s: %s", self.conn.port, exc)


# --------------------------------------------------------------------------- driver


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
    supports_subscribe: ClassVar[bool] = True

    def backfills(self, group: PollGroup) -> bool:
        """The counter queues its records while we are away; they are drained on reconnect."""
        return True

    @classmethod
    def profile_model(cls) -> type[ProfileBase]:
        """The generic profile schema plus one rule: exactly one group, because each record
        is drained (popped) once; two groups would race for the same queue."""
        cached: type[ProfileBase] | None = cls.__dict__.get("_one_group_model")
        if cached is None:
            generic = super().profile_model()

            def one_group(profile: ProfileBase) -> ProfileBase:
                if len(profile.groups) != 1:
                    raise ValueError(
                        "a serial_counter profile has exactly one group (records are drained once), "
                        f"got {', '.join(profile.groups)}"
                    )
                return profile

            validator: Any = model_validator(mode="after")(one_group)
            cached = cast(
                type[ProfileBase],
                create_model(
                    f"{cls.__name__}Profile", __base__=generic, __validators__={"one_group": validator}
                ),
            )
            cls._one_group_model = cached  # type: ignore[attr-defined]
        return cached

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.conn = cast(Connection, ctx.connection)
        self._executor: ThreadPoolExecutor | None = None
        self._port: _Port | None = None
        self._inflight: _Inflight | None = None
        self._lost_baseline: int | None = None
        """The counter's dropped-record count as of the last emitted record."""
        self._cst_supported = True
        self._drain: asyncio.Task[None] | None = None
        self._drain_error: DeviceError | None = None
        self.serial_number: str | None = None
        last_ts = ctx.state.get("last_ts")
        self._newest_ts: int | None = int(last_ts) if last_ts and last_ts.isdigit() else None
        """Newest record time handed out (committed or not): records at or before it are out of order."""

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _command(self, cmd: str, replies: tuple[str, ...], idempotent: bool = True) -> str:
        port = self._port
        if port is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        t = time.perf_counter()
        try:
            payload = await self._run(port.command, cmd, replies, idempotent)
            if payload == "ERR UNKNOWN" and cmd != "CST":
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
        reply = await self._command("CST", ("RST",))
        if reply == "ERR UNKNOWN":
            log.info("%s: counter has no CST command; device-side record loss is not tracked", self.ctx.id)
            self._cst_supported = False
            return None
        fields = reply.split()
        if len(fields) != 4 or not fields[3].isdigit():
            self.ctx.stats.error(Reason.DECODE_ERROR)
            return None
        return int(fields[3])

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
        data = {
            "reason": "device_queue_full",
            "group": group.name,
            "records": new,
            "device_lost_total": lost,
            "after_ts": self._newest_ts,
            "before_ts": record.ts_ns if record is not None else None,
        }
        return [Event(self.ctx.id, "data_loss", Severity.ALARM, data)]

    async def connect(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"serial-{self.ctx.id}")
        try:
            self._port = await self._run(_Port, self.conn, self.ctx.stats.error)
            reply = await self._command("CSN", ("RSN",))
        except BaseException:
            await self.close()
            raise
        self.serial_number = reply[3:].strip()
        known = self.ctx.state.get("serial")
        if known and known != self.serial_number:
            log.warning(
                "%s: serial number %s differs from %s of the committed watermark: another instrument; "
                "its queue is drained from the start",
                self.ctx.id,
                self.serial_number,
                known,
            )
            self._newest_ts = None

    async def close(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        port, self._port = self._port, None
        executor, self._executor = self._executor, None
        if executor is not None:
            if port is not None:
                await asyncio.get_running_loop().run_in_executor(executor, port.close)
            executor.shutdown(wait=True)

    # ------------------------------------------------------------------ draining

    def _committed_state(self) -> Mapping[str, str]:
        """The committed watermark, if it belongs to the instrument now on the port."""
        state = self.ctx.state
        return state if state.get("serial") in (None, self.serial_number) else {}

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
        reply = await self._command("CTD2", ("RTD2", "RND2"))
        if reply.startswith("RND2"):
            return None
        text = reply[4:].strip()
        try:
            return text, parse_record(text)
        except FrameError as exc:
            self.ctx.stats.error(Reason.DECODE_ERROR)
            log.warning("%s: undecodable record %r: %s", self.ctx.id, text[:80], exc)
            return text, None

    async def read(self, group: PollGroup) -> list[Block]:
        if self._drain is not None:
            # Subscribe mode: this is the scheduler's liveness check of the drain task.
            if self._drain_error is not None:
                raise self._drain_error
            return []
        block = await self._next_block(group)
        return [] if block is None else [block]

    async def subscribe(self, group: PollGroup, emit: Emit) -> None:
        self._drain_error = None
        self._drain = asyncio.create_task(self._drain_loop(group, emit), name=f"drain:{self.ctx.id}")

    async def _drain_loop(self, group: PollGroup, emit: Emit) -> None:
        try:
            while True:
                block = await self._next_block(group)
                if block is None:
                    await asyncio.sleep(group.interval_s)
                    continue
                emit(block)
                await self._until_committed(block)
        except DeviceError as exc:
            self._drain_error = exc
        except Exception as exc:  # a bug here must surface through the liveness check, not vanish
            log.exception("%s: drain task failed", self.ctx.id)
            self._drain_error = DeviceError("driver_error", repr(exc))

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
                await self._command("CPQ", ("RPQ",), idempotent=False)
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
        n = len(group.tags)
        raw: list[float | int | None] = [None] * n
        quality = [Quality.GOOD] * n
        reasons: list[str | None] = [None] * n
        sizes = {round(s, 6): c for s, c in record.channels}
        for i, spec in enumerate(group.tag_specs):
            q, why, value = _tag_value(cast(Tag, spec), record, sizes)
            if out_of_order and q is Quality.GOOD:
                q, why = Quality.UNCERTAIN, "timestamp_before_watermark"
            raw[i], quality[i], reasons[i] = value, q, why
        return group.finish(raw, quality=quality, reasons=reasons, source_ts_ns=record.ts_ns, state=state)


def _tag_value(
    tag: Tag, record: CounterRecord, sizes: Mapping[float, int]
) -> tuple[Quality, str | None, float | int | None]:
    """One tag's value from a record, with the quality the record's status bits imply."""
    if tag.field in ("laser_ok", "laser_fault"):
        return Quality.GOOD, None, int(record.laser_ok == (tag.field == "laser_ok"))
    if tag.field in ("flow_ok", "flow_fault"):
        return Quality.GOOD, None, int(record.flow_ok == (tag.field == "flow_ok"))
    if tag.field == "sample_valid":
        return Quality.GOOD, None, int(record.sample_valid)
    if tag.field == "sample_time":
        return Quality.GOOD, None, record.sample_time_s
    if tag.field == "volume":
        q = Quality.GOOD if record.flow_ok else Quality.UNCERTAIN
        return q, None if record.flow_ok else "flow_fault", record.volume_m3 * 1000.0
    assert tag.size_um is not None
    count = sizes.get(round(tag.size_um, 6))
    if count is None:
        return Quality.BAD, "no_such_channel", None
    value: float | int = count
    if tag.per != "sample":
        if record.volume_m3 <= 0:
            return Quality.BAD, Reason.DECODE_ERROR, None
        value = count / (record.volume_m3 if tag.per == "m3" else record.volume_m3 / M3_PER_UNIT["ft3"])
    if not record.laser_ok:
        return Quality.BAD, "laser_fault", None
    if not record.flow_ok:
        return (
            (Quality.UNCERTAIN, "flow_fault", value)
            if tag.per == "sample"
            else (Quality.BAD, "flow_fault", None)
        )
    if not record.sample_valid:
        return Quality.UNCERTAIN, "sample_invalid", value
    return Quality.GOOD, None, value
