"""The ``flat`` payload: one message per device sample with one value per tag name, on UNS topics,
tied to the chained segment it was committed in; bad configurations are clear errors.

The end-to-end part runs a real agent (child process) polling the simulated bioreactor over Modbus
TCP into a real mosquitto with ``mqtt.payload: flat``; :func:`capture_flat_run` is shared with
tests/test_historian_recipes.py, which feeds the captured messages to the historian recipes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.app.config import load_config
from agent.buffer.rows import StoredSegment
from agent.core import chain
from agent.core.records import dumps
from agent.sinks.flat import FlatConfig, FlatEncoder, UnsPlace
from agent.sinks.payload import TagInfo
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, wait_for
from tests.test_forwarder import check_schema

SCHEMA = json.loads(
    (Path(__file__).parent.parent / "agent" / "bundled" / "schemas" / "flat.schema.json").read_text()
)
AGENT = "gw-flat"
CATALOG = {
    "br1": [TagInfo("temp", "degC"), TagInfo("ph", "pH"), TagInfo("state", None, kind="string")],
    "inc1": [TagInfo("co2", "%")],
}
UNS = {
    "site": "basel",
    "uns": {"br1": {"area": "upstream", "line": "line-2"}, "inc1": {"area": "qc", "line": "lab"}},
}


def validate(msg: dict[str, Any]) -> None:
    """Against the bundled flat.schema.json, with the payload schema's own checker."""
    check_schema(msg, SCHEMA)


def segment(kind: chain.Kind, device: str, items: list[dict[str, Any]], i: int = 0) -> StoredSegment:
    stream = chain.stream_of(device, kind)
    payload = chain.build_payload(
        kind=kind,
        agent=AGENT,
        device=device,
        stream=stream,
        i=i,
        prev=chain.GENESIS,
        source={},
        clock={},
        bodies=[dumps(x) for x in items],
    )
    seqs = [x["seq"] for x in items]
    return StoredSegment(
        id=i + 1,
        stream=stream,
        i=i,
        device=device,
        kind=kind,
        n_readings=sum(x.get("n", 0) for x in items),
        n_records=len(items),
        seq_first=min(seqs),
        seq_last=max(seqs),
        first_ts=0,
        last_ts=0,
        payload=payload,
        hash=chain.digest(payload),
    )


def block(seq: int, ts: int, values: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "n": len(values),
        "group": "process",
        "ts": ts,
        "tags": ["temp", "ph", "state"],
        "units": ["degC", "pH", None],
        "values": values,
        **extra,
    }


def decoded(messages: list[Any]) -> list[tuple[str, dict[str, Any], bool]]:
    return [(m.topic, json.loads(m.payload), m.retain) for m in messages]


# --------------------------------------------------------------------------- the encoder


def test_a_block_becomes_one_message_with_one_value_per_tag_on_its_uns_topic() -> None:
    cfg = FlatConfig(topic="{prefix}/{site}/{area}/{line}/{device}", **UNS)
    enc = FlatEncoder(cfg, CATALOG, "plant")
    seg = segment("data", "br1", [block(100, 1767225600123456789, [37.02, 7.21, "run"])])
    [(topic, msg, retain)] = decoded(enc.encode(seg, historical=False))
    assert topic == "plant/basel/upstream/line-2/br1" and not retain
    assert msg == {
        "ts": 1767225600123456789,
        "agent": AGENT,
        "device": "br1",
        "group": "process",
        "seq": 100,
        "n": 3,
        "values": {"temp": 37.02, "ph": 7.21, "state": "run"},
        "batch": None,
        "segment": {"stream": "br1/data", "i": 0, "hash": hashlib.sha256(seg.payload).hexdigest()},
    }
    validate(msg)


def test_bad_readings_are_null_with_their_quality_and_what_the_device_sent() -> None:
    enc = FlatEncoder(FlatConfig(), CATALOG, "cleanroom")
    seg = segment(
        "data",
        "br1",
        [
            block(
                7,
                5,
                [99.5, None, "run"],
                quality=["bad", "bad", "uncertain"],
                reasons=["out_of_range", "timeout", "device_status"],
                src_ts=[4, None, 3],
            )
        ],
    )
    [(topic, msg, _)] = decoded(enc.encode(seg, historical=True))
    assert topic == "cleanroom/flat/br1/data"
    assert msg["values"] == {"temp": None, "ph": None, "state": "run"}
    assert msg["quality"] == {
        "temp": {"quality": "bad", "reason": "out_of_range", "value": 99.5},
        "ph": {"quality": "bad", "reason": "timeout"},
        "state": {"quality": "uncertain", "reason": "device_status"},
    }
    assert msg["src_ts"] == {"temp": 4, "state": 3} and msg["historical"] is True
    validate(msg)


