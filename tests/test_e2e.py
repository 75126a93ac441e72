"""Simulator → agent (a real child process) → mosquitto → a test subscriber.

These tests hold the non-negotiables: every polled reading arrives, with the values
the simulator served, in sequence order per device; a broker outage and a SIGKILL of
the agent lose nothing committed; duplicates are only re-sends of the same (agent, seq).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import load_config
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from cleanroom_common.net import free_port
from simulators.process.base import Clock
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, wait_for

AGENT = "gw-e2e"


def write_config(tmp: Path, broker_port: int, sim_port: int, interval: str = "200ms") -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"""
agent:
  id: {AGENT}
  status_listen: 127.0.0.1:{free_port()}
  shutdown_grace: 5s
buffer:
  path: buffer.db
  commit_interval: 50ms
mqtt:
  host: 127.0.0.1
  port: {broker_port}
  reconnect_min: 100ms
  reconnect_max: 500ms
health:
  clock_sync: false  # the test machine's clock is not NTP-synchronised: not what these tests check
devices:
  - id: br1
    profile: bioreactor-sim
    connection: {{host: 127.0.0.1, port: {sim_port}, timeout: 1s, backoff_min: 100ms, backoff_max: 500ms}}
    groups:
      process: {{interval: {interval}}}
      status: {{interval: {interval}}}
      setpoints: {{interval: 1s}}
"""
    )
    return cfg


def buffer_stats(tmp: Path) -> dict[str, Any]:
    buf = Buffer(BufferConfig(path=tmp / "buffer.db"), AGENT)
    buf.open(readonly=True)
    try:
        return buf.stats()
    finally:
        buf.close()


def received(collector: Collector) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(readings, events) in arrival order; a reading is one element of a block."""
    readings: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for topic, payload, _ in list(collector.messages):
        if not payload:
            continue
        msg = json.loads(payload)
        assert msg["agent"] == AGENT
        if topic.endswith("/data"):
            for b in msg["blocks"]:
                for i, tag in enumerate(b["tags"]):
                    q = b["quality"][i] if "quality" in b else "good"
                    readings.append(
                        {
                            "device": msg["device"],
                            "seq": b["seq"] + i,
                            "tag": tag,
                            "value": b["values"][i],
                            "quality": q,
                            "ts": b["ts"],
                            "group": b["group"],
                        }
                    )
        elif topic.endswith(("/events", "/audit")):
            events.extend(msg["events"])
    return readings, events


def assert_no_loss_and_ordered(
    readings: list[dict[str, Any]], events: list[dict[str, Any]], next_seq: int
) -> None:
    """Every committed seq arrived; a repeated seq is an identical re-send; per device, the
    first arrival of each seq is in increasing order."""
    first: dict[int, dict[str, Any]] = {}
    for r in readings:
        if r["seq"] in first:
            assert first[r["seq"]] == r, f"seq {r['seq']} reused for a different reading"
        else:
            first[r["seq"]] = r
    for e in events:
        first.setdefault(e["seq"], e)
    missing = sorted(set(range(next_seq)) - set(first))
    assert not missing, f"{len(missing)} committed seqs never reached the broker, e.g. {missing[:10]}"
    by_device: dict[str, list[int]] = {}
    seen: set[int] = set()
    for r in readings:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            by_device.setdefault(r["device"], []).append(r["seq"])
    for device, seqs in by_device.items():
        assert seqs == sorted(seqs), f"{device}: readings out of order"


def _status_json(cfg: Path) -> dict[str, Any] | None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "-c", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(proc.stdout)
    polled = status["devices"].get("br1", {}).get("driver", {}).get("requests", 0) > 0
    return status if polled else None


@pytest.fixture
def frozen_sim() -> Iterator[ThreadedSim]:
    """A bioreactor whose clock stands still: every poll must return the same values."""
    t0 = time.time()
    clock = Clock(1.0, start_time_s=t0, wall=lambda: t0)
    ts = ThreadedSim(lambda: serve_bioreactor_modbus(port=0, clock=clock, seed=7))
    with ts:
        yield ts


@pytest.fixture
def live_sim() -> Iterator[ThreadedSim]:
    ts = ThreadedSim(lambda: serve_bioreactor_modbus(port=0, speed=60.0, seed=7))
    with ts:
        yield ts


@pytest.fixture
def persistent() -> Iterator[tuple[Mosquitto, Collector]]:
    """A broker that keeps sessions across a restart, and a subscriber with a persistent
    session: what the subscriber receives is then exactly what the broker accepted."""
    broker = Mosquitto(persistence=True).start()
    collector = Collector(broker.port, persistent=True)
    try:
        yield broker, collector
    finally:
        collector.close()
        broker.close()


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[[Path], AgentProcess]]:
    """Start ``cleanroom-agent run`` on a config; every agent started is killed at teardown."""
    procs: list[AgentProcess] = []

    def start(cfg: Path) -> AgentProcess:
        procs.append(AgentProcess(cfg, tmp_path / "agent.log").start())
        return procs[-1]

    yield start
    for p in procs:
        p.close()


