"""The payload formats against the configured devices (issue 14 follow-ups): ``validate`` finds what
the encoders would refuse at start (a ``uns`` map naming an unknown device, a device without its
place, a tag Sparkplug cannot declare) and any topic two kinds of message would share (flat beside
the JSON segments, anything but Sparkplug under ``spBv1.0/``), each at its key and line; disabled
devices are declared nowhere; a reload that changes the devices makes the Sparkplug session new, so
its births declare them; the metrics count segments and messages apart."""

from __future__ import annotations

import asyncio
import re
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.app.catalog import build_catalog
from agent.app.config import ConfigError, load_config
from agent.app.metrics import render
from agent.app.reload import plan
from agent.app.runtime import Agent
from agent.app.topics import payload_problems
from agent.cli import main
from agent.core.device import ResolvedDevice
from agent.sinks.flat import FlatConfig, FlatEncoder
from agent.sinks.forwarder import AgentIdentity, MqttConfig, make_encoder
from agent.sinks.sparkplug import codec
from cleanroom_common.bundled import profiles_dir
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import Mosquitto, until

DEVICE = (
    "  - {{id: {id}, profile: {profile},"
    " connection: {{host: 127.0.0.1, port: {port}, timeout: 1s, backoff_min: 100ms}}{extra}}}\n"
)
LISTEN = f"127.0.0.1:{free_port()}"
"""One status listener for every configuration here: a reload cannot move it."""


def config_text(
    mqtt_section: str,
    devices: list[tuple[str, str]],
    port: int = 1502,
    profile: str = "bioreactor-sim",
    profiles_dirs: str = "",
) -> str:
    """An agent configuration; ``devices`` are (id, extra entry keys) pairs."""
    text = f"agent: {{id: gw-enc, status_listen: '{LISTEN}', shutdown_grace: 1s}}\n"
    text += "buffer: {path: buffer.db, commit_interval: 50ms}\nhealth: {clock_sync: false}\n"
    text += profiles_dirs + mqtt_section + "devices:\n"
    return text + "".join(DEVICE.format(id=i, profile=profile, port=port, extra=x) for i, x in devices)


def write(tmp: Path, text: str) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


FLAT = "mqtt:\n  host: 127.0.0.1\n  payload: flat\n"
TWO = [("br1", ""), ("br2", "")]


def test_flat_defaults_stay_apart_from_the_json_segments(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, config_text(FLAT + "  flat: {retain_per_tag: true}\n", TWO)))
    assert loaded.config.mqtt is not None and loaded.config.mqtt.publish_segments
    enc = FlatEncoder(FlatConfig(), build_catalog(loaded.devices), "cleanroom")
    assert enc.topic("data", "br1", "process") == "cleanroom/flat/br1/data"
    assert enc.topic("events", "br1") == "cleanroom/flat/br1/events"
    assert FlatConfig.agent_topic("cleanroom", "agent/audit") == "cleanroom/flat/agent/audit"


@pytest.mark.parametrize(
    ("mqtt_section", "devices", "key_line", "message"),
    [
        (  # the JSON segments' own topic
            FLAT + '  flat: {topic: "{prefix}/{device}/data"}\n',
            TWO,
            "flat: {topic",
            "mqtt.flat.topic: the flat samples of br1 would be published on 'cleanroom/br1/data', the topic "
            "of the JSON segments of br1/data: one topic, one kind of message (change mqtt.flat.topic (its "
            "default keeps flat messages under {prefix}/flat/), or set mqtt.publish_segments: false)",
        ),
        (
            FLAT + '  flat:\n    events_topic: "{prefix}/{device}/events"\n',
            TWO,
            "events_topic",
            "mqtt.flat.events_topic: the flat events of br1 would be published on 'cleanroom/br1/events'",
        ),
        (  # the status: {prefix}/agent/status/{agent id}
            FLAT + '  flat: {topic: "{prefix}/agent/status/gw-enc", events_topic: "{prefix}/e/{device}"}\n',
            TWO,
            "flat: {topic",
            "the topic of the agent's status",
        ),
        (  # flat's own kinds: a per-tag value on the events topic
            FLAT + '  flat:\n    retain_per_tag: true\n    events_topic: "{prefix}/flat/{device}/data/ph"\n',
            TWO,
            "retain_per_tag",
            "mqtt.flat.retain_per_tag: the retained 'ph' of br1 would be published on "
            "'cleanroom/flat/br1/data/ph', the topic of the flat events of br1",
        ),
        (
            FLAT + '  flat: {topic: "spBv1.0/{device}"}\n',
            TWO,
            "flat: {topic",
            "in the Sparkplug B namespace spBv1.0/",
        ),
        (
            "mqtt: {host: 127.0.0.1, topic_prefix: spBv1.0/g1, payload: sparkplug_b,"
            " sparkplug: {group_id: g1}}\n",
            TWO,
            "topic_prefix",
            "mqtt.topic_prefix: the JSON segments of br1/data would be published on 'spBv1.0/g1/br1/data', "
            "in the Sparkplug B namespace spBv1.0/",
        ),
        (
            FLAT + "  flat: {uns: {br1: {area: a}, br9: {area: b}}}\n",
            TWO,
            "br9",
            "mqtt.flat.uns.br9: names device 'br9', which is not configured (configured: br1, br2)",
        ),
        (
            FLAT + '  flat:\n    topic: "{prefix}/{area}/{device}"\n    uns:\n      br1: {area: up}\n',
            TWO,
            "uns:",
            "mqtt.flat.uns.br2.area: device 'br2' has no area, and a topic template names {area}",
        ),
    ],
)
def test_what_the_encoders_would_refuse_is_a_problem_at_its_key_and_line(
    tmp_path: Path, mqtt_section: str, devices: list[tuple[str, str]], key_line: str, message: str
) -> None:
    text = config_text(mqtt_section, devices)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    [problem] = err.value.problems
    assert problem.line == line_of(text, key_line)
    assert message in str(problem)


