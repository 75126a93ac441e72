"""InferenceEngine: committed blocks -> real ONNX scoring in the worker thread -> anomaly
events; shadow mode, refusal of altered models, incomplete windows, audited changes. Bindings
that must run active bind an approved copy of the model (unapproved models run in shadow)."""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import yaml

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase, TagBase, load_drivers
from agent.core.records import Block, Event, Quality, Severity
from agent.modeltools.csvdata import Dataset, load_csv
from agent.transforms.anomaly.manifest import EnvelopeCondition, approve, read_manifest, write_manifest
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.track import Settings, Track
from agent.transforms.inference import Binding, InferenceEngine, ModelBindingConfig
from simulators.process.generate import generate
from simulators.process.scenario import Scenario
from tests.test_modelkit import FAULT, T0, private_copy, series, trained_model

TAGS = ("T", "pH", "DO")
MAPPING = {"temp": "T", "ph": "pH", "do": "DO"}
PROFILE = ProfileBase(
    profile="bio-test", protocol="test", device_kind="bio", tags=[TagBase(name=t) for t in (*TAGS, "other")]
)
ACQ_OFFSET_NS = 3_600_000_000_000
"""Acquisition an hour after the device's own timestamps: the engine must use source time."""


class Harness:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.auditor = Auditor(self.events.append, "test")

    def engine(
        self, *bindings: ModelBindingConfig, devices: tuple[str, ...] = ("d1", "d2")
    ) -> InferenceEngine:
        return InferenceEngine(bindings, dict.fromkeys(devices, PROFILE), self.events.append, self.auditor)

    def of(self, kind: str, action: str | None = None) -> list[Event]:
        return [
            e for e in self.events if e.kind == kind and (action is None or e.data.get("action") == action)
        ]


def approved_copy(model: Path, folder: Path) -> Path:
    """A copy of ``model`` (manifest and ONNX) in ``folder``, approved by a test QA person:
    for tests that need a binding to run active."""
    folder.mkdir(parents=True, exist_ok=True)
    m = read_manifest(model)
    shutil.copy2(model.parent / m.file, folder / m.file)
    path = folder / model.name
    when = "2026-01-01T00:00:00Z"
    write_manifest(path, approve(m, "qa.test", "test fixture: released for active scoring", when))
    return path


@pytest.fixture(scope="session")
def syn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory)


@pytest.fixture
def model_copy(syn_model: Path, tmp_path: Path) -> Path:
    return private_copy(syn_model, tmp_path)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    yield Harness()


async def feed(
    engine: InferenceEngine, device: str, t: np.ndarray, v: np.ndarray, bad: tuple[int, ...] = ()
) -> None:
    """Commit one block per sample, 200 samples per commit, as the buffer would."""
    seq = 0
    for start in range(0, len(t), 200):
        blocks = []
        for ts, row in zip(t[start : start + 200], v[start : start + 200], strict=True):
            quality = [Quality.BAD if i in bad else Quality.GOOD for i in range(3)] if bad else None
            values = [None if i in bad else float(x) for i, x in enumerate(row)]
            src = int(ts * 1e9)
            blocks.append(
                Block(
                    device,
                    "process",
                    src + ACQ_OFFSET_NS,
                    TAGS,
                    [None] * 3,
                    values,
                    quality,
                    None,
                    src,
                    None,
                    seq,
                )
            )
            seq += 3
        engine.on_committed(blocks, [])
        await asyncio.sleep(0)
    async with asyncio.timeout(20):
        await engine.idle()


