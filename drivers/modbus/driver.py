"""The Modbus TCP and RTU driver: polls a device's groups by their read plans over its shared
bus, and turns every failure into data.

* **Errors as data.** An exception reply makes the tags of that request bad with the
  exception's name as reason; a garbled, truncated or CRC-failed reply makes them bad
  with ``comm_error``; a reply of the wrong length, ``decode_error``; a reply that answers
  something else (unit id, function code, transaction id), ``bad_reply``. Silence
  (timeout), a lost connection and a device sending junk raise :class:`DeviceError` so
  the scheduler reconnects with backoff. Every case counts in ``ctx.stats``; the log gets
  one line per change of a device's state, not one per failed request.
* **A dead unit cannot eat the bus.** Server-busy back-off waits happen outside the bus
  lock (:mod:`drivers.modbus.bus`), and a unit that keeps failing is *degraded*: skipped
  for ``degrade_for``.

The read plans are :mod:`drivers.modbus.plan`, records mode (particle counters' record
buffers) is :mod:`drivers.modbus.records`, the profile and connection models are
:mod:`drivers.modbus.config`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from agent.core.driver import (
    IDENTITY_UNAVAILABLE,
    ConnectionBase,
    DeviceContext,
    DeviceError,
    DeviceIdentity,
    Driver,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
    identity_text,
)
from agent.core.records import Block, Quality, Reason, now_ns
from cleanroom_common.modbus import BIT_TABLES, Table
from drivers.modbus.bus import BadReply, Bus, Garbled, acquire_bus, release_bus
from drivers.modbus.config import Connection, Group, Profile, Tag, as_tag
from drivers.modbus.frames import (
    READ_COILS,
    READ_DISCRETE,
    READ_HOLDING,
    READ_INPUT,
    WRITE_REGISTER,
    Fault,
    Reply,
    Request,
)
from drivers.modbus.plan import Outcome, Plan, decode_plan, raw_values, shared_plan
from drivers.modbus.records import RecordReader

log = logging.getLogger("cleanroom.modbus")

EXCEPTION_NAMES = {
    1: "illegal_function",
    2: "illegal_data_address",
    3: "illegal_data_value",
    4: "slave_device_failure",
    5: "acknowledge",
    6: "server_busy",
    8: "memory_parity_error",
    10: "gateway_path_unavailable",
    11: "gateway_target_failed",
}
"""Modbus exception codes → the quality reason of the readings a refused request yields."""

DEGRADED = "degraded"
"""Quality reason while a failing device is skipped (``degrade_after``/``degrade_for``)."""

READ_FUNCTIONS: dict[Table, int] = {
    "holding": READ_HOLDING,
    "input": READ_INPUT,
    "coil": READ_COILS,
    "discrete": READ_DISCRETE,
}
"""The function code that reads each table (the driver's polls and ``discover modbus``'s probes)."""

BAD_REPLY = "bad_reply"
"""Quality reason of a read whose reply answered something else (unit id, function code,
transaction id), or (RTU) could not be told apart from an earlier request's late reply."""

_FAULT_REASONS: dict[Fault, str] = {
    Fault.BAD_REPLY: BAD_REPLY,
    Fault.AMBIGUOUS: BAD_REPLY,
    Fault.WRONG_LENGTH: Reason.DECODE_ERROR,
    Fault.GARBLED: Reason.COMM_ERROR,
}
"""Why a reply did not answer its request → the quality reason of the readings it carried."""