def test_every_block_of_a_segment_is_a_message_and_historical_appears_only_when_true() -> None:
    enc = FlatEncoder(FlatConfig(topic="{prefix}/{device}/{group}"), CATALOG, "p")
    blocks = [
        block(10, 1, [1.0, 2.0, "a"]),
        block(13, 2, [], tags=[], units=[]),
        block(13, 3, [1.5, 2.5, "b"], src_ts=9),
    ]
    msgs = decoded(enc.encode(segment("data", "br1", blocks), historical=False))
    assert [(t, m["seq"], m.get("src_ts")) for t, m, _ in msgs] == [
        ("p/br1/process", 10, None),
        ("p/br1/process", 13, 9),
    ]
    assert all("historical" not in m for _, m, _ in msgs)  # an empty block carries no reading: no message


def test_retain_per_tag_publishes_each_tags_newest_value_once_per_segment() -> None:
    enc = FlatEncoder(FlatConfig(retain_per_tag=True), CATALOG, "p")
    blocks = [
        block(10, 1, [1.0, 2.0, "a"]),
        block(13, 2, [1.5, None, "b"], quality=["good", "bad", "good"], reasons=[None, "timeout", None]),
    ]
    msgs = decoded(enc.encode(segment("data", "br1", blocks), historical=False))
    assert [(t, r) for t, _, r in msgs] == [("p/flat/br1/data", False)] * 2 + [
        ("p/flat/br1/data/temp", True),
        ("p/flat/br1/data/ph", True),
        ("p/flat/br1/data/state", True),
    ]
    tags = {t.rsplit("/", 1)[1]: m for t, m, _ in msgs[2:]}
    assert tags["temp"] == {"ts": 2, "value": 1.5, "unit": "degC", "quality": "good"}
    assert tags["ph"] == {"ts": 2, "value": None, "unit": "pH", "quality": "bad", "reason": "timeout"}
    for _, m, _ in msgs:
        validate(m)


def test_events_are_one_message_each_and_the_agents_own_stay_on_its_topics() -> None:
    enc = FlatEncoder(
        FlatConfig(events_topic="{prefix}/{site}/{area}/{line}/{device}/events", **UNS), CATALOG, "p"
    )
    ev = {
        "seq": 40,
        "ts": 9,
        "kind": "excursion",
        "severity": "alarm",
        "data": {"tag": "temp", "value": 39.1},
    }
    msgs = decoded(enc.encode(segment("events", "br1", [ev, {**ev, "seq": 41}]), historical=False))
    assert [t for t, _, _ in msgs] == ["p/basel/upstream/line-2/br1/events"] * 2
    assert msgs[0][1] == {
        "ts": 9,
        "agent": AGENT,
        "device": "br1",
        "seq": 40,
        "kind": "excursion",
        "severity": "alarm",
        "data": ev["data"],
        "segment": msgs[0][1]["segment"],
    }
    restart = {"seq": 1, "ts": 2, "kind": "agent_restart", "severity": "warning", "data": {}}
    [(topic, msg, _)] = decoded(enc.encode(segment("events", "agent", [restart]), historical=True))
    assert topic == "p/flat/agent/events" and msg["historical"] is True
    [(topic, _, _)] = decoded(enc.encode(segment("audit", "agent", [restart]), historical=False))
    assert topic == "p/flat/agent/audit"
    for _, m, _ in msgs:
        validate(m)


def test_a_payload_that_is_not_a_segment_is_a_clear_error() -> None:
    enc = FlatEncoder(FlatConfig(), CATALOG, "p")
    seg = segment("data", "br1", [block(1, 1, [1, 2, "a"])])
    with pytest.raises(chain.ChainFormatError, match="not JSON"):
        enc.encode(_with(seg, b"\xff{"), historical=False)
    with pytest.raises(chain.ChainFormatError, match="no chain member"):
        enc.encode(_with(seg, b'{"blocks":[]}'), historical=False)


