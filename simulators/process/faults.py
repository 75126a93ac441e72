"""Fault kinds the scenario engine can inject, and the parameters each one accepts.

A fault is an interval of simulated time during which a model behaves wrongly in one
documented way. Process faults change the physics or a sensor; communication faults
leave the process alone and are only *reported* (``ProcessModel.comm_fault()``) so the
protocol front ends can time out, garble, raise an exception or drop the link. Every
occurrence is also a ground-truth label ``(kind, device, start, end)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from cleanroom_common.fields import Duration, Strict


class NoParams(Strict):
    """Fault kinds whose behaviour needs no tuning."""


class Co2SupplyFailureParams(Strict):
    """Cylinder running empty: supply pressure falls linearly from its nominal value."""

    decline_bar_per_h: float = Field(0.25, gt=0)
    """Pressure loss rate; at the default 0.25 bar/h a 1 bar supply is empty after 4 h."""


class TemperatureOscillationParams(Strict):
    """A heater/jacket disturbance the controller cannot cancel (e.g. a failing relay)."""

    amplitude_c: float = Field(1.0, gt=0, le=5)
    """Amplitude of the periodic heat disturbance, in °C of open-loop temperature swing."""
    period: Duration = 1200.0
    """Period of the disturbance (default 20 min)."""


class PhDriftParams(Strict):
    """Reference-electrode ageing: the probe's reading drifts linearly from the true pH."""

    rate_ph_per_day: float = Field(0.05, ge=-0.5, le=0.5)
    """Drift of (measured − true) pH per day; real probes drift 0.02–0.1 pH/day."""


class DoStuckParams(Strict):
    """DO sensor flat line: the reading freezes (or jumps to a rail) for the window."""

    value: float | None = Field(None, ge=0, le=200)
    """Reading to show (e.g. 0 or 100 % for a rail); empty freezes the last good reading."""


class ContaminationParams(Strict):
    """Bacterial contamination: a fast-growing population that eats O2 and acidifies."""

    doubling: Duration = 1800.0
    """Bacterial doubling time (default 30 min; T cells take 13–24 h)."""
    initial_per_ml: float = Field(1000.0, gt=0)
    """Bacteria per mL when the fault starts."""


class BagLeakParams(Strict):
    """A pin-hole or weld leak in the culture bag: liquid (with cells) is lost."""

    rate_ml_per_h: float = Field(20.0, gt=0, le=1000)
    """Liquid lost per hour; the weight falls without a harvest."""


class ParticleFactorParams(Strict):
    """Extra particles on top of the room's background concentration."""

    factor: float = Field(30.0, ge=1)
    """Multiplier of the background concentration at 0.5 µm during the window."""


class ParticleBurstParams(Strict):
    """An intervention (operator arm in the zone): many more, and larger, particles."""

    factor: float = Field(300.0, ge=1)
    """Multiplier of the background concentration at 0.5 µm during the window."""
    size_exponent: float = Field(1.2, gt=0)
    """Size-distribution slope during the burst (background: ISO's 2.08; people shed larger particles)."""


class CounterFlowFaultParams(Strict):
    """Sample pump degradation: less air is sampled than the counter assumes."""

    flow_lpm: float = Field(12.0, ge=0)
    """Actual sample flow during the fault (nominal 28.3 L/min); the flow-OK bit clears."""


class CommExceptionParams(Strict):
    """A protocol-level error reply instead of data."""

    code: int = Field(4, ge=1, le=255)
    """Modbus exception code to answer with (4 = slave device failure); other protocols map it."""


FAULT_PARAMS: dict[str, type[Strict]] = {
    "door_open": NoParams,
    "co2_supply_failure": Co2SupplyFailureParams,
    "temperature_oscillation": TemperatureOscillationParams,
    "ph_drift": PhDriftParams,
    "do_stuck": DoStuckParams,
    "contamination": ContaminationParams,
    "agitation_failure": NoParams,
    "bag_leak": BagLeakParams,
    "particle_burst": ParticleBurstParams,
    "particle_elevation": ParticleFactorParams,
    "counter_flow_fault": CounterFlowFaultParams,
    "laser_failure": NoParams,
    "comm_timeout": NoParams,
    "comm_garbled": NoParams,
    "comm_exception": CommExceptionParams,
    "comm_disconnect": NoParams,
}
"""Every fault kind and the model of its ``params:`` block in a scenario."""

COMM_FAULTS = frozenset(k for k in FAULT_PARAMS if k.startswith("comm_"))
"""Faults the protocol front ends act on; the process itself is untouched."""


@dataclass(frozen=True)
class Fault:
    """One fault occurrence on one device, in simulated Unix seconds ``[start_s, end_s)``."""

    kind: str
    start_s: float
    end_s: float
    params: Strict

    @classmethod
    def make(cls, kind: str, start_s: float, end_s: float, params: dict[str, Any] | None = None) -> Fault:
        """Validate kind and params so a typo fails when the scenario loads, not mid-run."""
        if kind not in FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(sorted(FAULT_PARAMS))}")
        if end_s < start_s:
            raise ValueError("a fault cannot end before it starts")
        return cls(kind, float(start_s), float(end_s), FAULT_PARAMS[kind].model_validate(params or {}))

    def active(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s


class FaultSet:
    """The faults scheduled on one device; models ask it what is active at a time."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)
        self._faults.sort(key=lambda f: f.start_s)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self._faults)

    def active(self, t_s: float) -> dict[str, Fault]:
        """Active faults by kind (if two of a kind overlap, the earlier one wins)."""
        out: dict[str, Fault] = {}
        for f in self._faults:
            if f.start_s > t_s:
                break
            if f.active(t_s) and f.kind not in out:
                out[f.kind] = f
        return out

    def comm_fault(self, t_s: float) -> str | None:
        """The communication fault the front end should act out now, if any."""
        for kind in self.active(t_s):
            if kind in COMM_FAULTS:
                return kind
        return None
