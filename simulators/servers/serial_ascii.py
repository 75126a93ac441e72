"""Serial ASCII particle counter (Lasair-like line protocol) on a pty.

The protocol is specified in docs/simulators.md ("Serial ASCII particle counter
protocol"); its framing, commands and record layout live in
:mod:`cleanroom_common.serial_counter`, which the agent's driver reads by too. This module
is the device: the record queue behind the commands, line input from the pty, and the
communication faults. Every reply carries an NMEA-style XOR checksum so a host can tell a
garbled line from a valid one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanroom_common.serial_counter import (
    ERR_BUSY,
    ERR_CHECKSUM,
    ERR_UNKNOWN,
    NO_RECORD,
    Command,
    CounterRecord,
    FrameError,
    Status,
    format_record,
    format_status,
    frame,
    parse_command,
    reply,
)
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


def wire_record(rec: SampleRecord, model: ParticleCounter, serial: str) -> CounterRecord:
    """A model's sample as the counter reports it: a sample is valid when laser and flow
    were in range and the counts did not overflow."""
    return CounterRecord(
        ts_ns=rec.timestamp_s * 1_000_000_000,
        sensor=model.device_id,
        serial=serial,
        laser_ok=rec.laser_ok,
        flow_ok=rec.flow_ok,
        sample_valid=rec.laser_ok and rec.flow_ok and not rec.overflow,
        sample_time_s=rec.sample_time_s,
        volume=rec.volume_l,
        volume_unit="L",
        channels=tuple(zip(model.params.channels_um, rec.counts, strict=True)),
    )


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
            return frame(ERR_BUSY)
        payload = self.answer(text)
        if fault is not None and fault.kind is CommFault.GARBLED:
            good = frame(payload)
            i = len(payload) // 2
            return good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1 :]  # checksum no longer matches
        return frame(payload)

    def answer(self, text: str) -> str:
        """The reply payload to one command line (without checksum and line end)."""
        try:
            command = parse_command(text)
        except FrameError:
            return ERR_CHECKSUM
        self.device.now()
        self.queue.pull()
        q = self.queue.queue
        match command:
            case Command.START:
                self.model.start()
                return reply(Command.START, 1)
            case Command.STOP:
                self.model.stop()
                return reply(Command.STOP, 1)
            case Command.QUEUED:
                return reply(Command.QUEUED, len(q))
            case Command.READ_OLDEST:
                if not q:
                    return NO_RECORD
                return reply(Command.READ_OLDEST, format_record(wire_record(q[0], self.model, self.serial)))
            case Command.POP_OLDEST:
                if q:
                    q.popleft()
                return reply(Command.POP_OLDEST, len(q))
            case Command.SERIAL:
                return reply(Command.SERIAL, self.serial)
            case Command.STATUS:
                return format_status(Status(self.model.running, len(q), self.queue.lost))
            case _:
                return ERR_UNKNOWN


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
