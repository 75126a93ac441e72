"""Serial ASCII particle counter (Lasair-like line protocol) on a pty.

The protocol is specified in docs/simulators.md ("Serial ASCII particle counter
protocol"), which the agent's driver is written from; this module is its reference
implementation. Every reply carries an NMEA-style XOR checksum so a host can tell a
garbled line from a valid one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

from simulators.process.base import Clock
from simulators.process.particle_counter import ParticleCounter, SampleRecord
from simulators.servers.counter import RecordQueue, counter_model, serial_number
from simulators.servers.device import SimulatedDevice
from simulators.servers.faults import CommFault, FaultSchedule
from simulators.servers.pty import PtyPort

SERIAL_PROFILE = "particle-counter-sim-serial"
"""The profile the agent reads this counter with (record fields, not registers)."""
MAX_LINE = 256
"""Longer input without a line end is noise: it is discarded, not buffered forever."""


def checksum(payload: str) -> str:
    """Two upper-case hex digits: XOR of every byte of the payload."""
    return f"{reduce(lambda a, b: a ^ b, payload.encode('ascii'), 0):02X}"


def frame(payload: str) -> bytes:
    return f"{payload}*{checksum(payload)}\r\n".encode("ascii")


def format_record(rec: SampleRecord, model: ParticleCounter, serial: str) -> str:
    """The CSV record of ``RTD2`` (field order in docs/simulators.md)."""
    ts = time.gmtime(rec.timestamp_s)
    sizes = model.params.channels_um
    valid = rec.laser_ok and rec.flow_ok and not rec.overflow
    fields = [
        time.strftime("%Y-%m-%d", ts),
        time.strftime("%H:%M:%S", ts),
        model.device_id,
        serial,
        str(int(rec.laser_ok)),
        str(int(rec.flow_ok)),
        str(int(valid)),
        str(round(rec.sample_time_s)),
        f"{rec.volume_l:.1f}",
        "L",
        str(len(sizes)),
    ]
    for size, count in zip(sizes, rec.counts, strict=True):
        fields += [f"{size:.1f}", str(count)]
    return ",".join(fields)


class SerialCounterServer:
    """One counter on one pty, answering one command line at a time."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.model = counter_model(device)
        self.serial = f"LSR-SIM-{serial_number(device.device_id):06d}"
        self.queue = RecordQueue(self.model)
        self._buf = bytearray()
        self._port: PtyPort | None = None

    @property
    def path(self) -> str | None:
        return self._port.path if self._port else None

    def start(self, link: Path | None = None) -> str:
        self._port = PtyPort(self._received, link)
        return self._port.path

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def _received(self, data: bytes) -> None:
        self._buf += data
        while True:
            ends = [i for i in (self._buf.find(b"\r"), self._buf.find(b"\n")) if i >= 0]
            if not ends:
                if len(self._buf) > MAX_LINE:
                    self._buf.clear()
                return
            end = min(ends)
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            reply = self._reply(line)
            if reply is not None and self._port is not None:
                self._port.write(reply)

    def _reply(self, raw: bytes) -> bytes | None:
        text = raw.decode("ascii", errors="replace").strip()
        if not text:
            return None
        fault = self.device.fault()
        if fault is not None and fault.kind in (CommFault.TIMEOUT, CommFault.DISCONNECT):
            if fault.kind is CommFault.DISCONNECT:
                self._buf.clear()
                if self._port is not None:
                    self._port.discard_input()
            return None
        if fault is not None and fault.kind is CommFault.EXCEPTION:
            return frame("ERR BUSY")
        payload = self.answer(text)
        if fault is not None and fault.kind is CommFault.GARBLED:
            good = frame(payload)
            i = len(payload) // 2
            return good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1 :]  # checksum no longer matches
        return frame(payload)

    def answer(self, text: str) -> str:
        """The reply payload to one command line (without checksum and line end)."""
        command, star, given = text.partition("*")
        if star and given.upper() != checksum(command):
            return "ERR CHECKSUM"
        self.device.now()
        self.queue.pull()
        q = self.queue.queue
        match command.strip():
            case "CSS":
                self.model.start()
                return "RSS 1"
            case "CSP":
                self.model.stop()
                return "RSP 1"
            case "CQC":
                return f"RQC {len(q)}"
            case "CTD2":
                return f"RTD2 {format_record(q[0], self.model, self.serial)}" if q else "RND2"
            case "CPQ":
                if q:
                    q.popleft()
                return f"RPQ {len(q)}"
            case "CSN":
                return f"RSN {self.serial}"
            case "CST":
                return f"RST {int(self.model.running)} {len(q)} {self.queue.lost}"
            case _:
                return "ERR UNKNOWN"


@dataclass
class SerialSim:
    server: SerialCounterServer
    device: SimulatedDevice
    clock: Clock
    pty_path: str

    @property
    def model(self) -> ParticleCounter:
        return self.server.model


@asynccontextmanager
async def serve_counter_serial(
    *,
    speed: float = 1.0,
    seed: int = 0,
    device_id: str = "particle-counter-1",
    params: Mapping[str, Any] | None = None,
    faults: list[str] | None = None,
    clock: Clock | None = None,
    pty_link: Path | None = None,
) -> AsyncIterator[SerialSim]:
    """``async with serve_counter_serial(speed=600) as sim:`` → open ``sim.pty_path`` with pyserial."""
    clock = clock or Clock(speed)
    schedule = FaultSchedule.parse(faults)
    device = SimulatedDevice.create(
        "particle_counter", device_id, clock=clock, seed=seed, params=params, faults=schedule
    )
    server = SerialCounterServer(device)
    path = server.start(pty_link)
    try:
        yield SerialSim(server, device, clock, path)
    finally:
        with contextlib.suppress(OSError):
            server.close()
