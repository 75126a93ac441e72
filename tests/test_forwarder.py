"""The forwarder against a real mosquitto: complete, ordered, PUBACK-gated delivery of segments
published byte for byte; outages; retained status with sessions and last will; TLS with
verification; the payload contract (JSON Schema)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.core import chain
from agent.core.events import DataLoss, LossReason, Segments
from agent.core.records import Block, Event, Quality
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from cleanroom_common.net import free_port
from tests.support import Collector, Mosquitto, until, wait_for

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "payload.schema.json").read_text())
IDENTITY = AgentIdentity(agent_id="gw-test", version="0.1.0", config_hash="c0ffee")
KEY = b"k" * 32
SOURCE = {"profile": "bioreactor", "profile_sha256": "a" * 64, "config_sha256": "b" * 64, "serial": "SN-1"}
CLOCK = {"synced": True, "offset_s": 0.0004, "max_error_s": 0.01}


# --------------------------------------------------------------------------- helpers


def check_schema(value: Any, schema: dict[str, Any] | None = None, path: str = "$") -> None:
    """The subset of JSON Schema 2020-12 that docs/payload.schema.json uses (no dependency)."""
    s = SCHEMA if schema is None else schema
    if "$ref" in s:
        s = SCHEMA["$defs"][s["$ref"].rsplit("/", 1)[1]]
    if "oneOf" in s:
        ok = 0
        for sub in s["oneOf"]:
            try:
                check_schema(value, sub, path)
                ok += 1
            except AssertionError:
                pass
        assert ok == 1, f"{path}: matches {ok} of oneOf"
        return
    kinds = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if "type" in s:
        types = [s["type"]] if isinstance(s["type"], str) else s["type"]
        assert any(kinds[t](value) for t in types), f"{path}: {value!r} is not {types}"
    if "const" in s:
        assert value == s["const"], f"{path}: {value!r} != {s['const']!r}"
    if "enum" in s:
        assert value in s["enum"], f"{path}: {value!r} not in {s['enum']}"
    if "minimum" in s and kinds["number"](value):
        assert value >= s["minimum"], f"{path}: {value} < {s['minimum']}"
    if "pattern" in s and isinstance(value, str):
        assert re.search(s["pattern"], value), f"{path}: {value!r} does not match {s['pattern']}"
    if "if" in s:
        try:
            check_schema(value, s["if"], path)
        except AssertionError:
            pass
        else:
            check_schema(value, s["then"], path)
    if isinstance(value, dict):
        for key in s.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        props = s.get("properties", {})
        if s.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{path}: unexpected {sorted(extra)}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{path}.{key}")
    if isinstance(value, list):
        assert len(value) >= s.get("minItems", 0), f"{path}: too few items"
        assert len(value) <= s.get("maxItems", len(value)), f"{path}: too many items"
        if "items" in s:
            for i, item in enumerate(value):
                check_schema(item, s["items"], f"{path}[{i}]")


def blocks_for(device: str, i: int, n: int = 4) -> Block:
    quality = [Quality.GOOD] * n
    quality[0] = Quality.BAD if i % 7 == 0 else Quality.GOOD
    return Block(
        device=device,
        group="fast",
        acq_ts_ns=time.time_ns(),
        tags=[f"t{k}" for k in range(n)],
        units=["degC"] * n,
        values=[None if quality[0] is Quality.BAD and k == 0 else i + k / 10 for k in range(n)],
        quality=quality if i % 7 == 0 else None,
        reasons=(["timeout"] + [None] * (n - 1)) if i % 7 == 0 else None,
        source_ts_ns=time.time_ns() if i % 2 else None,
    )


def received_seqs(messages: list[tuple[str, bytes, bool]], device: str) -> list[int]:
    """Reading seqs in arrival order from every data message of ``device`` (duplicates kept)."""
    out: list[int] = []
    for topic, payload, _ in messages:
        if topic == f"cleanroom/{device}/data":
            for b in json.loads(payload)["blocks"]:
                out.extend(range(b["seq"], b["seq"] + b["n"]))
    return out


def check_chains(messages: list[tuple[str, bytes, bool]], key: bytes | None = None) -> dict[str, int]:
    """Every data and events message is a segment published byte for byte: per stream (its topic),
    the distinct payloads link up from i 0 by the hash of the previous one, with the key's MAC when
    there is a key. Returns the segments per stream."""
    streams: dict[str, list[bytes]] = {}
    for topic, payload, _ in messages:
        if topic != "cleanroom/agent/status/gw-test" and payload not in streams.setdefault(topic, []):
            streams[topic].append(payload)
    for topic, payloads in streams.items():
        prev = chain.GENESIS
        for i, payload in enumerate(payloads):
            seg = chain.parse(payload)
            assert (f"cleanroom/{seg.link.stream}", seg.link.i, seg.link.prev) == (topic, i, prev)
            assert (seg.mac is not None) == (key is not None)
            assert key is None or chain.mac_ok(payload, key)
            prev = seg.hash
    return {topic.removeprefix("cleanroom/"): len(p) for topic, p in streams.items()}


def dedup_in_order(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


async def depth(buf: AsyncBuffer) -> int:
    return int((await buf.stats())["depth_records"])


class Rig:
    def __init__(self, buf: AsyncBuffer, fw: Forwarder) -> None:
        self.buf, self.fw = buf, fw


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    rigs: list[Rig] = []

    async def make(port: int, key: bytes | None = None, **mqtt_kw: Any) -> Rig:
        path = tmp_path / f"buf{len(rigs)}.db"
        bcfg = BufferConfig(path=path, synchronous="normal", commit_interval="10ms", segment_max_readings=40)
        buf = AsyncBuffer(bcfg, "gw", key=key)
        await buf.open()
        cfg = MqttConfig.model_validate(
            {"host": "127.0.0.1", "port": port, "reconnect_min": "50ms", "reconnect_max": "300ms",
             "inflight_window": 4, **mqtt_kw}
        )  # fmt: skip
        fw = Forwarder(cfg, buf, IDENTITY)
        await fw.start()
        rigs.append(Rig(buf, fw))
        return rigs[-1]

    yield make
    for rig in rigs:
        await rig.fw.stop(grace_s=0.5)
        await rig.buf.close()


class SessionCollector:
    """A subscriber with a persistent session (what a historian uses): the broker keeps its
    subscription and queues its messages across the broker's own restart."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"historian-{os.getpid()}", clean_session=False
        )
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("cleanroom/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def persistent_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    os.chmod(broker.dir, 0o777)  # mosquitto started as root drops to its own user, which must save there
    conf = f"persistence true\npersistence_location {broker.dir}/\nautosave_interval 0\n"
    broker.conf.write_text(broker.conf.read_text() + conf)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


# --------------------------------------------------------------------------- tests


def v2(kind: str, items: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A version-2 payload around ``items`` (what chain.build_payload makes), as a document."""
    bodies = [json.dumps(item) for item in items]
    stream = "agent/audit" if kind == "audit" else f"d1/{kind}"
    payload = chain.build_payload(kind=kind, agent="a", device="d1", stream=stream, i=0, prev=chain.GENESIS,  # type: ignore[arg-type]
                                  source=SOURCE, clock=CLOCK, bodies=bodies, key=KEY)  # fmt: skip
    return {**json.loads(payload), **extra}


def test_schema_check_rejects_what_the_contract_forbids() -> None:
    event = {"seq": 1, "ts": 2, "kind": "gap", "severity": "info", "data": {}}
    good = v2("events", [event])
    check_schema(good)
    check_schema(v2("audit", [event]))
    check_schema({**good, "source": {}, "clock": {"synced": None, "offset_s": None, "max_error_s": None}})
    unsigned = dict(good)
    del unsigned["mac"]
    check_schema(unsigned)
    for broken in (
        {**good, "extra": 1},
        {**good, "events": [{**event, "severity": "fatal"}]},
        {**good, "events": [{"ts": 2, "kind": "gap", "severity": "info", "data": {}}]},
        {**good, "events": []},
        {**good, "schema": "cleanroom-edge/events/1"},
        {**good, "mac": "00"},
        {**good, "chain": {"stream": "d1/events", "i": -1, "prev": chain.GENESIS}},
        {**good, "chain": {"stream": "d1/events", "i": 0, "prev": "0" * 63}},
        {**good, "source": {**SOURCE, "owner": "x"}},
        {**good, "clock": {"synced": "yes"}},
        {k: v for k, v in good.items() if k != "chain"},
    ):
        with pytest.raises(AssertionError):
            check_schema(broken)


def test_every_data_loss_reason_has_the_one_schema_shape() -> None:
    losses = [
        DataLoss(LossReason.BUFFER_FULL, readings=40, rows=2, first_seq=3, last_seq=42, first_ts=1,
                 last_ts=9, seqs=((3, 22), (30, 42)), segments=(Segments("d1/data", 0, 1),)),
        DataLoss(LossReason.UNENCODABLE, rows=1, events=1, first_seq=7, last_seq=7, first_ts=5, last_ts=5,
                 detail="TypeError: x"),
        DataLoss(LossReason.NOT_COMMITTED, readings=3, rows=1, first_seq=4, last_seq=6, first_ts=0,
                 last_ts=0),
        DataLoss(LossReason.BUFFER_CORRUPT, detail="buffer.db failed its integrity check"),
        DataLoss(LossReason.DEVICE_BUFFER_WRAPPED, first_ts=10**18, last_ts=2 * 10**18, group="counts"),
        DataLoss(LossReason.DEVICE_QUEUE_FULL, records=5, first_ts=10**18, last_ts=None, group="records"),
        DataLoss(LossReason.QUARANTINED, readings=8, rows=2, first_seq=9, last_seq=16, seqs=((9, 16),),
                 segments=(Segments("d1/data", 4, 4),), detail="hash mismatch"),
    ]  # fmt: skip
    assert {loss.reason for loss in losses} | {LossReason.DEVICE_BUFFER_CLEARED} == set(LossReason)
    for seq, loss in enumerate(losses):
        event = loss.event("d1", seq=seq)
        check_schema(v2("events", [event.body()]))
        assert DataLoss.from_body(event.body()) == loss
    old_shape = {"reason": "device_queue_full", "group": "g", "records": 5, "after_ts": 1, "before_ts": 2}
    with pytest.raises(AssertionError, match="data"):
        check_schema({"seq": 1, "ts": 2, "kind": "data_loss", "severity": "alarm", "data": old_shape},
                     SCHEMA["$defs"]["event"])  # fmt: skip


@pytest.mark.parametrize(("protocol", "key"), [("3.1.1", None), ("5", KEY)])
async def test_every_segment_arrives_once_in_order_byte_for_byte(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any], protocol: str, key: bytes | None
) -> None:
    rig = await make_rig(mosquitto.port, key=key, protocol=protocol)
    rig.buf.set_source("bioreactor-1", SOURCE)
    rig.buf.clock = lambda: CLOCK
    for i in range(60):
        rig.buf.submit([blocks_for("bioreactor-1", i), blocks_for("incubator-2", i, n=3)])
        if i % 20 == 0:
            rig.buf.submit((), [Event("incubator-2", "device_state", data={"state": "connected"})])
        await asyncio.sleep(0.002)
    rig.buf.submit((), [Event("agent", "audit", data={"action": "test"})])
    await rig.buf.flush()
    await until(lambda: _zero(rig.buf), what="depth 0")
    stats = await rig.buf.stats()
    assert stats["delivered_readings_total"] == stats["committed_readings_total"] == 60 * 7
    await until(lambda: len(received_seqs(collector.messages, "incubator-2")) >= 180, what="all readings")

    for device, n in (("bioreactor-1", 4), ("incubator-2", 3)):
        seqs = received_seqs(collector.messages, device)
        assert len(seqs) == 60 * n == len(set(seqs)), "no loss, no duplicates without an outage"
        assert seqs == sorted(seqs), "per-device order"
    segments = check_chains(collector.messages, key)
    assert set(segments) == {"bioreactor-1/data", "incubator-2/data", "incubator-2/events", "agent/audit"}
    assert sum(segments.values()) == rig.fw.stats()["published"] == rig.fw.stats()["acked"]
    data_msgs = [json.loads(p) for t, p, _ in collector.messages if t.endswith("/data")]
    assert all(sum(b["n"] for b in m["blocks"]) <= 40 for m in data_msgs), "segment_max_readings respected"
    assert len(data_msgs) < 120, "a segment carries what was committed together"
    for _, payload, _ in collector.messages:
        check_schema(json.loads(payload))
    first = json.loads(next(p for t, p, _ in collector.messages if t == "cleanroom/bioreactor-1/data"))
    assert first["agent"] == "gw" and first["blocks"][0]["quality"][0] == "bad"
    assert first["blocks"][0]["reasons"][0] == "timeout" and first["blocks"][0]["values"][0] is None
    assert first["source"] == SOURCE and first["clock"] == CLOCK
    audit = json.loads(next(p for t, p, _ in collector.messages if t == "cleanroom/agent/audit"))
    assert audit["schema"] == "cleanroom-edge/events/2" and audit["events"][0]["data"] == {"action": "test"}


async def _zero(buf: AsyncBuffer) -> bool:
    return await depth(buf) == 0


async def _delivered_total(buf: AsyncBuffer, readings: int) -> bool:
    return int((await buf.stats())["delivered_readings_total"]) == readings


async def test_broker_restart_mid_run_loses_nothing_and_keeps_order(
    persistent_broker: Mosquitto, make_rig: Callable[..., Any]
) -> None:
    historian = SessionCollector(persistent_broker.port)
    try:
        rig = await make_rig(persistent_broker.port)
        produced = 0

        async def produce(count: int) -> None:
            nonlocal produced
            for _ in range(count):
                rig.buf.submit([blocks_for("bioreactor-1", produced), blocks_for("incubator-2", produced)])
                produced += 1
                await asyncio.sleep(0.005)

        await produce(40)
        persistent_broker.stop()
        await until(lambda: not rig.fw.stats()["connected"], what="disconnect noticed")
        # the last acknowledgements before the outage may still be on their way to their marks
        acked = rig.fw.stats()["acked_readings"]
        await until(lambda: _delivered_total(rig.buf, acked), what="acknowledged readings marked")
        delivered_at_outage = (await rig.buf.stats())["delivered_readings_total"]
        await produce(40)
        await rig.buf.flush()
        await asyncio.sleep(0.3)
        during = await rig.buf.stats()
        assert during["depth_readings"] > 0, "rows committed during the outage stay undelivered"
        assert during["delivered_readings_total"] == delivered_at_outage, "nothing marked without PUBACK"
        persistent_broker.start()
        await produce(20)
        await rig.buf.flush()
        await until(lambda: _zero(rig.buf), within_s=15, what="backlog delivered after restart")
        assert rig.fw.stats()["reconnects"] >= 1
        total = produced * 4
        for device in ("bioreactor-1", "incubator-2"):
            await until(lambda d=device: len(set(received_seqs(historian.snapshot(), d))) >= total)
            seqs = received_seqs(historian.snapshot(), device)
            unique = dedup_in_order(seqs)
            assert len(unique) == total, "nothing lost"
            assert unique == sorted(unique), "order kept"
            # duplicates only from the window that was unacknowledged when the broker went away
            assert len(seqs) - len(unique) <= 4 * 40 * 2
    finally:
        historian.close()


async def test_nothing_marked_delivered_without_puback(
    mosquitto: Mosquitto, make_rig: Callable[..., Any]
) -> None:
    """A frozen broker (SIGSTOP) accepts the TCP bytes but acknowledges nothing."""
    rig = await make_rig(mosquitto.port)
    await until(lambda: rig.fw.stats()["connected"], what="connected")
    assert mosquitto.proc is not None
    os.kill(mosquitto.proc.pid, signal.SIGSTOP)
    try:
        for i in range(100):
            rig.buf.submit([blocks_for("d1", i), blocks_for("d2", i)])
        await rig.buf.flush()
        await until(lambda: rig.fw.stats()["published"] > 0, what="published into the frozen broker")
        await asyncio.sleep(0.3)
        stats = await rig.buf.stats()
        assert stats["delivered_readings_total"] == 0 and stats["depth_readings"] == 800
        assert rig.fw.stats()["acked"] == 0
        assert rig.fw.stats()["published"] == rig.fw.stats()["inflight"] == 4, "the window is exact"
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
    await until(lambda: _zero(rig.buf), what="delivered once the broker acknowledges")


async def test_broker_down_at_start_does_not_fail_start(make_rig: Callable[..., Any]) -> None:
    port = free_port()
    rig = await make_rig(port)
    rig.buf.submit([blocks_for("d1", 0)])
    await rig.buf.flush()
    await until(lambda: rig.fw.stats()["reconnects"] >= 2, what="retrying")
    assert not rig.fw.stats()["connected"] and "failed" in rig.fw.stats()["last_error"]
    broker = Mosquitto(port=port).start()
    try:
        collector = Collector(port)
        try:
            await until(lambda: _zero(rig.buf), what="delivered once the broker is up")
            await until(lambda: received_seqs(collector.messages, "d1") == [0, 1, 2, 3], what="arrived")
        finally:
            collector.close()
    finally:
        await rig.fw.stop(grace_s=0.2)
        broker.close()


@pytest.mark.parametrize("key", [None, KEY], ids=["unsigned", "signed"])
async def test_status_retained_online_will_on_abrupt_loss_offline_on_stop(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any], key: bytes | None
) -> None:
    rig = await make_rig(mosquitto.port, key=key)

    def statuses() -> list[dict[str, Any]]:
        """Each status without its MAC; with a key, every one (the will too) is signed with it."""
        out = []
        for t, p, _ in collector.messages:
            if t == "cleanroom/agent/status/gw-test":
                unsigned, mac = chain.split_mac(p)
                assert (mac is not None) == (key is not None) and (key is None or chain.mac_ok(p, key))
                out.append(json.loads(unsigned))
        return out

    await until(lambda: [s["status"] for s in statuses()] == ["online"], what="online")
    online = statuses()[0]
    assert online["agent"] == "gw-test" and online["version"] == "0.1.0" and online["config_hash"] == "c0ffee"
    assert online["session"] == f"{IDENTITY.started_ns}.1"
    # abrupt loss: the TCP connection dies without an MQTT DISCONNECT
    sock = rig.fw._client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    await until(
        lambda: [s["status"] for s in statuses()] == ["online", "offline", "online"], what="will, back"
    )
    assert statuses()[1]["reason"] == "connection_lost"
    assert statuses()[1]["session"] == online["session"], "the will names the session that ended"
    assert statuses()[2]["session"] == f"{IDENTITY.started_ns}.2"
    await rig.fw.stop(grace_s=1)
    await until(lambda: statuses()[-1]["status"] == "offline", what="offline on stop")
    assert statuses()[-1]["reason"] == "clean_stop" and statuses()[-1]["session"] == statuses()[2]["session"]
    for s in statuses():
        check_schema(s)
    late = Collector(mosquitto.port, topic="cleanroom/agent/status/gw-test")
    try:
        retained = await until(lambda: late.messages, what="retained status")
        assert retained[0][2] is True and json.loads(retained[0][1])["status"] == "offline"
    finally:
        late.close()


class Relay:
    """A TCP relay between the forwarder and the broker that can swallow what the broker says
    (its PUBACKs) and cut the connection: publishes reached the broker and its subscribers, but
    the forwarder never heard so, and must send them again on the next connection."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.swallow_replies = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, broker]
            for src, dst, up in ((client, broker, True), (broker, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if up or not self.swallow_replies:
                    dst.sendall(data)
        self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        """Drop every connection made so far (new ones are relayed again)."""
        socks, self._socks = self._socks, []
        self._close(*socks)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        self.cut()
        for t in self._threads:
            t.join(5)


async def test_a_resent_duplicate_follows_the_new_sessions_online(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    """What lets a verifier tell a re-send from a replay: in any capture, the second copy of a
    message comes after the ``online`` of a newer session than the one that sent the first."""
    relay = Relay(mosquitto.port)
    try:
        rig = await make_rig(relay.port)
        await until(lambda: collector.json("/agent/status/gw-test"), what="online")
        relay.swallow_replies = True
        for i in range(12):  # 20 readings a block, 40 a segment: 6 segments, window 4
            rig.buf.submit([blocks_for("d1", i, n=20)])
        await rig.buf.flush()
        await until(lambda: len(collector.json("/d1/data")) == rig.fw.stats()["published"] == 4,
                    what="the window reached the subscriber, unacknowledged")  # fmt: skip
        assert rig.fw.stats()["acked"] == 0
        relay.swallow_replies = False
        relay.cut()
        await until(lambda: _zero(rig.buf), what="delivered after the reconnect")
        await until(lambda: check_chains(collector.messages).get("d1/data") == 6, what="all segments")
        statuses = ["online", "offline", "online"]
        await until(lambda: [s["status"] for s in collector.json("/agent/status/gw-test")] == statuses,
                    what="the will, the new session")  # fmt: skip
        received = list(collector.messages)
    finally:
        relay.close()
    status_topic = "cleanroom/agent/status/gw-test"
    status_at = {json.loads(p)["session"] + json.loads(p)["status"]: k
                 for k, (t, p, _) in enumerate(received) if t == status_topic}  # fmt: skip
    first, second = (f"{IDENTITY.started_ns}.{n}" for n in (1, 2))
    assert set(status_at) == {first + "online", first + "offline", second + "online"}
    copies: dict[bytes, list[int]] = {}
    for k, (topic, payload, _) in enumerate(received):
        if topic == "cleanroom/d1/data":
            copies.setdefault(payload, []).append(k)
    resent = [at for at in copies.values() if len(at) > 1]
    assert len(resent) == 4 and all(len(at) == 2 for at in resent), "the unacknowledged window, once more"
    for at in resent:
        assert at[0] < status_at[second + "online"] < at[1]
    assert sum(at[0] > status_at[second + "online"] for at in copies.values()) == 2, "then the rest"


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 signed by it, and an unrelated CA."""

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    now = dt.datetime.now(dt.UTC)
    out: dict[str, Path] = {}
    cas: dict[str, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] = {}
    for ca in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"test {ca}"))
            .issuer_name(name(f"test {ca}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        cas[ca] = (key, cert)
        out[ca] = d / f"{ca}.pem"
        out[ca].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_key, ca_cert = cas["ca"]
    leaves = {
        "server": ("localhost", ExtendedKeyUsageOID.SERVER_AUTH),
        "client": ("edge-gateway", ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    for leaf, (cn, usage) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(cn), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{leaf}_cert"] = d / f"{leaf}.pem"
        out[f"{leaf}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{leaf}_key"] = write_key(key, d / f"{leaf}.key")
    return out


async def test_tls_verified_both_ways(make_rig: Callable[..., Any]) -> None:
    """The broker's certificate is verified (an unknown CA fails), and the broker requires ours."""
    broker = Mosquitto()
    os.chmod(broker.dir, 0o755)  # mosquitto started as root reads the certificates as its own user
    pki = make_pki(broker.dir)
    plain = free_port()
    tls_conf = (
        f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\n"
    )
    broker.conf.write_text(broker.conf.read_text() + tls_conf + f"listener {plain} 127.0.0.1\n")
    broker.start()
    try:
        wait_for(lambda: _accepting(plain), what="plain listener")
        collector = Collector(plain)
        try:
            mine = {"cert_file": str(pki["client_cert"]), "key_file": str(pki["client_key"])}
            tls = {"enabled": True, "ca_file": str(pki["ca"])}
            wrong_ca = await make_rig(broker.port, tls={**tls, **mine, "ca_file": str(pki["other_ca"])})
            no_cert = await make_rig(broker.port, tls=tls, client_id="no-cert")
            good = await make_rig(broker.port, tls={**tls, **mine}, client_id="good")
            await until(lambda: good.fw.stats()["connected"], what="mutual TLS connection")
            good.buf.submit([blocks_for("d1", 1)])
            await good.buf.flush()
            await until(lambda: received_seqs(collector.messages, "d1") == [0, 1, 2, 3], what="over TLS")
            await until(lambda: wrong_ca.fw.stats()["reconnects"] >= 1, what="attempt against an unknown CA")
            assert "certificate verify failed" in wrong_ca.fw.stats()["last_error"]
            await until(lambda: no_cert.fw.stats()["reconnects"] >= 1, what="attempt without a client cert")
            assert not wrong_ca.fw.stats()["connected"] and not no_cert.fw.stats()["connected"]
            assert "before the broker accepted it" in no_cert.fw.stats()["last_error"]
            assert (await no_cert.buf.stats())["depth_records"] == 0  # it had nothing; the good one delivered
        finally:
            collector.close()
    finally:
        broker.close()


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either password or password_file"):
        MqttConfig.model_validate(
            {"host": "localhost", "password": "x", "password_file": str(tmp_path / "p")}
        )
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        MqttConfig.model_validate({"host": "localhost", "qos": 2})
    with pytest.raises(ValueError, match=r"flush_max_readings was replaced by buffer\.segment_max_readings"):
        MqttConfig.model_validate({"host": "localhost", "flush_max_readings": 100})
    with pytest.raises(ValueError, match=r"flush_interval was removed.*buffer\.commit_interval"):
        MqttConfig.model_validate({"host": "localhost", "flush_interval": "20ms"})
    cfg = MqttConfig.model_validate({"host": "localhost", "password": "s3cret"})
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())
    missing = MqttConfig.model_validate({"host": "localhost", "password_file": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="password_file"):
        missing.resolve_password()
    with pytest.raises(ValueError, match="cannot load certificates"):
        Forwarder(
            MqttConfig.model_validate(
                {"host": "localhost", "tls": {"enabled": True, "ca_file": str(tmp_path / "x")}}
            ),
            AsyncBuffer(BufferConfig(path=tmp_path / "b.db"), "a"),
            IDENTITY,
        )


@pytest.fixture
def auth_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    os.chmod(broker.dir, 0o755)
    passwd = broker.dir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "edge", "pa55-w0rd"], check=True, timeout=10)
    os.chmod(passwd, 0o644)
    conf = broker.conf.read_text()
    broker.conf.write_text(
        conf.replace("allow_anonymous true", f"allow_anonymous false\npassword_file {passwd}")
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_username_password(
    auth_broker: Mosquitto, tmp_path: Path, make_rig: Callable[..., Any]
) -> None:
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text("pa55-w0rd\n")
    good = await make_rig(auth_broker.port, username="edge", password_file=str(secret_file), client_id="good")
    bad = await make_rig(auth_broker.port, username="edge", password="wrong", client_id="bad")
    good.buf.submit([blocks_for("d1", 1)])
    await good.buf.flush()
    await until(lambda: _zero(good.buf), what="delivered with the right password")
    await until(lambda: "refused" in (bad.fw.stats()["last_error"] or ""), what="refusal reported")
    assert not bad.fw.stats()["connected"] and "wrong" not in str(bad.fw.stats())


@pytest.fixture
def acl_broker() -> Iterator[Mosquitto]:
    broker = Mosquitto()
    os.chmod(broker.dir, 0o755)
    acl = broker.dir / "acl"
    acl.write_text("topic read cleanroom/#\ntopic write cleanroom/d1/#\ntopic write cleanroom/agent/#\n")
    os.chmod(acl, 0o644)
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_mqtt5_rejected_publish_stays_undelivered(
    acl_broker: Mosquitto, make_rig: Callable[..., Any]
) -> None:
    """With MQTT 5 a broker that refuses a publish says so in the PUBACK: that segment stays in the
    buffer (and is retried), the rest is delivered."""
    rig = await make_rig(acl_broker.port, protocol="5")
    rig.buf.submit([blocks_for("d1", 0), blocks_for("blocked", 0), blocks_for("d1", 1)])
    await rig.buf.flush()
    await until(lambda: rig.fw.stats()["rejected"] >= 1, what="the refused publish")
    await until(lambda: rig.fw.stats()["acked_readings"] == 8, what="the allowed ones")
    # The allowed ones are marked with the next commit (alone: buffer.mark_interval); the refused
    # one never is.
    await until(lambda: _undelivered(rig.buf, [("blocked/data", 4)]), what="the allowed ones marked")
    # (mosquitto 2.0 also drops the connection after a denied publish; the forwarder reconnects)
    await until(lambda: rig.fw.stats()["connected"], what="connected again")
    assert [(s.stream, s.seq_first) for s in await rig.buf.pending(0, 10)] == [("blocked/data", 4)]


async def _undelivered(buf: AsyncBuffer, expected: list[tuple[str, int]]) -> bool:
    return [(s.stream, s.seq_first) for s in await buf.pending(0, 10)] == expected


async def test_data_loss_event_is_forwarded(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    """An overflow while the broker was unreachable: the survivors and the data_loss event that
    accounts for the rest both arrive, so a consumer can prove completeness from seqs alone."""
    from agent.buffer.store import Buffer

    core = Buffer(BufferConfig(path=tmp_path / "buf0.db", max_bytes="64KiB", synchronous="off"), "gw")
    core.open()
    losses = 0
    for i in range(200):
        losses += len(core.commit([blocks_for("d1", i, n=20)]).events)
    core.close()
    assert losses > 0
    rig = await make_rig(mosquitto.port)  # opens buf0.db
    await until(lambda: _zero(rig.buf), what="backlog delivered")
    # The broker acknowledged every segment; its copies to the collector may still be on the way.
    acked = rig.fw.stats()["acked"]
    await until(lambda: len(_segments_received(collector)) >= acked, what="every segment at the collector")
    events = [e for m in collector.json("/d1/events") for e in m["events"]]
    assert {e["kind"] for e in events} == {"data_loss"}
    # an older loss event that itself had to go is folded into a newer one: ranges still cover all
    lost = {s for e in events for lo, hi in e["data"]["seqs"] for s in range(lo, hi + 1)}
    received = set(received_seqs(collector.messages, "d1"))
    assert not lost & received
    assert sorted(lost | received | {e["seq"] for e in events}) == list(range(200 * 20 + losses))
    # and the removed segments are named: with the ones received, the chain of d1/data is whole
    got = {chain.parse(p).link.i for t, p, _ in collector.messages if t == "cleanroom/d1/data"}
    gone = {i for e in events for g in e["data"]["segments"] if g["stream"] == "d1/data"
            for i in range(g["first_i"], g["last_i"] + 1)}  # fmt: skip
    assert not gone & got and sorted(gone | got) == list(range(len(gone | got)))
    stats = await rig.buf.stats()
    assert (
        sum(e["data"]["readings"] for e in events) == stats["lost_readings_total"] == 200 * 20 - len(received)
    )
    for _, payload, _ in collector.messages:
        check_schema(json.loads(payload))


def _segments_received(collector: Collector) -> set[bytes]:
    """The distinct segments the collector holds (the retained status is no segment)."""
    return {p for t, p, _ in list(collector.messages) if not t.startswith("cleanroom/agent/status")}


async def test_replay_on_a_running_agent_is_republished(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli import main
    from agent.sinks import forwarder

    monkeypatch.setattr(forwarder, "RESCAN_INTERVAL_S", 0.2)
    rig = await make_rig(mosquitto.port)
    rig.buf.submit([blocks_for("d1", 0), blocks_for("d2", 0)])
    await rig.buf.flush()
    await until(lambda: _zero(rig.buf), what="delivered")
    replay = ["buffer", "replay", "--db", str(rig.buf.cfg.path), "--device", "d1"]
    assert main([*replay, "--actor", "qa:jdoe", "--reason", "historian lost d1"]) == 0
    await until(lambda: received_seqs(collector.messages, "d1") == [0, 1, 2, 3] * 2, what="republished")
    await until(lambda: _zero(rig.buf), what="delivered again")
    assert received_seqs(collector.messages, "d2") == [4, 5, 6, 7]
    assert check_chains(collector.messages)["d1/data"] == 1, "the same segment, byte for byte"
    audit = [e for m in collector.json("/agent/audit") for e in m["events"]]
    assert [e["data"]["action"] for e in audit] == ["buffer_replay"]
