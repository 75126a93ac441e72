"""Particle counters on the wire: the Lighthouse-like Modbus record map and the record
queue the serial (Lasair-like) front end drains.

Both show the model's sample records (:class:`simulators.process.particle_counter.SampleRecord`)
the way the real instruments do: the Modbus counter exposes its rotating buffer through
a record index register, the serial counter a queue the host pops. Commands (start,
stop, clear buffer, set clock) act on the model, so a cleared buffer or a moved clock is
visible in every later record.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

from pymodbus.constants import ExcCodes

from cleanroom_common.modbus import Table, locate
from simulators.process.particle_counter import ParticleCounter, SampleRecord, channel_key
from simulators.servers.device import SimulatedDevice, Value
from simulators.servers.modbus_unit import ModbusUnit

COMMAND_REGISTER = 40002
"""Holding register taking commands (Lighthouse REMOTE map)."""
CLOCK_SET_REGISTER = 40035
"""Holding registers 40035–36: the Unix time command 13 sets the clock to (u32, high word first)."""
CMD_START, CMD_STOP, CMD_CLEAR, CMD_SET_CLOCK = 11, 12, 3, 13
NEWEST = 0xFFFF
MAP_VERSION = 1
FIRMWARE = 112
MODEL_NAME = "CLEANROOM-SIM REMOTE 3104"


def counter_model(device: SimulatedDevice) -> ParticleCounter:
    if not isinstance(device.model, ParticleCounter):
        raise ValueError(f"{device.device_id}: a counter front end needs a particle_counter model")
    return device.model


def serial_number(device_id: str) -> int:
    """A stable 6-digit serial per device id (the same in every run and protocol)."""
    digest = hashlib.blake2b(device_id.encode(), digest_size=4).digest()
    return 100000 + int.from_bytes(digest, "big") % 900000


def record_values(model: ParticleCounter, rec: SampleRecord | None) -> dict[str, Value]:
    """The record fields under the names the counter profiles use (zeros when no record)."""
    keys = [channel_key(d) for d in model.params.channels_um]
    out: dict[str, Value] = {
        "sample_end_ts": rec.timestamp_s if rec else 0,
        "sample_time_s": round(rec.sample_time_s) if rec else 0,
        "location": rec.location if rec else 0,
        "laser_fault": bool(rec and not rec.laser_ok),
        "flow_fault": bool(rec and not rec.flow_ok),
        "overflow": bool(rec and rec.overflow),
        "service_due": bool(rec and rec.service),
        "threshold_high": bool(rec and rec.threshold_high),
    }
    for i, key in enumerate(keys):
        out[f"count_{key}"] = rec.counts[i] if rec else 0
    return out


def _holding(address: int) -> int:
    """PDU address of a holding register written in vendor notation (the counter's map is fixed)."""
    return locate(address, "holding")[1]


class CounterUnit(ModbusUnit):
    """A remote counter's Modbus map: live status in holding registers, the record chosen
    by the index register in the input registers."""

    def __init__(self, device: SimulatedDevice, profile: Mapping[str, Any]) -> None:
        self.model = counter_model(device)
        spec = cast(dict[str, Any], profile["groups"]["records"]["records"])
        self.count_reg = _holding(int(spec["count_address"]))
        self.index_reg = _holding(int(spec["index_address"]))
        self.command_reg = _holding(COMMAND_REGISTER)
        self.clock_reg = _holding(CLOCK_SET_REGISTER)
        self.selected = NEWEST
        self.read_upto = -1
        """Highest record index shown in the input registers (drives the new-data bit)."""
        self.serial = serial_number(device.device_id)
        super().__init__(device, profile)
        self.image.extend("holding", self.clock_reg + 2)

    def _selected_record(self) -> SampleRecord | None:
        buf = self.model.buffer
        if not buf:
            return None
        i = len(buf) - 1 if self.selected == NEWEST else self.selected
        return buf[i] if 0 <= i < len(buf) else None

    def values(self) -> Mapping[str, Value]:
        m = self.model
        st = m.status()
        newest = m.buffer[-1].index if m.buffer else -1
        out: dict[str, Value] = {
            "map_version": MAP_VERSION,
            "running": st["running"],
            "sampling": st["sampling"],
            "new_data": newest > self.read_upto,
            "device_error": not (st["laser_ok"] and st["flow_ok"]),
            "laser_alarm": not st["laser_ok"],
            "flow_alarm": not st["flow_ok"],
            "service_alarm": st["service"],
            "threshold_alarm": st["threshold_high"],
            "firmware_version": FIRMWARE,
            "serial_number": self.serial,
            "model_name": MODEL_NAME,
            "flow_lpm": m.signals()["flow_lpm"],
            "record_count": len(m.buffer),
            "device_clock": int(m.device_time()),
            "sample_period_s": round(m.params.sample),
        }
        out.update(record_values(m, self._selected_record()))
        return out

    def refresh(self) -> None:
        super().refresh()
        self.image.tables["holding"][self.index_reg] = self.selected

    def read(self, table: Table, address: int, count: int) -> list[int] | ExcCodes:
        words = super().read(table, address, count)
        rec = self._selected_record()
        if (
            table == "input"
            and rec is not None
            and not isinstance(words, ExcCodes)
            and rec.index > self.read_upto
        ):
            self.read_upto = rec.index
            self.invalidate()  # the new-data bit changes
        return words

    def write(self, table: Table, address: int, words: list[int]) -> ExcCodes | None:
        """Index selection, clock staging and commands; the rest of the map is read-only."""
        if table != "holding":
            return ExcCodes.ILLEGAL_ADDRESS
        writable = {self.index_reg, self.command_reg, self.clock_reg, self.clock_reg + 1}
        regs = range(address, address + len(words))
        if any(r not in writable for r in regs):
            return ExcCodes.ILLEGAL_ADDRESS
        self.device.now()
        command = None
        for r, w in zip(regs, words, strict=True):
            if r == self.command_reg:
                command = w
            elif r == self.index_reg:
                self.selected = w
            else:
                self.image.tables["holding"][r] = w
        if command is not None:
            error = self._command(command)
            if error is not None:
                return error
        self.invalidate()
        self.refresh()
        return None

    def _command(self, code: int) -> ExcCodes | None:
        m = self.model
        if code == CMD_START:
            m.start()
        elif code == CMD_STOP:
            m.stop()
        elif code == CMD_CLEAR:
            m.clear_records()
        elif code == CMD_SET_CLOCK:
            hi, lo = (int(x) for x in self.image.tables["holding"][self.clock_reg : self.clock_reg + 2])
            m.set_clock((hi << 16) | lo)
        else:
            return ExcCodes.ILLEGAL_VALUE
        return None


class RecordQueue:
    """The serial counter's queue of records not yet popped by the host.

    Fed from the model's record stream by index, so every record enters exactly once
    however irregularly the host polls; a full queue drops its oldest record and counts
    it, so the loss is visible (``CST``) instead of silent.
    """

    def __init__(self, model: ParticleCounter, capacity: int = 3000) -> None:
        self.model = model
        self.queue: deque[SampleRecord] = deque()
        self.capacity = capacity
        self.lost = 0
        self._seen = model.buffer[-1].index if model.buffer else -1
        """Index of the last record taken (records before the queue existed are not owed)."""

    def pull(self) -> None:
        """Take the records completed since the last pull (call after advancing the model)."""
        for rec in self.model.records_since(self._seen):
            self.lost += rec.index - self._seen - 1  # rotated out of the sensor's buffer unseen
            if len(self.queue) >= self.capacity:
                self.queue.popleft()
                self.lost += 1
            self.queue.append(rec)
            self._seen = rec.index