async def test_active_binding_raises_and_clears_an_anomaly_with_explanation(
    syn_model: Path, tmp_path: Path, h: Harness
) -> None:
    model = approved_copy(syn_model, tmp_path / "approved")
    engine = h.engine(ModelBindingConfig(manifest=model, device_kind="bio", signals=MAPPING, mode="active"))
    await engine.start()
    try:
        await feed(engine, "d1", *series(8, 11, FAULT))
        await feed(engine, "d2", *series(8, 12))
        status = engine.status()
    finally:
        await engine.stop()
    sha = read_manifest(syn_model).sha256
    anomalies = h.of("anomaly")
    assert [(e.device, e.data["phase"]) for e in anomalies] == [("d1", "start"), ("d1", "end")]
    start, end = anomalies
    assert (
        start.severity is Severity.ALARM and start.data["shadow"] is False and start.data["mode"] == "active"
    )
    assert start.data["model"] == {"id": "syn-pca", "version": "1.0.0", "sha256": sha}
    # source time, not acquisition time: the alarm starts inside the fault window
    assert T0 + FAULT[0] <= start.data["start_ts"] / 1e9 <= T0 + FAULT[0] + 120
    top = start.data["top_signals"][0]
    assert top["signal"] == "temp" and top["tag"] == "T" and top["unit"] == "degC"
    assert top["value"] < top["normal_range"][0]
    assert (
        end.data["duration_s"] >= FAULT[1] - FAULT[0] - 120 and end.data["peak_score"] >= start.data["score"]
    )
    assert status["syn-pca@d1"]["state"] == "ok" and status["syn-pca@d2"]["state"] == "ok"
    assert (
        status["syn-pca@d2"]["windows_scored"] > 2000 and status["syn-pca@d2"]["window_completeness"] == 1.0
    )
    loads = h.of("audit", "model_load")
    assert [e.data["target"] for e in loads] == ["syn-pca@d1", "syn-pca@d2"]
    assert loads[0].data["new"]["sha256"] == sha and loads[0].data["new"]["tags"] == MAPPING
    assert len(h.of("audit", "model_unload")) == 2


async def test_shadow_mode_records_but_never_alerts(syn_model: Path, h: Harness) -> None:
    engine = h.engine(ModelBindingConfig(manifest=syn_model, devices=["d1"], signals=MAPPING))
    await engine.start()
    try:
        await feed(engine, "d1", *series(8, 11, FAULT))
    finally:
        await engine.stop()
    anomalies = h.of("anomaly")
    assert [e.data["phase"] for e in anomalies] == ["start", "end"]
    for e in anomalies:
        assert e.severity is Severity.INFO and e.data["shadow"] is True and e.data["mode"] == "shadow"
    assert anomalies[0].data["severity_if_active"] == "alarm"
    assert not [e for e in h.events if e.kind != "audit" and e.severity is not Severity.INFO]


async def test_altered_model_is_refused_and_the_rest_keeps_running(
    syn_model: Path, model_copy: Path, h: Harness
) -> None:
    onnx_file = model_copy.parent / "syn-pca.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    engine = h.engine(
        ModelBindingConfig(manifest=model_copy, devices=["d1"], signals=MAPPING),
        ModelBindingConfig(manifest=syn_model, devices=["d2"], signals=MAPPING, mode="active"),
    )
    await engine.start()
    try:
        await feed(engine, "d2", *series(1, 3))
        status = engine.status()
    finally:
        await engine.stop()
    refused = [v for k, v in status.items() if k.endswith("@d1")]
    assert refused and refused[0]["state"] == "refused"
    assert "sha256" in refused[0]["error"] and "refusing to load it" in refused[0]["error"]
    audit = h.of("audit", "model_refused")
    assert len(audit) == 1 and audit[0].severity is Severity.ALARM and "altered" in audit[0].data["reason"]
    assert status["syn-pca@d2"]["windows_scored"] > 0


async def test_missing_tag_is_refused_with_the_reason(syn_model: Path, h: Harness) -> None:
    engine = h.engine(ModelBindingConfig(manifest=syn_model, devices=["d1", "ghost"]))
    await engine.start()
    await engine.stop()
    assert "has no tag for temp->temp, ph->ph, do->do" in engine.refused["syn-pca@d1"]
    assert engine.refused["syn-pca@ghost"] == "device 'ghost' is not configured"


