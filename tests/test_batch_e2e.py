"""Issue 18 end to end: simulated plant (Modbus TCP) -> agent -> real mosquitto, batches assigned by
the simulated MES over the agent's MQTT command topic, faults injected on the simulators, and
``cleanroom-agent report batch`` over the agent's buffer.

Two batches run side by side on two bioreactors behind one gateway:

* LOT-C on br-c is clean; a broker outage falls in it (store and forward: no gap, and the readings
  acquired during the outage reach the broker later still naming LOT-C).
* LOT-F on br-f gets one temperature excursion (a ``temperature_oscillation`` hump past the action
  limit) and one comm fault (the device stops answering: a ``device_outage`` gap); the agent is
  restarted in the middle of it, and carries on stamping LOT-F.

The report of LOT-F lists exactly that excursion and that gap; LOT-C's says "none" in every
exception section. Commands are published at points the test observes (never on a wall-clock
guess), and process time runs at ×240, so the whole run takes ~15 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.cli import main
from cleanroom_common.net import free_port
from simulators.mes import Broker, MesPublisher
from simulators.process.batch import BatchSchedule, BatchSpec
from simulators.process.faults import Fault
from simulators.process.scenario import DeviceSpec
from simulators.servers.faults import CommFault
from simulators.servers.plant import Plant, ServeSpec
from tests.support import Collector, Mosquitto, until

AGENT = "gw-batch"
TOPIC = f"cleanroom/agent/batch/{AGENT}"
SPEED = 240.0
ACTION_HIGH = 38.0
EXCEPTION_SECTIONS = ("excursions", "alarms", "anomalies", "gaps", "conflicts")
HTML_SECTIONS = (
    "Limit excursions",
    "Excursion plots",
    "Device alarms",
    "Anomalies",
    "Data gaps",
    "Configuration, model and limits changes",
    "Batch conflicts and refused commands",
)
"""The exception sections of the HTML report, each of which a clean batch answers "none"."""


def _config(tmp: Path, broker_port: int, sim_port: int) -> Path:
    cfg = tmp / "agent.yaml"
    device = """
  - id: {id}
    profile: bioreactor-sim
    connection: {{host: 127.0.0.1, port: {port}, unit_id: {unit}, timeout: 300ms,
                  backoff_min: 100ms, backoff_max: 300ms}}
    groups:
      process: {{interval: 150ms}}
      status: {{interval: 1s}}
      setpoints: {{interval: 5s}}"""
    devices = "".join(device.format(id=d, port=sim_port, unit=u) for d, u in (("br-f", 1), ("br-c", 2)))
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
  reconnect_max: 300ms
batch:
  mqtt_commands: true
devices:{devices}
limits:
  tags:
    - {{tag: temperature_c, devices: [br-f, br-c], action_high: {ACTION_HIGH}, deadband: 0.3, consecutive: 2}}
"""
    )
    return cfg


def _batch(batch_id: str, device: str, steps: list[str]) -> BatchSpec:
    return BatchSpec.model_validate(
        {"id": batch_id, "product": "CAR-T", "coi_id": f"COI-{batch_id}", "devices": [device], "start": 0,
         "steps": [{"name": s, "duration": 600} for s in steps], "actor": "mes-e2e", "reason": "e2e run"}
    )  # fmt: skip


def _blocks(collector: Collector, device: str) -> list[dict[str, Any]]:
    return [b for seg in collector.json(f"/{device}/data") for b in seg.get("blocks", [])]


def _events(collector: Collector, device: str, kind: str) -> list[dict[str, Any]]:
    return [
        e for seg in collector.json(f"/{device}/events") for e in seg.get("events", []) if e["kind"] == kind
    ]