class ModbusDriver(Driver):
    protocol = "modbus"
    Tag: ClassVar[type[TagBase]] = Tag
    Group: ClassVar[type[GroupSpec]] = Group
    Connection: ClassVar[type[ConnectionBase]] = Connection
    Profile: ClassVar[type[ProfileBase]] = Profile

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.connection, Connection):
            raise TypeError("ModbusDriver needs a modbus Connection")
        self.conn: Connection = ctx.connection
        self._plans: dict[str, Plan] = {}
        self._fused: dict[tuple[str, ...], Plan] = {}
        self._records: dict[str, RecordReader] = {}
        for name, group in ctx.groups.items():
            tags = [as_tag(t) for t in group.tag_specs]
            spec = group.spec
            if isinstance(spec, Group) and spec.records is not None:
                self._records[name] = RecordReader(self, group, spec.records, tags)
            else:
                self._plans[name] = shared_plan(ctx.profile, f"group {name}", tags, self.conn)
        self._identity: tuple[list[str], Plan] | None = None
        """Identity fields and the plan reading their tags (the profile's ``identity``)."""
        if ctx.profile.identity is not None and (named := ctx.profile.identity.named()):
            specs = {t.name: t for t in ctx.profile.tags}
            identity_tags = [as_tag(specs[n]) for n in named.values()]
            self._identity = (list(named), shared_plan(ctx.profile, "identity", identity_tags, self.conn))
        self._identity_logged = False
        self._bus: Bus | None = None
        self._misses = 0
        self._degraded_until = 0.0
        self._health = "ok"

    # -- lifecycle

    def backfills(self, group: PollGroup) -> bool:
        """A records-mode group reads the counter's own buffer back after an outage."""
        return group.name in self._records

    async def connect(self) -> None:
        await self._open()
        if self._identity is not None:
            self.ctx.identify(await self._read_identity(*self._identity))

    async def _read_identity(self, fields: list[str], plan: Plan) -> DeviceIdentity:
        """The profile's identity tags, read once per connection within one timeout: a device that
        cannot tell who it is still measures, so every failure leaves the field unknown, counted
        (``identity_unavailable``) and logged once per driver, never fails the connect."""
        found: dict[str, str] = {}
        problem = ""
        try:
            outcome = await asyncio.wait_for(self.execute(plan), self.conn.timeout)
        except (DeviceError, TimeoutError) as exc:
            problem = f"reading identity registers: {exc or 'timeout'}"
        else:
            values, quality, reasons = decode_plan(plan, outcome.regs, outcome.bits, outcome.failed)
            for i, name in enumerate(fields):
                text = None if quality and quality[i] is Quality.BAD else identity_text(values[i])
                if text is None:
                    why = reasons[i] if reasons and reasons[i] else f"unusable value {values[i]!r}"
                    problem = problem or f"identity {name}: {why}"
                else:
                    found[name] = text
        if problem:
            self.ctx.stats.error(IDENTITY_UNAVAILABLE)
            if not self._identity_logged:
                self._identity_logged = True
                log.warning("%s: device identity incomplete (%s)", self.ctx.id, problem)
        return DeviceIdentity(**found)

    async def _open(self) -> None:
        if self._bus is None:
            self._bus = acquire_bus(self.conn)
        try:
            await self._bus.ensure_connected(self.conn.timeout)
        except DeviceError as exc:
            self._set_health(exc.reason, exc.detail)
            await self.close()
            raise
        if self.conn.connect_delay:
            await asyncio.sleep(self.conn.connect_delay)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                release_bus(bus)
            except Exception as exc:  # close must not raise
                log.debug("%s: closing bus failed: %s", self.ctx.id, exc)

    # -- reading

    def reads_together(self, group: PollGroup) -> bool:
        """Register groups fuse (records-mode groups keep their own exchange with the counter): the
        tags of groups due together are one plan, coalesced as one group's tags would be."""
        return group.name in self._plans

    async def read(self, group: PollGroup) -> list[Block]:
        return await self._scan((group,))

    async def read_together(self, groups: Sequence[PollGroup]) -> list[Block]:
        return await self._scan(tuple(groups))

    async def _scan(self, groups: tuple[PollGroup, ...]) -> list[Block]:
        if time.monotonic() < self._degraded_until:
            return [g.bad(DEGRADED) for g in groups]
        bus = self._bus
        if bus is not None and not bus.connected and bus.lost is not None:
            raise bus.lost  # dropped for junk: the scheduler backs off before reconnecting
        if bus is None or not bus.connected:
            await self._open()  # first poll, or the link closed after the last scan
        bus = self._bus
        assert bus is not None
        bus.scans += 1
        try:
            reader = self._records.get(groups[0].name) if len(groups) == 1 else None
            if reader is not None:
                return await reader.read()
            acq = now_ns()
            plan = self._plan_of(groups)
            outcome = await self.execute(plan)
            values, quality, reasons = decode_plan(plan, outcome.regs, outcome.bits, outcome.failed)
            raw = raw_values(plan, outcome) if self.ctx.record_raw else None
            blocks: list[Block] = []
            end = 0
            for g in groups:  # a plan of several groups holds each group's tags in turn
                at, end = end, end + len(g.tags)
                blocks.append(
                    g.finish(
                        values[at:end],
                        acq_ts_ns=acq,
                        quality=None if quality is None else quality[at:end],
                        reasons=None if reasons is None else reasons[at:end],
                        device_raw=None if raw is None else raw[at:end],
                    )
                )
            return blocks
        finally:
            bus.scans -= 1
            if self.conn.close_after_scan and bus.scans == 0:
                bus.disconnect()

    def _plan_of(self, groups: tuple[PollGroup, ...]) -> Plan:
        """One group's plan, or the plan of several groups' tags in turn (built on their first
        poll together, and shared by the devices of the profile as any plan is)."""
        if len(groups) == 1:
            return self._plans[groups[0].name]
        names = tuple(g.name for g in groups)
        plan = self._fused.get(names)
        if plan is None:
            tags = [as_tag(t) for g in groups for t in g.tag_specs]
            plan = self._fused[names] = shared_plan(
                self.ctx.profile, "groups " + "+".join(names), tags, self.conn
            )
        return plan

    async def execute(self, plan: Plan) -> Outcome:
        """Run a plan's reads; exception replies, garbage and replies that answer something else
        fail only their own read.

        Raises :class:`DeviceError` when the device stays silent (after retries) or the link drops.
        """
        out = Outcome(np.zeros(plan.n_regs, dtype=np.uint16), np.zeros(plan.n_bits, dtype=np.bool_))
        for rd in plan.reads:
            reply = await self._call(READ_FUNCTIONS[rd.table], rd.start, rd.count)
            if isinstance(reply, str):
                out.failed.update(dict.fromkeys(rd.tags, reply))
            elif rd.table in BIT_TABLES:
                out.bits[rd.offset : rd.offset + rd.count] = reply.bits
            else:
                out.regs[rd.offset : rd.offset + rd.count] = reply.registers
        if not out.failed:
            self._set_health("ok")
        return out

    async def _call(self, function: int, address: int, value: int) -> Reply | str:
        """One request with retries. Returns the reply, or the quality reason (``str``) of a
        refused, garbled or mismatched request; raises :class:`DeviceError` on silence."""
        if self._bus is None:
            # Another poll group's failure closed the connection while this poll waited.
            raise DeviceError(Reason.NOT_CONNECTED, "connection closed")
        stats = self.ctx.stats
        request = Request(self.conn.unit_id, function, address, value)
        attempts = self.conn.retries + 1
        for attempt in range(attempts):
            if attempt:
                stats.retries += 1
            t0 = time.monotonic()
            try:
                reply = await self._bus.request(
                    request, self.conn.timeout, self.conn.request_delay, stats.error
                )
            except TimeoutError:
                stats.error(Reason.TIMEOUT)
                # Counted per request, not per poll: the scheduler may cancel a poll whose
                # retries outlast its deadline, and the count must survive that.
                if self._missed():
                    break
                continue
            except Garbled:
                stats.error(Fault.GARBLED)
                self._set_health(Reason.COMM_ERROR, f"garbled reply to function {function} at {address}")
                return Reason.COMM_ERROR
            except BadReply as exc:
                stats.error(exc.fault)
                reason = _FAULT_REASONS[exc.fault]
                self._set_health(reason, f"function {function} at {address}: {exc.detail}")
                return reason
            except DeviceError as exc:
                stats.error(exc.reason)
                self._set_health(exc.reason, exc.detail)
                raise
            stats.request_done(time.monotonic() - t0)
            self._misses = 0
            code = reply.exception_code
            if code is None:
                return reply
            name = EXCEPTION_NAMES.get(code, f"exception_{code}")
            stats.error(name)
            if code == 6 and attempt + 1 < attempts:
                await asyncio.sleep(self.conn.retry_busy_wait)
                continue
            self._set_health(name, f"function {function} at {address}")
            return name
        if time.monotonic() >= self._degraded_until:  # else "degraded" was just logged
            self._set_health(
                Reason.TIMEOUT, f"unit {self.conn.unit_id} did not answer function {function} at {address}"
            )
        raise DeviceError(Reason.TIMEOUT, f"unit {self.conn.unit_id} did not answer")

    def _missed(self) -> bool:
        """Count an unanswered request; True when that degrades the device."""
        self._misses += 1
        if self._misses < self.conn.degrade_after:
            return False
        self._degraded_until = time.monotonic() + self.conn.degrade_for
        self._misses = self.conn.degrade_after - 1  # one more miss after the pause degrades again
        self._set_health(DEGRADED, f"skipped for {self.conn.degrade_for:g}s after repeated timeouts")
        return True

    def _set_health(self, state: str, detail: str = "") -> None:
        """Log a device's state only when it changes: a dead device is one line, not one per poll."""
        if state == self._health:
            return
        if state == "ok":
            log.info("%s: communicating again (was %s)", self.ctx.id, self._health)
        else:
            log.warning("%s: %s %s", self.ctx.id, state, detail)
        self._health = state

    async def write_register(self, address: int, value: int) -> str | None:
        """Write one holding register (PDU address); the exception name if refused."""
        reply = await self._call(WRITE_REGISTER, address, value)
        return reply if isinstance(reply, str) else None