async def test_bad_quality_readings_make_windows_incomplete_not_anomalous(
    syn_model: Path, h: Harness
) -> None:
    engine = h.engine(ModelBindingConfig(manifest=syn_model, devices=["d1"], signals=MAPPING, mode="active"))
    await engine.start()
    try:
        await feed(engine, "d1", *series(1, 4, (0.0, 3600.0)), bad=(0, 1))
        status = engine.status()["syn-pca@d1"]
    finally:
        await engine.stop()
    assert status["state"] == "incomplete" and status["windows_scored"] == 0
    assert status["window_completeness"] == pytest.approx(1 / 3, abs=0.01)
    assert not h.of("anomaly")


async def test_mode_change_is_audited(syn_model: Path, tmp_path: Path, h: Harness) -> None:
    model = approved_copy(syn_model, tmp_path / "approved")
    engine = h.engine(ModelBindingConfig(manifest=model, devices=["d1"], signals=MAPPING))
    await engine.start()
    await engine.idle()  # the models load in the background
    try:
        engine.set_mode("syn-pca@d1", "active", reason="validation protocol VP-12 passed", actor="qa.lead")
        assert engine.status()["syn-pca@d1"]["mode"] == "active"
    finally:
        await engine.stop()
    (change,) = h.of("audit", "model_mode")
    assert change.data == {
        "action": "model_mode",
        "target": "syn-pca@d1",
        "actor": "qa.lead",
        "old": "shadow",
        "new": "active",
        "reason": "validation protocol VP-12 passed",
        "os_user": ANY,
        "device": "d1",
    }


def test_binding_config_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one of 'devices'"):
        ModelBindingConfig(manifest=Path("m.model.yaml"))
    with pytest.raises(ValueError, match="exactly one of 'devices'"):
        ModelBindingConfig(manifest=Path("m.model.yaml"), devices=["a"], device_kind="bio")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ModelBindingConfig.model_validate({"manifest": "m", "devices": ["a"], "treshold": 3})


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = Path("models/incubator-pca.model.yaml")
"""Relative on purpose: the engine resolves it against the install folder."""


def door_opening_case(tmp_path: Path) -> tuple[ProfileBase, float, Dataset]:
    """The shipped simulator profile, and 5 h of simulated incubator with a door opening at 3 h."""
    raw = yaml.safe_load((ROOT / "deploy" / "profiles" / "incubator-sim-modbus.yaml").read_text())
    profile = load_drivers()[raw["protocol"]].profile_model().model_validate(raw)
    scn = Scenario.model_validate(
        {"devices": [{"id": "inc1", "kind": "incubator", "faults": ["door_open@3h+1m"]}]}
    )
    generate(scn, 5, 77, tmp_path, period_s=5)
    signals = read_manifest(ROOT / SHIPPED).signal_names
    return profile, scn.start + 3 * 3600, load_csv(tmp_path / "inc1.csv", signals=signals)


async def test_shipped_incubator_model_flags_a_simulated_door_opening(tmp_path: Path, h: Harness) -> None:
    """The shipped model, bound by kind to the shipped simulator profile (tag names must
    match), scores simulator ground truth: the door opening is an anomaly, nothing else is."""
    profile, door, ds = door_opening_case(tmp_path)
    engine = InferenceEngine(
        [ModelBindingConfig(manifest=SHIPPED, device_kind="incubator", mode="active")],
        {"inc1": profile},
        h.events.append,
        h.auditor,
    )
    await engine.start()
    try:
        blocks = [
            Block(
                "inc1",
                "process",
                int(t * 1e9),
                ds.signals,
                [None] * len(ds.signals),
                row.tolist(),
                seq_first=i,
            )
            for i, (t, row) in enumerate(zip(ds.ts, ds.values, strict=True))
        ]
        for i in range(0, len(blocks), 100):
            engine.on_committed(blocks[i : i + 100], [])
            await asyncio.sleep(0)
        async with asyncio.timeout(20):
            await engine.idle()
    finally:
        await engine.stop()
    starts = [e for e in h.of("anomaly") if e.data["phase"] == "start"]
    # shipped unapproved (a project's model is no site's release): configured active, it runs in shadow
    assert len(starts) == 1 and starts[0].severity is Severity.INFO and starts[0].data["shadow"] is True
    assert starts[0].data["severity_if_active"] == "alarm"
    (demoted,) = h.of("audit", "model_mode")
    assert "model incubator-pca 1.0.0 is not approved" in demoted.data["reason"]
    assert door <= starts[0].data["start_ts"] / 1e9 <= door + 60
    assert starts[0].data["top_signals"][0]["signal"] in {
        "co2_pct",
        "co2_valve_pct",
        "temperature_c",
        "rh_pct",
    }