def _report(tmp: Path, batch_id: str, fmt: str = "json") -> str:
    out = tmp / f"{batch_id}.{fmt}"
    rc = main(["report", "batch", batch_id, "--buffer", str(tmp / "buffer.db"), "--format", fmt,
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    return out.read_text()


@pytest.mark.timeout(120)
async def test_batch_context_and_exception_reports_end_to_end(tmp_path: Path) -> None:
    broker = Mosquitto(persistence=True).start()
    collector = Collector(broker.port, "cleanroom/#", persistent=True)
    plant = Plant(
        [(DeviceSpec(id=d, kind="bioreactor"), ServeSpec(protocol="modbus-tcp", endpoint="gw", unit_id=u))
         for d, u in (("br-f", 1), ("br-c", 2))],
        speed=SPEED,
        seed=3,
    )  # fmt: skip
    mes = MesPublisher(Broker(port=broker.port), TOPIC, ack_timeout_s=20)
    agent: Agent | None = None
    try:
        async with plant:
            (port,) = {e["connection"]["port"] for e in plant.endpoints()}
            cfg = _config(tmp_path, broker.port, port)
            agent = Agent(load_config(cfg))
            await agent.start()
            # the agent subscribes to its command topic on connect, before it publishes anything
            await until(
                lambda: _blocks(collector, "br-f") and _blocks(collector, "br-c"), 20, "first readings"
            )
            assert all(b["batch"] is None for b in _blocks(collector, "br-f"))  # no batch yet: says so
            await mes.connect()

            clock = plant.clock
            lot_f = BatchSchedule([_batch("LOT-F", "br-f", ["expansion", "harvest"])], clock.now())
            lot_c = BatchSchedule([_batch("LOT-C", "br-c", ["expansion"])], clock.now())
            (f_start, f_step, f_end), (c_start, c_end) = lot_f.commands(), lot_c.commands()
            for command in (f_start, c_start):
                await mes.publish(command.payload())
            await until(lambda: len(_events(collector, "br-f", "batch_context")) == 1, 10, "LOT-F start")
            await until(lambda: len(_events(collector, "br-c", "batch_context")) == 1, 10, "LOT-C start")

            # LOT-C: a broker outage; what is acquired meanwhile is delivered later, naming LOT-C
            await asyncio.to_thread(broker.stop)
            down_ns = time.time_ns()
            await asyncio.sleep(1.0)
            up_ns = time.time_ns()
            await asyncio.to_thread(broker.start)

            # LOT-F: one temperature excursion (simulated 10 min hump past the action limit)
            excursion_from = time.time_ns()
            t = clock.now()
            plant.devices["br-f"].model.faults.add(
                Fault.make("temperature_oscillation", t, t + 600, {"amplitude_c": 2.0, "period": 1200})
            )
            await until(
                lambda: (
                    [e for e in _events(collector, "br-f", "excursion") if e["data"].get("phase") == "end"]
                    or clock.now() > t + 1200
                ),
                20,
                "the excursion's end",
            )
            excursion_to = time.time_ns()
            # readings of the outage window arrived after it, stamped LOT-C
            outage = [b for b in _blocks(collector, "br-c") if down_ns <= b["ts"] <= up_ns]
            assert outage and {b["batch"] for b in outage} == {"LOT-C#1"}

            await mes.publish(c_end.payload())  # LOT-C ends clean
            await until(lambda: len(_events(collector, "br-c", "batch_context")) == 2, 10, "LOT-C end")

            # LOT-F: the device stops answering, then answers again: one outage
            gap_from = time.time_ns()
            plant.devices["br-f"].faults.force(CommFault.TIMEOUT)
            await until(
                lambda: _states(collector, "br-f").count("disconnected") == 1, 10, "br-f disconnected"
            )
            plant.devices["br-f"].faults.force(None)
            await until(lambda: _states(collector, "br-f")[-1:] == ["connected"], 10, "br-f connected again")
            gap_to = time.time_ns()

            # LOT-F survives an agent restart: the next agent restores it from its buffer
            await agent.stop()
            agent = None
            restarted_ns = time.time_ns()
            agent = Agent(load_config(cfg))
            await agent.start()
            await until(
                lambda: [b for b in _blocks(collector, "br-f") if b["ts"] > restarted_ns], 20, "readings"
            )
            after = [b for b in _blocks(collector, "br-f") if b["ts"] > restarted_ns]
            assert {b["batch"] for b in after} == {"LOT-F#1"}
            assert agent.batches.current("br-f") is not None

            for command in (f_step, f_end):
                await mes.publish(command.payload())
            await until(lambda: len(_events(collector, "br-f", "batch_context")) == 3, 10, "LOT-F step, end")
            ended_ns = time.time_ns()
            await until(lambda: [b for b in _blocks(collector, "br-f") if b["ts"] > ended_ns], 10, "readings")
            assert {b["batch"] for b in _blocks(collector, "br-f") if b["ts"] > ended_ns} == {None}
            await agent.stop()
            agent = None
    finally:
        if agent is not None:
            await agent.stop()
        await mes.close()
        collector.close()
        broker.close()

    refs = [e["data"]["ref"] for e in _events(collector, "br-f", "batch_context")]
    assert refs == ["LOT-F#1", "LOT-F#2", "LOT-F#3"]

    faulty = json.loads(_report(tmp_path, "LOT-F"))
    (excursion,) = faulty["excursions"]
    assert (excursion["device"], excursion["tag"]) == ("br-f", "temperature_c")
    assert excursion_from <= excursion["start_ts"] <= excursion["end_ts"] <= excursion_to
    assert excursion["peak"] > ACTION_HIGH
    (gap,) = faulty["gaps"]
    assert (gap["kind"], gap["device"], gap["explained"]) == ("device_outage", "br-f", True)
    assert gap_from <= gap["from_ts"] <= gap["to_ts"] <= gap_to
    assert faulty["alarms"] == faulty["anomalies"] == faulty["conflicts"] == []
    assert faulty["integrity"]["ok"]

    clean = json.loads(_report(tmp_path, "LOT-C"))
    assert {s: clean[s] for s in EXCEPTION_SECTIONS} == {s: [] for s in EXCEPTION_SECTIONS}
    assert clean["changes"] == [] and clean["integrity"]["ok"]
    assert clean["header"]["devices"] == ["br-c"] and clean["header"]["end_ts"] is not None
    html = _report(tmp_path, "LOT-C", "html")
    for title in HTML_SECTIONS:
        assert f'<h2>{title}</h2><p class="none">none</p>' in html, title


def _states(collector: Collector, device: str) -> list[str]:
    return [e["data"]["state"] for e in _events(collector, device, "device_state")]
