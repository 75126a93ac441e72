"""Model toolkit: CSV reading, the shared windowing/scoring/hysteresis path, real ONNX
graphs (PCA, isolation forest), training, calibration, evaluation, tamper refusal.

The helpers here (``write_csv``, ``syn_model``) are imported by the inference and CLI
tests, so every test trains on the same small synthetic process."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.modeltools.csvdata import FaultLabel, load_csv, load_labels
from agent.modeltools.evaluate import evaluate
from agent.modeltools.train import TrainOptions, train
from agent.transforms.anomaly.drift import DriftMonitor
from agent.transforms.anomaly.envelope import Envelope
from agent.transforms.anomaly.manifest import ModelError, parse_condition, read_manifest
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.offline import run_offline
from agent.transforms.anomaly.track import Settings, Track
from agent.transforms.anomaly.windows import SlotAccumulator, Windower
from agent.transforms.debounce import Debounce

T0 = 1_767_571_200.0
PERIOD = 10.0
SIGNALS = ("temp", "ph", "do")
FAULT = (5 * 3600.0, 5.5 * 3600.0)
"""Offset (s) of the synthetic fault window: temperature 1 °C low for 30 minutes."""


def series(
    hours: float, seed: int, fault: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A small correlated process: temperature, pH, and a DO that follows a slow cycle."""
    rng = np.random.default_rng(seed)
    n = int(hours * 3600 / PERIOD)
    t = T0 + np.arange(n) * PERIOD
    temp = 37 + 0.05 * rng.standard_normal(n)
    ph = 7.2 - 0.02 * (temp - 37) + 0.01 * rng.standard_normal(n)
    do = 40 + 2 * np.sin((t - T0) / 3600) + 0.5 * rng.standard_normal(n)
    if fault is not None:
        inside = (t >= T0 + fault[0]) & (t < T0 + fault[1])
        temp[inside] -= 1.0
    return t, np.column_stack([temp, ph, do])


