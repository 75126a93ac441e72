"""The link layer: one pymodbus client connection per serial line or TCP gateway, shared by
every device (unit id) on it.

Several devices on one serial line, or behind one TCP gateway, share one client
connection (:class:`Bus`, reference counted, one registry per event loop). Requests on a
bus are serialised by a lock, separated by the RTU inter-frame silence (3.5 character
times; pymodbus does not enforce it) and the device's ``request_delay``; the lock is held
for one request at a time, so a slow unit delays the others by at most its timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU

from agent.core.driver import DeviceError
from agent.core.records import Reason
from drivers.modbus.config import Connection


def _guarded(framer: Any, bus: Bus) -> Any:
    """The pymodbus framer, made to note that bytes arrived for the current request and to
    treat a frame it cannot decode as garbage instead of letting the exception escape into
    the transport (which would drop the connection other units on the bus share)."""
    inner = framer.handleFrame

    def handle_frame(data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, Any]:
        bus.rx_bytes += len(data)
        try:
            return inner(data, exp_devid, exp_tid)  # type: ignore[no-any-return]
        except ModbusException:
            return len(data), None

    framer.handleFrame = handle_frame
    return framer


class Garbled(Exception):
    """Bytes arrived but no valid reply could be read from them before the timeout."""


class Bus:
    """One client connection shared by every device on a serial line or behind a gateway."""

    def __init__(self, key: tuple[str, ...], conn: Connection) -> None:
        self.key = key
        self.conn = conn
        self.lock = asyncio.Lock()
        self.refs = 0
        self.rx_bytes = 0
        self.idle_since = 0.0
        self.gap_s = conn.frame_gap_s()
        # pymodbus's own retry and timeout are disabled: the driver times each request
        # itself (per device) and counts retries; its auto-reconnect is off (the scheduler
        # reconnects with backoff).
        self.client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if conn.transport == "tcp":
            self.client = AsyncModbusTcpClient(
                str(conn.host), port=int(conn.port or 502), timeout=3600, retries=0, reconnect_delay=0
            )
            framer: Any = FramerSocket(DecodePDU(False))
        else:
            self.client = AsyncModbusSerialClient(
                str(conn.port),
                baudrate=conn.baudrate,
                parity=conn.parity,
                stopbits=conn.stopbits,
                bytesize=conn.bytesize,
                timeout=3600,
                retries=0,
                reconnect_delay=0,
            )
            framer = FramerRTU(DecodePDU(False))
        self.client.ctx.framer = _guarded(framer, self)
        # A unit that never answers must not make pymodbus drop the shared connection.
        self.client.set_max_no_responses(1 << 30)

    def compatible(self, conn: Connection) -> bool:
        if conn.transport == "tcp":
            return True
        return (conn.baudrate, conn.parity, conn.stopbits, conn.bytesize) == (
            self.conn.baudrate,
            self.conn.parity,
            self.conn.stopbits,
            self.conn.bytesize,
        )

    async def ensure_connected(self, timeout_s: float) -> None:
        if self.client.connected:
            return
        async with self.lock:
            if self.client.connected:
                return
            try:
                async with asyncio.timeout(timeout_s):
                    ok = await self.client.connect()
            except TimeoutError:
                ok = False
            if not ok:
                self.client.close()
                where = "/".join(self.key[1:])
                raise DeviceError(Reason.NOT_CONNECTED, f"cannot open {self.key[0]} {where}")
            self.idle_since = time.monotonic()

    async def request(
        self, fn: str, address: int, count_or_value: int, unit: int, timeout_s: float, pause: float
    ) -> Any:
        """One request/reply under the bus lock, after the line has been quiet for ``pause``."""
        async with self.lock:
            wait = self.idle_since + max(pause, self.gap_s) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.client.connected:
                raise DeviceError(Reason.COMM_ERROR, "connection lost")
            self.rx_bytes = 0
            method = getattr(self.client, fn)
            kwargs: dict[str, int] = {"device_id": unit}
            if fn.startswith("read_"):
                kwargs["count"] = count_or_value
                call = method(address, **kwargs)
            else:
                call = method(address, count_or_value, **kwargs)
            try:
                async with asyncio.timeout(timeout_s):
                    return await call
            except TimeoutError:
                if self.rx_bytes:
                    raise Garbled() from None
                raise
            except ModbusIOException as exc:
                raise Garbled() from exc
            except ConnectionException as exc:
                raise DeviceError(Reason.COMM_ERROR, str(exc)) from exc
            finally:
                self.idle_since = time.monotonic()

    def disconnect(self) -> None:
        self.client.close()


_BUSES: dict[tuple[int, tuple[str, ...]], Bus] = {}
"""Open buses by (event loop, bus key): a connection belongs to the loop that opened it."""


def acquire_bus(conn: Connection) -> Bus:
    """The bus of ``conn`` on the running event loop, shared with every device already on it."""
    key = (id(asyncio.get_running_loop()), conn.bus_key())
    bus = _BUSES.get(key)
    if bus is None:
        bus = _BUSES[key] = Bus(conn.bus_key(), conn)
    elif not bus.compatible(conn):
        raise DeviceError(Reason.COMM_ERROR, f"devices on {'/'.join(key[1][1:])} disagree on line settings")
    bus.refs += 1
    return bus


def release_bus(bus: Bus) -> None:
    """Drop one device's hold on ``bus``; the last one out closes the connection."""
    bus.refs -= 1
    if bus.refs <= 0:
        for k, b in list(_BUSES.items()):
            if b is bus:
                del _BUSES[k]
        bus.disconnect()
