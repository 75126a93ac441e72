"""The Sparkplug B 3.0 session rules of the edge node, one at a time, on segments committed by a
real buffer and payloads decoded with the codec: bdSeq and seq (and their wrap), births before
data, rebirth, the primary host's STATE (also stale), aliases, the historical flag, devices going
down and coming back, and commands refused and audited; fuzzed incoming messages never raise."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredSegment
from agent.buffer.store import Buffer
from agent.core.records import Block, Event, Quality
from agent.sinks.payload import Message, TagInfo
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.generated import sparkplug_b_pb2 as pb
from agent.sinks.sparkplug.session import SparkplugConfig, SparkplugEncoder

CATALOG = {
    "d1": [TagInfo("temp", "degC", "the temperature"), TagInfo("count", None, kind="int")],
    "d2": [TagInfo("ph", "pH")],
}
CFG = SparkplugConfig(group_id="plant", edge_node_id="gw")
HOST = "scada"


class Store:
    """A real buffer that hands out what it committed, as the forwarder would take it."""

    def __init__(self, path: Path) -> None:
        self.core = Buffer(BufferConfig(path=path, synchronous="off"), "gw")
        self.core.open()
        self.after = 0

    def commit(self, *items: Block | Event) -> list[StoredSegment]:
        self.core.commit(list(items))
        segments = self.core.pending(self.after, 1000)
        self.after = segments[-1].id if segments else self.after
        return segments


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "b.db")
    yield s
    s.core.close()


def block(device: str, values: list[Any], tags: list[str] | None = None, bad: bool = False) -> Block:
    tags = tags or [t.name for t in CATALOG[device]]
    n = len(tags)
    return Block(
        device=device,
        group="g",
        acq_ts_ns=1_700_000_000_123_000_000,
        tags=tags,
        units=[None] * n,
        values=[None] * n if bad else values,
        quality=[Quality.BAD] * n if bad else None,
        reasons=["disconnected"] * n if bad else None,
    )


def state(device: str, what: str) -> Event:
    return Event(device, "device_state", data={"state": what})


def kind(m: Message) -> str:
    return m.topic.split("/")[2]


def decoded(m: Message) -> codec.Decoded:
    return codec.decode(m.payload)


def seqs(messages: list[Message]) -> list[int | None]:
    return [decoded(m).seq for m in messages if kind(m) != "NDEATH"]


def ncmd(**metrics: Any) -> bytes:
    payload = pb.Payload(timestamp=int(time.time() * 1000))
    for name, value in metrics.items():
        m = payload.metrics.add()
        m.name = name
        if isinstance(value, bool):
            m.datatype = codec.DataType.BOOLEAN
            m.boolean_value = value
        else:
            m.datatype = codec.DataType.STRING
            m.string_value = str(value)
    return payload.SerializeToString()  # type: ignore[no-any-return]


def host_state(online: bool, ts: int) -> bytes:
    return json.dumps({"online": online, "timestamp": ts}).encode()


def connected(enc: SparkplugEncoder) -> list[Message]:
    enc.will("s")
    return enc.on_connect("s")


# --------------------------------------------------------------------------- numbers


def test_bdseq_starts_at_zero_rises_per_connect_wraps_and_matches_the_birth() -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "agent-1")
    failed = [enc.will("refused") for _ in range(3)]  # the broker never accepted these attempts
    assert [decoded(w).metrics[0].value for w in failed] == [0, 0, 0]
    wills, births = [], []
    for k in range(258):
        wills.append(enc.will(f"s{k}"))
        births.append(enc.on_connect(f"s{k}")[0])
        enc.on_disconnect()
    bd = [decoded(w).metrics[0].value for w in wills]
    assert bd[:3] == [0, 1, 2] and bd[255:] == [255, 0, 1]
    assert all(w.topic == "spBv1.0/plant/NDEATH/gw" and w.qos == 1 and not w.retain for w in wills)
    assert all(b.topic == "spBv1.0/plant/NBIRTH/gw" for b in births)
    born = [{m.name: m.value for m in decoded(b).metrics}[codec.BDSEQ] for b in births]
    assert born == bd, "each birth has its connection's will's bdSeq"
    nbirth = decoded(births[-1])
    assert {m.name: m.value for m in nbirth.metrics}[codec.REBIRTH] is False
    assert (
        SparkplugEncoder(SparkplugConfig(group_id="g"), {}, "agent-1").topic("NDATA")
        == "spBv1.0/g/NDATA/agent-1"
    )


def test_births_come_first_seq_runs_across_message_kinds_and_wraps(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    assert not enc.ready()
    births = connected(enc)
    assert [m.topic for m in births] == [
        "spBv1.0/plant/NBIRTH/gw", "spBv1.0/plant/DBIRTH/gw/d1", "spBv1.0/plant/DBIRTH/gw/d2"
    ]  # fmt: skip
    assert seqs(births) == [0, 1, 2] and enc.ready()
    out: list[Message] = []
    for k in range(300):
        for seg in store.commit(block("d1", [20.0 + k, k])):
            out += enc.encode(seg, historical=False)
    assert {kind(m) for m in out} == {"DDATA"}
    got = seqs(out)
    assert got[:3] == [3, 4, 5] and got[252:255] == [255, 0, 1], "0..255, round again"
    assert enc.stats()["sparkplug"]["births"] == 1


def test_ddata_goes_by_alias_with_quality_and_the_segment_it_came_from(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    births = {m.topic: decoded(m) for m in connected(enc)}
    aliases = {m.name: m.alias for m in births["spBv1.0/plant/DBIRTH/gw/d1"].metrics}
    d1 = births["spBv1.0/plant/DBIRTH/gw/d1"].metrics[0]
    assert d1.properties[codec.ENG_UNIT] == "degC" and d1.datatype == codec.DataType.DOUBLE
    (seg,) = store.commit(block("d1", [36.6, 7]))
    (msg,) = enc.encode(seg, historical=False)
    data = decoded(msg)
    assert all(m.name is None for m in data.metrics), "DDATA: aliases only"
    by_alias = {m.alias: m for m in data.metrics}
    assert by_alias[aliases["temp"]].value == 36.6 and by_alias[aliases["count"]].value == 7
    assert by_alias[aliases["temp"]].timestamp == 1_700_000_000_123, "the reading's own time"
    ref = json.loads(by_alias[aliases[codec.INTEGRITY]].value)
    assert ref == {"stream": "d1/data", "i": 0, "hash": seg.hash}
    assert not any(m.is_historical for m in data.metrics)


def test_historical_segments_say_so_on_every_metric_with_their_original_time(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    (seg,) = store.commit(block("d2", [7.2]))
    (msg,) = enc.encode(seg, historical=True)
    metrics = decoded(msg).metrics
    assert metrics and all(m.is_historical for m in metrics)
    assert {m.timestamp for m in metrics} == {1_700_000_000_123}


# --------------------------------------------------------------------------- rebirth, host


def test_rebirth_repeats_every_birth_in_the_same_bdseq_with_the_last_values(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    for seg in store.commit(block("d1", [21.5, 3])):
        enc.encode(seg, historical=False)
    reaction = enc.on_message("spBv1.0/plant/NCMD/gw", ncmd(**{codec.REBIRTH: True}))
    assert [kind(m) for m in reaction.publish] == ["NBIRTH", "DBIRTH", "DBIRTH"] and not reaction.reconnect
    assert seqs(reaction.publish) == [0, 1, 2], "a rebirth starts seq at 0 again"
    nbirth = decoded(reaction.publish[0])
    assert {m.name: m.value for m in nbirth.metrics}[codec.BDSEQ] == 0, "same bdSeq"
    dbirth = {m.name: m.value for m in decoded(reaction.publish[1]).metrics}
    assert dbirth["temp"] == 21.5 and dbirth["count"] == 3
    not_rebirth = enc.on_message("spBv1.0/plant/NCMD/gw", ncmd(**{codec.REBIRTH: False}))
    assert not not_rebirth.publish
    assert enc.stats()["sparkplug"]["rebirths"] == 1 and enc.stats()["sparkplug"]["births"] == 2


def test_primary_host_state_gates_births_and_data_and_stale_states_are_ignored() -> None:
    enc = SparkplugEncoder(
        SparkplugConfig(group_id="plant", edge_node_id="gw", primary_host_id=HOST), CATALOG, "gw"
    )
    assert "spBv1.0/STATE/scada" in enc.subscriptions()
    assert {"spBv1.0/plant/NCMD/gw", "spBv1.0/plant/DCMD/gw/+"} <= set(enc.subscriptions())
    assert connected(enc) == [] and not enc.ready(), "no birth before the host is online"
    state_topic = "spBv1.0/STATE/scada"
    assert enc.on_message(state_topic, host_state(False, 1000)).publish == []
    assert not enc.ready()
    online = enc.on_message(state_topic, host_state(True, 2000))
    assert [kind(m) for m in online.publish] == ["NBIRTH", "DBIRTH", "DBIRTH"] and enc.ready()
    assert enc.on_message(state_topic, host_state(True, 2000)).publish == [], "the same state again"
    stale = enc.on_message(state_topic, host_state(False, 1500))
    assert stale.publish == [] and not stale.reconnect and enc.ready(), "older than the last: ignored"
    for garbage in (b"", b"{", b'{"online": "yes", "timestamp": 3000}', b"[]", b'{"online": true}'):
        assert enc.on_message(state_topic, garbage).publish == []
    assert enc.ready()
    offline = enc.on_message(state_topic, host_state(False, 3000))
    assert offline.reconnect and [kind(m) for m in offline.publish] == ["NDEATH"] and not enc.ready()
    assert enc.stats()["sparkplug"]["stale_host_states"] == 1
    enc.on_disconnect()
    assert connected(enc) == [], "the next session waits for online again"
    again = enc.on_message(state_topic, host_state(True, 4000))
    assert kind(again.publish[0]) == "NBIRTH"
    assert {m.name: m.value for m in decoded(again.publish[0]).metrics}[codec.BDSEQ] == 1


# --------------------------------------------------------------------------- devices


def test_device_down_is_a_ddeath_its_gap_withheld_and_back_is_a_dbirth_in_segment_order(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    out: list[Message] = []
    for items in (
        [block("d1", [20.0, 1])],
        [state("d1", "disconnected")],
        [block("d1", [], bad=True)],
        [block("d1", [], bad=True)],
        [state("d1", "connected")],
        [block("d1", [20.5, 2])],
    ):
        for seg in store.commit(*items):
            out += enc.encode(seg, historical=False)
    assert [(kind(m), m.topic.rsplit("/", 1)[1]) for m in out] == [
        ("DDATA", "d1"), ("DDATA", "d1"), ("DDEATH", "d1"), ("DBIRTH", "d1"), ("DDATA", "d1"), ("DDATA", "d1")
    ]  # fmt: skip
    event = json.loads(next(m.value for m in decoded(out[1]).metrics if m.value and "state" in m.value))
    assert event["kind"] == "device_state" and event["data"]["state"] == "disconnected"
    assert seqs(out) == list(range(3, 3 + len(out)))
    assert enc.stats()["sparkplug"]["withheld_blocks"] == 2
    enc.on_disconnect()
    births = connected(enc)
    assert [m.topic.rsplit("/", 1)[1] for m in births] == ["gw", "d1", "d2"]


def test_a_down_device_is_not_born_in_a_new_session_until_it_reports(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    for seg in store.commit(state("d2", "disconnected")):
        enc.encode(seg, historical=False)
    enc.on_disconnect()
    assert [kind(m) for m in connected(enc)] == ["NBIRTH", "DBIRTH"]
    (seg,) = store.commit(block("d2", [7.0]))
    assert [kind(m) for m in enc.encode(seg, historical=False)] == ["DBIRTH", "DDATA"]


def test_agent_events_and_audit_go_to_the_node_and_unknown_devices_still_arrive(store: Store) -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    segs = store.commit(Event("agent", "audit", data={"action": "x"}), Event("agent", "clock_step", data={}))
    out = [m for seg in segs for m in enc.encode(seg, historical=False)]
    assert [kind(m) for m in out] == ["NDATA", "NDATA"]
    (seg,) = store.commit(block("gone", [1.0], tags=["x"]))
    msgs = enc.encode(seg, historical=False)
    assert [kind(m) for m in msgs] == ["DBIRTH", "DDATA"]
    assert enc.stats()["sparkplug"]["skipped_readings"] == 1, "its readings have no metric: counted"
    all_aliases = [m.alias for m in decoded(msgs[0]).metrics]
    node_and_devices = {s.alias for specs in enc.device_specs.values() for s in specs}
    assert len(node_and_devices) == sum(len(s) for s in enc.device_specs.values()), "aliases unique"
    assert set(all_aliases) <= node_and_devices


# --------------------------------------------------------------------------- commands


def test_writes_are_refused_logged_once_per_streak_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    from agent.buffer.audit import Auditor

    trail: list[Event] = []
    enc = SparkplugEncoder(CFG, CATALOG, "gw", Auditor(trail.append, "gw"))
    connected(enc)
    caplog.set_level(logging.WARNING, logger="cleanroom.sparkplug")
    long_value = "x" * 500
    for _ in range(3):
        assert enc.on_message("spBv1.0/plant/DCMD/gw/d1", ncmd(temp=long_value)).publish == []
    reaction = enc.on_message(
        "spBv1.0/plant/NCMD/gw", ncmd(**{codec.REBIRTH: True, "Node Control/Reboot": True})
    )
    assert kind(reaction.publish[0]) == "NBIRTH", "the rebirth in it is honoured, the write refused"
    assert enc.stats()["sparkplug"]["refused_commands"] == 4
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, "once per streak: the repeated DCMD once, the NCMD once"
    assert all(long_value not in r for r in refusals)
    assert [e.data["action"] for e in trail] == ["command_refused"] * 4
    first = trail[0].data
    assert first["actor"] == "mqtt:spBv1.0/plant/DCMD/gw/d1" and first["reason"] == "read-only agent"
    assert first["device"] == "d1" and "temp" in first["target"]
    assert len(first["new"]["temp"]) < 100, "a long value is not kept verbatim"
    assert (
        trail[3].data["actor"] == "mqtt:spBv1.0/plant/NCMD/gw"
        and "Node Control/Reboot" in trail[3].data["target"]
    )


def test_a_malformed_command_is_refused_and_counted_never_raised() -> None:
    enc = SparkplugEncoder(CFG, CATALOG, "gw")
    connected(enc)
    for garbage in (b"\xff\xff\xff", b"not protobuf at all", b"\x0a\x05"):
        assert enc.on_message("spBv1.0/plant/NCMD/gw", garbage).publish == []
        assert enc.on_message("spBv1.0/plant/DCMD/gw/d1", garbage).publish == []
    assert enc.stats()["sparkplug"]["malformed_commands"] == 6


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    topic=st.sampled_from(
        ["spBv1.0/plant/NCMD/gw", "spBv1.0/plant/DCMD/gw/d1", "spBv1.0/STATE/scada", "x/y"]
    ),
    payload=st.binary(max_size=200),
)
def test_fuzzed_incoming_messages_never_raise(topic: str, payload: bytes) -> None:
    enc = SparkplugEncoder(
        SparkplugConfig(group_id="plant", edge_node_id="gw", primary_host_id=HOST), CATALOG, "gw"
    )
    connected(enc)
    reaction = enc.on_message(topic, payload)
    assert all(isinstance(m, Message) for m in reaction.publish)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field", ["group_id", "edge_node_id", "primary_host_id"])
@pytest.mark.parametrize("bad", ["a/b", "a+", "#", ""])
def test_ids_are_sparkplug_topic_tokens(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match=f"{field}[\\s\\S]*must be non-empty without"):
        SparkplugConfig.model_validate({field: bad})


def test_a_metric_takes_the_type_its_values_have_once_and_the_device_is_declared_again(store: Store) -> None:
    """An OPC UA node's type is not in its profile (declared float): a text value re-declares the
    metric as String in a new DBIRTH, same alias; a later value of yet another type is sent null."""
    catalog = {"ua": [TagInfo("state"), TagInfo("temp", "degC")]}
    enc = SparkplugEncoder(CFG, catalog, "gw")
    births = connected(enc)
    declared = {m.name: m for m in decoded(births[1]).metrics}
    assert declared["state"].datatype == codec.DataType.DOUBLE
    (seg,) = store.commit(block("ua", ["Running", 37.0], tags=["state", "temp"]))
    out = enc.encode(seg, historical=False)
    assert [kind(m) for m in out] == ["DBIRTH", "DDATA"]
    again = {m.name: m for m in decoded(out[0]).metrics}
    assert (
        again["state"].datatype == codec.DataType.STRING and again["state"].alias == declared["state"].alias
    )
    assert again["temp"].datatype == codec.DataType.DOUBLE and again["temp"].alias == declared["temp"].alias
    value = {m.alias: m for m in decoded(out[1]).metrics}[declared["state"].alias]
    assert value.value == "Running" and not value.is_null
    (seg,) = store.commit(block("ua", [True, 37.1], tags=["state", "temp"]))
    out = enc.encode(seg, historical=False)
    assert [kind(m) for m in out] == ["DDATA"], "once per tag: no flapping declarations"
    flipped = {m.alias: m for m in decoded(out[0]).metrics}[declared["state"].alias]
    assert flipped.is_null and flipped.properties[codec.QUALITY_REASON] == codec.TYPE_MISMATCH
    assert enc.stats()["sparkplug"]["redeclared"] == 1