def write_csv(
    path: Path, hours: float = 12, seed: int = 1, fault: tuple[float, float] | None = None, sep: str = ","
) -> Path:
    t, v = series(hours, seed, fault)
    lines = [sep.join(("timestamp", *SIGNALS))]
    lines += [sep.join([f"{ts:.0f}", *(f"{x:.5f}" for x in row)]) for ts, row in zip(t, v, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


_TRAINED: dict[str, Path] = {}


def trained_model(factory: pytest.TempPathFactory) -> Path:
    """A PCA model trained on 24 h of normal synthetic data, once per test session
    (shared by the modelkit, inference and CLI tests)."""
    if "syn" not in _TRAINED:
        d = factory.mktemp("model")
        ds = load_csv(write_csv(d / "normal.csv", hours=24, seed=1))
        _TRAINED["syn"] = train(
            [ds],
            TrainOptions(model_id="syn-pca", window=12, raise_after=3, clear_after=6, units={"temp": "degC"}),
            d / "out",
        )
    return _TRAINED["syn"]


def private_copy(model: Path, tmp_path: Path) -> Path:
    """A copy of a trained model for tests that alter its files."""
    out = tmp_path / "m"
    shutil.copytree(model.parent, out)
    return out / model.name


@pytest.fixture(scope="session")
def syn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory)


@pytest.fixture
def model_copy(syn_model: Path, tmp_path: Path) -> Path:
    return private_copy(syn_model, tmp_path)


# --------------------------------------------------------------------------- CSV


def test_csv_sniffs_semicolon_decimal_comma_iso_time_and_labels(tmp_path: Path) -> None:
    p = tmp_path / "historian.csv"
    p.write_text(
        "Time;Temp;pH;state\n"
        "2026-01-05T00:00:00Z;37,01;7,20;normal\n"
        "2026-01-05 00:00:10;37,02;7,21;normal\n"
        "2026-01-05T00:00:20+00:00;;7,22;FAULT\n"
    )
    ds = load_csv(p, label_column="state")
    assert ds.signals == ["Temp", "pH"]
    assert ds.ts.tolist() == [T0, T0 + 10, T0 + 20]
    assert ds.values[0].tolist() == [37.01, 7.2]
    assert np.isnan(ds.values[2, 0])
    assert ds.abnormal.tolist() == [False, False, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signals": ["temp", "nope"]}, "no column(s) nope"),
        ({"time_column": "when"}, "no time column 'when'"),
        ({"label_column": "lbl"}, "no label column 'lbl'"),
    ],
)
def test_csv_bad_columns_are_clear_errors(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    p = write_csv(tmp_path / "x.csv", hours=0.1)
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_csv(p, **kwargs)  # type: ignore[arg-type]


def test_csv_unparseable_time_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("timestamp,a\n1767571200,1\nyesterday,2\n")
    with pytest.raises(ModelError, match="line 3, column 'timestamp'"):
        load_csv(p)


def test_labels_file(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("kind,device,start,end\ndoor_open,inc1,1767571200,2026-01-05T00:01:00Z\n")
    assert load_labels(p) == [FaultLabel("door_open", "inc1", T0, T0 + 60)]


# --------------------------------------------------------------------------- shared path


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8), seed=st.integers(0, 1000))
def test_online_feeding_in_any_chunks_equals_offline(cuts: list[int], seed: int) -> None:
    """The agent feeds commits of any size; the windows must not depend on how data arrives."""
    rng = np.random.default_rng(seed)
    ts = np.sort(T0 + rng.uniform(0, 4000, 400))
    vals = rng.normal(size=(400, 2))
    vals[rng.random((400, 2)) < 0.1] = np.nan

    def run(bounds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        acc, win = SlotAccumulator(PERIOD, 2), Windower(5, np.zeros(2), 0.5)
        comp, wins = [], []
        for a, b in itertools.pairwise(bounds):
            c, _, _, w = win.push(*acc.add(ts[a:b], vals[a:b]))
            comp.append(c)
            wins.append(w)
        c, _, _, w = win.push(*acc.flush())
        return np.concatenate([*comp, c]), np.concatenate([*wins, w])

    one = run([0, 400])
    many = run([0, *sorted(cuts), 400])
    np.testing.assert_array_equal(one[0], many[0])  # same windows, same completeness
    np.testing.assert_allclose(one[1], many[1], rtol=1e-6)  # float32, summed in another order


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.0, 1.0, 2.5, 10.0]), min_size=5, max_size=120),
    period=st.sampled_from([1.0, 10.0]),
    seed=st.integers(0, 1000),
)
def test_scalar_slot_path_equals_the_vectorised_path(steps: list[float], period: float, seed: int) -> None:
    """The agent adds one sample at a time (the scalar path, where a sample alone in its slot is
    its own mean); evaluation adds whole series (the vectorised path). Same slots, same means."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.cumsum(steps)
    vals = rng.normal(size=(len(ts), 2))
    vals[rng.random(vals.shape) < 0.15] = np.nan
    whole, one = SlotAccumulator(period, 2), SlotAccumulator(period, 2)
    ids, means = whole.add(ts, vals)
    got_ids, got_means = [], []
    for t, row in zip(ts.tolist(), vals.tolist(), strict=True):
        i, m = one.add_rows([t], [row])
        got_ids += i
        got_means += m
    assert (one.open_id, one.closed_upto) == (whole.open_id, whole.closed_upto)
    flushed, (last_id, last_mean) = whole.flush(), one.flush()
    np.testing.assert_array_equal(got_ids + last_id.tolist(), np.concatenate([ids, flushed[0]]))
    np.testing.assert_array_equal(np.array(got_means + last_mean.tolist()), np.vstack([means, flushed[1]]))


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.sampled_from([1, 1, 1, 1, 2, 3, 5, 6, 9]), min_size=1, max_size=80),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10),
    seed=st.integers(0, 1000),
)
def test_windower_ring_fast_path_equals_the_general_path(
    steps: list[int], cuts: list[int], seed: int
) -> None:
    """The agent pushes one slot at a time (the ring's fast path when it follows the last one);
    evaluation pushes whole series (the general path). Both must give exactly the same windows
    and states, across gaps shorter and longer than a window."""
    rng = np.random.default_rng(seed)
    ids = np.cumsum(steps).astype(np.int64)
    means = rng.normal(size=(len(ids), 2))
    means[rng.random(means.shape) < 0.15] = np.nan
    fill = np.array([0.5, -0.5])
    whole = Windower(5, fill, 0.5).push(ids, means)

    def pushed(bounds: list[int]) -> tuple[list[float], list[bool], list[bool], np.ndarray]:
        win = Windower(5, fill, 0.5)
        parts = [win.push_rows(ids[a:b].tolist(), means[a:b].tolist()) for a, b in itertools.pairwise(bounds)]
        return (
            [c for p in parts for c in p[0]],
            [w for p in parts for w in p[1]],
            [s for p in parts for s in p[2]],
            np.concatenate([p[3] for p in parts]),
        )

    for bounds in (list(range(len(ids) + 1)), [0, *sorted(c for c in cuts if c < len(ids)), len(ids)]):
        completeness, warm, scored, windows = pushed(bounds)
        assert completeness == whole[0].tolist()
        assert warm == whole[1].tolist() and scored == whole[2].tolist()
        assert windows.dtype == np.float32
        np.testing.assert_array_equal(windows, whole[3])


def test_windower_completeness_warmup_and_gap_policy() -> None:
    acc, win = SlotAccumulator(1.0, 1), Windower(4, np.array([9.0]), 0.75)
    ts = T0 + np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24], dtype=float)
    vals = np.array(
        [[1], [2], [3], [4], [np.nan], [np.nan], [7], [8], [9], [1], [1], [1], [1], [1]], dtype=float
    )
    ids, means = acc.add(ts, vals)
    completeness, warm, scored, windows = win.push(ids, means)
    # samples on slot boundaries close their slot at once: all 14 slots are out
    assert (
        warm.tolist() == [False, False, False, True, True, True, True, True, True] + [False] * 3 + [True] * 2
    )
    # window ending at slot 5 has two of four slots missing: not scored
    assert completeness[5] == 0.5 and not scored[5]
    # window ending at slot 4 has one gap, filled forward from slot 3
    assert scored[4]
    np.testing.assert_array_equal(windows[1, :, 0], [2, 3, 4, 4])
    # a gap longer than the window restarts warm-up instead of scoring a window of nothing
    assert not scored[9:12].any()


@settings(max_examples=200, deadline=None)
@given(
    overs=st.lists(st.booleans(), max_size=60), raise_after=st.integers(1, 5), clear_after=st.integers(1, 5)
)
def test_debounce_matches_its_definition(overs: list[bool], raise_after: int, clear_after: int) -> None:
    d = Debounce(raise_after, clear_after)
    active = False
    for i, over in enumerate(overs):
        change = d.update(over)
        # reference: state flips when the last k observations all disagree with it and
        # the flip has not happened within them
        need = clear_after if active else raise_after
        run = 0
        for prev in reversed(overs[: i + 1]):
            if prev == active:
                break
            run += 1
        expect = run >= need and run == need
        assert (change is not None) == expect, (overs[: i + 1], change)
        if change is not None:
            assert change is (not active)
            active = change
        assert d.active is active


# --------------------------------------------------------------------------- models


def test_pca_graph_contributions_decompose_the_score(syn_model: Path) -> None:
    model = LoadedModel(syn_model)
    rng = np.random.default_rng(3)
    m = model.manifest
    windows = (model.mean + rng.normal(size=(64, m.window, 3)) * [s.std for s in m.signals] * 3).astype(
        np.float32
    )
    scores, contrib = model.score(windows)
    assert scores.shape == (64,) and contrib.shape == (64, 3)
    np.testing.assert_allclose(contrib.sum(axis=1), scores, rtol=1e-4, atol=1e-4)
    assert model.session.get_session_options().intra_op_num_threads == 1


def test_training_writes_a_complete_manifest(syn_model: Path) -> None:
    m = read_manifest(syn_model)
    assert m.method == "pca" and m.signal_names == list(SIGNALS)
    assert m.signals[0].unit == "degC"
    assert m.period == PERIOD and m.window == 12
    assert m.provenance.rows == int(24 * 3600 / PERIOD)
    assert len(m.provenance.data_sha256) == 64
    assert m.validation["fit_windows"] > 0 and m.validation["components"] >= 1
    assert m.threshold > m.validation["holdout_p99_score"]  # type: ignore[operator]


def test_detects_the_fault_and_stays_quiet_on_independent_normal_data(
    syn_model: Path, tmp_path: Path
) -> None:
    model = LoadedModel(syn_model)
    faulty = load_csv(write_csv(tmp_path / "dev1.csv", hours=10, seed=7, fault=FAULT))
    normal = load_csv(write_csv(tmp_path / "dev2.csv", hours=10, seed=8))
    labels = [FaultLabel("temp_low", "dev1", T0 + FAULT[0], T0 + FAULT[1])]
    metrics, results = evaluate(model, {"dev1": faulty, "dev2": normal}, labels)
    assert metrics["recall"] == 1.0 and metrics["false_alarms"] == 0 and metrics["f1"] == 1.0
    assert metrics["delay_median_s"] <= 3 * PERIOD * model.manifest.hysteresis.raise_after
    start = next(t for t in results[0].result.transitions if t.phase == "start")
    assert start.top[0]["signal"] == "temp"
    assert start.top[0]["value"] < start.top[0]["normal_range"][0]


def test_offline_and_settings_overrides_use_the_same_track(syn_model: Path) -> None:
    model = LoadedModel(syn_model)
    t, v = series(10, 7, FAULT)
    base = run_offline(model, Settings.of(model.manifest), t, v)
    strict = run_offline(model, Settings.of(model.manifest, raise_after=1000), t, v)
    np.testing.assert_array_equal(base.scores, strict.scores)
    assert base.alarm.any() and not strict.alarm.any()


def test_isolation_forest_is_a_real_onnx_graph(tmp_path: Path) -> None:
    ds = load_csv(write_csv(tmp_path / "n.csv", hours=4, seed=2))
    path = train(
        [ds], TrainOptions(model_id="syn-if", method="iforest", window=6, trees=25), tmp_path / "out"
    )
    model = LoadedModel(path)
    t, v = series(4, 9, (2 * 3600.0, 2.5 * 3600.0))
    r = run_offline(model, Settings.of(model.manifest), t, v)
    inside = (r.ts > T0 + 2 * 3600 + 120) & (r.ts < T0 + 2.5 * 3600)
    outside = r.ts < T0 + 2 * 3600
    assert np.nanmean(r.scores[inside]) > np.nanmean(r.scores[outside])


def test_tampered_model_is_refused_with_a_clear_message(model_copy: Path) -> None:
    onnx_file = model_copy.parent / read_manifest(model_copy).file
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"syn-pca 1\.0\.0: syn-pca\.onnx has sha256 .* refusing to load it"):
        LoadedModel(model_copy)


def test_malformed_manifest_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.model.yaml"
    p.write_text("id: x\nversion: 1\n")
    with pytest.raises(ModelError, match=r"invalid manifest: .*file: Field required"):
        read_manifest(p)


def test_drift_monitor_flags_a_shifted_signal(syn_model: Path) -> None:
    m = read_manifest(syn_model)
    mon = DriftMonitor(m.model_copy(update={"drift": m.drift.model_copy(update={"window": 600 * PERIOD})}))
    t, v = series(4, 5)
    ids = np.floor(t / PERIOD).astype(np.int64)
    assert mon.add(ids, v) is None and not mon.active
    v[:, 1] += 10 * m.signals[1].std
    change = mon.add(ids + len(ids), v)
    assert change is not None and change.phase == "start"
    assert set(change.signals) == {"ph"} and change.signals["ph"]["shift_sigma"] > 5


def test_a_sample_older_than_the_open_slot_is_late_not_a_slot_out_of_order() -> None:
    first = [10.0, 20.0, 30.0, 40.0, 130.0]  # slots 0, 0, 0, 0, 2: closes 0, slot 2 open, 1 empty
    second = [100.0, 170.0, 175.0, 185.0, 190.0]  # 100.0 is slot 1: older than the open slot 2
    for path in ("vectorised", "scalar"):
        acc = SlotAccumulator(60.0, 1)
        ids: list[int] = []
        for batch in (first, second):
            vals = [[float(i)] for i in range(len(batch))]
            if path == "vectorised":  # batches above SMALL take the numpy path
                got, _ = acc.add(np.array(batch), np.array(vals))
                ids += got.tolist()
            else:
                got_ids, _ = acc.add_rows(batch, vals)
                ids += got_ids
        assert ids == [0, 2], f"{path}: slots leave once each, in time order: {ids}"
        assert acc.late == 1, path


# --------------------------------------------------------------------------- operating envelope


@pytest.mark.parametrize(
    ("text", "signal", "lo", "hi"),
    [
        ("culture_day>=0.125", "culture_day", 0.125, None),
        ("state <= 2", "state", None, 2.0),
        ("0.1<=age<=14", "age", 0.1, 14.0),
    ],
)
def test_envelope_conditions_parse(text: str, signal: str, lo: float | None, hi: float | None) -> None:
    c = parse_condition(text)
    assert (c.signal, c.min, c.max) == (signal, lo, hi)
    assert not c.holds(float("nan"))  # an unknown state is not inside


@pytest.mark.parametrize("text", ["culture_day>0.1", "age>=x", "5<=age<=1", "age"])
def test_bad_envelope_condition_is_a_clear_error(text: str) -> None:
    with pytest.raises(ModelError, match=r"envelope condition"):
        parse_condition(text)


def _with_age(
    hours: float, seed: int, fault: tuple[float, float] | None, inside_from: float
) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic series plus an ``age_h`` column that enters the envelope (>= 1) at ``inside_from`` s."""
    t, v = series(hours, seed, fault)
    age = np.where(t - T0 >= inside_from, 1.0 + (t - T0) / 3600, 0.5)
    return t, np.column_stack([v, age])


@given(st.lists(st.integers(1, 400), min_size=1, max_size=12), st.integers(0, 3))
@settings(max_examples=15, deadline=None)
def test_envelope_gates_scoring_alike_on_the_agent_and_offline_paths(cuts: list[int], leave: int) -> None:
    """Windows reaching outside the envelope are never scored, whatever the chunking; the
    agent's per-commit path decides exactly as the offline one; leaving the envelope during
    an alarm neither clears nor re-raises it."""
    model = _envelope_model()
    w = model.manifest.window
    t, v = _with_age(8, 7, FAULT, inside_from=2 * 3600.0)
    v[(t - T0 > 5.2 * 3600) & (t - T0 < 5.2 * 3600 + leave * 600), 3] = 0.5  # out again during the alarm
    offline = run_offline(model, Settings.of(model.manifest), t, v)
    track = Track(model, Settings.of(model.manifest), drift=False)
    scores: list[float] = []
    bounds = sorted({0, len(t), *(c * 7 % len(t) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        for i in range(a, b, 3):  # the agent's commits: a few samples at a time
            ready = track.feed_rows(t[i : min(b, i + 3)].tolist(), v[i : min(b, i + 3)].tolist())
            scores += track.decide(ready, *model.score(ready.windows)).scores
    ready = track.flush()
    scores += track.decide(ready, *model.score(ready.windows)).scores
    np.testing.assert_allclose(np.array(scores), offline.scores, rtol=1e-5)
    first_in = T0 + 2 * 3600 + (w - 1) * model.manifest.period  # the first slot inside ends at 2 h
    assert np.isnan(offline.scores[offline.ts < first_in]).all()
    assert not np.isnan(offline.scores[offline.ts >= first_in + 3600]).all()
    assert [x.phase for x in offline.transitions][:1] == ["start"]
    assert sum(x.phase == "start" for x in offline.transitions) == 1
    away = (offline.ts > T0 + 5.2 * 3600) & (offline.ts < T0 + 5.2 * 3600 + leave * 600)
    assert offline.alarm[away].all() and np.isnan(offline.scores[away]).all()


_ENVELOPE: dict[str, LoadedModel] = {}


def _envelope_model() -> LoadedModel:
    """The synthetic model trained with an envelope on a series whose first 2 h (outside it)
    run 3 °C hot: trained inside only, the statistics never see the hot start."""
    if "m" not in _ENVELOPE:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="envelope-"))
        t, v = _with_age(24, 1, None, inside_from=2 * 3600.0)
        v[t - T0 < 2 * 3600, 0] += 3.0
        from agent.modeltools.csvdata import Dataset

        ds = Dataset(t, v, [*SIGNALS, "age_h"], np.zeros(len(t), bool), "syn", "0" * 64)
        opts = TrainOptions(model_id="env", window=12, envelope=[parse_condition("age_h>=1")])
        _ENVELOPE["m"] = LoadedModel(train([ds], opts, d))
    return _ENVELOPE["m"]


def test_training_with_an_envelope_learns_only_the_state_inside_it() -> None:
    m = _envelope_model().manifest
    assert [str(c) for c in m.envelope] == ["1 <= age_h"]
    assert m.signal_names == list(SIGNALS) and m.data_names == [*SIGNALS, "age_h"]
    assert m.signals[0].normal_high < 37.5  # the hot start-up (40 °C) is not "normal"


def test_envelope_run_survives_missing_slots_but_not_a_gap_longer_than_a_window() -> None:
    env = Envelope([parse_condition("a>=1")], ["x", "a"], window=3)
    inside, eligible = env.check([0, 1, 2, 4, 5, 10, 11, 12, 13], [[0.0, 1.0]] * 9)
    assert inside == [True] * 9
    assert eligible == [False, False, True, True, True, False, False, True, True]
    inside, eligible = env.check([14, 15, 16, 17], [[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, float("nan")]])
    assert inside == [True, False, True, False] and not any(eligible[1:])


def test_delay_comparison_with_the_rules_is_paired_and_a_miss_is_never_earlier(
    syn_model: Path, tmp_path: Path
) -> None:
    from agent.transforms.limits import LimitsConfig

    model = LoadedModel(syn_model)
    faulty = {"dev1": load_csv(write_csv(tmp_path / "dev1.csv", hours=10, seed=7, fault=FAULT))}
    labels = [FaultLabel("temp_low", "dev1", T0 + FAULT[0], T0 + FAULT[1])]
    limits = LimitsConfig.model_validate({"tags": [{"tag": "temp", "alert_low": 36.5}]})
    m, _ = evaluate(model, faulty, labels, limits=limits)
    assert m["paired_faults"] == 1 and m["paired_model_delay_median_s"] == m["delay_median_s"]
    assert m["paired_rule_delay_median_s"] < m["paired_model_delay_median_s"]  # a step: the limit is first
    deaf = Settings.of(model.manifest, raise_after=10**6)
    never, _ = evaluate(model, faulty, labels, limits=limits, settings=deaf)
    assert never["paired_faults"] == 1 and never["paired_model_delay_median_s"] == "missed"
