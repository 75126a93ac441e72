"""One simulated device as every front end sees it: a process model, the shared clock,
and the communication faults to act out.

Front ends never step a model themselves: they ask :meth:`SimulatedDevice.now`, which
advances the model to the clock's simulated time, so a device that nobody polls costs
nothing and every protocol shows the same process at the same instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from simulators.process.base import Clock, ProcessModel, create_model
from simulators.servers.faults import DEFAULT_EXCEPTION_CODE, CommFault, FaultSchedule, FaultWindow

Value = float | bool | str


@dataclass
class SimulatedDevice:
    device_id: str
    model: ProcessModel
    clock: Clock
    faults: FaultSchedule = field(default_factory=FaultSchedule)

    @classmethod
    def create(
        cls,
        kind: str,
        device_id: str,
        *,
        clock: Clock,
        seed: int = 0,
        params: Mapping[str, Any] | None = None,
        faults: FaultSchedule | None = None,
    ) -> SimulatedDevice:
        model = create_model(kind, device_id, seed=seed, params=params, start_time_s=clock.now())
        return cls(device_id, model, clock, faults or FaultSchedule())

    @property
    def kind(self) -> str:
        return self.model.kind

    def now(self) -> float:
        """Advance the model to the clock and return the simulated Unix time."""
        t = self.clock.now()
        self.model.advance(t)
        return t

    def fault(self) -> FaultWindow | None:
        """The communication fault to act out now: a CLI/test window first, else the scenario's
        (with its exception code, when the scenario gives one)."""
        t = self.now()
        window = self.faults.active(t - self.model.start_time_s)
        if window is not None:
            return window
        kind = self.model.comm_fault()
        if kind is None:
            return None
        scheduled = self.model.faults.active(self.model.t)[kind]
        code = getattr(scheduled.params, "code", DEFAULT_EXCEPTION_CODE)
        t0 = self.model.start_time_s
        return FaultWindow(CommFault(kind), scheduled.start_s - t0, scheduled.end_s - t0, code)

    def values(self) -> dict[str, Value]:
        """Every named value a profile may show: signals, status bits and setpoints."""
        out: dict[str, Value] = {}
        out.update(self.model.signals())
        out.update(self.model.status())
        out.update(self.model.setpoints())
        return out