def test_what_is_no_clash_loads(tmp_path: Path) -> None:
    without_segments = FLAT + '  publish_segments: false\n  flat: {topic: "{prefix}/{device}/data"}\n'
    load_config(write(tmp_path, config_text(without_segments, TWO)))
    # a disabled device may keep its place: what it left in the buffer is published there
    placed = (
        FLAT + '  flat:\n    topic: "{prefix}/{area}/{device}"\n    uns: {br1: {area: a}, br2: {area: b}}\n'
    )
    loaded = load_config(write(tmp_path, config_text(placed, [("br1", ""), ("br2", ", enabled: false")])))
    assert list(build_catalog(loaded.devices)) == ["br1"]
    assert loaded.config.mqtt is not None
    FlatEncoder(loaded.config.mqtt.flat, build_catalog(loaded.devices), "cleanroom")


def test_a_tag_sparkplug_cannot_declare_is_found_by_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shipped = (profiles_dir() / "bioreactor-sim.yaml").read_text()
    reserved = shipped.replace("profile: bioreactor-sim", "profile: reserved-names", 1)
    (profiles / "reserved.yaml").write_text(
        reserved.replace("{name: temperature_c,", "{name: Events/event,", 1)
    )
    sparkplug = "mqtt: {host: 127.0.0.1, payload: sparkplug_b, sparkplug: {group_id: g1}}\n"
    text = config_text(
        sparkplug, [("br1", "")], profile="reserved-names", profiles_dirs="profiles_dirs: [profiles]\n"
    )
    path = write(tmp_path, text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{path}:{line_of(text, 'id: br1')}: devices[0].profile: payload sparkplug_b: device 'br1': tag "
        in err
    )
    assert "'Events/event' has a name reserved for the agent's own metrics (rename the tag in" in err
    assert "Traceback" not in err


def test_a_reload_plans_a_new_session_only_when_declared_devices_change(tmp_path: Path) -> None:
    sparkplug = "mqtt: {host: 127.0.0.1, payload: sparkplug_b, sparkplug: {group_id: g1}}\n"
    json_ = "mqtt: {host: 127.0.0.1}\n"
    for section, expected in ((sparkplug, True), (json_, False)):
        old = load_config(write(tmp_path, config_text(section, [("br1", "")])))
        new = load_config(write(tmp_path, config_text(section, TWO)))
        assert plan(old, new).catalog is expected
        assert plan(old, new).summary()["mqtt_reconnected"] is expected
    old = load_config(write(tmp_path, config_text(sparkplug, TWO)))
    same = load_config(write(tmp_path, config_text(sparkplug, TWO) + "# a comment\n"))
    disabled = load_config(
        write(tmp_path, config_text(sparkplug, [("br1", ""), ("br2", ", enabled: false")]))
    )
    swapped = load_config(write(tmp_path, config_text(sparkplug, TWO[::-1])))  # the aliases move
    assert not plan(old, same).catalog and plan(old, disabled).catalog and plan(old, swapped).catalog


