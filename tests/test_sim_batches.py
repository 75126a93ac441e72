"""The simulated plant runs batches: the schedule model, the devices' batch nodes over a real OPC
UA client, and the simulated MES publishing its assignment commands to a real mosquitto (also
through a broker restart), in process and as ``cleanroom-sim mes``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, ua
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulators.cli import main as sim_main
from simulators.mes import Broker, MesError, MesPublisher, run_mes
from simulators.process.base import Clock
from simulators.process.batch import BatchSchedule, BatchSpec
from simulators.process.scenario import load_scenario
from simulators.servers.opcua import NAMESPACE
from simulators.servers.plant import Plant
from tests.support import Collector, Mosquitto, until, wait_for

LOT = {
    "id": "LOT-1",
    "product": "CAR-T",
    "coi_id": "COI-9",
    "devices": ["br-1", "inc-1"],
    "start": "1m",
    "steps": [{"name": "inoculation", "duration": "10m"}, {"name": "expansion", "duration": "1h"}],
}
DEVICES = [{"id": "br-1", "kind": "bioreactor"}, {"id": "inc-1", "kind": "incubator"}]


def _scenario(tmp_path: Path, batches: list[Any], devices: list[Any] = DEVICES, **top: Any) -> Path:
    path = tmp_path / "batches.yaml"
    path.write_text(yaml.safe_dump({**top, "devices": devices, "batches": batches}))
    return path


# --------------------------------------------------------------------------- schedule model


def test_schedule_commands_and_what_each_device_holds(tmp_path: Path) -> None:
    later = {
        "id": "LOT-2",
        "devices": ["br-1"],
        "group": "suite-2",
        "start": "71m",
        "steps": [{"name": "harvest", "duration": 60}],
    }
    schedule = load_scenario(_scenario(tmp_path, [later, LOT])).batch_schedule(1000.0)
    got = [(c.t, c.payload()) for c in schedule.commands()]
    common = {"batch_id": "LOT-1", "actor": "mes-sim", "reason": "scheduled by the simulated MES"}
    assert got == [
        (
            1060.0,
            {
                "action": "start",
                "devices": ["br-1", "inc-1"],
                **common,
                "coi_id": "COI-9",
                "product": "CAR-T",
                "step": "inoculation",
            },
        ),
        (1660.0, {"action": "step", "devices": ["br-1", "inc-1"], **common, "step": "expansion"}),
        # released and reassigned at one instant: the end goes first
        (5260.0, {"action": "end", "devices": ["br-1", "inc-1"], **common}),
        (
            5260.0,
            {
                "action": "start",
                "group": "suite-2",
                "batch_id": "LOT-2",
                "step": "harvest",
                "actor": "mes-sim",
                "reason": "scheduled by the simulated MES",
            },
        ),
        (
            5320.0,
            {
                "action": "end",
                "group": "suite-2",
                "batch_id": "LOT-2",
                "actor": "mes-sim",
                "reason": "scheduled by the simulated MES",
            },
        ),
    ]
    assert list(got[0][1]) == [
        "action",
        "devices",
        "batch_id",
        "coi_id",
        "product",
        "step",
        "actor",
        "reason",
    ]
    assert [c.action for c in schedule.commands(end_s=1660.0)] == ["start"]

    def held(device: str, t: float) -> tuple[str, str] | None:
        h = schedule.held(device, t)
        return None if h is None else (h.batch.id, h.step)

    assert held("br-1", 1059.9) is None
    assert held("br-1", 1060.0) == held("inc-1", 1659.9) == ("LOT-1", "inoculation")
    assert held("inc-1", 1660.0) == ("LOT-1", "expansion")
    assert held("inc-1", 5260.0) is None and held("br-1", 5260.0) == ("LOT-2", "harvest")
    assert held("br-1", 5320.0) is None and held("pc-1", 1100.0) is None


BAD = {
    "unknown device": ({**LOT, "devices": ["br-1", "br-9"]}, "batches[0] (LOT-1): no device 'br-9'"),
    "overlap": (
        [LOT, {**LOT, "id": "LOT-2", "devices": ["inc-1"], "start": "70m"}],
        "device 'inc-1': batch 'LOT-2' starts before batch 'LOT-1' ends",
    ),
    "device twice": ({**LOT, "devices": ["br-1", "br-1"]}, "device br-1 listed twice"),
    "no steps": ({**LOT, "steps": []}, "batches[0].steps"),
    "zero duration": ({**LOT, "steps": [{"name": "x", "duration": 0}]}, "batches[0].steps[0].duration"),
    "bad duration": ({**LOT, "steps": [{"name": "x", "duration": "soon"}]}, "batches[0].steps[0].duration"),
    "bad id": ({**LOT, "id": "LOT 1#2"}, "batches[0].id"),
    "typo": ({**LOT, "product_id": "x"}, "batches[0].product_id"),
    "no devices": ({**LOT, "devices": []}, "batches[0].devices"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_batches_section_names_the_problem(case: str, tmp_path: Path) -> None:
    batch, message = BAD[case]
    with pytest.raises(ValueError, match=r"batches\.yaml") as info:
        load_scenario(_scenario(tmp_path, batch if isinstance(batch, list) else [batch]))
    assert message in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_batch = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["LOT-1", "", "a b", "x" * 70]) | st.text(max_size=6),
        "devices": st.lists(st.sampled_from(["br-1", "inc-1", "nope"]), max_size=3) | _json,
        "start": st.sampled_from(["1m", "-1m", "x", 0, 3.5]) | _json,
        "steps": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=4), "duration": st.sampled_from(["1m", 0, "?", -3])}
            ),
            max_size=2,
        )
        | _json,
        "coi_id": _json,
        "group": _json,
        "extra": _json,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(_batch, max_size=3) | _json)
def test_fuzzed_batches_sections_load_or_fail_with_a_value_error(tmp_path: Path, batches: Any) -> None:
    path = _scenario(tmp_path, batches)
    try:
        scenario = load_scenario(path)
    except ValueError as exc:
        assert "batches" in str(exc) or "device" in str(exc)
        return
    schedule = scenario.batch_schedule(0.0)
    for c in schedule.commands():
        assert json.loads(json.dumps(c.payload()))["batch_id"] == c.batch.id


def test_the_demo_plant_runs_batches() -> None:
    scenario = load_scenario("plant")
    held = {b.id: b.devices for b in scenario.batches}
    assert held["LOT-2026-0002"] == ["br-03", "inc-01"]
    assert scenario.batch_schedule(0.0).held("br-01", 130.0) is not None


# --------------------------------------------------------------------------- device nodes


async def test_the_opcua_bioreactor_shows_the_batch_it_holds(tmp_path: Path) -> None:
    """A plant with a schedule: the held bioreactor's ActiveProgram nodes name batch, step,
    product and chain of identity; between batches they are empty strings."""
    first = {**LOT, "devices": ["br-1"], "start": 0, "steps": [{"name": "inoculation", "duration": "7d"}]}
    devices = [{"id": "br-1", "kind": "bioreactor", "protocol": "opcua"}]
    plant = Plant.from_file(_scenario(tmp_path, [first], devices, speed=1))
    async with plant:
        (endpoint,) = plant.endpoints()
        async with Client(endpoint["address"], timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE)
            base = "Bioreactor.FunctionalUnit.ProgramManager.ActiveProgram"
            names = ("BatchId", "CurrentStepName", "ProductId", "ChainOfIdentityId")
            nodes = [client.get_node(ua.NodeId(f"{base}.{n}", idx)) for n in names]

            async def shown() -> list[Any]:
                values = await client.read_attributes(nodes, ua.AttributeIds.Value)
                assert all(dv.Value.VariantType is ua.VariantType.String for dv in values)
                return [dv.Value.Value for dv in values]

            assert await shown() == ["LOT-1", "inoculation", "CAR-T", "COI-9"]
            plant.batches.batches = []  # the batch released: the next update empties the nodes

            async def released() -> bool:
                return await shown() == ["", "", "", ""]

            await until(released, 10, "empty batch nodes")


# --------------------------------------------------------------------------- simulated MES


def _fast_schedule(clock: Clock) -> BatchSchedule:
    """Two batches whose five commands fall due within ~0.3 s of wall time at speed 600."""
    a = BatchSpec.model_validate(
        {**LOT, "start": 0, "steps": [{"name": "s1", "duration": 60}, {"name": "s2", "duration": 60}]}
    )
    b = BatchSpec.model_validate(
        {"id": "LOT-2", "devices": ["br-2"], "start": 30, "steps": [{"name": "s1", "duration": 120}]}
    )
    return BatchSchedule([a, b], clock.now())


async def test_the_mes_publishes_each_command_when_due_with_qos1(mosquitto: Mosquitto) -> None:
    collector = Collector(mosquitto.port, "cleanroom/agent/batch/#")
    topic = "cleanroom/agent/batch/gw-1"
    publisher = MesPublisher(Broker(port=mosquitto.port), topic, ack_timeout_s=10)
    try:
        await publisher.connect()
        clock = Clock(600.0)
        schedule = _fast_schedule(clock)
        sent: list[tuple[str, str]] = []
        n = await run_mes(schedule, publisher, clock, lambda c: sent.append((c.action, c.batch.id)))
        # every command counted as sent was acknowledged, so it is at the broker by now
        await asyncio.to_thread(wait_for, lambda: len(collector.messages) == 5, 10, 0.02, "5 commands")
        assert clock.now() >= schedule.commands()[-1].t  # none went out before its time
    finally:
        await publisher.close()
        collector.close()
    got = [json.loads(p) for t, p, _ in collector.messages if t == topic]
    assert n == 5 and [(m["action"], m["batch_id"]) for m in got] == sent == [
        ("start", "LOT-1"),
        ("start", "LOT-2"),
        ("step", "LOT-1"),
        ("end", "LOT-1"),
        ("end", "LOT-2"),
    ]
    assert got == [c.payload() for c in schedule.commands()]


async def test_a_command_due_during_a_broker_outage_is_delivered_after_it() -> None:
    broker = Mosquitto(persistence=True).start()
    collector = Collector(broker.port, "cleanroom/agent/batch/#", persistent=True)
    publisher = MesPublisher(Broker(port=broker.port), "cleanroom/agent/batch/gw-1", ack_timeout_s=20)
    try:
        await publisher.connect()
        clock = Clock(1.0)
        spec = BatchSpec.model_validate({**LOT, "start": 0, "steps": [{"name": "s1", "duration": 3600}]})
        schedule = BatchSchedule([spec], clock.now())
        (start, _) = schedule.commands()
        await publisher.publish(start.payload())
        await asyncio.to_thread(broker.stop)
        step = asyncio.create_task(publisher.publish({**start.payload(), "action": "step", "step": "s2"}))
        await asyncio.sleep(0.5)
        assert not step.done()  # no PUBACK: not counted as sent
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(step, 20)
        await asyncio.to_thread(wait_for, lambda: len(collector.messages) >= 2, 10, 0.02, "both commands")
    finally:
        await publisher.close()
        collector.close()
        broker.close()
    assert [json.loads(p)["action"] for _, p, _ in collector.messages] == ["start", "step"]


async def test_an_unreachable_broker_is_a_clear_error() -> None:
    from cleanroom_common.net import free_port

    port = free_port()
    with pytest.raises(MesError, match=f"cannot connect to the MQTT broker at 127.0.0.1:{port}"):
        await MesPublisher(Broker(port=port), "t").connect(timeout_s=2)


def _sim(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulators.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cleanroom_sim_mes_publishes_the_schedule_and_exits(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    path = _scenario(
        tmp_path, [{**LOT, "start": "2s", "steps": [{"name": "s1", "duration": "30s"}]}], speed=60
    )
    port = mosquitto.port
    secret = tmp_path / "password"
    secret.write_text("s3cret-value\n")
    res = _sim(
        "mes",
        "--config",
        str(path),
        "--agent",
        "gw-7",
        "--broker",
        f"127.0.0.1:{port}",
        "--username",
        "mes",
        "--password-file",
        str(secret),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"mes: 2 commands to cleanroom/agent/batch/gw-7 on 127.0.0.1:{port}",
        "start LOT-1            br-1,inc-1 step=s1",
        "end   LOT-1            br-1,inc-1",
    ]
    assert "s3cret" not in res.stdout + res.stderr
    wait_for(lambda: len(collector.json("/batch/gw-7")) == 2, 10, what="both commands at the broker")
    assert [m["action"] for m in collector.json("/batch/gw-7")] == ["start", "end"]


def test_cleanroom_sim_mes_bad_input_exits_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cleanroom_common.net import free_port

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"devices": DEVICES}))
    cases = [
        (["--config", str(plain), "--agent", "a"], 2, "no batches: section"),
        (["--config", str(tmp_path / "nope.yaml"), "--agent", "a"], 2, "nope.yaml"),
        (["--config", str(plain), "--agent", "a", "--broker", "localhost"], 2, "write HOST:PORT"),
        (
            ["--config", "plant", "--agent", "a", "--topic", "{site}/x"],
            2,
            "placeholders are {prefix} and {agent}",
        ),
        (["--config", "plant", "--agent", "a", "--broker", f"127.0.0.1:{free_port()}"], 1, "cannot connect"),
    ]
    for args, code, message in cases:
        try:
            rc = sim_main(["mes", *args])
        except SystemExit as exc:  # argparse's own refusal: exit 2 with usage
            rc = exc.code
        err = capsys.readouterr().err
        assert (rc, message in err) == (code, True), (args, err)
