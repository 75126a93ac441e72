"""Batch assignment from its three sources (issue 18): the CLI through the agent's control endpoint,
the MES on the MQTT command topic (a real mosquitto), and the device itself (a real Modbus server
whose registers report its batch); every refusal typed and audited; a device disagreeing with a
person's assignment recorded as a conflict, the assignment unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from agent.app.batchcommands import (
    MAX_COMMAND_BYTES,
    BatchCommand,
    CommandError,
    MqttBatchCommands,
    parse_command,
)
from agent.app.batchconfig import BatchConfig
from agent.app.batches import BatchRegistry
from agent.app.config import ConfigError, load_config
from agent.app.control import TOKEN_FILE, read_token, write_token
from agent.app.runtime import Agent
from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main as cli_main
from agent.core.batch import BatchSource
from agent.core.driver import ProfileBase
from agent.core.records import Event
from cleanroom_common.net import free_port
from tests.support import Collector, Mosquitto, until
from tests.test_app import events_in

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "batch-command.schema.json").read_text())


# --------------------------------------------------------------------------- the command parser


def test_the_schema_documents_exactly_the_model() -> None:
    """docs/batch-command.schema.json and the model that parses commands say the same."""
    fields = BatchCommand.model_fields
    assert set(SCHEMA["properties"]) == set(fields)
    assert SCHEMA["required"] == ["action"]
    assert SCHEMA["additionalProperties"] is False
    assert SCHEMA["properties"]["action"]["enum"] == ["start", "step", "end"]
    for example in SCHEMA["examples"]:
        parse_command(json.dumps(example).encode())


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "Invalid JSON"),
        (b"\xff\xfe", "Invalid JSON"),
        (b"[]", "should be an object"),
        (b'{"action": "start", "devices": ["a"]}', "start needs batch_id"),
        (b'{"action": "start", "batch_id": "B"}', "either devices or group"),
        (b'{"action": "start", "batch_id": "B", "devices": ["a"], "group": "g"}', "either devices or group"),
        (b'{"action": "step", "devices": ["a"]}', "step needs step"),
        (b'{"action": "end", "devices": ["a"], "product": "P"}', "takes no coi_id or product"),
        (b'{"action": "pause", "devices": ["a"]}', "action"),
        (b'{"action": "end", "devices": "a"}', "devices"),
        (b'{"action": "end", "devices": []}', "devices"),
        (b'{"action": "end", "devices": ["a"], "ts": "yesterday"}', "ts"),
        (b'{"action": "end", "devices": ["a"], "ts": -1}', "ts"),
        (b'{"action": "end", "devices": ["a"], "actor": 7}', "actor"),
        (b'{"action": "end", "devices": ["a"], "rogue": 1}', "rogue: Extra inputs"),
        (b'{"action": "start", "devices": ["a"], "batch_id": "' + b"x" * 300 + b'"}', "batch_id"),
        (b" " * (MAX_COMMAND_BYTES + 1), f"more than {MAX_COMMAND_BYTES}"),
    ],
)
def test_a_malformed_command_is_a_clear_error(payload: bytes, expected: str) -> None:
    with pytest.raises(CommandError, match=expected) as err:
        parse_command(payload)
    assert len(str(err.value)) <= 600


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
FIELD = st.sampled_from([*BatchCommand.model_fields, "extra"])
NEAR_VALID = st.dictionaries(
    FIELD, JSON | st.sampled_from(["start", "step", "end", ["a", "b"], "B-1"]), max_size=9
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | NEAR_VALID.map(lambda v: json.dumps(v).encode())
)
def test_the_parser_takes_any_payload_without_a_traceback(payload: bytes) -> None:
    """Whatever is published on the topic parses or is a CommandError: never another exception."""
    try:
        command = parse_command(payload)
    except CommandError as exc:
        assert str(exc)
    else:
        assert (command.devices is None) != (command.group is None)


IDENT = st.sampled_from(["br1", "inc1", "line", "ghost", "", " x", "B-1", "\x00", "é" * 201])
COMMANDS = st.fixed_dictionaries(
    {"action": st.sampled_from(["start", "step", "end"])},
    optional={
        "devices": st.lists(IDENT, max_size=3),
        "group": IDENT,
        "batch_id": IDENT,
        "coi_id": IDENT,
        "product": IDENT,
        "step": IDENT,
        "actor": IDENT,
        "reason": IDENT,
        "ts": st.integers(min_value=-1, max_value=2**70),
    },
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(COMMANDS.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=50), max_size=6),
    st.booleans(),
)
def test_whatever_the_mes_sends_the_handler_refuses_or_applies_and_never_raises(
    payloads: list[bytes], retained: bool
) -> None:
    """The handler end to end over a real registry: every payload is applied, refused and
    audited, or refused as malformed and audited; none raises out of the handler."""
    committed: list[Event] = []
    auditor = Auditor(committed.append, "gw")
    registry = BatchRegistry(["br1", "inc1", "inc2"], {"line": ["inc1", "inc2"]}, committed.append, auditor)
    handler = MqttBatchCommands(registry, auditor, lambda: {"line": ["inc1", "inc2"]})
    for payload in payloads:
        before, applied = len(committed), handler.applied
        handler("cleanroom/agent/batch/gw", payload, retained)
        # each left a trace (committed, audited), or was applied as a repeat that changes nothing
        assert len(committed) > before or handler.applied > applied
    assert all(e.kind in ("audit", "batch_context", "batch_conflict") for e in committed)


# --------------------------------------------------------------------------- configuration


def test_the_batch_section_is_validated() -> None:
    with pytest.raises(ValueError, match="in groups 'a' and 'b'"):
        BatchConfig.model_validate({"groups": {"a": ["d1"], "b": ["d1"]}})
    with pytest.raises(ValueError, match="names no device"):
        BatchConfig.model_validate({"groups": {"a": []}})
    with pytest.raises(ValueError, match="unknown placeholder"):
        BatchConfig.model_validate({"command_topic": "{prefix}/{site}/batch"})
    with pytest.raises(ValueError, match="wildcards"):
        BatchConfig.model_validate({"command_topic": "{prefix}/batch/#"})
    cfg = BatchConfig.model_validate({"mqtt_commands": True, "groups": {"line": ["d1", "ghost"]}})
    assert cfg.topic("plant", "gw") == "plant/agent/batch/gw"
    problems = [str(p) for p in cfg.check(["d1"], mqtt_configured=False)]
    assert problems == [
        "batch.groups.line[1]: device 'ghost' is not configured",
        "batch.mqtt_commands: batch commands come over MQTT: there is no mqtt section",
    ]
    assert "broker ACL" in cfg.security_warnings("plant", "gw")[0]
    assert BatchConfig().security_warnings("plant", "gw") == []


def test_a_profile_batch_block_must_name_its_tags() -> None:
    base = {"profile": "p", "protocol": "modbus", "tags": [{"name": "lot"}]}
    assert ProfileBase.model_validate({**base, "batch": {"batch_id": "lot"}}).batch is not None
    with pytest.raises(ValueError, match=r"batch\.step names tag 'phase', which is not in tags"):
        ProfileBase.model_validate({**base, "batch": {"batch_id": "lot", "step": "phase"}})


def test_an_unknown_group_member_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, devices=DISABLED, batch="batch: {groups: {line: [br1, ghost]}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "batch.groups.line[1]: device 'ghost' is not configured" in str(err.value)


# --------------------------------------------------------------------------- a running agent


DISABLED = "".join(
    f"  - {{id: {d}, profile: incubator-sim-modbus, enabled: false,\n"
    "      connection: {host: 127.0.0.1, port: 1}}\n"
    for d in ("br1", "inc1", "inc2")
)


def write_config(
    tmp_path: Path, *, devices: str, batch: str = "", broker: int | None = None, profiles: bool = False
) -> Path:
    cfg = tmp_path / "agent.yaml"
    mqtt = (
        f"mqtt: {{host: 127.0.0.1, port: {broker}, reconnect_min: 0.1, reconnect_max: 0.5}}\n"
        if broker
        else ""
    )
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 0.5}}\n"
        "buffer: {path: buffer.db, commit_interval: 0.02}\n"
        + ("profiles_dirs: [profiles]\n" if profiles else "")
        + mqtt
        + batch
        + f"devices:\n{devices}"
    )
    return cfg


@asynccontextmanager
async def running(cfg: Path) -> AsyncIterator[Agent]:
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cleanroom-agent ARGS`` in a thread (the agent answers on this loop meanwhile)."""
    code = await asyncio.to_thread(cli_main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def audits(db: Path) -> list[dict[str, Any]]:
    return [e["data"] for e in events_in(db) if e["kind"] == "audit"]


def http(url: str, token: str | None, body: bytes = b"{}") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_token_file_is_the_agents_alone_and_never_written_through_a_link(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("an old token\n")
    path.chmod(0o644)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / f".{TOKEN_FILE}.{os.getpid()}").symlink_to(victim)  # planted where the new one is made
    token = write_token(path)
    assert read_token(path) == token and len(token) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not path.is_symlink()
    assert victim.read_text() == "keep me"
    path.write_text("not a token")
    with pytest.raises(ValueError, match="holds no control token"):
        read_token(path)


async def test_the_cli_assigns_through_the_token_and_every_refusal_is_typed_and_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, devices=DISABLED, batch="batch: {groups: {line: [inc1, inc2]}}\n")
    c = str(cfg)
    who = ("--actor", "alice", "--reason", "WO-1 released")
    token_file = tmp_path / TOKEN_FILE
    async with running(cfg) as agent:
        # the token: the agent's account only, and nothing works without it
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        url = f"http://127.0.0.1:{agent.status_server.port}/api/batch"
        for sent in (None, "0" * 64, token + "x"):
            status, body = await asyncio.to_thread(http, url, sent)
            assert (
                status == 401 and token.encode() not in body and (sent is None or sent.encode() not in body)
            )
        assert agent.batches.current("br1") is None

        assert await cli(
            capsys,
            "batch",
            "start",
            "-c",
            c,
            "--device",
            "br1",
            "--batch",
            "B1",
            "--product",
            "CAR-T",
            "--coi",
            "COI-9",
            *who,
        ) == (0, "start B1 ref B1#1\n", "")
        held = agent.batches.current("br1")
        assert held is not None and held.source is BatchSource.CLI and held.actor == "alice"

        code, _, err = await cli(capsys, "batch", "start", "-c", c, "--device", "br1", "--batch", "B2", *who)
        assert code == 1 and "refused (already_assigned)" in err and "'B1'" in err
        code, _, err = await cli(capsys, "batch", "start", "-c", c, "--device", "nope", "--batch", "B2", *who)
        assert code == 2 and "refused (unknown_device)" in err
        code, _, err = await cli(
            capsys, "batch", "start", "-c", c, "--group", "line", "--batch", "B2", "--reason", "no actor"
        )
        assert code == 2 and "refused (missing_actor)" in err
        code, _, err = await cli(capsys, "batch", "end", "-c", c, "--device", "br1", "--actor", "alice")
        assert code == 2 and "refused (missing_reason)" in err
        code, _, err = await cli(capsys, "batch", "end", "-c", c, "--device", "br1", "--batch", "B9", *who)
        assert code == 1 and "refused (already_assigned)" in err and "holds batch 'B1'" in err
        status, body = await asyncio.to_thread(http, url, token, b'{"action": "start", "devices": "br1"}')
        assert status == 400 and json.loads(body)["refusal"] == "malformed"

        code, out, _ = await cli(capsys, "batch", "start", "-c", c, "--group", "line", "--batch", "B2", *who)
        assert code == 0 and "group inc1,inc2" in out
        code, out, _ = await cli(
            capsys, "batch", "step", "-c", c, "--device", "inc2", "--step", "harvest", *who
        )
        assert (code, out) == (
            0,
            "step B2 ref B2#2 step harvest group inc1,inc2\nstep B2 ref B2#2 step harvest group inc1,inc2\n",
        )
        code, out, _ = await cli(capsys, "batch", "show", "-c", c)
        assert code == 0 and [line.split()[:3] for line in out.splitlines()[1:]] == [
            ["br1", "B1", "B1#1"],
            ["inc1", "B2", "B2#2"],
            ["inc2", "B2", "B2#2"],
        ]
        assert await cli(capsys, "batch", "end", "-c", c, "--device", "br1", *who) == (
            0,
            "end B1 ref B1#2\n",
            "",
        )
    assert not token_file.exists()  # nobody holds a key to an agent that is not running
    code, _, err = await cli(capsys, "batch", "show", "-c", c)
    assert code == 1 and "is the agent running" in err

    trail = audits(tmp_path / "buffer.db")
    batch = [
        (a["action"], a.get("refusal"), a.get("source")) for a in trail if a["action"].startswith("batch")
    ]
    assert batch == [
        ("batch_start", None, "cli"),
        ("batch_refused", "already_assigned", "cli"),
        ("batch_refused", "unknown_device", "cli"),
        ("batch_refused", "missing_actor", "cli"),
        ("batch_refused", "missing_reason", "cli"),
        ("batch_conflict", None, "cli"),
        ("batch_command_refused", "malformed", "cli"),
        ("batch_start", None, "cli"),
        ("batch_start", None, "cli"),
        ("batch_step", None, "cli"),
        ("batch_step", None, "cli"),
        ("batch_end", None, "cli"),
    ]
    started = trail[[a["action"] for a in trail].index("batch_start")]
    assert started["actor"] == "alice" and started["reason"] == "WO-1 released" and started["device"] == "br1"
    assert started["new"]["coi_id"] == "COI-9" and started["new"]["product"] == "CAR-T"
    stored = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("buffer.db*")))  # noqa: ASYNC240
    assert token.encode() not in stored


