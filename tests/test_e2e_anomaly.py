"""A simulator fault becomes an anomaly event on the broker, with the right top signal.

The whole path: an OPC UA bioreactor (source timestamps in simulated time, so the
model's 30 s period passes quickly) → agent with the shipped bioreactor model active (an
approved copy: the shipped model is unapproved and would run in shadow) →
buffer → mosquitto → a subscriber. After the model has warmed up on normal operation,
the temperature loop starts to oscillate; the anomaly event must name the heater and
the temperature as its top signals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.status import fetch_status
from cleanroom_common.net import free_port
from simulators.process.faults import Fault
from simulators.servers.opcua import serve_bioreactor_opcua
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, wait_for
from tests.test_inference import approved_copy

ROOT = Path(__file__).resolve().parent.parent
SPEED = 150.0
SETTLE_SPEED = 3000.0
"""The shipped model is trained on runs past their 3 h start-up transient: the simulator
runs fast through it before the agent starts, then at SPEED."""


@pytest.fixture
def opcua_sim() -> Iterator[ThreadedSim]:
    ts = ThreadedSim(
        lambda: serve_bioreactor_opcua(port=0, speed=SETTLE_SPEED, seed=11, update_interval_s=0.1)
    )
    with ts:
        model = ts.sim.model
        wait_for(lambda: ts.call(lambda: model.t) > model.start_time_s + 4 * 3600, timeout=30, what="settled")

        def slow_down() -> None:
            ts.sim.clock.speed = SPEED

        ts.call(slow_down)
        yield ts


def anomalies(collector: Collector) -> list[dict[str, Any]]:
    out = []
    for topic, payload, _ in list(collector.messages):
        if topic.endswith("/events") and payload:
            out += [e for e in json.loads(payload)["events"] if e["kind"] == "anomaly"]
    return out


def test_temperature_oscillation_raises_an_anomaly_naming_the_loop(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, opcua_sim: ThreadedSim
) -> None:
    manifest = approved_copy(ROOT / "models" / "bioreactor-pca.model.yaml", tmp_path / "models")
    cfg = tmp_path / "agent.yaml"
    listen = f"127.0.0.1:{free_port()}"
    cfg.write_text(
        f"""
agent: {{id: gw-anomaly, status_listen: "{listen}"}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}
devices:
  - id: br1
    profile: bioreactor-sim-opcua
    connection: {{url: "{opcua_sim.sim.url}", timeout: 2s, security_policy: None}}
    groups:
      process: {{interval: 200ms, sampling_interval: 100ms}}
      status: {{interval: 200ms}}
models:
  - {{manifest: {manifest}, devices: [br1], mode: active}}
"""
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        # 60 slots of 30 s simulated time warm the model up: 12 s of wall time at ×150
        model = opcua_sim.sim.model
        wait_for(
            lambda: agent.running() and opcua_sim.call(lambda: model.t) > model.start_time_s + 2400,
            timeout=40,
            interval=0.2,
            what="model warm-up",
        )
        before = {e["seq"] for e in anomalies(collector)}
        t_fault = opcua_sim.call(lambda: model.t)
        opcua_sim.call(
            lambda: model.faults.add(Fault.make("temperature_oscillation", t_fault, t_fault + 7200))
        )

        def fault_anomaly() -> dict[str, Any] | None:
            agent.running()
            for e in anomalies(collector):
                if e["seq"] not in before and e["data"]["phase"] == "start":
                    return e
            return None

        try:
            event = wait_for(fault_anomaly, timeout=40, interval=0.2, what="an anomaly event after the fault")
        except AssertionError:
            seen = [(e["data"].get("state"), e["data"].get("top_signals")) for e in anomalies(collector)]
            raise AssertionError(
                f"no anomaly; status: {fetch_status(listen).get('models')}; {seen}"
            ) from None
    finally:
        agent.terminate()
    data = event["data"]
    assert event["severity"] == "alarm" and data["shadow"] is False and data["mode"] == "active"
    assert data["model"]["id"] == "bioreactor-pca" and len(data["model"]["sha256"]) == 64
    # the alarm is about the fault: it starts after it (device time, from source timestamps)
    assert data["start_ts"] >= t_fault * 1e9
    assert data["peak_score"] > data["threshold"]
    top = [s["tag"] for s in data["top_signals"]]
    # an oscillating temperature loop: the heater swings and the temperature with it
    assert set(top[:2]) == {"heater_pct", "temperature_c"}, f"top signals {top}"
    for s in data["top_signals"]:
        assert {"value", "normal_range", "unit", "contribution"} <= set(s)
