"""Control loops and disturbances shared by the models (one implementation, several devices)."""

from __future__ import annotations

import math
from typing import cast

from simulators.process.faults import Co2SupplyFailureParams, Fault, TemperatureOscillationParams


class PI:
    """PI controller with a clamped output and conditional integration.

    The integrator holds while the output is saturated in the direction of the error,
    so a door opening or a supply outage does not wind it up into a long overshoot.
    """

    def __init__(self, kp: float, ti_s: float, low: float, high: float, i0: float = 0.0) -> None:
        self.kp, self.ki, self.low, self.high = kp, kp / ti_s, low, high
        self.i = min(high, max(low, i0))

    def update(self, err: float, dt_s: float) -> float:
        out = self.i + self.kp * err
        if not ((out >= self.high and err > 0) or (out <= self.low and err < 0)):
            self.i = min(self.high, max(self.low, self.i + self.ki * err * dt_s))
            out = self.i + self.kp * err
        return min(self.high, max(self.low, out))


def heat_disturbance(faults: dict[str, Fault], t_s: float) -> float:
    """Rate (°C/s) of a ``temperature_oscillation`` heat disturbance; open loop it swings ±amplitude."""
    osc = faults.get("temperature_oscillation")
    if osc is None:
        return 0.0
    p = cast(TemperatureOscillationParams, osc.params)
    w = 2 * math.pi / p.period
    return p.amplitude_c * w * math.cos(w * (t_s - osc.start_s))


def supply_pressure(bar: float, faults: dict[str, Fault], dt_s: float, nominal: float = 1.0) -> float:
    """CO2 supply pressure: nominal, or falling linearly while a ``co2_supply_failure`` lasts.

    The cylinder is swapped when the window ends, so pressure is nominal again.
    """
    fail = faults.get("co2_supply_failure")
    if fail is None:
        return nominal
    decline = cast(Co2SupplyFailureParams, fail.params).decline_bar_per_h
    return max(0.0, bar - decline * dt_s / 3600.0)


SUPPLY_LOW_BAR = 0.5
"""Below this the CO2 mass-flow controller / valve cannot deliver its full rate; the low-supply bit sets."""


def supply_factor(bar: float) -> float:
    """Fraction of the requested CO2 flow a supply at ``bar`` can deliver."""
    return min(1.0, bar / SUPPLY_LOW_BAR)
