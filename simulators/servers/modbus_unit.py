"""A Modbus unit id: one simulated device behind its profile's register image.

The base of every unit the Modbus front end serves; device kinds with a map of their own
(the particle counter's record buffer, :mod:`simulators.servers.counter`) extend it. It
lives apart from the front end so that those extensions and the front end that serves
them both import it, and not each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymodbus.constants import ExcCodes

from cleanroom_common.modbus import Table
from simulators.servers.device import SimulatedDevice, Value
from simulators.servers.registers import RegisterImage, slots_of


class ModbusUnit:
    """One unit id: a simulated device behind its profile's register image."""

    def __init__(self, device: SimulatedDevice, profile: Mapping[str, Any]) -> None:
        self.device = device
        self.profile_name = str(profile.get("profile", "?"))
        slots = slots_of(profile)
        self.image = RegisterImage(slots)
        self.setpoints = [s for s in slots if s.table == "holding" and s.name in device.model.SETPOINTS]
        self._filled_at: float | None = None
        """Model time the image was encoded at; ``None`` after anything else changed it."""
        self.image.check_values(self.values(), f"{self.profile_name} on {device.device_id}")

    def values(self) -> Mapping[str, Value]:
        return self.device.values()

    def refresh(self) -> None:
        """Advance the model; re-encode only when it moved on (it steps on a fixed grid, so
        a client polling faster than the step reads the same image) or was written to."""
        self.device.now()
        t = self.device.model.t
        if t != self._filled_at:
            self.image.fill(self.values())
            self._filled_at = t

    def invalidate(self) -> None:
        self._filled_at = None

    def read(self, table: Table, address: int, count: int) -> list[int] | ExcCodes:
        self.refresh()
        words = self.image.read(table, address, count)
        return ExcCodes.ILLEGAL_ADDRESS if words is None else words

    def write(self, table: Table, address: int, words: list[int]) -> ExcCodes | None:
        """Writes reach the model only through its setpoints; everything else is read-only."""
        end = address + len(words)
        hit = [s for s in self.setpoints if s.start < end and address < s.start + s.width]
        if table != "holding" or not hit:
            return ExcCodes.ILLEGAL_ADDRESS
        if any(s.start < address or s.start + s.width > end for s in hit):
            return ExcCodes.ILLEGAL_VALUE  # half of a multi-register value
        for s in hit:
            value = s.value_of(words[s.start - address : s.start - address + s.width])
            try:
                self.device.model.set_setpoint(s.name, value)
            except ValueError:
                return ExcCodes.ILLEGAL_VALUE
        self.invalidate()
        self.refresh()
        return None
