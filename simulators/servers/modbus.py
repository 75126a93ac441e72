"""Modbus front end: TCP (a gateway with one or more unit ids) and RTU on a pty.

Framing and PDUs are pymodbus's own (``FramerSocket``/``FramerRTU``, ``DecodePDU`` and
each request's ``datastore_update``), so the bytes on the wire are what a pymodbus
server sends. The transports are ours, because the simulator must misbehave on
purpose: answer nothing, answer garbage, or drop one connection, per unit and per
fault window. pymodbus's server offers no hook for that.

Each unit (:mod:`simulators.servers.modbus_unit`) holds a register image built from its
profile and refreshed from the model (advanced to the shared clock) on every request, so
a client always reads the process as it is at that simulated instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerBase, FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from cleanroom_common.modbus import BIT_TABLES, TABLE_OF_FUNCTION
from cleanroom_common.profilefiles import load_profile
from simulators.process.base import Clock
from simulators.servers.counter import CounterUnit
from simulators.servers.device import SimulatedDevice
from simulators.servers.faults import CommFault, FaultSchedule
from simulators.servers.modbus_unit import ModbusUnit
from simulators.servers.pty import PtyPort

log = logging.getLogger(__name__)

DEFAULT_PROFILES = {
    ("bioreactor", "tcp"): "bioreactor-sim",
    ("incubator", "tcp"): "incubator-sim-modbus",
    ("incubator", "rtu"): "incubator-sim-rtu",
    ("particle_counter", "tcp"): "particle-counter-sim-modbus",
    ("particle_counter", "rtu"): "particle-counter-sim-modbus",
}
_MAX_BUFFER = 1024
"""Unparsable input beyond this is discarded: a garbage stream must not grow memory."""


class _Datastore:
    """The context object pymodbus requests run against (``pdu.datastore_update``)."""

    def __init__(self, units: Mapping[int, ModbusUnit]) -> None:
        self.units = units

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        table = TABLE_OF_FUNCTION.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        words = self.units[device_id].read(table, address, count)
        if isinstance(words, ExcCodes) or table not in BIT_TABLES:
            return words
        return [bool(w) for w in words]

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        table = TABLE_OF_FUNCTION.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        return self.units[device_id].write(table, address, [int(v) for v in values])

    def device_ids(self) -> list[int]:
        return list(self.units)


_DROP = object()
"""Reply marker: close this connection instead of answering."""


class ModbusServer:
    """Serves a set of units over TCP and/or one RTU pty."""

    def __init__(self, units: Mapping[int, ModbusUnit]) -> None:
        if not units:
            raise ValueError("a Modbus server needs at least one unit")
        self.units = dict(units)
        self._store = _Datastore(self.units)
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._pty: PtyPort | None = None
        self._rtu_tasks: set[asyncio.Task[None]] = set()
        self.port: int | None = None
        self.pty_path: str | None = None

    # ------------------------------------------------------------------ common

    async def _answer(self, pdu: ModbusPDU, framer: FramerBase, rtu: bool) -> bytes | object | None:
        """The frame to send for one request, ``None`` for silence, or ``_DROP``."""
        unit = self.units.get(pdu.dev_id)
        if unit is None:
            # On a bus nobody answers for an absent unit; a TCP gateway says its target failed.
            return None if rtu else self._frame(framer, pdu, ExceptionResponse(pdu.function_code, 0x0B))
        fault = unit.device.fault()
        if fault is not None:
            if fault.kind is CommFault.TIMEOUT:
                return None
            if fault.kind is CommFault.DISCONNECT:
                return None if rtu else _DROP
            if fault.kind is CommFault.EXCEPTION:
                return self._frame(framer, pdu, ExceptionResponse(pdu.function_code, fault.code))
        try:
            response = await pdu.datastore_update(self._store, pdu.dev_id)  # type: ignore[arg-type]
        except Exception as exc:  # a request kind the datastore cannot serve: a device failure, not a crash
            log.info("unit %s: cannot serve %s: %s", pdu.dev_id, type(pdu).__name__, exc)
            response = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)
        frame = self._frame(framer, pdu, response)
        if fault is not None and fault.kind is CommFault.GARBLED:
            return _garble(frame, rtu)
        return frame

    @staticmethod
    def _frame(framer: FramerBase, request: ModbusPDU, response: ModbusPDU) -> bytes:
        response.dev_id = request.dev_id
        response.transaction_id = request.transaction_id
        return framer.buildFrame(response)

    async def _feed(self, framer: FramerBase, buf: bytearray, rtu: bool) -> list[bytes | object]:
        """Consume complete requests from ``buf``; return what to send, in order."""
        out: list[bytes | object] = []
        while buf:
            try:
                used, pdu = framer.handleFrame(bytes(buf), 0, 0)
            except ModbusIOException as exc:  # a function code we do not implement
                fc_at = 1 if rtu else 7
                fc = exc.fcode if exc.fcode is not None else (buf[fc_at] if len(buf) > fc_at else 0)
                buf.clear()
                bad = ExceptionResponse(fc & 0x7F, ExcCodes.ILLEGAL_FUNCTION, exc.dev_id, exc.transaction_id)
                if rtu and exc.dev_id not in self.units:
                    continue
                out.append(framer.buildFrame(bad))
                continue
            del buf[:used]
            if pdu is None:
                if len(buf) > _MAX_BUFFER:
                    buf.clear()
                break
            reply = await self._answer(pdu, framer, rtu)
            if reply is not None:
                out.append(reply)
        return out

    # ------------------------------------------------------------------ TCP

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._tcp = await asyncio.start_server(self._serve_conn, host, port)
        self.port = int(self._tcp.sockets[0].getsockname()[1])
        return self.port

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        framer = FramerSocket(DecodePDU(True))
        buf = bytearray()
        try:
            while data := await reader.read(4096):
                buf += data
                for reply in await self._feed(framer, buf, rtu=False):
                    if reply is _DROP:
                        return
                    writer.write(reply)  # type: ignore[arg-type]
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    # ------------------------------------------------------------------ RTU on a pty

    async def start_rtu(self, link: Path | None = None) -> str:
        """Serve RTU on a pty; return the slave path (also symlinked at ``link``) that a
        client opens as its serial port."""
        framer = FramerRTU(DecodePDU(True))
        buf = bytearray()
        lock = asyncio.Lock()

        async def handle() -> None:
            async with lock:  # one bus, one request at a time, in arrival order
                for reply in await self._feed(framer, buf, rtu=True):
                    if self._pty is not None:
                        self._pty.write(reply)  # type: ignore[arg-type]

        def received(data: bytes) -> None:
            buf.extend(data)
            task = asyncio.get_running_loop().create_task(handle())
            self._rtu_tasks.add(task)
            task.add_done_callback(self._rtu_tasks.discard)

        self._pty = PtyPort(received, link)
        self.pty_path = self._pty.path
        return self.pty_path

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            for w in list(self._conns):
                w.close()
            await self._tcp.wait_closed()
            self._tcp = None
        if self._pty is not None:
            for task in list(self._rtu_tasks):
                task.cancel()
            self._pty.close()
            self._pty = None


def _garble(frame: bytes, rtu: bool) -> bytes:
    """Corrupt a reply the way a noisy line or a confused gateway does.

    RTU: one data byte flipped, so the CRC fails. TCP: the PDU's byte count claims more
    data than the (consistent) MBAP length carries, so the reply cannot be decoded.
    """
    b = bytearray(frame)
    if rtu:
        b[len(b) // 2] ^= 0x5A
    elif len(b) > 8:
        b[8] = 0xFF
    return bytes(b)


# --------------------------------------------------------------------------- Python API


@dataclass
class ModbusSim:
    """A running Modbus simulator: where to connect and the models behind it."""

    server: ModbusServer
    devices: dict[int, SimulatedDevice]
    clock: Clock
    host: str = "127.0.0.1"
    port: int | None = None
    pty_path: str | None = None

    @property
    def device(self) -> SimulatedDevice:
        """The first (often only) unit's device."""
        return next(iter(self.devices.values()))

    @property
    def model(self) -> Any:
        return self.device.model


