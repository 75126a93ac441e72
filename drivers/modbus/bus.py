"""The link layer: one connection per serial line or TCP gateway, shared by every device (unit
id) on it, and the one place where a reply is matched to its request.

Several devices on one serial line, or behind one TCP gateway, share one connection
(:class:`Bus`, reference counted, one registry per event loop). Requests on a bus are
serialised by a lock, separated by the RTU inter-frame silence (3.5 character times) and
the device's ``request_delay``; the lock is held for one request at a time, so a slow unit
delays the others by at most its timeout.

The link (:class:`_Link`, an asyncio protocol over a socket or, through pymodbus's serial
transport, a serial port) frames what arrives with :mod:`drivers.modbus.frames` and takes a
frame as the reply only if it answers the request in flight:

* **TCP**: the transaction id must be the request's; a frame carrying the id of an earlier
  request that went unanswered is that request's late reply and is dropped.
* **RTU** has no transaction id, so the link remembers requests that went unanswered. A
  frame that could answer one of them (same unit, function and length) and also the
  request in flight cannot be told apart: it is held, and taken only if a second such
  frame follows (devices answer in order, so the first was the late one); if none does,
  the request fails as ambiguous. A late reply is never taken for a newer request's.
* **Junk**: bytes that never form a frame, and frames that answer nothing, are bad frames.
  Five in a row within a second drop the link (the scheduler then backs off), so a device
  that streams junk costs a bounded amount of CPU instead of being parsed forever.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.transport.serialtransport import create_serial_connection

from agent.core.driver import DeviceError
from agent.core.records import Reason
from drivers.modbus.config import Connection
from drivers.modbus.frames import (
    JUNK_BYTES_PER_BAD_FRAME,
    Deframer,
    Fault,
    Frame,
    Mismatch,
    Reply,
    Request,
    RtuDeframer,
    TcpDeframer,
    judge,
)

BAD_FRAMES_TO_DROP = 5
"""Bad frames in a row (no good reply between them) that drop the link..."""
BAD_FRAME_WINDOW_S = 1.0
"""...when they all fall within this many seconds."""

_REMEMBERED = 8
"""Unanswered requests (RTU) or transaction ids (TCP) kept to recognise late replies by."""

Count = Callable[[str], None]
"""Counts one error of a kind in the requesting device's stats."""


class Garbled(Exception):
    """Bytes arrived but no valid reply could be read from them before the timeout."""


class BadReply(Exception):
    """A frame arrived that does not answer the request."""

    def __init__(self, fault: Fault, detail: str) -> None:
        super().__init__(detail)
        self.fault = fault
        self.detail = detail


@dataclass(eq=False)
class _Pending:
    request: Request
    tid: int
    future: asyncio.Future[Reply | Mismatch | DeviceError]
    rx: bool = False
    """Bytes arrived while this request was in flight."""
    candidate: Frame | None = None
    """RTU: a frame that may answer this request or an earlier unanswered one."""


def _noop(kind: str) -> None:
    """No device to count for (bytes arriving before the first request)."""


