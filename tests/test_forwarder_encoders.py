"""The forwarder behind the encoder seam, against a real mosquitto: a segment of several messages
is delivered only when the broker acknowledged them all; an encoder that never re-sends gets its
unacknowledged segments encoded again in the next session, on a fresh client, after that session's
first messages; ``historical`` by commit before the session; ``ready()`` holds segments in the
buffer; subscriptions and reactions (publish, reconnect) reach the broker, and a failing handler
is counted, never fatal; the broker section's new keys are validated with their YAML line."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import ConfigError, load_config
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredSegment
from agent.core.records import Block
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig, WithSegments, make_encoder
from agent.sinks.payload import Encoder, Message, Reaction
from agent.sinks.sparkplug.session import SparkplugEncoder
from tests.support import Collector, Mosquitto, until
from tests.test_forwarder import Relay

IDENTITY = AgentIdentity(agent_id="gw-test", version="0.1.0", config_hash="c0ffee")


def block(device: str, i: int) -> Block:
    return Block(device=device, group="g", acq_ts_ns=time.time_ns(), tags=["a", "b"], units=[None, None],
                 values=[float(i), i + 0.5])  # fmt: skip


class Split(Encoder):
    """Each segment as ``parts`` messages on ``x/{stream}/{k}``, tagged with the session that encoded
    it; records what it was asked, so the forwarder's side of the seam can be checked."""

    name = "split"

    def __init__(self, parts: int = 3, resend: bool = True) -> None:
        self.parts = parts
        self.resend_after_reconnect = resend
        self.session = ""
        self.sessions: list[str] = []
        self.encoded: list[tuple[int, bool]] = []
        self.held = False
        self.messages: list[tuple[str, bytes]] = []

    def on_connect(self, session: str) -> list[Message]:
        self.session = session
        self.sessions.append(session)
        return [Message("x/hello", session.encode())]

    def ready(self) -> bool:
        return not self.held

    def subscriptions(self) -> list[str]:
        return ["x/cmd"]

    def on_message(self, topic: str, payload: bytes) -> Reaction:
        self.messages.append((topic, payload))
        if payload == b"boom":
            raise RuntimeError("a handler bug")
        if payload == b"reconnect":
            return Reaction(reconnect=True)
        return Reaction(publish=[Message("x/reply", b"re:" + payload)])

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        self.encoded.append((seg.id, historical))
        return [
            Message(f"x/{seg.stream}/{k}", f"{self.session}|{seg.id}".encode()) for k in range(self.parts)
        ]


class Rig:
    def __init__(self, buf: AsyncBuffer, fw: Forwarder, enc: Split) -> None:
        self.buf, self.fw, self.enc = buf, fw, enc

    async def commit(self, *blocks: Block) -> None:
        self.buf.submit(list(blocks))
        await self.buf.flush()

    async def depth(self) -> int:
        return int((await self.buf.stats())["depth_segments"])


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    rigs: list[Rig] = []

    async def make(
        port: int, enc: Split, start: bool = True, before: list[Block] | None = None, **kw: Any
    ) -> Rig:
        bcfg = BufferConfig(path=tmp_path / f"b{len(rigs)}.db", synchronous="off", commit_interval="10ms")
        buf = AsyncBuffer(bcfg, "gw")
        await buf.open()
        if before:
            buf.submit(before)
            await buf.flush()
        cfg = MqttConfig.model_validate({"host": "127.0.0.1", "port": port, "reconnect_min": "50ms",
                                         "reconnect_max": "200ms", "inflight_window": 4, **kw})  # fmt: skip
        fw = Forwarder(cfg, buf, IDENTITY, encoder=enc)
        rigs.append(Rig(buf, fw, enc))
        if start:
            await fw.start()
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.fw.stop(grace_s=0.3)
        await rig.buf.close()


def payloads(collector: Collector, prefix: str = "x/") -> list[tuple[str, str]]:
    return [(t, p.decode()) for t, p, _ in list(collector.messages) if t.startswith(prefix)]