def test_a_reload_changing_the_batch_command_subscription_starts_a_new_session(tmp_path: Path) -> None:
    base = config_text("mqtt: {host: 127.0.0.1}\n", TWO)
    off = load_config(write(tmp_path, base))
    on = load_config(write(tmp_path, base + "batch: {mqtt_commands: true}\n"))
    moved = load_config(write(tmp_path, base + 'batch: {mqtt_commands: true, command_topic: "x/{agent}"}\n'))
    grouped = load_config(write(tmp_path, base + "batch: {mqtt_commands: true, groups: {g: [br1, br2]}}\n"))
    assert plan(off, on).mqtt and plan(on, moved).mqtt and plan(on, off).mqtt
    assert not plan(on, grouped).mqtt  # groups live in the registry, not in the MQTT session


PIECES = ["{prefix}", "{device}", "{group}", "{site}", "{area}", "/", "data", "events", "flat", "agent",
          "status", "gw-enc", "br1", "spBv1.0", "+", "{", "}"]  # fmt: skip
template = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


@cache
def two_devices() -> list[ResolvedDevice]:
    with tempfile.TemporaryDirectory() as tmp:
        return load_config(write(Path(tmp), config_text("", TWO))).devices


@settings(max_examples=150, deadline=None)
@given(template, template, st.booleans(), st.booleans())
@example("{prefix}/x/{device}/{group}", "{prefix}/ev/{device}", True, False)  # events named no group
def test_any_flat_templates_are_rejected_or_publish_nothing_on_another_kinds_topic(
    topic: str, events: str, segments: bool, retain: bool
) -> None:
    try:
        mqtt_cfg = MqttConfig.model_validate(
            {"host": "127.0.0.1", "payload": "flat", "publish_segments": segments,
             "flat": {"topic": topic, "events_topic": events, "site": "s", "retain_per_tag": retain,
                      "uns": {"br1": {"area": "a1"}, "br2": {"area": "a2"}}}}
        )  # fmt: skip
    except ValidationError:
        return
    devices = two_devices()
    if payload_problems(mqtt_cfg, "gw-enc", devices, {"br1": ("devices", 0), "br2": ("devices", 1)}):
        return
    enc = FlatEncoder(mqtt_cfg.flat, build_catalog(devices), "cleanroom")
    json_topics = {f"cleanroom/{d.id}/{k}" for d in devices for k in ("data", "events")}
    json_topics |= {"cleanroom/agent/events", "cleanroom/agent/audit", "cleanroom/agent/status/gw-enc"}
    events = {enc.topic("events", d.id) for d in devices}
    events |= {FlatConfig.agent_topic("cleanroom", s) for s in ("agent/events", "agent/audit")}
    samples = {enc.topic("data", d.id, g) for d in devices for g in d.groups}
    retained = {f"{enc.topic('data', d.id, g)}/{t}" for d in devices for g, pg in d.groups.items()
                for t in pg.tags} if retain else set()  # fmt: skip
    kinds = [events, samples, retained] + ([json_topics] if segments else [])
    for i, a in enumerate(kinds):
        assert not any(t.split("/")[0] == "spBv1.0" for t in a)
        for b in kinds[i + 1 :]:
            assert not a & b


# --------------------------------------------------------------------------- a running agent


def bd_seq_of(payload: bytes) -> object:
    return next(m.value for m in codec.decode(payload).metrics if m.name == codec.BDSEQ)


def test_a_rebuilt_edge_node_goes_on_with_the_bd_seq_of_the_process() -> None:
    """A reload that rebuilds the forwarder hands the old encoder to the new one: its first will
    and birth take the bdSeq after the old one's last connect (Sparkplug 3.0: +1 per connect of the
    process), whether or not the JSON segments are published beside it; an attempt the broker never
    accepted takes no number, and a format without bdSeq before it leaves the numbering at 0."""
    identity = AgentIdentity(agent_id="gw-enc", version="0", config_hash="c0")
    base = {"host": "127.0.0.1", "payload": "sparkplug_b", "sparkplug": {"group_id": "g1"}}
    old = make_encoder(MqttConfig.model_validate(base), identity, None)
    for session in ("1.1", "1.2"):  # two accepted connects: bdSeq 0, then 1
        assert (will := old.will(session)) is not None and bd_seq_of(will.payload) == int(session[-1]) - 1
        old.on_connect(session)
        old.on_disconnect()
    old.will("1.3")  # the broker was down: no session, no number
    old.on_disconnect()
    alone = MqttConfig.model_validate({**base, "publish_segments": False})
    new = make_encoder(alone, identity, None, previous=old)
    assert (will := new.will("1.4")) is not None and bd_seq_of(will.payload) == 2
    nbirth = next(m for m in new.on_connect("1.4") if "/NBIRTH/" in m.topic)
    assert bd_seq_of(nbirth.payload) == 2, "the birth matches the will"
    after_json = make_encoder(
        alone, identity, None, previous=make_encoder(MqttConfig(host="127.0.0.1"), identity, None)
    )
    assert (will := after_json.will("1.5")) is not None and bd_seq_of(will.payload) == 0


