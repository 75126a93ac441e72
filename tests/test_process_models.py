"""Process models without faults: normal ranges, determinism, clock, setpoints, counter commands."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from simulators.process import MODELS, Clock, ProcessModel, create_model
from simulators.process.base import device_rng
from simulators.process.particle_counter import GRADE_LIMITS, ParticleCounter

H = 3600.0


def trace(model: ProcessModel, hours: float, every_s: float = 60.0) -> dict[str, np.ndarray]:
    """Signals and status bits sampled every ``every_s`` over ``hours`` of simulated time."""
    rows = []
    for k in range(1, round(hours * H / every_s) + 1):
        model.advance(model.start_time_s + k * every_s)
        rows.append({**model.signals(), **{f"st_{n}": float(v) for n, v in model.status().items()}})
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def assert_in_normal_ranges(model: ProcessModel, data: dict[str, np.ndarray]) -> None:
    for name, spec in model.signal_specs().items():
        lo, hi = data[name].min(), data[name].max()
        assert spec.low <= lo and hi <= spec.high, f"{name} left [{spec.low}, {spec.high}]: {lo}..{hi}"


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("bioreactor", {}),
        ("incubator", {}),
        ("incubator", {"o2_control": True, "o2_setpoint_pct": 5.0}),
    ],
)
def test_a_fault_free_day_stays_in_the_documented_normal_ranges(kind: str, params: dict[str, object]) -> None:
    # 5 s steps: nothing in a fault-free day is faster, and the test stays quick on a busy machine.
    model = create_model(kind, "dev-01", seed=7, params={"step_s": 5.0, **params})
    data = trace(model, 24)
    assert_in_normal_ranges(model, data)
    alarms = [k for k in data if k.startswith("st_") and k != "st_running" and data[k].any()]
    if kind == "incubator":
        assert alarms == []
    assert data["temperature_c"].std() > 0  # noise is there: a flat line would be a stuck sensor


def test_a_full_batch_grows_cells_and_makes_the_controllers_work_harder() -> None:
    model = create_model("bioreactor", "br-01", seed=1, params={"step_s": 30.0})
    data = trace(model, 14 * 24 - 1, every_s=600.0)
    assert_in_normal_ranges(model, data)
    day = data["culture_day"]
    early, late = day < 2, day > 10
    assert 5.0 <= data["vcd_e6_per_ml"][late].mean() <= 7.0  # T cells reach ~6e6/mL
    assert data["viability_pct"][late].min() > 90.0
    assert data["o2_flow_slpm"][late].mean() > data["o2_flow_slpm"][early].mean() + 0.01
    assert data["agitation_rpm"][late].mean() > data["agitation_rpm"][early].mean()
    assert data["base_added_ml"][-1] > 10.0 and data["base_added_ml"][early].max() == 0.0
    assert data["weight_kg"][late].mean() > 1.8 * data["weight_kg"][early].mean()  # fed-batch 0.5 -> 1 L
    # Specific growth rate in the exponential phase sits in the T-cell range (0.03-0.05 /h).
    x = data["vcd_e6_per_ml"]
    i, j = np.searchsorted(day, 2.0), np.searchsorted(day, 3.0)
    mu = np.log(x[j] / x[i]) / 24 + np.log(data["volume_l"][j] / data["volume_l"][i]) / 24
    assert 0.02 <= mu <= 0.05


def test_batches_cycle_so_long_runs_stay_realistic() -> None:
    br = create_model("bioreactor", "br-01", seed=1, params={"run_days": 2.0, "step_s": 30.0})
    data = trace(br, 5 * 24, every_s=3600.0)
    day = data["culture_day"]
    assert day.max() < 2.0 and list(np.flatnonzero(np.diff(day) < 0) + 1) == [48, 96]
    assert data["vcd_e6_per_ml"][[48, 96]] == pytest.approx(0.3, rel=0.05)  # re-seeded
    assert data["volume_l"][48] == 0.5 and data["base_added_ml"][48] == 0.0


@pytest.mark.parametrize(("grade", "state"), sorted(GRADE_LIMITS))
def test_particle_background_sits_under_the_grade_limit(grade: str, state: str) -> None:
    pc = create_model("particle_counter", "pc-01", seed=2, params={"grade": grade, "state": state})
    assert isinstance(pc, ParticleCounter)
    pc.advance(pc.start_time_s + 24 * H)
    recs = pc.records()
    assert len(recs) == 1440  # one 60 s sample per minute
    counts = np.array([r.counts for r in recs])
    assert (np.diff(counts, axis=1) <= 0).all()  # cumulative: >= 0.3 um counts include >= 0.5 um
    conc_05 = counts[:, 1] / 0.0283
    assert np.mean(conc_05 <= GRADE_LIMITS[(grade, state)][0]) >= 0.99


def test_grade_a_at_rest_reads_a_few_counts_and_almost_never_5um() -> None:
    pc = create_model("particle_counter", "pc-01", seed=3, params={"grade": "A", "state": "at_rest"})
    assert isinstance(pc, ParticleCounter)
    pc.advance(24 * H)
    counts = np.array([r.counts for r in pc.records()])
    assert 0.5 <= counts[:, 1].mean() <= 3.0  # >= 0.5 um per ft3
    five = counts[:, 3] > 0
    assert five.mean() < 0.03
    assert not (five[1:] & five[:-1]).any()  # isolated single counts, never two samples running
    assert all(r.flow_ok and r.laser_ok and r.volume_l == pytest.approx(28.3) for r in pc.records())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_stepping_in_chunks_or_at_once_gives_the_same_process(kind: str) -> None:
    a = create_model(kind, "dev-01", seed=5, start_time_s=1000.0)
    b = create_model(kind, "dev-01", seed=5, start_time_s=1000.0)
    for t in itertools.accumulate([0.4, 7, 61.5, 600, 0.1, 3000], initial=1000.0):
        a.advance(t)
    b.advance(1000.0 + 3669.0)
    assert a.t == b.t
    assert a.signals() == b.signals() and a.status() == b.status()
    a.advance(a.t - 500)  # the process never rewinds
    assert a.signals() == b.signals()


def test_device_streams_are_stable_and_distinct() -> None:
    assert device_rng(1, "br-01").integers(1 << 30) == device_rng(1, "br-01").integers(1 << 30)
    assert device_rng(1, "br-01").integers(1 << 30) != device_rng(1, "br-02").integers(1 << 30)
    assert device_rng(1, "br-01").integers(1 << 30) != device_rng(2, "br-01").integers(1 << 30)
    # Pinned: a change of seeding would silently change every generated data set.
    assert device_rng(1, "br-01").integers(1 << 30) == 937819706


def test_clock_runs_at_speed_and_changes_speed_without_a_jump() -> None:
    wall = [100.0]
    clock = Clock(speed=60, start_time_s=5000.0, wall=lambda: wall[0])
    assert clock.now() == 5000.0
    wall[0] = 110.0
    assert clock.now() == 5600.0
    clock.speed = 1.0
    assert clock.now() == 5600.0
    wall[0] = 111.0
    assert clock.now() == 5601.0
    with pytest.raises(ValueError, match="positive"):
        Clock(speed=0)


def test_setpoint_writes_are_range_checked_and_move_the_process() -> None:
    inc = create_model("incubator", "inc-01", seed=1)
    with pytest.raises(ValueError, match="within"):
        inc.set_setpoint("co2_setpoint_pct", 30.0)
    with pytest.raises(KeyError, match="no setpoint"):
        inc.set_setpoint("pressure", 1.0)
    inc.set_setpoint("co2_setpoint_pct", 8.0)
    inc.advance(2 * H)
    assert inc.signals()["co2_pct"] == pytest.approx(8.0, abs=0.2)
    assert inc.setpoints()["co2_setpoint_pct"] == 8.0


def test_bad_model_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown device kind"):
        create_model("centrifuge", "x", seed=0)
    with pytest.raises(ValidationError, match="rpm"):
        create_model("bioreactor", "x", seed=0, params={"agitation_rpm": 10})
    with pytest.raises(ValidationError, match="increasing"):
        create_model("particle_counter", "x", seed=0, params={"channels_um": [0.5, 0.3]})


def test_counter_commands_buffer_wrap_and_clock() -> None:
    pc = create_model("particle_counter", "pc-01", seed=1, params={"buffer_size": 10, "auto_start": False})
    assert isinstance(pc, ParticleCounter)
    pc.advance(600)
    assert pc.records() == [] and not pc.status()["running"]
    pc.start()
    pc.advance(600 + 15 * 60)
    recs = pc.records()
    assert len(recs) == 10 and [r.index for r in recs] == list(range(5, 15))  # rotated, index keeps going
    assert recs[-1].timestamp_s == 1500
    assert [r.index for r in pc.records_since(12)] == [13, 14]
    pc.set_clock(1_000_000.0)  # device clock set 998,500 s ahead of true time
    pc.clear_records()
    pc.advance(1560)
    (rec,) = pc.records()
    assert rec.index == 15 and rec.timestamp_s == 1_000_060 and rec.sim_end_s == 1560
    pc.stop()
    pc.advance(3000)
    assert len(pc.records()) == 1
    assert pc.signals()["record_count"] == 1.0


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["incubator", "particle_counter"]),
    steps=st.lists(st.floats(min_value=0.0, max_value=900.0), min_size=1, max_size=12),
)
def test_any_request_pattern_sees_the_same_process(kind: str, steps: list[float]) -> None:
    """Front ends advance on every request, at whatever times clients poll: it must not matter."""
    a = create_model(kind, "dev-01", seed=9, params={"grade": "C"} if kind == "particle_counter" else {})
    b = create_model(kind, "dev-01", seed=9, params={"grade": "C"} if kind == "particle_counter" else {})
    t = 0.0
    for dt in steps:
        t += dt
        a.advance(t)
    b.advance(t)
    assert a.t == b.t and a.signals() == b.signals() and a.status() == b.status()
    if isinstance(a, ParticleCounter) and isinstance(b, ParticleCounter):
        assert a.records() == b.records()