def test_check_reports_every_binding_problem_without_starting(syn_model: Path, model_copy: Path) -> None:
    (model_copy.parent / "syn-pca.onnx").write_bytes(b"not onnx")
    problems = [
        str(p)
        for p in InferenceEngine.check(
            [
                ModelBindingConfig(manifest=syn_model, devices=["d1", "ghost"], signals=MAPPING),
                ModelBindingConfig(manifest=syn_model, devices=["d1"]),
                ModelBindingConfig(manifest=model_copy, devices=["d1"]),
                ModelBindingConfig(manifest=syn_model, device_kind="centrifuge"),
            ],
            {"d1": PROFILE},
        )
    ]
    assert problems[0] == "models[0] syn-pca@ghost: device 'ghost' is not configured"
    assert problems[1] == "models[1] syn-pca@d1: profile 'bio-test' has no tag for temp->temp, ph->ph, do->do"
    assert problems[2].startswith("models[2] ") and "refusing to load it" in problems[2]
    assert problems[3].endswith("no device of kind 'centrifuge'") and len(problems) == 4


@pytest.fixture
def short_drift_model(model_copy: Path) -> Path:
    """The model with a 2-hour drift window (720 slots, judged from 360 on)."""
    m = read_manifest(model_copy)
    drift = m.drift.model_copy(update={"window": 7200.0})
    model_copy.write_text(yaml.safe_dump(m.model_copy(update={"drift": drift}).model_dump(mode="json")))
    return model_copy