async def publish_until(collector: Collector, topic: str, command: dict[str, Any], done: Any) -> None:
    """Publish a command (idempotent) until it took effect: the agent subscribes once connected,
    and a command published before its subscription reached the broker is not delivered to it."""
    for _ in range(50):
        collector.client.publish(topic, json.dumps(command), qos=1)
        try:
            await until(done, within_s=0.5)
            return
        except AssertionError:
            continue
    raise AssertionError(f"the agent never applied {command}")


async def test_the_mes_assigns_over_mqtt_and_what_it_sends_wrong_is_refused_and_audited(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    cfg = write_config(
        tmp_path,
        devices=DISABLED,
        broker=mosquitto.port,
        batch="batch: {mqtt_commands: true, groups: {line: [inc1, inc2]}}\n",
    )
    topic = "cleanroom/agent/batch/gw"
    mes = {"actor": "mes:opcenter", "reason": "WO-7 released"}
    # a retained command would be applied again at every reconnect: refused when it arrives as one
    stale = json.dumps({"action": "end", "devices": ["inc1"], **mes})
    collector.client.publish(topic, stale, qos=1, retain=True).wait_for_publish(5)
    async with running(cfg) as agent:
        assert any("broker ACL" in w for w in (await agent.status())["security"]["warnings"])
        await until(lambda: agent.forwarder is not None and agent.forwarder.stats()["connected"])
        start = {"action": "start", "group": "line", "batch_id": "LOT-7", "coi_id": "COI-1", **mes}
        await publish_until(collector, topic, start, lambda: agent.batches.current("inc2"))
        held = agent.batches.current("inc1")
        assert held is not None and (held.batch_id, held.source, held.group) == (
            "LOT-7",
            BatchSource.MQTT,
            ("inc1", "inc2"),
        )

        # a command handler that fails is logged and counted, never the end of the session
        def broken(topic: str, payload: bytes, retained: bool) -> None:
            raise RuntimeError("handler bug")

        assert agent.forwarder is not None
        agent.forwarder.add_command_handler("cleanroom/agent/other/gw", broken)
        await publish_until(
            collector, "cleanroom/agent/other/gw", {}, lambda: agent.forwarder.stats()["command_errors"] >= 2
        )
        wrong = [
            b"{not json",
            json.dumps({"action": "start", "devices": ["ghost"], "batch_id": "X", **mes}).encode(),
            json.dumps({"action": "start", "devices": ["inc1"], "batch_id": "LOT-8", **mes}).encode(),
            json.dumps({"action": "start", "devices": ["br1"], "batch_id": "LOT-8", "reason": "r"}).encode(),
            json.dumps({"action": "end", "devices": ["br1"], "actor": "mes"}).encode(),
        ]
        for payload in wrong:
            collector.client.publish(topic, payload, qos=1)
        collector.client.publish(
            topic, json.dumps({"action": "step", "group": "line", "step": "harvest", **mes}), qos=1
        )
        await until(lambda: (c := agent.batches.current("inc1")) is not None and c.step == "harvest")
        assert agent.batches.current("br1") is None  # nothing refused was applied
        sources = (await agent.status())["batch_sources"]
        assert sources["mqtt"]["refused"] == 4 and sources["mqtt"]["refused_unparsed"] == 2
        assert sources["mqtt"]["applied"] >= 2 and sources["cli"]["applied"] == 0
        await until(
            lambda: any(
                e.get("kind") == "batch_context" and e.get("data", {}).get("step") == "harvest"
                for m in collector.json("/inc2/events")
                for e in m.get("events", [])
            )
        )
    collector.client.publish(topic, b"", qos=1, retain=True)  # clear the retained message

    trail = audits(tmp_path / "buffer.db")
    batch = [
        (a["action"], a.get("refusal"), a.get("source")) for a in trail if a["action"].startswith("batch")
    ]
    assert batch == [
        ("batch_command_refused", "malformed", "mqtt"),
        ("batch_start", None, "mqtt"),
        ("batch_start", None, "mqtt"),
        ("batch_command_refused", "malformed", "mqtt"),
        ("batch_refused", "unknown_device", "mqtt"),
        ("batch_refused", "already_assigned", "mqtt"),
        ("batch_refused", "missing_actor", "mqtt"),
        ("batch_refused", "missing_reason", "mqtt"),
        ("batch_step", None, "mqtt"),
        ("batch_step", None, "mqtt"),
    ]
    refused = [a for a in trail if a["action"] == "batch_command_refused"]
    assert "retained" in refused[0]["reason"] and "malformed batch command" in refused[1]["reason"]
    assert refused[1]["bytes"] == len(wrong[0]) and len(refused[1]["sha256"]) == 64


def test_commands_are_not_subscribed_unless_configured(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, devices=DISABLED, broker=free_port())
    agent = Agent(load_config(cfg))
    assert agent.forwarder is not None and agent.forwarder._commands == []
    assert agent.loaded.config.batch.mqtt_commands is False


# --------------------------------------------------------------------------- the device itself


PROFILE = """\
profile: batch-plc
protocol: modbus
groups: {default: {interval: 100ms}}
tags:
  - {name: temperature, address: 40001, type: int16}
  - {name: lot, address: 40002, type: uint16}
  - {name: phase, address: 40003, type: uint16}
batch: {batch_id: lot, step: phase}
"""


class Plc:
    """A Modbus server whose holding registers the test sets: temperature, lot, phase."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.registers = [37, 0, 0]

        async def action(
            fc: int, start: int, address: int, count: int, regs: list[int], values: Any
        ) -> ExcCodes | None:
            regs[: len(self.registers)] = self.registers
            return None

        device = SimDevice(
            id=1,
            simdata=(
                [SimData(0, values=[False] * 8, datatype=SimType.BITS)],
                [SimData(0, values=[False] * 8, datatype=SimType.BITS)],
                [SimData(0, values=[0] * 8, datatype=SimType.REGISTERS)],
                [SimData(0, values=[0] * 8, datatype=SimType.REGISTERS)],
            ),
            action=action,
        )
        self.server = ModbusTcpServer([device], address=("127.0.0.1", self.port))


@pytest.fixture
def plc_config(tmp_path: Path) -> tuple[Path, int]:
    """An agent configuration with a device that reports its batch, and the device's port."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "batch-plc.yaml").write_text(PROFILE)
    port = free_port()
    connection = f"{{host: 127.0.0.1, port: {port}, timeout: 0.5}}"
    device = f"  - {{id: plc1, profile: batch-plc, connection: {connection}}}\n"
    return write_config(tmp_path, devices=device + DISABLED, profiles=True), port


async def test_the_device_reports_its_batch_and_a_disagreement_with_a_person_is_a_conflict(
    tmp_path: Path, plc_config: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, port = plc_config
    plc = Plc(port)
    await plc.server.serve_forever(background=True)
    try:
        async with running(cfg) as agent:
            plc.registers[1:] = [4711, 1]
            await until(lambda: (c := agent.batches.current("plc1")) is not None and c.step == "1")
            held = agent.batches.current("plc1")
            assert held is not None and (held.batch_id, held.source, held.actor) == (
                "4711",
                BatchSource.DEVICE,
                "device:plc1",
            )
            plc.registers[2] = 2
            await until(lambda: (c := agent.batches.current("plc1")) is not None and c.step == "2")
            plc.registers[1:] = [0, 0]
            await until(lambda: agent.batches.current("plc1") is None)

            # a person assigns; the device goes on saying "no batch", then names another batch
            who = ("--actor", "bob", "--reason", "manual start")
            code, _, _ = await cli(
                capsys, "batch", "start", "-c", str(cfg), "--device", "plc1", "--batch", "LOT-A", *who
            )
            assert code == 0
            await until(lambda: agent.device_batches.conflicts == 1)
            plc.registers[1] = 815
            await until(lambda: agent.device_batches.conflicts == 2)
            held = agent.batches.current("plc1")
            assert held is not None and (held.batch_id, held.source) == (
                "LOT-A",
                BatchSource.CLI,
            )  # unchanged
        async with running(cfg) as agent:  # after a restart: the same disagreement, recorded again once
            await until(lambda: agent.device_batches.conflicts == 1)
            held = agent.batches.current("plc1")
            assert held is not None and held.batch_id == "LOT-A"
    finally:
        await plc.server.shutdown()

    events = events_in(tmp_path / "buffer.db")
    contexts = [
        (e["data"]["phase"], e["data"]["ref"], e["data"]["source"])
        for e in events
        if e["kind"] == "batch_context"
    ]
    assert contexts == [
        ("start", "4711#1", "device"),
        ("step", "4711#2", "device"),
        ("end", "4711#3", "device"),
        ("start", "LOT-A#1", "cli"),
    ]
    conflicts = [e["data"] for e in events if e["kind"] == "batch_conflict"]
    assert [(c["source"], c["claimed"]["batch_id"], c["current"]["batch_id"]) for c in conflicts] == [
        ("device", None, "LOT-A"),
        ("device", "815", "LOT-A"),
        ("device", "815", "LOT-A"),
    ]
    core = Buffer(BufferConfig(path=tmp_path / "buffer.db"), agent_id=None)
    core.open(readonly=True)
    try:
        assert {r.device for r in core.records(kind="event") if '"kind":"batch_conflict"' in r.body} == {
            "plc1"
        }
    finally:
        core.close()
