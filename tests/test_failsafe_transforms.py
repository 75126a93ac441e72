"""Fail-safe transforms (issue 11): one poison record in a commit batch (a value no float
holds, a rule that raises) costs that record only. The rest of the batch is evaluated,
another device's excursion in the same batch still raises its event, and the failure is
logged once and counted, however many batches carry it."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase, TagBase
from agent.core.records import Block, Event
from agent.transforms.inference import Binding, InferenceEngine, ModelBindingConfig
from agent.transforms.limits import LevelRule, LimitMonitor, LimitsConfig
from cleanroom_common.bundled import package_dir

T0_NS = 1_767_571_200 * 10**9
HUGE = int("9" * 400)
"""An integer no float holds: ``float(HUGE)`` and ``math.isfinite(HUGE)`` raise OverflowError."""


def block(device: str, values: dict[str, Any], seq: int, t_s: float = 0.0) -> Block:
    tags = tuple(values)
    return Block(device, "g", T0_NS + int(t_s * 1e9), tags, (None,) * len(tags), list(values.values()),
                 seq_first=seq)  # fmt: skip


def limits(events: list[Event]) -> LimitMonitor:
    profile = ProfileBase(profile="p", protocol="test", tags=[TagBase(name="temp")])
    monitor = LimitMonitor(
        LimitsConfig.model_validate({"tags": [{"tag": "temp", "action_high": 40.0}]}),
        {"d1": profile, "d2": profile},
        events.append,
        Auditor(events.append, "gw"),
    )
    monitor._started = True
    return monitor


def excursions(events: list[Event]) -> list[str]:
    return [e.device for e in events if e.kind == "excursion" and e.data["phase"] == "start"]


@pytest.mark.parametrize("poison", [HUGE, float("nan"), float("inf"), -HUGE])
def test_a_value_no_float_holds_does_not_hide_another_devices_excursion(poison: Any) -> None:
    events: list[Event] = []
    monitor = limits(events)
    monitor.on_committed([block("d1", {"temp": poison}, 0), block("d2", {"temp": 50.0}, 1)], [])
    assert excursions(events) == ["d2"]


def test_a_rule_that_raises_costs_its_record_only_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Event] = []
    monitor = limits(events)
    real = LevelRule.update

    def update(self: LevelRule, ts_ns: int, value: float, seq: int | None) -> Event | None:
        if self.exc.device == "d1":
            raise ZeroDivisionError("rule bug")
        return real(self, ts_ns, value, seq)

    monkeypatch.setattr(LevelRule, "update", update)
    for i in range(3):  # the same fault in three batches: counted thrice, logged once
        monitor.on_committed(
            [block("d1", {"temp": 50.0}, 2 * i, i), block("d2", {"temp": 50.0 + i}, 2 * i + 1, i)], []
        )
    assert excursions(events) == ["d2"], "d2's excursion starts in the first batch"
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and "rule bug" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert monitor.status()["failed_records"] == 3


@pytest.fixture
async def engine() -> AsyncIterator[InferenceEngine]:
    manifest = package_dir("agent.bundled") / "models" / "bioreactor-pca.model.yaml"
    events: list[Event] = []
    engine = InferenceEngine(
        [ModelBindingConfig(manifest=manifest, devices=["d1", "d2"])],
        dict.fromkeys(("d1", "d2"), _bioreactor_profile()),
        events.append,
        Auditor(events.append, "gw"),
    )
    await engine.start()
    await engine.idle()  # the models load in the background
    try:
        yield engine
    finally:
        await engine.stop()


def rows(engine: InferenceEngine) -> dict[str, list[list[float]]]:
    return {b.device: b.rows for b in engine.bindings.values()}


async def test_inference_takes_a_value_no_float_holds_as_a_missing_sample(engine: InferenceEngine) -> None:
    names = _bioreactor_signals()
    poison = block("d1", {**dict.fromkeys(names, 1.0), names[0]: HUGE}, 0)
    engine.on_committed([poison, block("d2", dict.fromkeys(names, 1.0), 1)], [])
    copied = rows(engine)
    assert math.isnan(copied["d1"][0][0]) and copied["d1"][0][1:] == [1.0] * (len(names) - 1)
    assert copied["d2"] == [[1.0] * len(names)], "the next device's record was copied"


async def test_inference_copies_the_rest_of_a_batch_after_a_record_that_raises(
    engine: InferenceEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    names = _bioreactor_signals()
    real = Binding.row

    def row(self: Binding, block: Block, sig: list[int], pos: list[int]) -> list[float]:
        if block.device == "d1":
            raise IndexError("copy bug")
        return real(self, block, sig, pos)

    monkeypatch.setattr(Binding, "row", row)
    for i in range(2):
        engine.on_committed(
            [
                block("d1", dict.fromkeys(names, 1.0), 2 * i),
                block("d2", dict.fromkeys(names, 1.0), 2 * i + 1),
            ],
            [],
        )
    copied = rows(engine)
    assert copied["d1"] == [] and len(copied["d2"]) == 2
    assert engine.failed_records == 2
    assert len([r for r in caplog.records if "copy bug" in r.getMessage()]) == 1


def _bioreactor_signals() -> list[str]:
    from agent.transforms.anomaly.manifest import read_manifest

    return list(
        read_manifest(package_dir("agent.bundled") / "models" / "bioreactor-pca.model.yaml").data_names
    )


def _bioreactor_profile() -> ProfileBase:
    return ProfileBase(profile="bio", protocol="test", tags=[TagBase(name=n) for n in _bioreactor_signals()])
