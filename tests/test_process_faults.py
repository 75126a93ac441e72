"""Each fault kind moves the signals it should, by the amount docs/simulators-process.md states,
inside its window and not outside it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from simulators.process import ProcessModel, create_model
from simulators.process.faults import COMM_FAULTS, Fault
from simulators.process.particle_counter import ParticleCounter

H = 3600.0


def faulty(
    kind: str, fault: str, start_s: float, end_s: float, fparams: dict[str, Any] | None = None, **params: Any
) -> ProcessModel:
    model = create_model(kind, "dev-01", seed=11, params=params)
    model.faults.add(Fault.make(fault, start_s, end_s, fparams))
    return model


def trace(model: ProcessModel, t0: float, t1: float, every_s: float) -> dict[str, np.ndarray]:
    rows = []
    for t in np.arange(t0, t1 + every_s / 2, every_s):
        model.advance(float(t))
        rows.append({"t": model.t, **model.signals(), **{k: float(v) for k, v in model.status().items()}})
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def test_door_open_drops_temperature_co2_and_humidity_then_recovers() -> None:
    inc = faulty("incubator", "door_open", H, H + 30)
    d = trace(inc, H - 300, H + 1830, 1.0)
    t = d["t"]
    # State after advance(t) reflects the step [t - 1 s, t): the bit is set for exactly the window.
    assert (t[d["door_open"] == 1] > H).all() and (t[d["door_open"] == 1] <= H + 30).all()
    assert d["door_open"].sum() == 30 and d["door_alarm"].sum() == 0  # alarm only after 60 s
    assert 1.0 <= 37.0 - d["temperature_c"].min() <= 3.0
    assert d["co2_pct"].min() < 2.5
    assert 95.0 - d["rh_pct"].min() >= 20.0
    closed = H + 30
    co2_back = t[(t > closed) & (np.abs(d["co2_pct"] - 5.0) > 0.3)].max() - closed
    temp_back = t[(t > closed) & (np.abs(d["temperature_c"] - 37.0) > 0.3)].max() - closed
    rh_back = t[(t > closed) & (95.0 - d["rh_pct"] > 3.0)].max() - closed
    assert 4 * 60 <= co2_back <= 10 * 60
    assert 5 * 60 <= temp_back <= 15 * 60
    assert 10 * 60 <= rh_back <= 30 * 60


def test_a_long_door_opening_sets_the_alarm_after_its_delay() -> None:
    inc = faulty("incubator", "door_open", H, H + 120)
    d = trace(inc, H, H + 130, 1.0)
    alarm_t = d["t"][d["door_alarm"] == 1]
    assert alarm_t.min() == H + 61 and alarm_t.max() == H + 120


def test_co2_supply_failure_in_an_incubator_starves_the_chamber() -> None:
    inc = faulty("incubator", "co2_supply_failure", H, 7 * H, step_s=5.0)
    d = trace(inc, 0, 8 * H, 60.0)
    t, inside = d["t"], (d["t"] > H) & (d["t"] <= 7 * H)
    low = t[d["co2_supply_low"] == 1]
    assert low.min() == pytest.approx(3 * H, abs=120) and low.max() <= 7 * H  # 1 bar - 0.25 bar/h < 0.5
    assert d["co2_pct"][~inside & (t < H)].min() > 4.7
    assert d["co2_pct"][inside].min() < 3.0 and d["co2_low"][inside].any()
    assert d["co2_pct"][t > 7.5 * H].min() > 4.7  # cylinder swapped at the end of the window


def test_co2_supply_failure_in_a_bioreactor_lets_the_ph_climb() -> None:
    br = faulty("bioreactor", "co2_supply_failure", 2 * H, 8 * H, step_s=5.0)
    d = trace(br, 0, 8 * H, 300.0)
    before, inside = d["t"] <= 2 * H, d["t"] > 2 * H
    assert d["ph"][before].max() < 7.3
    assert d["ph"][inside].max() > 7.5 and d["ph_high"][inside].any() and d["gas_supply_low"][inside].any()


@pytest.mark.parametrize("kind", ["bioreactor", "incubator"])
def test_temperature_oscillation_swings_by_about_its_amplitude(kind: str) -> None:
    model = faulty(
        kind, "temperature_oscillation", H, 3 * H, {"amplitude_c": 1.0, "period": "20m"}, step_s=2.0
    )
    d = trace(model, 0, 3 * H, 20.0)
    t, temp = d["t"], d["temperature_c"]
    settled = (t > H + 1200) & (t <= 3 * H)
    assert np.ptp(temp[settled]) >= 1.5  # peak-to-peak vs 2.0 open loop
    assert np.ptp(temp[t <= H]) < 0.3


def test_ph_drift_moves_the_probe_away_from_the_true_ph() -> None:
    base = create_model("bioreactor", "dev-01", seed=11, params={"step_s": 10.0})
    br = faulty("bioreactor", "ph_drift", 6 * H, 54 * H, {"rate_ph_per_day": 0.1}, step_s=10.0)
    for m in (base, br):
        m.advance(30 * H)
    assert br.signals()["ph"] - br.ph_true == pytest.approx(0.1, abs=0.02)  # type: ignore[attr-defined]
    # Inside the controller's deadband the reading itself drifts up...
    assert br.signals()["ph"] > base.signals()["ph"] + 0.05
    for m in (base, br):
        m.advance(54 * H)
    assert br.signals()["ph"] - br.ph_true == pytest.approx(0.2, abs=0.02)  # type: ignore[attr-defined]
    # ...past it the controller holds the reading, so the culture's true pH moves instead.
    assert br.ph_true < base.ph_true - 0.05  # type: ignore[attr-defined]
    br.advance(55 * H)
    assert abs(br.signals()["ph"] - br.ph_true) < 0.02  # type: ignore[attr-defined]


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0.0, 0.0)])
def test_do_stuck_is_a_flat_line(value: float | None, expected: float | None) -> None:
    br = faulty("bioreactor", "do_stuck", H, 3 * H, {"value": value}, step_s=5.0)
    d = trace(br, 0, 4 * H, 60.0)
    t = d["t"]
    inside = (t > H + 5) & (t <= 3 * H)
    assert d["do_pct"][inside].std() == 0.0
    assert d["do_pct"][t <= H].std() > 0.05 and d["do_pct"][t > 3 * H + 60].std() > 0.05
    if expected is not None:
        assert (d["do_pct"][inside] == expected).all() and d["do_low"][inside].all()


def test_contamination_crashes_do_and_ph_faster_than_t_cells_could() -> None:
    br = faulty("bioreactor", "contamination", 24 * H, 36 * H, step_s=10.0)
    d = trace(br, 20 * H, 37 * H, 300.0)
    t = d["t"]
    before, late = t <= 24 * H, (t > 35 * H) & (t <= 36 * H)
    assert d["do_pct"][before].min() > 30 and d["do_pct"][late].max() < 5
    assert d["ph"][late].max() < d["ph"][before].min() - 0.3
    # Clean T cells at this density use under 1 % of the O2 transfer; the crash needs bacteria.
    vcd_start = d["vcd_e6_per_ml"][np.searchsorted(t, 24 * H)]
    assert d["vcd_e6_per_ml"][late].max() < vcd_start  # growth stalled, cells dying
    assert d["viability_pct"][late].min() < d["viability_pct"][before].min() - 5
    # The bag is discarded when the window closes: a fresh batch is seeded.
    assert d["vcd_e6_per_ml"][t > 36 * H].max() < 0.4 and d["do_pct"][-1] > 30
    assert d["culture_day"][-1] == pytest.approx(1 / 24, abs=0.01)


def test_agitation_failure_stops_rocking_and_do_falls() -> None:
    dense = {"seed_vcd_e6_per_ml": 3.0, "activation_h": 0.0, "step_s": 5.0}
    br = faulty("bioreactor", "agitation_failure", 2 * H, 4 * H, **dense)
    d = trace(br, 0, 5 * H, 60.0)
    t = d["t"]
    inside = (t > 2 * H + 5) & (t <= 4 * H)
    assert (d["agitation_rpm"][inside] == 0).all() and d["agitation_fault"][inside].all()
    assert d["agitation_rpm"][t <= 2 * H].min() >= 10 and not d["agitation_fault"][t <= 2 * H].any()
    assert d["do_pct"][(t > 3 * H) & (t <= 4 * H)].max() < 10
    assert d["o2_flow_slpm"][inside].max() == pytest.approx(0.3)  # the cascade tries its last stage
    assert d["do_pct"][t > 4.75 * H].min() > 30


def counter(
    fault: str, start: float, end: float, fparams: dict[str, Any] | None = None, **params: Any
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    pc = faulty("particle_counter", fault, start, end, fparams, **params)
    assert isinstance(pc, ParticleCounter)
    pc.advance(end + 2 * H)
    recs = pc.records()
    ends = np.array([r.sim_end_s for r in recs])
    inside = (ends > start) & (ends - 60 < end)  # sample overlaps the window
    return np.array([r.counts for r in recs]), inside, recs


def test_particle_burst_is_a_short_excursion_with_large_particles() -> None:
    counts, inside, recs = counter("particle_burst", 4 * H, 4 * H + 600, {"factor": 300})
    assert inside.sum() == 10
    assert counts[inside, 1].mean() >= 100  # 0.5 um: ~1.4 x 300 per ft3
    assert counts[~inside, 1].mean() < 5
    assert (counts[inside, 3] > 0).mean() >= 0.8  # 5 um present in most burst samples
    assert all(r.threshold_high for r, i in zip(recs, inside, strict=True) if i)


def test_particle_elevation_raises_the_level_by_its_factor() -> None:
    counts, inside, _ = counter(
        "particle_elevation", 2 * H, 8 * H, {"factor": 30}, grade="B", state="at_rest"
    )
    ratio = counts[inside, 1].mean() / counts[~inside, 1].mean()
    assert 20 <= ratio <= 40


def test_counter_flow_fault_clears_flow_ok_and_undercounts() -> None:
    counts, inside, recs = counter("counter_flow_fault", 2 * H, 6 * H, {"flow_lpm": 12.0}, grade="C")
    full = [r for r, i in zip(recs, inside, strict=True) if i][1:-1]
    assert all(not r.flow_ok and r.flow_lpm == 12.0 and r.volume_l == pytest.approx(28.3) for r in full)
    assert all(r.flow_ok for r, i in zip(recs, inside, strict=True) if not i)
    ratio = counts[inside, 0].mean() / counts[~inside, 0].mean()
    assert ratio == pytest.approx(12.0 / 28.3, abs=0.1)  # the record claims a volume it never sampled


@pytest.mark.parametrize("kind", sorted(COMM_FAULTS))
def test_comm_faults_are_reported_in_their_window_and_leave_the_process_alone(kind: str) -> None:
    clean = create_model("incubator", "dev-01", seed=11)
    inc = faulty("incubator", kind, 600, 900)
    seen = {}
    for t in (599, 601, 899, 901):
        clean.advance(t)
        inc.advance(t)
        seen[t] = inc.comm_fault()
        assert inc.signals() == clean.signals()
    assert seen == {599: None, 601: kind, 899: kind, 901: None}


def test_the_over_temperature_cut_out_stops_the_heater_independently() -> None:
    inc = faulty(
        "incubator", "temperature_oscillation", H, 2 * H, {"amplitude_c": 3.0, "period": "30m"}, step_s=2.0
    )
    d = trace(inc, 0, 2 * H, 10.0)
    cut = d["over_temp"] == 1
    assert cut.any() and not cut[d["t"] <= H].any()
    assert (d["heater_pct"][cut] == 0).all()
    assert 37.8 < d["temperature_c"].max() < 38.5  # the cut-out (setpoint + 1 °C) limits the excursion


def test_bag_leak_loses_weight_without_a_harvest() -> None:
    br = faulty("bioreactor", "bag_leak", H, 5 * H, {"rate_ml_per_h": 25.0}, step_s=5.0)
    d = trace(br, 0, 6 * H, 300.0)
    t, w = d["t"], d["weight_kg"]
    before = w[np.searchsorted(t, H)]
    after = w[np.searchsorted(t, 5 * H)]
    assert before - after == pytest.approx(4 * 0.025 * 1.01, abs=0.01)  # 100 mL at 1.01 kg/L
    assert np.ptp(w[t > 5 * H]) < 0.015 and np.ptp(w[t <= H]) < 0.015  # flat outside the window
    assert d["vcd_e6_per_ml"][t > 5 * H].min() > 0.25  # the liquid leaves with its cells


def test_laser_failure_blinds_the_counter_and_says_so() -> None:
    counts, inside, recs = counter("laser_failure", 2 * H, 3 * H, grade="C")
    full = [(r, c) for r, c, i in zip(recs, counts, inside, strict=True) if i][1:-1]
    assert full and all(not r.laser_ok and r.service and c.sum() == 0 for r, c in full)
    assert all(r.laser_ok and not r.service for r, i in zip(recs, inside, strict=True) if not i)
    assert counts[~inside, 0].min() > 0