class _Link(asyncio.Protocol):
    """One open connection: frames what arrives and settles the request in flight."""

    def __init__(self, rtu: bool) -> None:
        self.rtu = rtu
        self.deframer: Deframer = RtuDeframer() if rtu else TcpDeframer()
        self.transport: asyncio.BaseTransport | None = None
        self.made = asyncio.Event()
        self.pending: _Pending | None = None
        self.unanswered: deque[Request] = deque(maxlen=_REMEMBERED)
        self.late_tids: deque[int] = deque(maxlen=_REMEMBERED)
        self.strikes: deque[float] = deque()
        self.lost: DeviceError | None = None
        self.count: Count = _noop
        self.tid = 0

    # -- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.made.set()

    def connection_lost(self, exc: Exception | None) -> None:
        """The device closed the link: the request in flight fails; the next poll reconnects."""
        if self.transport is not None:
            self.close()
            why = f": {exc}" if exc else ""
            self._fail_pending(DeviceError(Reason.COMM_ERROR, f"connection closed by the device{why}"))

    def data_received(self, data: bytes) -> None:
        if self.pending is not None:
            self.pending.rx = True
        for item in self.deframer.feed(data):
            if isinstance(item, int):
                self.count("bad_frame")
                self._strike(f"{item} bytes that form no frame", max(1, item // JUNK_BYTES_PER_BAD_FRAME))
            else:
                self._frame(item)
            if self.transport is None:
                return

    # -- requests

    async def exchange(self, request: Request, timeout_s: float, count: Count) -> Reply:
        """Send ``request`` and wait for the frame that answers it."""
        if self.transport is None:
            raise self.lost or DeviceError(Reason.COMM_ERROR, "connection lost")
        self.count = count
        if not self.rtu:
            self.tid = self.tid % 0xFFFF + 1  # 1..65535: a reply with id 0 answers nothing of ours
        pending = _Pending(
            request, self.tid if not self.rtu else 0, asyncio.get_running_loop().create_future()
        )
        self.pending = pending
        answered = False
        try:
            self.transport.write(self.deframer.encode(request, pending.tid))  # type: ignore[attr-defined]
            try:
                async with asyncio.timeout(timeout_s):
                    result = await pending.future
            except TimeoutError:
                if pending.candidate is None:
                    if pending.rx:
                        # The unit answered, corruptly: what is left of it is no use to the next
                        # request (on TCP it would be read as the start of its reply).
                        answered = self.rtu
                        self.deframer.clear()
                        raise Garbled() from None
                    raise
                # One frame that answers this request or an earlier one: it cannot be told which.
                # Devices answer in order, so nothing older is still owed by the unit.
                answered = True
                self._forget_unit(request.unit)
                raise BadReply(
                    Fault.AMBIGUOUS, "the only reply may answer an earlier, unanswered request"
                ) from None
            if isinstance(result, DeviceError):
                raise result
            if isinstance(result, Mismatch):
                answered = self.rtu  # the unit answered, wrongly; on TCP its real reply may follow
                raise BadReply(result.fault, result.detail)
            answered = True
            return result
        finally:
            self.pending = None
            if not answered:
                if self.rtu:
                    self.unanswered.append(request)
                else:
                    self.late_tids.append(pending.tid)

    def close(self) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        self.deframer.clear()

    # -- receiving

    def _frame(self, frame: Frame) -> None:
        p = self.pending
        if not self.rtu:
            if p is not None and frame.tid == p.tid:
                self._settle(p, judge(p.request, frame))
            elif frame.tid in self.late_tids:
                self.late_tids.remove(frame.tid)
                self.count("late_reply")
            elif p is not None:
                self._settle(p, Mismatch(Fault.BAD_REPLY, f"transaction id {frame.tid} answered {p.tid}"))
            else:
                self.count("bad_frame")
                self._strike("a frame while no request was in flight")
            return
        stale = next((r for r in self.unanswered if r.could_be_answered_by(frame)), None)
        if stale is not None and (p is None or not p.request.could_be_answered_by(frame)):
            self.unanswered.remove(stale)
            self.count("late_reply")
            return
        if p is None:
            self.count("bad_frame")
            self._strike("a frame while no request was in flight")
            return
        if stale is not None:
            if p.candidate is None:
                p.candidate = frame  # the late reply, or this request's: wait for a second one
                return
            self.unanswered.remove(stale)  # two came: the first was the late one
            self.count("late_reply")
        self._settle(p, judge(p.request, frame))

    def _settle(self, p: _Pending, verdict: Reply | Mismatch) -> None:
        if p.future.done():
            return
        if isinstance(verdict, Reply):
            self.strikes.clear()
            if self.rtu:
                self._forget_unit(p.request.unit)
        p.future.set_result(verdict)
        if isinstance(verdict, Mismatch):
            self._strike(verdict.detail)

    def _forget_unit(self, unit: int) -> None:
        """A unit answers in order: once it answered a newer request, older ones stay unanswered."""
        for r in [r for r in self.unanswered if r.unit == unit]:
            self.unanswered.remove(r)

    def _strike(self, detail: str, weight: int = 1) -> None:
        """One more bad frame (``weight`` for a large piece of junk); too many too fast drop the link."""
        now = time.monotonic()
        self.strikes.extend([now] * min(weight, BAD_FRAMES_TO_DROP))
        while self.strikes and now - self.strikes[0] > BAD_FRAME_WINDOW_S:
            self.strikes.popleft()
        if len(self.strikes) >= BAD_FRAMES_TO_DROP:
            self._drop(
                DeviceError(
                    Reason.COMM_ERROR,
                    f"{len(self.strikes)} bad frames within {BAD_FRAME_WINDOW_S:g} s (last: {detail}); "
                    "the device is sending junk, disconnected",
                )
            )

    def _drop(self, error: DeviceError) -> None:
        """Close the link for cause: the next poll raises ``error`` so the scheduler backs off."""
        self.lost = error
        self.close()
        self._fail_pending(error)

    def _fail_pending(self, error: DeviceError) -> None:
        p = self.pending
        if p is not None and not p.future.done():
            p.future.set_result(error)


class Bus:
    """One connection shared by every device on a serial line or behind a gateway."""

    def __init__(self, key: tuple[str, ...], conn: Connection) -> None:
        self.key = key
        self.conn = conn
        self.lock = asyncio.Lock()
        self.refs = 0
        self.scans = 0
        """Polls under way on this bus, of every device on it: ``close_after_scan`` closes the
        link only when the last one ends, never under another poll's request."""
        self.idle_since = 0.0
        self.gap_s = conn.frame_gap_s()
        self._link: _Link | None = None

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.transport is not None

    @property
    def lost(self) -> DeviceError | None:
        """Why the link was dropped for cause (junk), so the next poll backs off instead of
        reconnecting at once."""
        return self._link.lost if self._link is not None else None

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
        if self.connected:
            return
        async with self.lock:
            if self.connected:
                return
            self.disconnect()
            link = _Link(self.conn.transport == "rtu")
            try:
                async with asyncio.timeout(timeout_s):
                    await self._open(link)
                    await link.made.wait()
            except (OSError, ValueError, TimeoutError) as exc:
                link.close()
                where = "/".join(self.key[1:])
                raise DeviceError(Reason.NOT_CONNECTED, f"cannot open {self.key[0]} {where}: {exc}") from None
            self._link = link
            self.idle_since = time.monotonic()

    async def _open(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        if conn.transport == "tcp":
            await loop.create_connection(lambda: link, str(conn.host), int(conn.port or 502))
            return
        transport: Any
        transport, _ = await create_serial_connection(
            loop,
            lambda: link,
            str(conn.port),
            baudrate=conn.baudrate,
            bytesize=conn.bytesize,
            parity=conn.parity,
            stopbits=conn.stopbits,
            timeout=0,
        )
        link.transport = transport  # before setup runs: a close now must still close the port

    async def request(self, request: Request, timeout_s: float, pause: float, count: Count) -> Reply:
        """One request/reply under the bus lock, after the line has been quiet for ``pause``."""
        async with self.lock:
            wait = self.idle_since + max(pause, self.gap_s) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            link = self._link
            if link is None or link.transport is None:
                raise self.lost or DeviceError(Reason.COMM_ERROR, "connection lost")
            try:
                return await link.exchange(request, timeout_s, count)
            finally:
                self.idle_since = time.monotonic()

    def disconnect(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()


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
