"""The Modbus TCP and RTU driver (pymodbus client underneath): polls a device's groups by
their read plans over its shared bus, and turns every failure into data.

* **Errors as data.** An exception reply makes the tags of that request bad with the
  exception's name as reason; a garbled, truncated or CRC-failed reply makes them bad
  with ``comm_error``; a reply of the wrong length, ``decode_error``. Silence (timeout)
  and a lost connection raise :class:`DeviceError` so the scheduler reconnects. Every
  case counts in ``ctx.stats``; the log gets one line per change of a device's state,
  not one per failed request.
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
from typing import Any, ClassVar

import numpy as np

from agent.core.driver import (
    ConnectionBase,
    DeviceContext,
    DeviceError,
    Driver,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
)
from agent.core.records import Block, Reason, now_ns
from cleanroom_common.modbus import BIT_TABLES, Table
from drivers.modbus.bus import Bus, Garbled, acquire_bus, release_bus
from drivers.modbus.config import Connection, Group, Profile, Tag, as_tag
from drivers.modbus.plan import Outcome, Plan, build_plan, decode_plan
from drivers.modbus.records import RecordReader

log = logging.getLogger("cleanroom.modbus")

if logging.getLogger("pymodbus").level == logging.NOTSET:
    # pymodbus logs every failed request at ERROR; this driver logs state changes instead.
    # Set the "pymodbus" logger's level explicitly to see its own trace.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

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

_READ_FUNCTIONS: dict[Table, str] = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


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
        self._records: dict[str, RecordReader] = {}
        for name, group in ctx.groups.items():
            tags = [as_tag(t) for t in group.tag_specs]
            spec = group.spec
            if isinstance(spec, Group) and spec.records is not None:
                self._records[name] = RecordReader(self, group, spec.records, tags)
            else:
                self._plans[name] = build_plan(tags, self.conn)
        self._bus: Bus | None = None
        self._misses = 0
        self._degraded_until = 0.0
        self._health = "ok"

    # -- lifecycle

    def backfills(self, group: PollGroup) -> bool:
        """A records-mode group reads the counter's own buffer back after an outage."""
        return group.name in self._records

    async def connect(self) -> None:
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

    async def read(self, group: PollGroup) -> list[Block]:
        if time.monotonic() < self._degraded_until:
            return [group.bad(DEGRADED)]
        if self._bus is None or not self._bus.client.connected:
            await self.connect()
        try:
            reader = self._records.get(group.name)
            if reader is not None:
                return await reader.read()
            acq = now_ns()
            outcome = await self.execute(self._plans[group.name])
            values, quality, reasons = decode_plan(
                self._plans[group.name], outcome.regs, outcome.bits, outcome.failed
            )
            return [group.finish(values, acq_ts_ns=acq, quality=quality, reasons=reasons)]
        finally:
            if self.conn.close_after_scan and self._bus is not None and self._bus.refs == 1:
                self._bus.disconnect()

    async def execute(self, plan: Plan) -> Outcome:
        """Run a plan's reads; exception replies and garbage fail only their own read.

        Raises :class:`DeviceError` when the device stays silent (after retries).
        """
        out = Outcome(np.zeros(plan.n_regs, dtype=np.uint16), np.zeros(plan.n_bits, dtype=np.bool_))
        for rd in plan.reads:
            reply = await self._call(_READ_FUNCTIONS[rd.table], rd.start, rd.count)
            if isinstance(reply, str):
                out.failed.update(dict.fromkeys(rd.tags, reply))
                continue
            got = reply.bits[: rd.count] if rd.table in BIT_TABLES else reply.registers
            if len(got) != rd.count:
                self.ctx.stats.error("wrong_length")
                self._set_health(
                    Reason.DECODE_ERROR, f"{rd.table} {rd.start}: {len(got)} of {rd.count} values"
                )
                out.failed.update(dict.fromkeys(rd.tags, Reason.DECODE_ERROR))
                continue
            if rd.table in BIT_TABLES:
                out.bits[rd.offset : rd.offset + rd.count] = got
            else:
                out.regs[rd.offset : rd.offset + rd.count] = got
        if not out.failed:
            self._set_health("ok")
        return out

    async def _call(self, fn: str, address: int, count_or_value: int) -> Any:
        """One request with retries. Returns the reply, or the quality reason (``str``) of
        a refused or garbled request; raises :class:`DeviceError` on silence."""
        if self._bus is None:
            # Another poll group's failure closed the connection while this poll waited.
            raise DeviceError(Reason.NOT_CONNECTED, "connection closed")
        stats = self.ctx.stats
        attempts = self.conn.retries + 1
        for attempt in range(attempts):
            if attempt:
                stats.retries += 1
            t0 = time.monotonic()
            try:
                reply = await self._bus.request(
                    fn, address, count_or_value, self.conn.unit_id, self.conn.timeout, self.conn.request_delay
                )
            except TimeoutError:
                stats.error(Reason.TIMEOUT)
                # Counted per request, not per poll: the scheduler may cancel a poll whose
                # retries outlast its deadline, and the count must survive that.
                if self._missed():
                    break
                continue
            except Garbled:
                stats.error("garbled")
                self._set_health(Reason.COMM_ERROR, f"garbled reply to {fn} {address}")
                return Reason.COMM_ERROR
            except DeviceError as exc:
                stats.error(exc.reason)
                self._set_health(exc.reason, exc.detail)
                raise
            stats.request_done(time.monotonic() - t0)
            self._misses = 0
            if not reply.isError():
                return reply
            name = EXCEPTION_NAMES.get(reply.exception_code, f"exception_{reply.exception_code}")
            stats.error(name)
            if reply.exception_code == 6 and attempt + 1 < attempts:
                await asyncio.sleep(self.conn.retry_busy_wait)
                continue
            self._set_health(name, f"{fn} {address}")
            return name
        if time.monotonic() >= self._degraded_until:  # else "degraded" was just logged
            self._set_health(Reason.TIMEOUT, f"unit {self.conn.unit_id} did not answer {fn} {address}")
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
        reply = await self._call("write_register", address, value)
        return reply if isinstance(reply, str) else None