@pytest.fixture
def acl_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    os.chmod(broker.dir, 0o755)
    acl = broker.dir / "acl"
    acl.write_text("topic read #\ntopic write x/d1/#\ntopic write x/hello\n"
                   "topic write x/blocked/data/0\ntopic write x/blocked/data/1\n")  # fmt: skip
    os.chmod(acl, 0o644)
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_a_segment_is_delivered_only_when_every_message_of_it_is_acknowledged(
    acl_broker: Mosquitto, make_rig: Callable[..., Any]
) -> None:
    """MQTT 5: the broker refuses the third message of the ``blocked`` segment and takes the other
    two: that segment stays in the buffer, the others are delivered."""
    rig = await make_rig(acl_broker.port, Split(parts=3), protocol="5")
    await rig.commit(block("d1", 0), block("blocked", 0), block("d1", 1))
    await until(lambda: rig.fw.stats()["rejected"] >= 1, what="the refused message")
    await until(lambda: rig.fw.stats()["acked"] == 1, what="the d1 segment (both blocks)")
    await until(lambda: _pending(rig, ["blocked/data"]), what="d1 marked delivered, blocked not")
    assert rig.fw.stats()["acked_readings"] == 4
    # (mosquitto 2.0 also drops the connection after a denied publish; the forwarder reconnects)
    await until(lambda: rig.fw.stats()["connected"], what="connected again")
    assert await _pending(rig, ["blocked/data"])
    stats = rig.fw.stats()
    assert stats["messages"] == 6 and stats["published"] == 2 and stats["payload"] == "split"


