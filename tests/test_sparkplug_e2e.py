"""The Sparkplug B edge node end to end: a real buffer and forwarder, a real mosquitto that is
stopped and started mid-run, and a host application (a paho subscriber with a persistent session)
decoding with the codec. The host sees NBIRTH/DBIRTH, data, the NDEATH with the session's bdSeq,
then NBIRTH/DBIRTH with the next bdSeq, the backlog as historical data and then live data, and
every committed reading arrives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.core.records import Block
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.generated import sparkplug_b_pb2 as pb
from tests.support import Collector, Mosquitto, until

CATALOG = {
    "d1": [TagInfo("v", "degC"), TagInfo("k", kind="int")],
    "d2": [TagInfo("v", "pH"), TagInfo("k", kind="int")],
}
IDENTITY = AgentIdentity(agent_id="gw", version="0.1.0", config_hash="c0ffee")


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    b = Mosquitto(persistence=True).start()
    try:
        yield b
    finally:
        b.close()


def block(device: str, k: int) -> Block:
    return Block(device=device, group="g", acq_ts_ns=time.time_ns(), tags=["v", "k"], units=[None, None],
                 values=[k + 0.25, k])  # fmt: skip


def bd_seq(d: codec.Decoded) -> int:
    return int(next(m.value for m in d.metrics if m.name == codec.BDSEQ))


async def test_broker_outage_death_rebirth_history_then_live_nothing_lost(
    broker: Mosquitto, tmp_path: Path
) -> None:
    host = Collector(broker.port, topic="#", persistent=True)
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", synchronous="off", commit_interval="10ms"), "gw")
    await buf.open()
    cfg = MqttConfig.model_validate(
        {"host": "127.0.0.1", "port": broker.port, "reconnect_min": "50ms", "reconnect_max": "200ms",
         "inflight_window": 4, "payload": "sparkplug_b", "sparkplug": {"group_id": "plant"}}
    )  # fmt: skip
    fw = Forwarder(cfg, buf, IDENTITY, catalog=CATALOG)
    produced = 0

    async def produce(rounds: int) -> None:
        nonlocal produced
        for _ in range(rounds):
            buf.submit([block("d1", produced), block("d2", produced)])
            produced += 1
            await asyncio.sleep(0.01)
        await buf.flush()

    async def delivered() -> bool:
        return int((await buf.stats())["depth_segments"]) == 0

    try:
        await fw.start()
        await produce(10)
        await until(delivered, what="first session delivered")
        broker.stop()
        await until(lambda: not fw.stats()["connected"], what="outage noticed")
        await produce(10)  # waits in the buffer
        broker.start()
        await until(lambda: fw.stats()["connected"], what="reconnected")
        await produce(10)
        await until(delivered, within_s=15, what="backlog and live data delivered")
        await until(lambda: sum(1 for t, _, _ in host.messages if "/DDATA/" in t) >= 2 * produced)
    finally:
        await fw.stop(grace_s=0.5)
        await buf.close()
        host.close()

    spb = [
        (t.split("/")[2], t.rsplit("/", 1)[1], codec.decode(p))
        for t, p, _ in host.messages
        if t.startswith("spBv1.0/")
    ]
    assert all(t.startswith("spBv1.0/plant/") for t, _, _ in host.messages if t.startswith("spBv1.0/"))
    kinds = [k for k, _, _ in spb]
    assert kinds[:3] == ["NBIRTH", "DBIRTH", "DBIRTH"] and bd_seq(spb[0][2]) == 0
    death = kinds.index("NDEATH")
    assert bd_seq(spb[death][2]) == 0, "the will of the first session"
    rebirth = kinds.index("NBIRTH", death)
    assert bd_seq(spb[rebirth][2]) == 1, "the next session's bdSeq"
    assert [(k, d) for k, d, _ in spb[rebirth : rebirth + 3]] == [
        ("NBIRTH", "gw"),
        ("DBIRTH", "d1"),
        ("DBIRTH", "d2"),
    ]
    assert "DDATA" not in kinds[death:rebirth], "no data between the death and the next birth"
    after = [d for k, _, d in spb[rebirth:] if k == "DDATA"]
    flags = [all(m.is_historical for m in d.metrics) for d in after]
    assert all(m.is_historical == flags[i] for i, d in enumerate(after) for m in d.metrics)
    first_live = flags.index(False)
    assert first_live > 0 and not any(flags[first_live:]), "the backlog first, as historical; then live"
    assert [d.seq for d in (x for _, _, x in spb[rebirth:])][:3] == [0, 1, 2]
    # every reading arrived (values are unique per device): in Sparkplug and in the chained segments
    for device in ("d1", "d2"):
        specs = {s.alias: s.name for s in codec.catalog_metrics(CATALOG)[device]}
        got = {
            m.value
            for k, d, x in spb
            if k == "DDATA" and d == device
            for m in x.metrics
            if specs.get(m.alias or 0) == "k"
        }
        assert got == set(range(produced)), f"{device}: every committed reading arrived"
        seqs = {
            s
            for t, p, _ in host.messages
            if t == f"cleanroom/{device}/data"
            for b in json.loads(p)["blocks"]
            for s in range(b["seq"], b["seq"] + b["n"])
        }
        assert len(seqs) == 2 * produced, "and the segments beside them (publish_segments)"
    segment_refs = {
        json.loads(m.value)["i"]
        for k, d, x in spb
        if k == "DDATA" and d == "d1"
        for m in x.metrics
        if isinstance(m.value, str) and m.value.startswith('{"')
    }
    assert segment_refs == set(range(max(segment_refs) + 1)), "every d1 segment is named by its messages"


async def test_primary_host_rebirth_and_refused_write_over_the_broker(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The host's retained STATE gates the node; its NCMD rebirth is obeyed; a DCMD write is refused
    and its audit record reaches the host as NDATA; the host going offline holds the data, which
    arrives as historical after the next birth."""
    from agent.buffer.audit import Auditor

    host = Collector(broker.port, topic="spBv1.0/#")
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", synchronous="off", commit_interval="10ms"), "gw")
    await buf.open()
    cfg = MqttConfig.model_validate(
        {"host": "127.0.0.1", "port": broker.port, "reconnect_min": "50ms", "reconnect_max": "200ms",
         "payload": "sparkplug_b", "publish_segments": False,
         "sparkplug": {"group_id": "plant", "edge_node_id": "edge", "primary_host_id": "scada"}}
    )  # fmt: skip
    auditor = Auditor(lambda e: buf.submit((), (e,)), "gw")
    fw = Forwarder(cfg, buf, IDENTITY, catalog=CATALOG, auditor=auditor)

    def kinds() -> list[str]:
        return [t.split("/")[2] for t, _, _ in list(host.messages) if t.startswith("spBv1.0/plant/")]

    def state(online: bool, ts: int) -> None:
        doc = json.dumps({"online": online, "timestamp": ts}).encode()
        host.client.publish("spBv1.0/STATE/scada", doc, qos=1, retain=True)

    try:
        await fw.start()
        await until(lambda: fw.stats()["connected"], what="connected")
        buf.submit([block("d1", 0)])
        await buf.flush()
        await asyncio.sleep(0.3)
        assert kinds() == [] and fw.stats()["published"] == 0, "nothing before the host is online"
        state(True, 1000)
        await until(lambda: "DDATA" in kinds(), what="births, then the data that waited")
        assert kinds()[:3] == ["NBIRTH", "DBIRTH", "DBIRTH"]
        waited = codec.decode(next(p for t, p, _ in host.messages if "/DDATA/" in t))
        assert all(m.is_historical for m in waited.metrics)
        rebirth = pb.Payload()
        metric = rebirth.metrics.add()
        metric.name, metric.datatype, metric.boolean_value = codec.REBIRTH, codec.DataType.BOOLEAN, True
        host.client.publish("spBv1.0/plant/NCMD/edge", rebirth.SerializeToString(), qos=1)
        await until(lambda: kinds().count("NBIRTH") == 2, what="rebirth")
        write = pb.Payload()
        metric = write.metrics.add()
        metric.name, metric.datatype, metric.double_value = "v", codec.DataType.DOUBLE, 99.0
        host.client.publish("spBv1.0/plant/DCMD/edge/d1", write.SerializeToString(), qos=1)
        await until(lambda: "NDATA" in kinds(), what="the refusal's audit record")
        audit = codec.decode(next(p for t, p, _ in host.messages if "/NDATA/" in t))
        record = json.loads(next(m.value for m in audit.metrics if m.alias == 4))
        assert record["data"]["action"] == "command_refused" and record["data"]["reason"] == "read-only agent"
        assert record["data"]["actor"] == "mqtt:spBv1.0/plant/DCMD/edge/d1"
        assert fw.stats()["sparkplug"]["refused_commands"] == 1
        state(False, 500)  # stale: older than the online it follows
        await until(lambda: fw.stats()["sparkplug"]["stale_host_states"] >= 1, what="the stale STATE seen")
        assert "NDEATH" not in kinds() and fw.stats()["sparkplug"]["born"]
        state(False, 2000)
        await until(lambda: "NDEATH" in kinds(), what="the node's death when the host goes offline")
        buf.submit([block("d1", 1)])
        await buf.flush()
        await asyncio.sleep(0.3)
        assert (await buf.stats())["depth_segments"] >= 1, "held while the host is offline"
        state(True, 3000)
        await until(lambda: kinds().count("NBIRTH") == 3, what="births in the next session")
        births = [codec.decode(p) for t, p, _ in host.messages if "/NBIRTH/" in t]
        assert [bd_seq(b) for b in births] == [0, 0, 1], "a rebirth keeps bdSeq, a new session takes the next"
        await until(lambda: kinds()[-1] == "DDATA", what="the held data")
        held = codec.decode([p for t, p, _ in host.messages if "/DDATA/" in t][-1])
        assert all(m.is_historical for m in held.metrics)
    finally:
        await fw.stop(grace_s=0.5)
        await buf.close()
        host.close()