class Births:
    """The Sparkplug births (and deaths) on the broker, in arrival order."""

    def __init__(self, port: int) -> None:
        self.seen: list[tuple[str, int | None]] = []
        self._subscribed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"births-{id(self)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_subscribe = lambda *a: self._loop.call_soon_threadsafe(self._subscribed.set)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.split("/")[2]
        if kind in ("NBIRTH", "NDEATH", "DBIRTH"):
            decoded = codec.decode(bytes(msg.payload))
            bd = next((m.value for m in decoded.metrics if m.name == codec.BDSEQ), None)
            self.seen.append(("/".join(msg.topic.split("/")[2:]), bd))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_reload_that_adds_a_device_births_it_and_metrics_count_segments_and_messages(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    births = Births(mosquitto.port)
    await asyncio.wait_for(births._subscribed.wait(), 10)
    sparkplug = (
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, reconnect_min: 100ms, payload: sparkplug_b,"
        " sparkplug: {group_id: g1, edge_node_id: gw}}\n"
    )
    try:
        async with serve_bioreactor_modbus(port=0, speed=60.0, seed=3) as sim:
            assert sim.port is not None
            path = write(
                tmp_path, config_text(sparkplug, [("br1", ""), ("br3", ", enabled: false")], sim.port)
            )
            agent = Agent(load_config(path))
            await agent.start()
            try:
                await until(lambda: ("DBIRTH/gw/br1", None) in births.seen, 15, "br1 born")

                async def delivered() -> bool:
                    return agent.forwarder is not None and agent.forwarder.stats()["acked"] >= 3

                await until(delivered, 15, "segments delivered")
                write(
                    tmp_path,
                    config_text(sparkplug, [("br1", ""), ("br2", ""), ("br3", ", enabled: false")], sim.port),
                )
                outcome = await agent.reload()
                assert outcome.outcome == "applied" and outcome.applied["mqtt_reconnected"], outcome
                await until(lambda: ("DBIRTH/gw/br2", None) in births.seen, 15, "br2 born after the reload")
                await until(delivered, 15, "segments delivered in the new session")
                body, _ = await render(agent)
            finally:
                await agent.stop()
    finally:
        births.close()
    # the old session's death, then a new session (the next bdSeq of the process) that births both
    nbirths = [i for i, (kind, _) in enumerate(births.seen) if kind == "NBIRTH/gw"]
    assert len(nbirths) == 2
    second = births.seen[nbirths[1] :]
    assert ("DBIRTH/gw/br1", None) in second and ("DBIRTH/gw/br2", None) in second
    bd = births.seen[nbirths[0]][1]
    assert isinstance(bd, int) and ("NDEATH/gw", bd) in births.seen[nbirths[0] : nbirths[1]]
    assert births.seen[nbirths[1]][1] == bd + 1, "the rebuilt forwarder goes on with the bdSeq"
    assert not any(kind.endswith("/br3") for kind, _ in births.seen), "a disabled device is never born"
    text = body.decode()

    def metric(name: str) -> float:
        [value] = re.findall(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(value)

    segments = metric("cleanroom_mqtt_published_segments_total")
    assert metric("cleanroom_mqtt_published_messages_total") > segments > 0  # JSON segment + Sparkplug
    assert 0 < metric("cleanroom_mqtt_acked_segments_total") <= segments
    assert metric("cleanroom_mqtt_acked_readings_total") > 0


def test_a_batch_command_topic_on_a_published_topic_is_refused(tmp_path: Path) -> None:
    """The agent would read what it publishes there as batch commands."""
    text = config_text("mqtt: {host: 127.0.0.1}\n", TWO)
    text += 'batch: {mqtt_commands: true, command_topic: "{prefix}/br1/data"}\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    said = str(caught.value)
    assert "'cleanroom/br1/data', the topic of the batch commands" in said, said
    # the default command topic is a topic of its own
    text = config_text("mqtt: {host: 127.0.0.1}\n", TWO) + "batch: {mqtt_commands: true}\n"
    assert load_config(write(tmp_path, text)).config.batch.mqtt_commands