def test_every_reading_arrives_once_with_served_values(
    tmp_path: Path,
    mosquitto: Mosquitto,
    collector: Collector,
    frozen_sim: ThreadedSim,
    start_agent: Callable[[Path], AgentProcess],
) -> None:
    cfg = write_config(tmp_path, mosquitto.port, frozen_sim.sim.port)
    agent = start_agent(cfg)
    wait_for(
        lambda: agent.running() and len(received(collector)[0]) >= 26 * 10,
        timeout=30,
        what="ten polls of readings",
    )
    assert agent.terminate() == 0, (tmp_path / "agent.log").read_text()

    stats = buffer_stats(tmp_path)
    assert stats["depth_records"] == 0, "a clean stop with the broker up leaves nothing undelivered"
    wait_for(
        lambda: len({r["seq"] for r in received(collector)[0]}) == stats["committed_readings_total"],
        timeout=10,
        what="all committed readings at the subscriber",
    )
    readings, events = received(collector)
    assert len(readings) == len({r["seq"] for r in readings}), "each reading arrives exactly once"
    assert_no_loss_and_ordered(readings, events, stats["next_seq"])

    signals = frozen_sim.call(frozen_sim.sim.model.signals)
    process = [r for r in readings if r["group"] == "process"]
    assert process and all(r["quality"] == "good" for r in process)
    checked = 0
    for r in process:
        if r["tag"] in signals:
            # register resolution: scaled integers to 0.01, float32 to 1e-6 relative
            assert r["value"] == pytest.approx(signals[r["tag"]], rel=1e-5, abs=0.011), r
            checked += 1
    assert checked >= 10 * len(process) // 17
    kinds = {e["kind"] for e in events}
    assert {"audit", "device_state"} <= kinds


def test_broker_outage_loses_nothing(
    tmp_path: Path,
    live_sim: ThreadedSim,
    start_agent: Callable[[Path], AgentProcess],
    persistent: tuple[Mosquitto, Collector],
) -> None:
    broker, collector = persistent
    cfg = write_config(tmp_path, broker.port, live_sim.sim.port)
    agent = start_agent(cfg)
    wait_for(
        lambda: agent.running() and len(received(collector)[0]) > 100,
        timeout=30,
        what="readings before the outage",
    )
    broker.stop()
    time.sleep(3.0)  # the agent keeps polling and committing while the broker is away
    during = buffer_stats(tmp_path)
    assert during["depth_readings"] > 0, "readings must accumulate in the buffer during the outage"
    broker.start()
    wait_for(lambda: buffer_stats(tmp_path)["depth_records"] < 5, timeout=30, what="backlog drained")
    assert agent.terminate() == 0
    stats = buffer_stats(tmp_path)
    assert stats["depth_records"] == 0
    wait_for(
        lambda: max((r["seq"] for r in received(collector)[0]), default=-1) >= stats["next_seq"] - 40,
        timeout=10,
        what="the last readings at the subscriber",
    )
    readings, events = received(collector)
    assert_no_loss_and_ordered(readings, events, stats["next_seq"])


def test_sigkill_loses_nothing_committed(
    tmp_path: Path,
    live_sim: ThreadedSim,
    start_agent: Callable[[Path], AgentProcess],
    persistent: tuple[Mosquitto, Collector],
) -> None:
    broker, collector = persistent
    cfg = write_config(tmp_path, broker.port, live_sim.sim.port, interval="100ms")
    first = start_agent(cfg)
    wait_for(
        lambda: first.running() and len(received(collector)[0]) > 200,
        timeout=30,
        what="readings before the kill",
    )
    first.kill()  # SIGKILL: no flush, no goodbye
    killed_at = buffer_stats(tmp_path)
    assert killed_at["committed_readings_total"] > 0

    second = start_agent(cfg)
    wait_for(
        lambda: buffer_stats(tmp_path)["next_seq"] > killed_at["next_seq"] + 100,
        timeout=30,
        what="the restarted agent committing new readings",
    )
    assert second.terminate() == 0
    stats = buffer_stats(tmp_path)
    assert stats["depth_records"] == 0
    wait_for(
        lambda: max((r["seq"] for r in received(collector)[0]), default=-1) >= stats["next_seq"] - 40,
        timeout=10,
        what="the last readings at the subscriber",
    )
    readings, events = received(collector)
    assert_no_loss_and_ordered(readings, events, stats["next_seq"])
    # the restart continued the sequence: its first record comes after the last committed one
    starts = sorted(
        {e["seq"] for e in events if e["kind"] == "audit" and e["data"]["action"] == "agent_start"}
    )
    assert len(starts) == 2 and starts[1] >= killed_at["next_seq"]


def test_sigterm_exits_zero_and_says_offline(
    tmp_path: Path,
    mosquitto: Mosquitto,
    collector: Collector,
    frozen_sim: ThreadedSim,
    start_agent: Callable[[Path], AgentProcess],
) -> None:
    cfg = write_config(tmp_path, mosquitto.port, frozen_sim.sim.port)
    agent = start_agent(cfg)
    wait_for(
        lambda: any(t.endswith(f"agent/status/{AGENT}") for t, _, _ in collector.messages),
        timeout=20,
        what="status",
    )
    # status from the running agent, as an operator would ask for it
    status = wait_for(lambda: _status_json(cfg), timeout=20, what="status with a poll")
    br1 = status["devices"]["br1"]
    assert br1["state"] == "connected" and br1["driver"]["requests"] > 0
    assert status["broker"]["connected"] is True
    assert status["config_sha256"] == load_config(cfg).sha256
    assert {"depth_readings", "oldest_undelivered_age_s", "size_bytes"} <= set(status["buffer"])
    human = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert human.returncode == 0 and "br1" in human.stdout and "connected" in human.stdout
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(20) == 0
    agent.proc = None
    statuses = [json.loads(p) for t, p, _ in collector.messages if t.endswith(f"agent/status/{AGENT}") and p]
    assert statuses[0]["status"] == "online" and statuses[-1]["status"] == "offline"