def _with(seg: StoredSegment, payload: bytes) -> StoredSegment:
    return StoredSegment(
        seg.id,
        seg.stream,
        seg.i,
        seg.device,
        seg.kind,
        seg.n_readings,
        seg.n_records,
        seg.seq_first,
        seg.seq_last,
        seg.first_ts,
        seg.last_ts,
        payload,
        seg.hash,
    )


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"topic": "{prefix}/{plant}/{device}"}, "topic names {plant}, which is not a placeholder"),
        ({"events_topic": "{prefix}/{device}/{group}"}, "events_topic names {group}"),
        ({"topic": "{prefix}/{site}/{device}"}, "names {site}: set site"),
        ({"topic": "{prefix}/+/{device}"}, "MQTT wildcards"),
        ({"topic": "{prefix}/#"}, "MQTT wildcards"),
        ({"topic": "{device!r}"}, "no format spec or conversion"),
        ({"topic": "{device:>5}"}, "no format spec or conversion"),
        ({"topic": "{prefix}/{device"}, "not a topic template"),
        ({"topic": ""}, "at least 1 character"),
        ({"site": "a/b"}, "site"),
        ({"uns": {"br1": {"area": "x+"}}}, "area"),
        ({"uns": {"br1": {"cell": "c1"}}}, "cell"),
        ({"retain_per_tag": "often"}, "retain_per_tag"),
    ],
)
def test_a_bad_flat_section_is_a_clear_error_naming_the_key(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        FlatConfig.model_validate(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("uns", "message"),
    [
        ({"br1": UnsPlace(area="a", line="l")}, "mqtt.flat.uns.inc1.area is not set"),
        (
            {"br1": UnsPlace(area="a", line="l"), "inc1": UnsPlace(area="b")},
            "mqtt.flat.uns.inc1.line is not set",
        ),
    ],
)
def test_every_device_needs_the_uns_levels_its_topic_names(uns: dict[str, UnsPlace], message: str) -> None:
    cfg = FlatConfig(topic="{prefix}/{area}/{line}/{device}", uns=uns)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        FlatEncoder(cfg, CATALOG, "p")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_any_template_text_is_a_working_config_or_a_validation_error(topic: str, events: str) -> None:
    try:
        cfg = FlatConfig(topic=topic, events_topic=events, site="s", uns={"br1": {"area": "a", "line": "l"}})
    except ValidationError:
        return
    enc = FlatEncoder(cfg, {"br1": CATALOG["br1"]}, "p")
    for m in enc.encode(segment("data", "br1", [block(1, 1, [1, 2, "a"])]), historical=False):
        assert "+" not in m.topic and "#" not in m.topic


# --------------------------------------------------------------------------- a real agent run


@dataclass
class FlatRun:
    """What a real agent published with ``payload: flat`` (and the JSON segments beside it)."""

    messages: list[tuple[str, bytes, bool]]
    segments: dict[str, bytes]
    """hash -> the JSON segment payload published on ``{prefix}/{stream}``."""
    retained: dict[str, dict[str, Any]]
    """What a subscriber that came after the run found retained below the UNS path."""

    def flat(self, prefix: str) -> list[tuple[str, dict[str, Any], bool]]:
        return [(t, json.loads(p), r) for t, p, r in self.messages if t.startswith(prefix) and p]


UNS_TOPIC = "plant/{site}/{area}/{line}/{device}"


def capture_flat_run(tmp: Path, samples: int = 6) -> FlatRun:
    """Simulated bioreactor (Modbus TCP) → ``cleanroom-agent run`` → mosquitto, until ``samples``
    samples of the process group arrived; the agent is then stopped cleanly."""
    prefix = "plant/basel/upstream/line-2/br1"
    broker = Mosquitto().start()
    try:
        with ThreadedSim(lambda: serve_bioreactor_modbus(port=0, speed=60.0, seed=7)) as sim:
            cfg = tmp / "agent.yaml"
            cfg.write_text(f"""
agent: {{id: {AGENT}, status_listen: "127.0.0.1:{free_port()}", shutdown_grace: 5s}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
health: {{clock_sync: false}}
mqtt:
  host: 127.0.0.1
  port: {broker.port}
  topic_prefix: cleanroom
  payload: flat
  flat:
    topic: "{UNS_TOPIC}"
    events_topic: "plant/{{site}}/{{area}}/{{line}}/{{device}}/events"
    site: basel
    uns: {{br1: {{area: upstream, line: line-2}}}}
    retain_per_tag: true
devices:
  - id: br1
    profile: bioreactor-sim
    connection: {{host: 127.0.0.1, port: {sim.port}, timeout: 1s, backoff_min: 100ms, backoff_max: 500ms}}
    groups: {{process: {{interval: 200ms}}, status: {{interval: 200ms}}, setpoints: {{interval: 1s}}}}
""")
            load_config(cfg)  # a config error shows here, not as an agent that never publishes
            collector = Collector(broker.port)
            agent = AgentProcess(cfg, tmp / "agent.log").start()
            try:

                def enough() -> bool:
                    agent.running()
                    got = [p for t, p, _ in list(collector.messages) if t == prefix]
                    return sum(b'"group":"process"' in p for p in got) >= samples

                wait_for(enough, timeout=30, what=f"{samples} flat samples")
                assert agent.terminate() == 0
            finally:
                agent.close()
                collector.close()
        late = Collector(broker.port, topic=f"{prefix}/#")
        try:
            wait_for(lambda: len(late.messages) >= 10, timeout=10, what="retained per-tag messages")
            retained = {t: json.loads(p) for t, p, r in list(late.messages) if r}
        finally:
            late.close()
    finally:
        broker.close()
    messages = list(collector.messages)
    segments = {hashlib.sha256(p).hexdigest(): p for t, p, _ in messages if t.startswith("cleanroom/br1/")}
    return FlatRun(messages, segments, retained)


@functools.cache
def shared_flat_run() -> FlatRun:
    """One agent run per test session, whichever module needs it first (this one, the recipes)."""
    tmp = Path(tempfile.mkdtemp(prefix="flat-run-"))
    try:
        return capture_flat_run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def run() -> FlatRun:
    return shared_flat_run()


def test_a_real_agent_publishes_flat_samples_tied_to_its_chained_segments(run: FlatRun) -> None:
    samples = [m for t, m, r in run.flat("plant/basel/upstream/line-2/br1") if t.endswith("/br1") and not r]
    assert samples, "no flat sample arrived"
    seqs: list[int] = []
    for msg in samples:
        validate(msg)
        assert msg["agent"] == AGENT and msg["device"] == "br1" and len(msg["values"]) == msg["n"]
        segment_payload = run.segments[msg["segment"]["hash"]]  # the segment it names arrived too
        doc = chain.parse(segment_payload).doc
        [blk] = [b for b in doc["blocks"] if b["seq"] == msg["seq"]]
        assert dict(zip(blk["tags"], blk["values"], strict=True)) == {
            t: v
            if t not in msg.get("quality", {}) or "value" not in msg["quality"][t]
            else msg["quality"][t]["value"]
            for t, v in msg["values"].items()
        }
        seqs.append(msg["seq"])
    assert seqs == sorted(seqs)
    process = [m for m in samples if m["group"] == "process"]
    values = process[-1]["values"]
    assert 20 < values["temperature_c"] < 45 and 6 < values["ph"] < 8
    for tag, decimals in (("temperature_c", 2), ("ph", 3), ("do_pct", 2)):
        # scaled registers arrive with their scale's decimals, never binary noise
        assert len(repr(float(values[tag])).split(".")[-1]) <= decimals, (tag, values[tag])
    for tag in ("air_flow_slpm", "weight_kg", "volume_l"):
        # float32 registers arrive as the shortest decimal of the float32
        assert repr(float(values[tag])) == repr(float(str(np.float32(values[tag])))), (tag, values[tag])


def test_a_real_agent_retains_each_tags_newest_value(run: FlatRun) -> None:
    retained = run.retained
    assert {"plant/basel/upstream/line-2/br1/temperature_c", "plant/basel/upstream/line-2/br1/ph"} <= set(
        retained
    )
    for msg in retained.values():
        validate(msg)
    assert retained["plant/basel/upstream/line-2/br1/temperature_c"]["unit"] == "degC"


def test_a_real_agent_publishes_its_device_events_flat(run: FlatRun) -> None:
    events = [m for t, m, _ in run.flat("plant/basel/upstream/line-2/br1/events")]
    assert any(e["kind"] == "device_state" and e["data"]["state"] == "connected" for e in events)
    for e in events:
        validate(e)