def make_units(
    kind: str,
    transport: str,
    unit_ids: Sequence[int],
    *,
    clock: Clock,
    seed: int,
    profile: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    faults: Sequence[str] = (),
    device_ids: Sequence[str] | None = None,
) -> dict[int, ModbusUnit]:
    """Units of one kind, device ids ``<kind>-<unit>`` unless given; each unit its own model
    (seeded from ``seed`` and its device id, so units differ but runs repeat)."""
    data = load_profile(profile or DEFAULT_PROFILES[(kind, transport)])
    ids = list(device_ids) if device_ids else [f"{kind.replace('_', '-')}-{u}" for u in unit_ids]
    units: dict[int, ModbusUnit] = {}
    for uid, dev_id in zip(unit_ids, ids, strict=True):
        device = SimulatedDevice.create(
            kind, dev_id, clock=clock, seed=seed, params=params, faults=FaultSchedule.parse(list(faults))
        )
        units[uid] = unit_for(device, data)
    return units


def unit_for(device: SimulatedDevice, profile: Mapping[str, Any]) -> ModbusUnit:
    """The unit type a device kind needs: counters serve a record buffer, others live values."""
    if device.kind == "particle_counter":
        return CounterUnit(device, profile)
    return ModbusUnit(device, profile)


@asynccontextmanager
async def serve_modbus(
    kind: str,
    *,
    transport: str = "tcp",
    port: int = 0,
    host: str = "127.0.0.1",
    speed: float = 1.0,
    seed: int = 0,
    unit_ids: Sequence[int] = (1,),
    profile: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    faults: Sequence[str] = (),
    clock: Clock | None = None,
    pty_link: Path | None = None,
    device_ids: Sequence[str] | None = None,
) -> AsyncIterator[ModbusSim]:
    """Run a Modbus simulator for the duration of the ``async with`` block: one device per
    unit id (ids ``<kind>-<unit>`` unless ``device_ids`` names them), one shared clock."""
    clock = clock or Clock(speed)
    units = make_units(
        kind,
        transport,
        unit_ids,
        clock=clock,
        seed=seed,
        profile=profile,
        params=params,
        faults=faults,
        device_ids=device_ids,
    )
    server = ModbusServer(units)
    sim = ModbusSim(server, {u: unit.device for u, unit in units.items()}, clock, host)
    try:
        if transport == "tcp":
            sim.port = await server.start_tcp(host, port)
        elif transport == "rtu":
            sim.pty_path = await server.start_rtu(pty_link)
        else:
            raise ValueError(f"unknown Modbus transport {transport!r}: tcp or rtu")
        yield sim
    finally:
        await server.close()


def serve_bioreactor_modbus(**kwargs: Any) -> contextlib.AbstractAsyncContextManager[ModbusSim]:
    """``async with serve_bioreactor_modbus(port=0, speed=60) as sim:`` → ``sim.port``, ``sim.model``."""
    return serve_modbus("bioreactor", **kwargs)


def serve_incubator_modbus(**kwargs: Any) -> contextlib.AbstractAsyncContextManager[ModbusSim]:
    return serve_modbus("incubator", **kwargs)


def serve_counter_modbus(**kwargs: Any) -> contextlib.AbstractAsyncContextManager[ModbusSim]:
    return serve_modbus("particle_counter", **kwargs)
