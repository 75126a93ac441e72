"""The Sparkplug B codec: births, deaths, data from committed segments, and decoding what a host
sends, including garbage."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.chain import GENESIS, build_payload, digest, parse
from agent.core.records import dumps
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.codec import (
    AUDIT,
    BATCH,
    BDSEQ,
    EVENTS,
    INTEGRITY,
    REBIRTH,
    DataType,
    Last,
    MetricSpec,
    SparkplugDecodeError,
    SparkplugEncodeError,
)
from agent.sinks.sparkplug.generated import sparkplug_b_pb2 as pb

TAGS = [
    TagInfo("temp", "degC", "Culture temperature"),
    TagInfo("count", None, "", "int"),
    TagInfo("door", None, "", "bool"),
    TagInfo("state", None, "", "string"),
]
T0 = 1_767_225_600_123_456_789
T0_MS = T0 // 1_000_000


def counter(start: int = 0) -> tuple[Callable[[], int], list[int]]:
    """A seq_for that records what it handed out."""
    taken: list[int] = []

    def seq_for() -> int:
        taken.append((start + len(taken)) % 256)
        return taken[-1]

    return seq_for, taken


def segment(kind: str, items: list[dict[str, Any]], *, device: str = "br-1", i: int = 7) -> bytes:
    stream = "agent/audit" if kind == "audit" else f"{device}/{kind}"
    return build_payload(
        kind=kind,  # type: ignore[arg-type]
        agent="gw",
        device="agent" if kind == "audit" else device,
        stream=stream,
        i=i,
        prev=GENESIS,
        source=None,
        clock=None,
        bodies=[dumps(item) for item in items],
    )


def block(tags: list[str], values: list[Any], **extra: Any) -> dict[str, Any]:
    n = len(tags)
    return {
        "seq": 100,
        "n": n,
        "group": "fast",
        "ts": T0,
        "tags": tags,
        "units": [None] * n,
        "values": values,
    } | extra


@pytest.fixture(scope="module")
def specs() -> dict[str, list[MetricSpec]]:
    return codec.catalog_metrics({"br-1": TAGS, "inc-2": [TagInfo("co2", "%")]})


def by_alias(specs: list[MetricSpec]) -> dict[int, MetricSpec]:
    return {s.alias: s for s in specs}


# --- aliases and declarations --------------------------------------------------------------------


def test_aliases_are_unique_across_the_node_and_follow_profile_order(
    specs: dict[str, list[MetricSpec]],
) -> None:
    every = codec.node_metrics() + [s for device in specs.values() for s in device]
    aliases = [s.alias for s in every]
    assert aliases == list(range(1, len(every) + 1))
    assert [s.name for s in codec.node_metrics()] == [BDSEQ, REBIRTH, EVENTS, AUDIT, INTEGRITY]
    assert [s.name for s in specs["br-1"]] == ["temp", "count", "door", "state", EVENTS, INTEGRITY, BATCH]
    assert [s.datatype for s in specs["br-1"][:4]] == [
        DataType.DOUBLE,
        DataType.INT64,
        DataType.BOOLEAN,
        DataType.STRING,
    ]
    # the same catalog gives the same aliases: a rebirth declares what the last birth did
    assert codec.catalog_metrics({"br-1": TAGS, "inc-2": [TagInfo("co2", "%")]}) == specs


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ([TagInfo("a"), TagInfo("a")], "device 'd': tag 'a' is declared twice"),
        ([TagInfo(INTEGRITY)], "device 'd': tag 'Integrity/segment' has a name reserved"),
        ([TagInfo(BDSEQ)], "tag 'bdSeq' has a name reserved"),
        ([TagInfo("a", kind="complex")], "device 'd': tag 'a': kind 'complex' is not one of"),
    ],
)
def test_a_catalog_that_cannot_be_declared_names_device_and_tag(tags: list[TagInfo], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        codec.catalog_metrics({"d": tags})


def test_dbirth_declares_every_metric_with_name_alias_type_unit_and_last_value(
    specs: dict[str, list[MetricSpec]],
) -> None:
    device = specs["br-1"]
    last = {
        "temp": Last(37.1, T0_MS - 5),
        "door": Last(None, T0_MS - 9, "bad", "timeout"),
        EVENTS: Last("{}", 1),
    }
    d = codec.decode(codec.dbirth(seq=4, ts_ms=T0_MS, specs=device, last=last))
    assert (d.seq, d.timestamp) == (4, T0_MS)
    assert [(m.name, m.alias, m.datatype) for m in d.metrics] == [
        (s.name, s.alias, s.datatype) for s in device
    ]
    temp, count, door, state, events, integrity, batch = d.metrics
    assert (temp.value, temp.timestamp, temp.properties, temp.description) == (
        37.1,
        T0_MS - 5,
        {"engUnit": "degC"},
        "Culture temperature",
    )
    assert count.is_null and count.value is None and count.timestamp == T0_MS and count.properties == {}
    assert door.is_null and door.properties == {"Quality": 0, "QualityReason": "timeout"}
    assert state.is_null
    # events and the integrity reference are messages, not states: never repeated by a birth
    assert events.is_null and integrity.is_null
    assert batch.is_null  # no batch sent yet (test_batch_context: a birth repeats the last ref)


def test_nbirth_ndeath_ddeath() -> None:
    nb = codec.decode(codec.nbirth(bd_seq=255, seq=0, ts_ms=5, specs=codec.node_metrics()))
    assert nb.seq == 0 and nb.timestamp == 5
    values = {m.name: (m.alias, m.datatype, m.value, m.is_null) for m in nb.metrics}
    assert values == {
        BDSEQ: (1, DataType.INT64, 255, False),
        REBIRTH: (2, DataType.BOOLEAN, False, False),
        EVENTS: (3, DataType.STRING, None, True),
        AUDIT: (4, DataType.STRING, None, True),
        INTEGRITY: (5, DataType.STRING, None, True),
    }
    nd = codec.decode(codec.ndeath(bd_seq=255, ts_ms=6))
    assert nd.seq is None and nd.timestamp == 6
    assert [(m.name, m.alias, m.datatype, m.value) for m in nd.metrics] == [
        (BDSEQ, None, DataType.INT64, 255)
    ]
    dd = codec.decode(codec.ddeath(seq=9, ts_ms=7))
    assert (dd.seq, dd.timestamp, dd.metrics) == (9, 7, [])
    with pytest.raises(ValueError, match=r"bdSeq must be 0\.\.255, got 256"):
        codec.ndeath(bd_seq=256, ts_ms=0)
    with pytest.raises(ValueError, match=r"seq must be 0\.\.255, got -1"):
        codec.ddeath(seq=-1, ts_ms=0)


# --- every datatype, both ways -------------------------------------------------------------------


def _ints(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from([lo, hi, 0 if lo <= 0 else lo]), st.integers(lo, hi))


VALUES: dict[DataType, st.SearchStrategy[Any]] = {
    DataType.INT8: _ints(-(2**7), 2**7 - 1),
    DataType.INT16: _ints(-(2**15), 2**15 - 1),
    DataType.INT32: _ints(-(2**31), 2**31 - 1),
    DataType.INT64: _ints(-(2**63), 2**63 - 1),
    DataType.UINT8: _ints(0, 2**8 - 1),
    DataType.UINT16: _ints(0, 2**16 - 1),
    DataType.UINT32: _ints(0, 2**32 - 1),
    DataType.UINT64: _ints(0, 2**64 - 1),
    DataType.DATETIME: _ints(0, 2**64 - 1),
    DataType.FLOAT: st.floats(width=32, allow_nan=False, allow_infinity=False),
    DataType.DOUBLE: st.floats(allow_nan=False, allow_infinity=False),
    DataType.BOOLEAN: st.booleans(),
    DataType.STRING: st.text(),
    DataType.TEXT: st.text(),
    DataType.UUID: st.uuids().map(str),
    DataType.BYTES: st.binary(),
    DataType.FILE: st.binary(),
}


def test_every_scalar_datatype_is_covered() -> None:
    assert set(VALUES) == set(DataType) - {DataType.UNKNOWN}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_datatype_round_trips(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from(sorted(VALUES)))
    value = data.draw(VALUES[datatype])
    spec = MetricSpec("m", 9, datatype)
    (m,) = codec.decode(codec.dbirth(seq=0, ts_ms=1, specs=[spec], last={"m": Last(value, 2)})).metrics
    assert (m.datatype, m.is_null, m.properties) == (datatype, False, {})
    assert m.value == value and type(m.value) is type(value)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        (DataType.DOUBLE, "95.1"),
        (DataType.DOUBLE, math.inf),
        (DataType.DOUBLE, 10**400),
        (DataType.DOUBLE, True),
        (DataType.FLOAT, 1e300),
        (DataType.INT64, 2**63),
        (DataType.INT64, 3.0),
        (DataType.INT64, False),
        (DataType.UINT8, -1),
        (DataType.BOOLEAN, 1),
        (DataType.STRING, 5),
        (DataType.BYTES, "text"),
    ],
)
def test_a_value_that_does_not_fit_its_type_goes_null_with_quality_bad(
    datatype: DataType, value: Any
) -> None:
    spec = MetricSpec("m", 9, datatype)
    (m,) = codec.decode(codec.dbirth(seq=0, ts_ms=1, specs=[spec], last={"m": Last(value, 2)})).metrics
    assert m.is_null and m.value is None
    assert m.properties == {"Quality": 0, "QualityReason": "type_mismatch"}


# --- data from committed segments ----------------------------------------------------------------


def test_one_ddata_per_block_by_alias_at_acquisition_time_with_the_segment_reference(
    specs: dict[str, list[MetricSpec]],
) -> None:
    device = specs["br-1"]
    seg = segment(
        "data",
        [
            block(["temp", "count", "door", "state"], [37.02, 12, False, "run"]),
            block(["temp", "count"], [37.03, 13], ts=T0 + 1_000_000_000),
        ],
    )
    parsed = parse(seg)
    ref = codec.segment_ref(parsed.link.stream, parsed.link.i, parsed.hash)
    assert json.loads(ref) == {"stream": "br-1/data", "i": 7, "hash": digest(seg)}
    seq_for, taken = counter(254)
    out = codec.data_from_segment(
        parsed.doc, specs=device, seq_for=seq_for, segment_ref=ref, historical=False, ts_ms=42
    )
    assert taken == [254, 255] and out.skipped == 0
    first, second = (codec.decode(p) for p in out.payloads)
    assert (first.seq, first.timestamp, second.seq) == (254, 42, 255)
    aliases = by_alias(device)
    assert [(aliases[m.alias].name, m.value, m.timestamp) for m in first.metrics] == [
        ("temp", 37.02, T0_MS),
        ("count", 12, T0_MS),
        ("door", False, T0_MS),
        ("state", "run", T0_MS),
        (INTEGRITY, ref, T0_MS),
    ]
    assert all(m.name is None and not m.is_historical and m.properties == {} for m in first.metrics)
    assert [(aliases[m.alias].name, m.value, m.timestamp) for m in second.metrics] == [
        ("temp", 37.03, T0_MS + 1000),
        ("count", 13, T0_MS + 1000),
        (INTEGRITY, ref, T0_MS + 1000),
    ]
    assert out.last == {
        "temp": Last(37.03, T0_MS + 1000),
        "count": Last(13, T0_MS + 1000),
        "door": Last(False, T0_MS),
        "state": Last("run", T0_MS),
    }


def test_historical_segments_mark_every_metric(specs: dict[str, list[MetricSpec]]) -> None:
    doc = parse(segment("data", [block(["temp"], [36.9])])).doc
    seq_for, _ = counter()
    out = codec.data_from_segment(
        doc, specs=specs["br-1"], seq_for=seq_for, segment_ref="r", historical=True, ts_ms=1
    )
    (payload,) = (codec.decode(p) for p in out.payloads)
    assert [m.is_historical for m in payload.metrics] == [True, True]
    assert payload.metrics[0].timestamp == T0_MS  # the original acquisition time, not the send time


def test_quality_travels_as_properties_and_values_are_kept(specs: dict[str, list[MetricSpec]]) -> None:
    doc = parse(
        segment(
            "data",
            [
                block(
                    ["temp", "count", "door", "state"],
                    [37.5, None, True, 7],
                    quality=["uncertain", "bad", "bad", "good"],
                    reasons=["sample_invalid", "timeout", "device_status", None],
                )
            ],
        )
    ).doc
    seq_for, _ = counter()
    out = codec.data_from_segment(
        doc, specs=specs["br-1"], seq_for=seq_for, segment_ref="r", historical=False, ts_ms=1
    )
    temp, count, door, state, _ref = codec.decode(out.payloads[0]).metrics
    assert (temp.value, temp.properties) == (37.5, {"Quality": 500, "QualityReason": "sample_invalid"})
    assert (count.is_null, count.properties) == (True, {"Quality": 0, "QualityReason": "timeout"})
    assert (door.value, door.properties) == (True, {"Quality": 0, "QualityReason": "device_status"})
    # a string's column holding a number: a driver bug, sent null and marked, never raised
    assert (state.is_null, state.properties) == (True, {"Quality": 0, "QualityReason": "type_mismatch"})
    assert out.last["state"] == Last(None, T0_MS, "bad", "type_mismatch")
    assert out.last["temp"] == Last(37.5, T0_MS, "uncertain", "sample_invalid")


def test_readings_of_undeclared_tags_are_skipped_and_counted(specs: dict[str, list[MetricSpec]]) -> None:
    doc = parse(segment("data", [block(["temp", "new_tag", INTEGRITY], [1.0, 2.0, 3.0])])).doc
    seq_for, _ = counter()
    out = codec.data_from_segment(
        doc, specs=specs["br-1"], seq_for=seq_for, segment_ref="r", historical=False, ts_ms=1
    )
    assert out.skipped == 2
    assert [m.value for m in codec.decode(out.payloads[0]).metrics] == [1.0, "r"]


def test_events_travel_one_per_payload_with_their_body_as_in_the_segment(
    specs: dict[str, list[MetricSpec]],
) -> None:
    events = [
        {
            "seq": 5,
            "ts": T0,
            "kind": "excursion",
            "severity": "alarm",
            "data": {"tag": "temp", "value": 39.5},
        },
        {"seq": 6, "ts": T0 + 10**9, "kind": "device_state", "severity": "warning", "data": {"state": "µ ✓"}},
    ]
    seg = segment("events", events)
    seq_for, taken = counter(10)
    out = codec.data_from_segment(
        parse(seg).doc, specs=specs["br-1"], seq_for=seq_for, segment_ref="r", historical=False, ts_ms=1
    )
    assert taken == [10, 11]
    aliases = by_alias(specs["br-1"])
    for event, payload in zip(events, out.payloads, strict=True):
        carrier, ref = codec.decode(payload).metrics
        assert (aliases[carrier.alias].name, carrier.datatype, carrier.timestamp) == (
            EVENTS,
            DataType.STRING,
            event["ts"] // 1_000_000,
        )
        assert carrier.value.encode() in seg and json.loads(carrier.value) == event
        assert ref.value == "r"
    assert out.last == {}


def test_audit_records_travel_on_the_node_as_audit_records() -> None:
    record = {"seq": 1, "ts": T0, "kind": "audit", "severity": "info", "data": {"action": "agent_start"}}
    seq_for, _ = counter()
    out = codec.data_from_segment(
        parse(segment("audit", [record])).doc,
        specs=codec.node_metrics(),
        seq_for=seq_for,
        segment_ref="r",
        historical=True,
        ts_ms=1,
    )
    carrier, ref = codec.decode(out.payloads[0]).metrics
    assert (carrier.alias, json.loads(carrier.value), carrier.is_historical) == (4, record, True)
    assert ref.alias == 5


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"blocks": [block(["temp"], [1.0]), "x"]}, "block 1 is not an object"),
        ({"blocks": [block(["temp", "count"], [1.0])]}, "block 0: values is not a list of 2 entries"),
        (
            {"blocks": [block(["temp"], [1.0], quality=["good", "bad"])]},
            "block 0: quality is not a list of 1",
        ),
        ({"blocks": [block(["temp"], [1.0], ts="now")]}, "block 0: tags or ts missing"),
        ({"events": [{"seq": 1, "kind": "x"}]}, "event 0 is not an object with an integer ts"),
        ({"chain": {}}, "neither blocks nor events"),
    ],
)
def test_a_malformed_segment_is_a_clear_error_and_takes_no_seq(
    specs: dict[str, list[MetricSpec]], doc: dict[str, Any], message: str
) -> None:
    seq_for, taken = counter()
    with pytest.raises(SparkplugEncodeError, match=message):
        codec.data_from_segment(
            doc, specs=specs["br-1"], seq_for=seq_for, segment_ref="r", historical=False, ts_ms=1
        )
    assert taken == []


# --- decoding what a host sends ------------------------------------------------------------------


def command(*metrics: dict[str, Any]) -> bytes:
    payload = pb.Payload(timestamp=1)
    for fields in metrics:
        payload.metrics.add(**fields)
    return payload.SerializeToString()  # type: ignore[no-any-return]


def test_rebirth_requests_and_writes(specs: dict[str, list[MetricSpec]]) -> None:
    by_name = command({"name": REBIRTH, "datatype": DataType.BOOLEAN, "boolean_value": True})
    by_alias_ = command({"alias": 2, "datatype": DataType.BOOLEAN, "boolean_value": True})
    declined = command({"name": REBIRTH, "datatype": DataType.BOOLEAN, "boolean_value": False})
    assert codec.rebirth_requested(codec.decode(by_name))
    assert codec.rebirth_requested(codec.decode(by_alias_))
    assert not codec.rebirth_requested(codec.decode(declined))
    assert codec.command_writes(codec.decode(by_name)) == []
    write = command(
        {"name": "setpoint", "datatype": DataType.DOUBLE, "double_value": 38.0},
        {"alias": 6, "datatype": DataType.DOUBLE, "double_value": 1.0},
        {"alias": 999, "datatype": DataType.INT32, "int_value": 1},
    )
    decoded = codec.decode(write)
    assert not codec.rebirth_requested(decoded)
    assert codec.command_writes(decoded, specs["br-1"]) == ["setpoint", "temp", "alias 999"]


def test_signed_integers_are_read_from_their_twos_complement() -> None:
    d = codec.decode(
        command(
            {"name": "a", "datatype": DataType.INT8, "int_value": 0xFFFFFFFB},
            {"name": "b", "datatype": DataType.INT64, "long_value": 2**64 - 2},
            {"name": "c", "datatype": DataType.UINT64, "long_value": 2**64 - 2},
        )
    )
    assert [m.value for m in d.metrics] == [-5, -2, 2**64 - 2]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xff\xff", "not a Sparkplug B payload"),
        (b"\x12\x03\x0a\x01\xff", "metric 0: the name: a string that is not UTF-8"),
        (
            command({"name": "s", "datatype": DataType.STRING, "string_value": "ok"}).replace(
                b"ok", b"\xc3("
            ),
            "not UTF-8",
        ),
        (
            command({"name": "x", "datatype": DataType.DOUBLE, "int_value": 1}),
            r"metric 0 \('x'\): datatype DOUBLE",
        ),
        (
            command(
                {"name": "x", "properties": {"keys": ["a", "b"], "values": [{"type": 3, "int_value": 1}]}}
            ),
            "the property set has 2 keys and 1 values",
        ),
        (
            command({"name": "x", "properties": {"keys": ["q"], "values": [{"type": 12, "int_value": 1}]}}),
            "property 'q': datatype STRING but the value is in int_value",
        ),
    ],
)
def test_garbage_is_a_clear_decode_error(payload: bytes, message: str) -> None:
    with pytest.raises(SparkplugDecodeError, match=message):
        codec.decode(payload)


def test_types_this_agent_does_not_read_decode_without_a_value() -> None:
    d = codec.decode(command({"name": "ds", "datatype": 16, "dataset_value": {"num_of_columns": 1}}))
    assert (d.metrics[0].datatype, d.metrics[0].value) == (16, None)


def _valid_payloads() -> Iterator[bytes]:
    specs = codec.catalog_metrics({"d": TAGS})["d"]
    yield codec.nbirth(bd_seq=1, seq=0, ts_ms=1, specs=codec.node_metrics())
    yield codec.dbirth(seq=1, ts_ms=1, specs=specs, last={"temp": Last(1.5, 1, "uncertain", "x")})
    yield command({"name": REBIRTH, "datatype": DataType.BOOLEAN, "boolean_value": True})


VALID = list(_valid_payloads())


def decodes_or_refuses(data: bytes) -> None:
    """What a session may rely on: a Decoded of the declared types, or SparkplugDecodeError."""
    try:
        d = codec.decode(data)
    except SparkplugDecodeError:
        return
    assert isinstance(d.timestamp, int | None) and isinstance(d.seq, int | None)
    assert isinstance(d.uuid, str | None)
    for m in d.metrics:
        assert isinstance(m.name, str | None) and isinstance(m.description, str | None)
        assert isinstance(m.alias, int | None) and isinstance(m.datatype, int | None)
        assert all(isinstance(k, str) for k in m.properties)
        assert isinstance(m.value, int | float | str | bytes | None)
    codec.rebirth_requested(d)
    codec.command_writes(d)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_random_bytes_raises_nothing_but_its_error(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_decode_of_damaged_payloads_raises_nothing_but_its_error(
    valid: bytes, flips: list[tuple[int, int]]
) -> None:
    damaged = bytearray(valid)
    for at, byte in flips:
        damaged[at % len(damaged)] = byte
    decodes_or_refuses(bytes(damaged))
