"""CO2 incubator: chamber temperature, CO2, humidity and (tri-gas) O2 as first-order lags.

Each channel relaxes toward the room when the door is open and toward its controlled
value when it is closed, with actuator limits that set the recovery times people see
on real units: a 30 s opening costs 1–3 °C, most of the CO2 and a third of the
humidity; CO2 is back in ~5–10 min, temperature in ~10–15, RH in ~15–30. CO2 has no
active removal, so an overshoot only decays by leakage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from simulators.process.base import Fault, ModelParams, ProcessModel, Signal, lag_alpha, register
from simulators.process.control import PI, SUPPLY_LOW_BAR, heat_disturbance, supply_factor, supply_pressure

CO2_AMBIENT_PCT = 0.04
O2_AMBIENT_PCT = 20.9


class IncubatorParams(ModelParams):
    """Setpoints and the room the incubator stands in."""

    temperature_setpoint_c: float = Field(37.0, ge=25, le=45)
    """Chamber temperature setpoint."""
    co2_setpoint_pct: float = Field(5.0, ge=0, le=20)
    """CO2 setpoint (cell culture: 5–10 %)."""
    o2_control: bool = False
    """Tri-gas unit: hold O2 at ``o2_setpoint_pct`` by N2 injection (otherwise O2 is whatever air gives)."""
    o2_setpoint_pct: float = Field(5.0, ge=1, le=20.9)
    """O2 setpoint of a tri-gas unit (physiological 2–6 %)."""
    rh_equilibrium_pct: float = Field(95.0, ge=50, le=99)
    """Humidity the water pan holds the closed chamber at."""
    ambient_c: float = Field(22.0, ge=10, le=35)
    """Room temperature."""
    ambient_rh_pct: float = Field(40.0, ge=0, le=100)
    """Room humidity, what the chamber falls toward with the door open."""
    door_alarm_delay_s: float = Field(60.0, ge=0)
    """The door-open alarm sets after the door has been open this long."""
    overtemp_offset_c: float = Field(1.0, gt=0, le=5)
    """Independent over-temperature cut-out, this far above the setpoint."""


@register
class Incubator(ProcessModel):
    """CO2 (optionally tri-gas) incubator with door, supply and heater faults."""

    kind = "incubator"
    Params = IncubatorParams
    SIGNALS: ClassVar[Mapping[str, Signal]] = {
        "temperature_c": Signal("degC", 36.7, 37.3, "Chamber temperature (10 s lag, σ 0.02 °C)."),
        "co2_pct": Signal("%", 4.7, 5.3, "Chamber CO2 (IR sensor: 30 s lag, σ 0.02 %)."),
        "rh_pct": Signal("%", 90.0, 98.0, "Relative humidity (30 s lag, σ 0.3 %)."),
        "o2_pct": Signal("%", 1.0, 21.0, "Chamber O2 (tri-gas: held at setpoint; else ~19.9 % at 5 % CO2)."),
        "co2_supply_bar": Signal("bar", 0.5, 1.2, "CO2 supply pressure (99.5 % CO2 at ~1 bar)."),
        "heater_pct": Signal("%", 0.0, 100.0, "Heater output."),
        "co2_valve_pct": Signal("%", 0.0, 100.0, "CO2 injection valve duty."),
    }
    STATUS = (
        "door_open",
        "door_alarm",
        "over_temp",
        "temp_high",
        "temp_low",
        "co2_high",
        "co2_low",
        "co2_supply_low",
        "o2_alarm",
    )
    FAULTS = frozenset({"door_open", "co2_supply_failure", "temperature_oscillation"})
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float]]] = {
        "temperature_setpoint_c": (25.0, 45.0),
        "co2_setpoint_pct": (0.0, 20.0),
        "o2_setpoint_pct": (1.0, 20.9),
    }

    # Chamber constants (documented in docs/simulators-process.md).
    TAU_LOSS_S = 7200.0  # closed chamber heat loss to the room
    HEAT_MAX_C_PER_S = 0.0065
    TAU_DOOR_TEMP_S = 200.0
    TAU_LEAK_S = 7200.0  # closed chamber gas exchange with the room (CO2 and O2)
    TAU_DOOR_GAS_S = 20.0
    CO2_INJECT_MAX_PCT_S = 0.012
    N2_INJECT_MAX_PCT_S = 0.05
    TAU_RH_S = 480.0
    TAU_DOOR_RH_S = 30.0

    params: IncubatorParams

    def __init__(
        self,
        device_id: str,
        *,
        seed: int,
        params: Mapping[str, Any] | None = None,
        start_time_s: float = 0.0,
    ) -> None:
        super().__init__(device_id, seed=seed, params=params, start_time_s=start_time_s)
        p = self.params
        self.temp = self.temp_meas = p.temperature_setpoint_c
        self.co2 = self.co2_meas = p.co2_setpoint_pct
        self.rh = self.rh_meas = p.rh_equilibrium_pct
        self.o2 = self.o2_meas = self._o2_target()
        self.supply_bar = 1.0
        self.door_open = False
        self.door_alarm = False
        self.over_temp = False
        # Integrators start at the duty that holds each setpoint, so a run starts in control.
        self.heater = (self.temp - p.ambient_c) / self.TAU_LOSS_S / self.HEAT_MAX_C_PER_S
        self.co2_valve = (self.co2 - CO2_AMBIENT_PCT) / self.TAU_LEAK_S / self.CO2_INJECT_MAX_PCT_S
        self.heat_pi = PI(1.0, 1800.0, 0.0, 1.0, self.heater)
        self.co2_pi = PI(1.0, 300.0, 0.0, 1.0, self.co2_valve)
        n2_duty = (
            (O2_AMBIENT_PCT - self.o2) / self.TAU_LEAK_S / self.N2_INJECT_MAX_PCT_S if p.o2_control else 0.0
        )
        self.n2_pi = PI(1.0, 300.0, 0.0, 1.0, n2_duty)

    def _o2_target(self) -> float:
        if self.params.o2_control:
            return self._setpoints["o2_setpoint_pct"]
        return O2_AMBIENT_PCT * (1 - self.co2 / 100)

    def _step(self, t_s: float, dt_s: float, faults: dict[str, Fault]) -> None:
        p = self.params
        n = self.noise
        door = faults.get("door_open")
        self.door_open = door is not None
        self.door_alarm = door is not None and t_s - door.start_s >= p.door_alarm_delay_s
        self.supply_bar = supply_pressure(self.supply_bar, faults, dt_s)

        # Temperature: heater PI, cut out by the independent over-temperature guard.
        sp_t = self._setpoints["temperature_setpoint_c"]
        if self.temp > sp_t + p.overtemp_offset_c:
            self.over_temp = True
        elif self.temp < sp_t + p.overtemp_offset_c / 2:
            self.over_temp = False
        self.heater = 0.0 if self.over_temp else self.heat_pi.update(sp_t - self.temp_meas, dt_s)
        loss = (self.temp - p.ambient_c) / (self.TAU_DOOR_TEMP_S if self.door_open else self.TAU_LOSS_S)
        disturbance = heat_disturbance(faults, t_s)
        if self.over_temp:  # the cut-out opens the heating circuit, faulty part included
            disturbance = min(0.0, disturbance)
        self.temp += (self.heater * self.HEAT_MAX_C_PER_S - loss + disturbance) * dt_s

        # CO2: injection (rate-limited, supply-limited) against leakage; no active removal.
        self.co2_valve = self.co2_pi.update(self._setpoints["co2_setpoint_pct"] - self.co2_meas, dt_s)
        inject = self.co2_valve * self.CO2_INJECT_MAX_PCT_S * supply_factor(self.supply_bar)
        self.co2 += inject * dt_s
        self.co2 += lag_alpha(dt_s, self._gas_tau()) * (CO2_AMBIENT_PCT - self.co2)

        # O2: leaks toward air; a tri-gas unit pushes it down with N2.
        air_o2 = O2_AMBIENT_PCT * (1 - self.co2 / 100)
        self.o2 += lag_alpha(dt_s, self._gas_tau()) * (air_o2 - self.o2)
        if p.o2_control:
            n2 = self.n2_pi.update(self.o2_meas - self._setpoints["o2_setpoint_pct"], dt_s)
            self.o2 = max(0.0, self.o2 - n2 * self.N2_INJECT_MAX_PCT_S * dt_s)

        # Humidity: the pan pulls toward equilibrium; an open door toward the room.
        if self.door_open:
            self.rh += lag_alpha(dt_s, self.TAU_DOOR_RH_S) * (p.ambient_rh_pct - self.rh)
        else:
            self.rh += lag_alpha(dt_s, self.TAU_RH_S) * (p.rh_equilibrium_pct - self.rh)

        self.temp_meas += lag_alpha(dt_s, 10.0) * (self.temp + 0.02 * n.normal() - self.temp_meas)
        self.co2_meas += lag_alpha(dt_s, 30.0) * (self.co2 + 0.02 * n.normal() - self.co2_meas)
        self.rh_meas += lag_alpha(dt_s, 30.0) * (self.rh + 0.3 * n.normal() - self.rh_meas)
        self.o2_meas += lag_alpha(dt_s, 30.0) * (self.o2 + 0.02 * n.normal() - self.o2_meas)

    def _gas_tau(self) -> float:
        return self.TAU_DOOR_GAS_S if self.door_open else self.TAU_LEAK_S

    def signals(self) -> dict[str, float]:
        return {
            "temperature_c": self.temp_meas,
            "co2_pct": self.co2_meas,
            "rh_pct": min(100.0, max(0.0, self.rh_meas)),
            "o2_pct": self.o2_meas,
            "co2_supply_bar": self.supply_bar,
            "heater_pct": 100.0 * self.heater,
            "co2_valve_pct": 100.0 * self.co2_valve,
        }

    def status(self) -> dict[str, bool]:
        sp_t = self._setpoints["temperature_setpoint_c"]
        sp_co2 = self._setpoints["co2_setpoint_pct"]
        o2_off = abs(self.o2_meas - self._setpoints["o2_setpoint_pct"])
        return {
            "door_open": self.door_open,
            "door_alarm": self.door_alarm,
            "over_temp": self.over_temp,
            "temp_high": self.temp_meas > sp_t + 0.5,
            "temp_low": self.temp_meas < sp_t - 0.5,
            "co2_high": self.co2_meas > sp_co2 + 1.0,
            "co2_low": self.co2_meas < sp_co2 - 1.0,
            "co2_supply_low": self.supply_bar < SUPPLY_LOW_BAR,
            "o2_alarm": self.params.o2_control and o2_off > 1.0,
        }
