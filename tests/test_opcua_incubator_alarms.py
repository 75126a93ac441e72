"""Issue 15, OPC UA events from an incubator: the incubator served over OPC UA (the same server
implementation as the bioreactor's) raises a DoorOpen condition when a scenario's door-open
fault opens its door and clears it when the door closes; through the agent, with the bundled
``incubator-sim-opcua`` profile, both reach a real mosquitto as ``alarm`` events. The simulator
is served the way ``cleanroom-sim incubator --protocol opcua`` serves it (a plant of one
device); a kind the OPC UA front end does not serve is a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanroom_common.net import free_port
from simulators.cli import build_parser
from simulators.process.faults import Fault
from simulators.process.scenario import DeviceSpec
from simulators.servers.opcua import KINDS
from simulators.servers.plant import Plant, ServeSpec
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, wait_for

INCUBATOR = KINDS["incubator"]


@pytest.fixture
def sim() -> Iterator[ThreadedSim]:
    """``cleanroom-sim incubator --protocol opcua --device-id inc1``, in process. At speed 1 the
    door is open for a wall second; its alarm sets as it opens (no delay), so the test waits on
    the door, not on the alarm delay."""
    args = build_parser().parse_args(["incubator", "--protocol", "opcua", "--device-id", "inc1"])
    device = DeviceSpec(id="inc1", kind=args.kind, params={"door_alarm_delay_s": 0})
    threaded = ThreadedSim(lambda: Plant([(device, ServeSpec(protocol=args.protocol))], speed=1, seed=4))
    with threaded:
        yield threaded


def door_alarms(collector: Collector) -> list[dict[str, Any]]:
    return [
        e
        for m in collector.json("/inc1/events")
        for e in m["events"]
        if e["kind"] == "alarm" and e["data"]["condition"] == "DoorOpen"
    ]


def test_a_door_open_fault_arrives_as_an_alarm_and_its_clearing_as_a_second(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, sim: ThreadedSim
) -> None:
    (endpoint,) = sim.sim.endpoints()
    assert endpoint["protocol"] == "opcua" and endpoint["profile"] == "incubator-sim-opcua"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"""
agent: {{id: gw-inc, status_listen: "127.0.0.1:{free_port()}", shutdown_grace: 0.1}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}
devices:
  - id: inc1
    profile: {endpoint["profile"]}
    connection: {{url: "{endpoint["connection"]["url"]}", timeout: 2s, security_policy: None}}
"""
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        wait_for(lambda: agent.running() and collector.json("/inc1/data"), timeout=30, what="first readings")
        model = sim.sim.devices["inc1"].model

        def open_door() -> None:  # the scenario's fault hook: the door opens at the next step, for 1 s
            t0 = model.t + model.params.step_s
            model.faults.add(Fault.make("door_open", t0, t0 + 1))

        sim.call(open_door)
        wait_for(
            lambda: agent.running() and len(door_alarms(collector)) >= 2, timeout=20, what="raised, cleared"
        )
    finally:
        agent.terminate()
    raised, cleared = door_alarms(collector)[:2]
    assert raised["data"]["active"] is True and cleared["data"]["active"] is False
    assert (raised["data"]["acked"], cleared["data"]["acked"]) == (False, True)
    assert (raised["data"]["retain"], cleared["data"]["retain"]) == (True, False)
    assert cleared["seq"] > raised["seq"] and cleared["data"]["time"] > raised["data"]["time"]
    assert raised["severity"] == "warning" and raised["data"]["severity_ua"] == 600
    assert raised["data"]["source"] == "Incubator" and raised["data"]["event_type"] == "OffNormalAlarmType"
    assert raised["data"]["source_node"] == f"nsu={INCUBATOR.namespace};s=Incubator"
    assert raised["data"]["condition_id"] == f"nsu={INCUBATOR.namespace};s=Incubator.Conditions.DoorOpen"
    assert raised["data"]["message"] == "Door open longer than the alarm delay"
    assert cleared["data"]["message"] == "Back to normal: Door open longer than the alarm delay"
    # the profile's device block fits what the simulator reports: no mismatch was raised
    events = [e for m in collector.json("/inc1/events") for e in m["events"]]
    assert not [e for e in events if e["kind"] == "profile_mismatch"]


def test_a_kind_the_opcua_front_end_does_not_serve_is_a_clear_error() -> None:
    serve = ServeSpec(protocol="opcua")
    with pytest.raises(ValueError, match="pc-1: the OPC UA front end serves bioreactors and incubators only"):
        Plant([(DeviceSpec(id="pc-1", kind="particle_counter"), serve)])
    assert serve.profile_name("incubator") == "incubator-sim-opcua"