async def test_a_session_that_never_resends_encodes_what_was_unacknowledged_again(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    relay = Relay(mosquitto.port)
    try:
        rig = await make_rig(relay.port, Split(parts=2, resend=False))
        await until(lambda: rig.fw.stats()["connected"], what="connected")
        first_client = rig.fw._client
        relay.swallow_replies = True  # publishes reach the broker, their PUBACKs never come back
        await rig.commit(block("d1", 0), block("d2", 0))
        await until(lambda: len(payloads(collector, "x/d")) >= 4, what="published, unacknowledged")
        assert await rig.depth() == 2 and rig.fw.stats()["inflight"] == 2
        relay.swallow_replies = False
        relay.cut()
        await until(lambda: len(rig.enc.sessions) >= 2, what="a new session")
        await until(lambda: _zero(rig), what="delivered in the new session")
        assert rig.fw._client is not first_client, "a fresh client: paho re-sends nothing old"
        got = payloads(collector)
        hello = got.index(("x/hello", rig.enc.sessions[1]))
        after = [p for t, p in got[hello + 1 :] if t != "x/hello"]
        assert after and all(p.startswith(rig.enc.sessions[1] + "|") for p in after), (
            "after the new session's first message, only that session's messages"
        )
        before = {p.split("|")[1] for t, p in got[:hello] if t != "x/hello"}
        assert {p.split("|")[1] for p in after} == before, "every one of them again"
    finally:
        relay.close()


async def _pending(rig: Rig, streams: list[str]) -> bool:
    return [s.stream for s in await rig.buf.pending(0, 10)] == streams


async def _zero(rig: Rig) -> bool:
    return await rig.depth() == 0


async def test_historical_by_commit_before_the_session_and_ready_holds_segments(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    enc = Split(parts=1)
    enc.held = True
    rig = await make_rig(mosquitto.port, enc, before=[block("d1", 0)])
    await until(lambda: rig.fw.stats()["connected"], what="connected")
    await rig.commit(block("d1", 1))
    await asyncio.sleep(0.3)
    assert rig.fw.stats()["published"] == 0 and await rig.depth() == 2, "held in the buffer while not ready"
    enc.held = False
    await rig.commit(block("d1", 2))  # (a commit wakes the forwarder)
    await until(lambda: _zero(rig), what="delivered once ready")
    assert [h for _, h in enc.encoded] == [True, True, True], "all waited in the buffer"
    await rig.commit(block("d1", 3))
    await until(lambda: _zero(rig), what="live one delivered")
    assert enc.encoded[-1][1] is False, "committed while the session publishes: live"


async def test_incoming_messages_reach_the_encoder_and_its_reactions_the_broker(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    rig = await make_rig(mosquitto.port, Split(parts=1, resend=False))
    await until(lambda: rig.fw.stats()["connected"], what="connected")

    def ping() -> bool:
        """Sent until answered: the forwarder's subscription may not be in place yet."""
        collector.client.publish("x/cmd", b"ping", qos=1)
        return ("x/reply", "re:ping") in payloads(collector)

    await until(ping, what="the reaction published")
    collector.client.publish("x/cmd", b"boom", qos=1)
    await until(lambda: rig.fw.stats()["message_errors"] == 1, what="the failing handler counted")
    collector.client.publish("x/cmd", b"reconnect", qos=1)
    await until(lambda: len(rig.enc.sessions) == 2 and rig.fw.stats()["connected"], what="a new session")
    await rig.commit(block("d1", 0))
    await until(lambda: _zero(rig), what="and the forwarder still delivers")


def test_payload_keys_are_validated_with_their_line(tmp_path: Path) -> None:
    text = ("agent:\n  id: gw-01\nbuffer:\n  path: b.db\nmqtt:\n  host: 127.0.0.1\n  payload: sparkplug_b\n"
            "  sparkplug:\n    edge_node_id: gw-01\n")  # fmt: skip
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    (problem,) = exc.value.problems
    assert problem.path == ("mqtt", "sparkplug") and problem.line == 8
    assert "group_id is required with payload: sparkplug_b" in problem.message
    cfg.write_text(text.replace("    edge_node_id: gw-01", "    group_id: plant/a"))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    (problem,) = exc.value.problems
    assert problem.path == ("mqtt", "sparkplug", "group_id") and problem.line == 9
    assert "'/'" in problem.message
    cfg.write_text(text.replace("sparkplug_b", "protobuf"))
    with pytest.raises(ConfigError, match=r"mqtt\.payload"):
        load_config(cfg)


def test_the_encoder_is_the_one_the_payload_names(tmp_path: Path) -> None:
    base = {"host": "127.0.0.1", "sparkplug": {"group_id": "plant"}}
    json_only = make_encoder(MqttConfig.model_validate(base), IDENTITY, None)
    assert json_only.name == "json" and json_only.messages_per_segment == 1
    both = make_encoder(MqttConfig.model_validate({**base, "payload": "sparkplug_b"}), IDENTITY, None)
    assert isinstance(both, WithSegments) and isinstance(both.primary, SparkplugEncoder)
    assert not both.resend_after_reconnect and both.messages_per_segment is None
    will = both.will("1.1")
    assert will is not None and will.topic == "spBv1.0/plant/NDEATH/gw-test", "one will: the NDEATH"
    alone = make_encoder(
        MqttConfig.model_validate({**base, "payload": "sparkplug_b", "publish_segments": False}),
        IDENTITY,
        None,
    )
    assert isinstance(alone, SparkplugEncoder)
    assert MqttConfig.model_validate({"host": "127.0.0.1"}).payload == "json"


def test_the_catalog_declares_each_tag_with_the_type_its_readings_have(tmp_path: Path) -> None:
    """From the shipped profiles: a register's type (scaled: float), bits, coils and discrete inputs
    (bool), text, a counter's counts and flags (int) and concentrations (float); an OPC UA node,
    whose type the profile does not say, float (the Sparkplug session re-declares it from its values)."""
    from agent.app.catalog import build_catalog

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "agent:\n  id: gw-01\nbuffer:\n  path: b.db\ndevices:\n"
        "  - {id: gen, profile: generic-modbus-example, connection: {host: 127.0.0.1, port: 5020}}\n"
        "  - {id: pc, profile: particle-counter-sim-serial, connection: {port: /dev/ttyS0}}\n"
        "  - {id: ua, profile: bioreactor-sim-opcua,\n"
        "     connection: {url: 'opc.tcp://127.0.0.1:4840', security_policy: None}}\n"
    )
    catalog = build_catalog(load_config(cfg).devices)
    kinds = {(device, t.name): t.kind for device, tags in catalog.items() for t in tags}
    assert [t.name for t in catalog["gen"]][:2] == ["temperature", "pressure"], "profile order"
    expected = {
        ("gen", "temperature"): "float",  # int16 × 0.1
        ("gen", "flow"): "float",  # float32
        ("gen", "total_volume"): "int",  # uint64
        ("gen", "running"): "bool",  # bit 0 of a register
        ("gen", "pump_on"): "bool",  # coil
        ("gen", "level_switch"): "bool",  # discrete input 10001
        ("gen", "model_name"): "string",
        ("gen", "sample_volume"): "float",  # uint32 × 0.001
        ("pc", "count_0_5um"): "int",
        ("pc", "conc_0_5um_per_m3"): "float",
        ("pc", "laser_ok"): "int",
        ("ua", "temperature_c"): "float",
    }
    assert {k: kinds[k] for k in expected} == expected
    gen = {t.name: t for t in catalog["gen"]}
    assert gen["temperature"].unit == "degC" and gen["pump_on"].description
