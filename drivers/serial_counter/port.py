"""The link to one counter's serial port: blocking request/reply in a thread of its own.

Serial I/O is blocking request/reply, half duplex, a few hundred bytes per poll: each
port gets one worker thread (a single-thread executor) that owns the pyserial handle, so
commands on a port are serialised by construction and the event loop never blocks. A
thread per port costs ~100 kB and no CPU while waiting in ``read``; a non-blocking fd on
the loop would save the thread but re-implement timeouts and framing that pyserial
already gets right.

Before each command the input buffer is flushed (dropping any partial or late frame), a
reply is read up to LF within ``timeout``; a bad checksum or garbled line is counted
(``checksum``/``garbled``) and the command, if idempotent, is retried up to ``retries``
times. Replies that answer another command (a late reply) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent.core.driver import DeviceError
from agent.core.records import Reason
from cleanroom_common.serial_counter import ERR_PREFIX, ERR_UNKNOWN, Command, FrameError, frame, parse_reply
from drivers.serial_counter.config import Connection

log = logging.getLogger("cleanroom.drivers.serial_counter")

_T = TypeVar("_T")

_BUSY_PAUSE_S = 0.05


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

    def command(self, cmd: Command, idempotent: bool = True) -> str:
        """Send ``cmd`` and return the payload of its reply (or of the device's error reply)."""
        attempts = 1 + (self.conn.retries if idempotent else 0)
        last = ""
        for _ in range(attempts):
            try:
                self.ser.reset_input_buffer()
                self.ser.write(frame(cmd))
                payload = self._reply(cmd.replies)
            except FrameError as exc:
                last = str(exc)
                self._on_error(exc.kind)
                continue
            except (self._serial_exc, OSError) as exc:
                raise DeviceError(Reason.COMM_ERROR, f"{self.conn.port}: {exc}") from exc
            if payload.startswith(ERR_PREFIX) and payload != ERR_UNKNOWN:  # unknown: retrying won't help
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
            if payload.startswith(replies) or payload.startswith(ERR_PREFIX):
                return payload
            self._on_error("unexpected_reply")  # a late reply to an earlier command: skip it

    def close(self) -> None:
        try:
            self.ser.close()
        except (self._serial_exc, OSError) as exc:
            log.debug("close %s: %s", self.conn.port, exc)


class PortLink:
    """The port and the one worker thread that owns it, seen from the event loop."""

    def __init__(self, conn: Connection, name: str, on_error: Callable[[str], None]) -> None:
        self.conn = conn
        self._name = name
        self._on_error = on_error
        self._executor: ThreadPoolExecutor | None = None
        self._port: _Port | None = None

    async def open(self) -> None:
        """Start the worker thread and open the port in it (the caller closes on failure)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"serial-{self._name}")
        self._port = await self._run(_Port, self.conn, self._on_error)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def command(self, cmd: Command, idempotent: bool = True) -> str:
        """The payload of the reply to ``cmd`` (see :meth:`_Port.command`)."""
        port = self._port
        if port is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        return await self._run(port.command, cmd, idempotent)

    async def close(self) -> None:
        port, self._port = self._port, None
        executor, self._executor = self._executor, None
        if executor is not None:
            if port is not None:
                await asyncio.get_running_loop().run_in_executor(executor, port.close)
            executor.shutdown(wait=True)
