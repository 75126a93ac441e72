"""Rocking-bag bioreactor running a 7–14 day T-cell expansion.

Mass balances, not curve fits, so that faults show the signatures a process engineer
expects: contamination crashes DO faster than the T cells' own oxygen uptake could;
a drifting pH probe makes the controller move the *true* pH; a lost CO2 supply lets
the pH climb. Constants and ranges are documented in ``docs/simulators-process.md``.

Units inside: time in hours for biology (rates per h), seconds for control loops;
cell densities in 1e6 cells/mL; concentrations in mM; DO in % air saturation;
dissolved CO2 as the equivalent gas-phase % (1 % = 7.13 mmHg = 0.219 mM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, cast

from pydantic import Field, model_validator

from simulators.process.base import Fault, ModelParams, ProcessModel, Signal, lag_alpha, register
from simulators.process.control import PI, SUPPLY_LOW_BAR, heat_disturbance, supply_factor, supply_pressure
from simulators.process.faults import BagLeakParams, ContaminationParams, DoStuckParams, PhDriftParams

O2_AIR = 0.2095
HCO3_FRESH_MM = 24.0  # bicarbonate of fresh medium
CO2_MM_PER_PCT = 0.219  # dissolved CO2 (mM) per % CO2 in equilibrium gas at 37 °C
RESIDUAL_CO2_PCT = 1.0  # respiration CO2 that never leaves the liquid film; caps pH near 8.1 with no CO2
O2_SAT_MM = 0.21  # dissolved O2 at 100 % air saturation, 37 °C
Q_O2_T = 0.15  # T-cell O2 uptake, mM/h per 1e6 cells/mL (0.15 pmol/cell/h)
Q_O2_B = 0.005  # bacterial O2 uptake, mM/h per 1e6 cells/mL
Q_ACID_T = 0.167  # T-cell lactate (bicarbonate consumed), mM/h per 1e6 cells/mL (4 pmol/cell/day)
Q_ACID_B = 0.02  # bacterial acid, mM/h per 1e6 cells/mL
BACTERIA_MAX = 5000.0  # stationary phase, 1e6/mL
BASE_M = 1.0  # base (NaHCO3/Na2CO3 equivalent) concentration, mol/L


class BioreactorParams(ModelParams):
    """Process and controller settings of one bioreactor."""

    temperature_setpoint_c: float = Field(37.0, ge=30, le=40)
    """Culture temperature setpoint (control within ±0.5 °C)."""
    ph_setpoint: float = Field(7.2, ge=6.8, le=7.6)
    """pH setpoint; CO2 in the overlay lowers pH, base raises it."""
    ph_deadband: float = Field(0.05, ge=0, le=0.2)
    """No pH action while |pH − setpoint| is within this band (real units: 0.05–0.1)."""
    do_setpoint_pct: float = Field(40.0, ge=5, le=100)
    """Dissolved-oxygen setpoint, % air saturation (typical 20–50)."""
    agitation_min_rpm: float = Field(10.0, ge=2, le=40)
    """Rocking rate at the bottom of the DO cascade."""
    agitation_max_rpm: float = Field(25.0, ge=2, le=40)
    """Rocking rate at which the DO cascade moves on to air flow."""
    seed_vcd_e6_per_ml: float = Field(0.3, gt=0, le=5)
    """Viable cell density at inoculation."""
    max_vcd_e6_per_ml: float = Field(6.5, gt=0, le=50)
    """Density at which growth stops (logistic limit; T-cell runs reach ~6e6/mL)."""
    mu_max_per_h: float = Field(0.04, gt=0, le=0.1)
    """Maximum specific growth rate (T cells: 0.03–0.05 h⁻¹, doubling 13–24 h)."""
    activation_h: float = Field(36.0, ge=0, le=120)
    """Activation lag: growth ramps linearly to full rate over this many hours after seeding."""
    initial_volume_l: float = Field(0.5, gt=0, le=25)
    """Working volume at inoculation."""
    final_volume_l: float = Field(1.0, gt=0, le=25)
    """Working volume after the fed-batch phase."""
    feed_start_day: float = Field(2.0, ge=0)
    """Culture day the fed-batch volume increase starts."""
    feed_end_day: float = Field(5.0, ge=0)
    """Culture day the volume reaches ``final_volume_l``."""
    perfusion_start_vcd: float = Field(2.0, gt=0)
    """Perfusion starts once the density first reaches this (1e6/mL)."""
    perfusion_vvd: float = Field(1.0, ge=0, le=5)
    """Full perfusion rate in vessel volumes per day, reached at 4e6/mL."""
    run_days: float = Field(14.0, gt=0, le=60)
    """Batch length; after it a new batch is seeded (so long ground-truth runs cycle)."""
    ambient_c: float = Field(22.0, ge=10, le=35)
    """Room temperature the bag loses heat to."""

    @model_validator(mode="after")
    def _consistent(self) -> BioreactorParams:
        if self.agitation_min_rpm > self.agitation_max_rpm:
            raise ValueError("agitation_min_rpm must not exceed agitation_max_rpm")
        if self.feed_end_day < self.feed_start_day or self.final_volume_l < self.initial_volume_l:
            raise ValueError("the fed-batch phase must end after it starts and not shrink the volume")
        return self


@register
class Bioreactor(ProcessModel):
    """T-cell expansion with temperature, pH (CO2/base), DO cascade and perfusion control."""

    kind = "bioreactor"
    Params = BioreactorParams
    SIGNALS: ClassVar[Mapping[str, Signal]] = {
        "temperature_c": Signal("degC", 36.5, 37.5, "Culture temperature (probe: 30 s lag, σ 0.02 °C)."),
        "ph": Signal("pH", 7.05, 7.35, "pH probe reading (30 s lag, σ 0.005); what the controller acts on."),
        "do_pct": Signal("%", 25.0, 60.0, "Dissolved O2, % air saturation (20 s lag, σ 0.3)."),
        "agitation_rpm": Signal("rpm", 0.0, 40.0, "Rocking rate actually applied."),
        "air_flow_slpm": Signal("slpm", 0.0, 1.0, "Air to the overlay."),
        "o2_flow_slpm": Signal("slpm", 0.0, 1.0, "O2 to the overlay (top of the DO cascade)."),
        "co2_flow_slpm": Signal("slpm", 0.0, 1.0, "CO2 to the overlay (pH control, delivered)."),
        "n2_flow_slpm": Signal("slpm", 0.0, 1.0, "N2 to the overlay (strips O2 when DO is above setpoint)."),
        "weight_kg": Signal("kg", 0.3, 25.0, "Net bag weight (load cell, σ 2 g)."),
        "volume_l": Signal("L", 0.3, 25.0, "Working volume."),
        "vcd_e6_per_ml": Signal("1e6/mL", 0.1, 8.0, "Viable cell density (capacitance probe, σ 1 %)."),
        "viability_pct": Signal("%", 80.0, 100.0, "Viable / total cells."),
        "base_added_ml": Signal("mL", 0.0, 1e4, "Base pumped since inoculation (1 M)."),
        "perfusion_vvd": Signal("1/d", 0.0, 5.0, "Perfusion rate, vessel volumes per day."),
        "culture_day": Signal("d", 0.0, 60.0, "Time since inoculation of the current batch."),
        "heater_pct": Signal("%", 0.0, 100.0, "Heater output."),
        "gas_supply_bar": Signal("bar", 0.5, 1.2, "CO2 supply pressure."),
    }
    STATUS = (
        "running",
        "temp_high",
        "temp_low",
        "ph_high",
        "ph_low",
        "do_low",
        "agitation_fault",
        "gas_supply_low",
        "base_pump_on",
    )
    FAULTS = frozenset(
        {
            "temperature_oscillation",
            "ph_drift",
            "do_stuck",
            "contamination",
            "agitation_failure",
            "co2_supply_failure",
            "bag_leak",
        }
    )
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float]]] = {
        "temperature_setpoint_c": (30.0, 40.0),
        "ph_setpoint": (6.8, 7.6),
        "do_setpoint_pct": (5.0, 100.0),
    }

    params: BioreactorParams

    # Control constants (documented in docs/simulators-process.md).
    TAU_LOSS_S = 5400.0
    HEAT_MAX_C_PER_S = 0.006
    AIR_MIN, AIR_MAX = 0.1, 0.5
    O2_MAX, N2_MAX = 0.3, 0.3
    CO2_MAX_PCT = 15.0
    BASE_ML_PER_MIN = 0.2
    KLA0_PER_H, KLA_SURFACE_PER_H = 2.0, 0.3

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
        # Plant and sensor state. Controllers start at their steady state, so a run
        # begins in control instead of with a start-up transient.
        self.temp_true = p.temperature_setpoint_c
        self.temp_meas = self.temp_true
        self.heater = (self.temp_true - p.ambient_c) / self.TAU_LOSS_S / self.HEAT_MAX_C_PER_S
        self.heat_pi = PI(0.5, 600.0, 0.0, 1.0, self.heater)
        self.do_pi = PI(0.02, 900.0, -1.0, 1.0, -0.65)
        self.co2_pi = PI(20.0, 1800.0, 0.0, self.CO2_MAX_PCT)
        self.age_h = 0.0
        self.supply_bar = 1.0
        self.agitation = p.agitation_min_rpm
        self.air = self.AIR_MIN
        self.o2 = 0.0
        self.n2 = 0.0
        self.co2 = 0.0
        self.base_on = False
        self.ph_offset = 0.0
        self.do_frozen: float | None = None
        self._batch_start_s = self.start_time_s
        self._seed_culture()
        # Zero-length control passes so flows read their steady values before the first step.
        self._do_cascade(0.0, {})
        self._ph_control(0.0)

    def _seed_culture(self) -> None:
        """Inoculate a fresh bag: new medium, seed cells, controllers kept.

        Called at start-up, ``run_days`` after the last inoculation, and when a
        contamination window closes (the bag is discarded and the run restarted).
        """
        p = self.params
        self.volume = p.initial_volume_l
        self.xv = p.seed_vcd_e6_per_ml
        self.xd = self.xv * 0.05 / 0.95
        self.bacteria = 0.0
        self.hco3 = HCO3_FRESH_MM
        self.base_ml = 0.0
        self.perfusing = False
        self.perfusion = 0.0
        sp = self._setpoints["ph_setpoint"]
        self.dco2 = self.hco3 / (CO2_MM_PER_PCT * 10 ** (sp - 6.1)) - RESIDUAL_CO2_PCT
        self.co2_pi.i = self.dco2
        self.ph_true = sp
        self.ph_meas = sp
        self.do_true = self._setpoints["do_setpoint_pct"]
        self.do_meas = self.do_true
        self.vcd_meas = self.xv
        self.weight = self.volume * 1.01

    def _step(self, t_s: float, dt_s: float, faults: dict[str, Fault]) -> None:
        if t_s - self._batch_start_s >= self.params.run_days * 86400.0 or self._contamination_ended(faults):
            self._batch_start_s = t_s
            self._seed_culture()
        age_h = (t_s - self._batch_start_s) / 3600.0
        dt_h = dt_s / 3600.0
        n = self.noise

        self._temperature(t_s, dt_s, faults)
        self._gas_supply(dt_s, faults)
        self._do_cascade(dt_s, faults)
        self._ph_control(dt_s)
        self._liquid_phase(dt_h, age_h, faults)

        # Sensors (fixed noise draws per step keep the stream aligned across runs).
        a = lag_alpha(dt_s, 30.0)
        self.temp_meas += a * (self.temp_true + 0.02 * n.normal() - self.temp_meas)
        drift = faults.get("ph_drift")
        if drift is not None:
            rate = cast(PhDriftParams, drift.params).rate_ph_per_day
            self.ph_offset = rate * (t_s - drift.start_s) / 86400.0
        else:
            self.ph_offset = 0.0
        self.ph_meas += a * (self.ph_true + self.ph_offset + 0.005 * n.normal() - self.ph_meas)
        do_reading = self.do_meas + lag_alpha(dt_s, 20.0) * (self.do_true + 0.3 * n.normal() - self.do_meas)
        stuck = faults.get("do_stuck")
        if stuck is None:
            self.do_frozen = None
            self.do_meas = max(0.0, do_reading)
        else:
            if self.do_frozen is None:
                value = cast(DoStuckParams, stuck.params).value
                self.do_frozen = self.do_meas if value is None else value
            self.do_meas = self.do_frozen
        self.vcd_meas = max(0.0, self.xv * (1.0 + 0.01 * n.normal()))
        self.weight = self.volume * 1.01 + 0.002 * n.normal()

    def _contamination_ended(self, faults: dict[str, Fault]) -> bool:
        """The batch is discarded when a contamination window closes; the next one is seeded."""
        return self.bacteria > 0 and "contamination" not in faults

    def _temperature(self, t_s: float, dt_s: float, faults: dict[str, Fault]) -> None:
        p = self.params
        self.heater = self.heat_pi.update(self._setpoints["temperature_setpoint_c"] - self.temp_meas, dt_s)
        loss = (self.temp_true - p.ambient_c) / self.TAU_LOSS_S
        self.temp_true += (self.heater * self.HEAT_MAX_C_PER_S - loss + heat_disturbance(faults, t_s)) * dt_s

    def _gas_supply(self, dt_s: float, faults: dict[str, Fault]) -> None:
        self.supply_bar = supply_pressure(self.supply_bar, faults, dt_s)

    def _do_cascade(self, dt_s: float, faults: dict[str, Fault]) -> None:
        """DO PI controller whose output ``u`` in [-1, 1] walks N2 → agitation → air → O2."""
        p = self.params
        u = self.do_pi.update(self._setpoints["do_setpoint_pct"] - self.do_meas, dt_s)
        span = p.agitation_max_rpm - p.agitation_min_rpm
        self.n2 = -u * self.N2_MAX if u < 0 else 0.0
        self.agitation = p.agitation_min_rpm + span * min(1.0, max(0.0, 3 * u))
        self.air = self.AIR_MIN + (self.AIR_MAX - self.AIR_MIN) * min(1.0, max(0.0, 3 * u - 1))
        self.o2 = self.O2_MAX * min(1.0, max(0.0, 3 * u - 2))
        if "agitation_failure" in faults:
            self.agitation = 0.0

    def _ph_control(self, dt_s: float) -> None:
        """CO2 first (PI with deadband), base only once CO2 is nearly off."""
        sp = self._setpoints["ph_setpoint"]
        db = self.params.ph_deadband
        err = self.ph_meas - sp
        eff = 0.0 if abs(err) <= db else err - math.copysign(db, err)
        co2_pct = self.co2_pi.update(eff, dt_s)
        if self.base_on:
            self.base_on = self.ph_meas < sp - db / 2
        else:
            self.base_on = self.ph_meas < sp - db and co2_pct < 1.0
        carrier = self.air + self.o2 + self.n2
        frac = co2_pct / 100.0
        self.co2 = frac / (1.0 - frac) * carrier * supply_factor(self.supply_bar)

    def _liquid_phase(self, dt_h: float, age_h: float, faults: dict[str, Fault]) -> None:
        p = self.params
        total = self.air + self.o2 + self.n2 + self.co2
        y_o2 = (O2_AIR * self.air + self.o2) / total
        y_co2 = self.co2 / total
        kla = self.KLA0_PER_H * (self.agitation / 10.0) ** 0.7 * (total / 0.2) ** 0.3 + self.KLA_SURFACE_PER_H

        contamination = faults.get("contamination")
        if contamination is not None:
            cp = cast(ContaminationParams, contamination.params)
            if self.bacteria == 0.0:
                self.bacteria = cp.initial_per_ml / 1e6
            mu_b = math.log(2) / (cp.doubling / 3600.0)
            self.bacteria = min(BACTERIA_MAX, self.bacteria * math.exp(mu_b * dt_h))

        our_mm = Q_O2_T * self.xv + Q_O2_B * self.bacteria
        do_star = 100.0 * y_o2 / O2_AIR
        otr = kla * (do_star - self.do_true)
        self.do_true = max(0.0, self.do_true + (otr - our_mm / O2_SAT_MM * 100) * dt_h)

        kla_co2 = 0.9 * kla
        ctr = kla_co2 * (100 * y_co2 - self.dco2)
        self.dco2 = max(0.0, self.dco2 + (ctr + our_mm / CO2_MM_PER_PCT) * dt_h)

        # Volume: fed-batch ramp, then perfusion (in = out, cells retained by the filter).
        feed_days = max(p.feed_end_day - p.feed_start_day, 1e-9)
        feed_l_per_h = 0.0
        if p.feed_start_day * 24 <= age_h < p.feed_end_day * 24 and self.volume < p.final_volume_l:
            feed_l_per_h = (p.final_volume_l - p.initial_volume_l) / (feed_days * 24)
        base_l_per_h = self.BASE_ML_PER_MIN * 60 / 1000 if self.base_on else 0.0
        if self.xv >= p.perfusion_start_vcd:
            self.perfusing = True
        self.perfusion = p.perfusion_vvd * min(1.0, self.xv / 4.0) if self.perfusing else 0.0
        dilution = (feed_l_per_h + base_l_per_h) / self.volume  # per h, cells and solutes
        exchange = self.perfusion / 24.0 + feed_l_per_h / self.volume  # per h, fresh medium in

        acid = Q_ACID_T * self.xv + Q_ACID_B * self.bacteria
        base_mm = base_l_per_h * BASE_M * 1000 / self.volume
        self.hco3 = max(0.3, self.hco3 + (-acid + exchange * (HCO3_FRESH_MM - self.hco3) + base_mm) * dt_h)
        self.ph_true = 6.1 + math.log10(self.hco3 / (CO2_MM_PER_PCT * (self.dco2 + RESIDUAL_CO2_PCT)))
        self.base_ml += base_l_per_h * 1000 * dt_h
        leak = faults.get("bag_leak")
        leak_l_per_h = cast(BagLeakParams, leak.params).rate_ml_per_h / 1000 if leak is not None else 0.0
        self.volume = max(0.05, self.volume + (feed_l_per_h + base_l_per_h - leak_l_per_h) * dt_h)

        # Cells: logistic growth after activation, slowed off-optimum; stress kills.
        sp_t = self._setpoints["temperature_setpoint_c"]
        activation = min(1.0, age_h / p.activation_h) if p.activation_h > 0 else 1.0
        mu = (
            p.mu_max_per_h
            * activation
            * max(0.0, 1.0 - self.xv / p.max_vcd_e6_per_ml)
            * self.do_true
            / (self.do_true + 2.0)
            * math.exp(-(((self.temp_true - sp_t) / 2.0) ** 2))
            * math.exp(-(((self.ph_true - 7.2) / 0.4) ** 2))
        )
        kd = 0.002 + 0.003 * (self.xv / p.max_vcd_e6_per_ml) ** 4
        if self.do_true < 5.0:
            kd += 0.02
        if self.temp_true > 39.0:
            kd += 0.02
        if self.ph_true < 6.8:
            kd += 0.03
        if self.bacteria > 0:
            stall = min(1.0, self.bacteria / 50.0)
            mu *= 1.0 - stall
            kd += 0.05 * stall
        self.xv = max(0.0, self.xv + ((mu - kd - dilution) * self.xv) * dt_h)
        self.xd = max(0.0, self.xd + (kd * self.xv - (0.05 + dilution) * self.xd) * dt_h)
        self.age_h = age_h

    def signals(self) -> dict[str, float]:
        total_cells = self.xv + self.xd
        return {
            "temperature_c": self.temp_meas,
            "ph": self.ph_meas,
            "do_pct": self.do_meas,
            "agitation_rpm": self.agitation,
            "air_flow_slpm": self.air,
            "o2_flow_slpm": self.o2,
            "co2_flow_slpm": self.co2,
            "n2_flow_slpm": self.n2,
            "weight_kg": self.weight,
            "volume_l": self.volume,
            "vcd_e6_per_ml": self.vcd_meas,
            "viability_pct": 100.0 * self.xv / total_cells if total_cells > 0 else 0.0,
            "base_added_ml": self.base_ml,
            "perfusion_vvd": self.perfusion,
            "culture_day": self.age_h / 24.0,
            "heater_pct": 100.0 * self.heater,
            "gas_supply_bar": self.supply_bar,
        }

    def offline_sample(self) -> dict[str, float]:
        """The lab's values of a sample drawn now: the true pH, dissolved oxygen, temperature and
        viable cell density, without the probes' lag, noise, drift (``ph_drift``) or freeze
        (``do_stuck``): what a blood-gas analyser and a cell counter would report."""
        return {
            **self.signals(),
            "temperature_c": self.temp_true,
            "ph": self.ph_true,
            "do_pct": self.do_true,
            "vcd_e6_per_ml": self.xv,
        }

    def status(self) -> dict[str, bool]:
        sp_t = self._setpoints["temperature_setpoint_c"]
        sp_ph = self._setpoints["ph_setpoint"]
        return {
            "running": True,
            "temp_high": self.temp_meas > sp_t + 0.5,
            "temp_low": self.temp_meas < sp_t - 0.5,
            "ph_high": self.ph_meas > sp_ph + 0.2,
            "ph_low": self.ph_meas < sp_ph - 0.2,
            "do_low": self.do_meas < 20.0,
            "agitation_fault": self.agitation == 0.0,
            "gas_supply_low": self.supply_bar < SUPPLY_LOW_BAR,
            "base_pump_on": self.base_on,
        }