async def test_input_drift_is_an_event_and_in_status(short_drift_model: Path, h: Harness) -> None:
    m = read_manifest(short_drift_model)
    engine = h.engine(ModelBindingConfig(manifest=short_drift_model, devices=["d1"], signals=MAPPING))
    await engine.start()
    try:
        t, v = series(4, 13)
        v[len(v) // 2 :, 2] += 8 * m.signals[2].std  # DO reads high from the third hour on
        await feed(engine, "d1", t, v)
        status = engine.status()["syn-pca@d1"]["drift"]
    finally:
        await engine.stop()
    (event,) = h.of("drift")
    assert event.data["phase"] == "start" and event.severity is Severity.WARNING
    assert event.data["ts"] / 1e9 > t[len(t) // 2]
    bounds, do = event.data["bounds"], event.data["signals"]["do"]
    assert set(event.data["signals"]) == {"do"}
    assert do["psi"] > bounds["psi"] or do["shift_sigma"] > bounds["mean_shift_sigma"]
    assert event.data["model"]["id"] == "syn-pca" and status["active"] is True
    assert status["signals"]["do"]["shift_sigma"] > 5  # by the end the whole window is shifted


def test_signals_missing_from_a_block_hold_their_last_good_value_until_a_bad_reading() -> None:
    model = LoadedModel(ROOT / "models" / "bioreactor-pca.model.yaml")
    names = model.manifest.signal_names
    b = Binding("k", "br1", model, Track(model, Settings.of(model.manifest)), list(names), "active")

    def block(tags: list[str], values: list[float], bad: bool = False) -> Block:
        q = [Quality.BAD] * len(tags) if bad else None
        return Block(
            "br1",
            "g",
            0,
            tags,
            [None] * len(tags),
            list(values),
            quality=q,
            reasons=["timeout"] * len(tags) if bad else None,
        )

    first = b.row(
        block(list(names), [float(i) for i in range(len(names))]),
        list(range(len(names))),
        list(range(len(names))),
    )
    assert first == [float(i) for i in range(len(names))]
    # a subscription notification with one changed tag: the others keep their values
    row = b.row(block([names[0]], [42.0]), [0], [0])
    assert row[0] == 42.0 and row[1:] == first[1:]
    # a bad reading ends the hold for that signal only
    row = b.row(block([names[1]], [0.0], bad=True), [1], [0])
    assert math.isnan(row[1]) and row[0] == 42.0
    row = b.row(block([names[0]], [43.0]), [0], [0])
    assert math.isnan(row[1]), "no value is invented after a bad reading"
    # a value nobody re-sends (a constant flow under a subscription) stays the value: hours of
    # notifications of another tag later, the others still hold
    for v in range(1000):
        row = b.row(block([names[0]], [float(v)]), [0], [0])
    assert row[2:] == first[2:]
    # until the link is lost: the gap block's bad readings end every hold
    row = b.row(
        block(list(names), [0.0] * len(names), bad=True), list(range(len(names))), list(range(len(names)))
    )
    assert all(math.isnan(v) for v in row)


async def test_one_model_binds_a_device_once(syn_model: Path, h: Harness) -> None:
    """Two entries scoring the same device with the same model would double every event:
    the second is refused (and ``validate`` says so), the first runs."""
    configs = [
        ModelBindingConfig(manifest=syn_model, devices=["d1"], signals=MAPPING),
        ModelBindingConfig(manifest=syn_model, device_kind="bioreactor", signals=MAPPING, mode="active"),
    ]
    profile = PROFILE.model_copy(update={"device_kind": "bioreactor"})
    assert [str(p) for p in InferenceEngine.check(configs, {"d1": profile})] == [
        "models[1] syn-pca@d1: this model is already bound to this device by models[0]"
    ]
    engine = InferenceEngine(configs, {"d1": profile}, h.events.append, h.auditor)
    await engine.start()
    await engine.stop()
    assert engine.refused == {
        "models[1]:syn-pca@d1": "this model is already bound to this device by models[0]"
    }
    loads = [e for e in h.of("audit") if e.data["action"] == "model_load"]
    assert [e.data["new"]["mode"] for e in loads] == ["shadow"]


async def test_envelope_signal_is_bound_like_an_input_and_gates_scoring(
    syn_model: Path, tmp_path: Path, h: Harness
) -> None:
    """The envelope's signal maps to a device tag through ``signals:`` like the inputs; a
    profile without it is refused by name; outside the envelope nothing is scored."""
    man = private_copy(syn_model, tmp_path)
    m = read_manifest(man)
    write_manifest(man, m.model_copy(update={"envelope": [EnvelopeCondition(signal="age_h", min=1.0)]}))
    age_profile = ProfileBase(
        profile="bio-age", protocol="test", tags=[TagBase(name=t) for t in (*TAGS, "Age")]
    )
    engine = InferenceEngine(
        [
            ModelBindingConfig(
                manifest=man, devices=["d1"], signals={**MAPPING, "age_h": "Age"}, mode="active"
            ),
            ModelBindingConfig(manifest=man, devices=["d2"], signals=MAPPING),
        ],
        {"d1": age_profile, "d2": PROFILE},
        h.events.append,
        h.auditor,
    )
    await engine.start()
    await engine.idle()  # the models load in the background
    try:
        assert engine.refused == {"syn-pca@d2": "profile 'bio-test' has no tag for age_h->age_h"}
        t, v = series(2, 4, (0.0, 7200.0))  # faulty throughout, but the device is never in the envelope
        blocks = [
            Block("d1", "process", int(ts * 1e9), (*TAGS, "Age"), [None] * 4, [*map(float, row), 0.5], None)
            for ts, row in zip(t, v, strict=True)
        ]
        engine.on_committed(blocks, [])
        async with asyncio.timeout(20):
            await engine.idle()
        status = engine.status()["syn-pca@d1"]
    finally:
        await engine.stop()
    assert status["state"] == "out_of_envelope" and status["windows_scored"] == 0
    assert status["windows_out_of_envelope"] > 0
    assert not h.of("anomaly")
