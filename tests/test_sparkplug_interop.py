"""Interoperability with Eclipse Tahu's JavaScript codec (npm ``sparkplug-payload``), the reference
implementation hosts are built on: what our codec encodes, Tahu decodes to the same metrics, and
what Tahu encodes, ours decodes. One node process per direction, payloads exchanged as base64 in
JSON. node and npm are required: without them the test fails, it does not skip."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.core.chain import GENESIS, build_payload, parse
from agent.core.records import dumps
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.codec import BDSEQ, REBIRTH, DataType, Last, MetricSpec
from tests.support import npm_package

pytestmark = pytest.mark.timeout(300)  # a first run installs the npm package

TAHU_VERSION = "1.0.3"
"""sparkplug-payload, Eclipse Tahu's JavaScript codec: 1.0.x carries the Sparkplug 3.0 schema
(the top-level DataType enum with the array types); 1.0.3 is the newest release."""

T0_MS = 1_767_225_600_123

# Tahu's decode turns protobuf's 64-bit fields into Long objects and bytes into Buffers: give them
# a JSON form Python reads back exactly (decimal strings, base64).
JS_PLAIN = """
function plain(v) {
  if (v === null || v === undefined) return v === null ? null : undefined;
  if (typeof v === "object" && "low" in v && "high" in v && "unsigned" in v) return {long: v.toString()};
  if (v instanceof Uint8Array) return {bytes: Buffer.from(v).toString("base64")};
  if (Array.isArray(v)) return v.map(plain);
  if (typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v)) out[k] = plain(v[k]);
    return out;
  }
  return v;
}
"""


@pytest.fixture(scope="module")
def tahu() -> tuple[str, Path]:
    """node, and the installed sparkplug-payload package (installed once into a cache outside the
    repository)."""
    return npm_package(
        "sparkplug-payload", TAHU_VERSION, "the Sparkplug interoperability test (Tahu's codec)"
    )


def run_node(tahu: tuple[str, Path], body: str, data: Any) -> Any:
    """Run a script with ``spb`` (Tahu's spBv1.0 codec), ``INPUT`` and ``plain`` defined; the script
    prints one JSON document, which is returned."""
    node, module = tahu
    script = (
        f"const spb = require({json.dumps(str(module))}).get('spBv1.0');\n"
        f"const Long = require({json.dumps(str(module.parent / 'long'))});\n"
        f"const INPUT = {json.dumps(data)};\n{JS_PLAIN}\n{body}\n"
    )
    done = subprocess.run([node, "-"], input=script, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def from_js(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"long"}:
        return int(v["long"])
    if isinstance(v, dict) and set(v) == {"bytes"}:
        return base64.b64decode(v["bytes"])
    return v


# --- ours -> Tahu -------------------------------------------------------------------------------

EVERY_TYPE: list[tuple[DataType, Any]] = [
    (DataType.INT8, -128),
    (DataType.INT16, -32768),
    (DataType.INT32, -(2**31)),
    (DataType.INT64, -(2**63)),
    (DataType.UINT8, 255),
    (DataType.UINT16, 65535),
    # Tahu reads a UInt32 with Long.toInt(), which turns values from 2**31 on negative: stay below
    (DataType.UINT32, 2**31 - 1),
    (DataType.UINT64, 2**64 - 1),
    (DataType.FLOAT, 1.5),
    (DataType.DOUBLE, 95.1),
    (DataType.BOOLEAN, True),
    (DataType.STRING, "µS/cm ✓"),
    (DataType.DATETIME, T0_MS),
    (DataType.TEXT, "line 1\nline 2"),
    (DataType.UUID, "1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
    (DataType.BYTES, b"\x00\xff\x10"),
    (DataType.FILE, b"PK\x03\x04"),
]


def our_payloads() -> dict[str, bytes]:
    specs = codec.catalog_metrics(
        {
            "br-1": [
                TagInfo("temp", "degC", "Culture temperature"),
                TagInfo("count", kind="int"),
                TagInfo("ok", kind="bool"),
            ]
        }
    )["br-1"]
    typed = [MetricSpec(f"m{dt.name}", 100 + i, dt) for i, (dt, _) in enumerate(EVERY_TYPE)]
    blocks = [
        {"seq": 1, "n": 3, "group": "g", "ts": T0_MS * 10**6, "tags": ["temp", "count", "ok"],
         "units": ["degC", None, None], "values": [37.02, None, "yes"],
         "quality": ["uncertain", "bad", "good"], "reasons": ["sample_invalid", "timeout", None]},
    ]  # fmt: skip
    seg = build_payload(
        kind="data",
        agent="gw",
        device="br-1",
        stream="br-1/data",
        i=3,
        prev=GENESIS,
        source=None,
        clock=None,
        bodies=[dumps(b) for b in blocks],
    )
    parsed = parse(seg)
    seqs = iter(range(7, 10))
    ddata = codec.data_from_segment(
        parsed.doc,
        specs=specs,
        seq_for=lambda: next(seqs),
        segment_ref=codec.segment_ref("br-1/data", 3, parsed.hash),
        historical=True,
        ts_ms=T0_MS + 5,
    ).payloads[0]
    event = {"seq": 2, "ts": T0_MS * 10**6, "kind": "excursion", "severity": "alarm", "data": {"v": 1}}
    events = build_payload(
        kind="events",
        agent="gw",
        device="br-1",
        stream="br-1/events",
        i=0,
        prev=GENESIS,
        source=None,
        clock=None,
        bodies=[dumps(event)],
    )
    edata = codec.data_from_segment(
        parse(events).doc, specs=specs, seq_for=lambda: 10, segment_ref="ref", historical=False, ts_ms=T0_MS
    ).payloads[0]
    return {
        "nbirth": codec.nbirth(bd_seq=3, seq=0, ts_ms=T0_MS, specs=codec.node_metrics()),
        "ndeath": codec.ndeath(bd_seq=3, ts_ms=T0_MS),
        "dbirth": codec.dbirth(seq=1, ts_ms=T0_MS, specs=specs, last={"temp": Last(36.9, T0_MS - 1)}),
        "types": codec.dbirth(
            seq=2,
            ts_ms=T0_MS,
            specs=typed,
            last={s.name: Last(v, T0_MS) for s, (_, v) in zip(typed, EVERY_TYPE, strict=True)},
        ),
        "ddata": ddata,
        "events": edata,
        "ddeath": codec.ddeath(seq=11, ts_ms=T0_MS),
    }


def as_tahu_sees_ours(d: codec.Decoded) -> dict[str, Any]:
    """Our own reading of a payload, in the shape Tahu's decode gives (after :func:`from_js`)."""
    out: dict[str, Any] = {"timestamp": d.timestamp}
    if d.seq is not None:
        out["seq"] = d.seq
    metrics = []
    for m in d.metrics:
        metric: dict[str, Any] = {
            "type": DataType(m.datatype).name,
            "value": m.value,
            "timestamp": m.timestamp,
        }
        if m.name is not None:
            metric["name"] = m.name
        if m.alias is not None:
            metric["alias"] = m.alias
        if m.is_historical:
            metric["isHistorical"] = True
        if m.properties:
            metric["properties"] = {
                key: {"type": "String" if isinstance(v, str) else "Int32", "value": v}
                for key, v in m.properties.items()
            }
        if m.description is not None:
            metric["metadata"] = {"description": m.description}
        metrics.append(metric)
    out["metrics"] = metrics
    return out


def tahu_normalised(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"timestamp": from_js(payload.get("timestamp"))}
    if "seq" in payload:
        out["seq"] = from_js(payload["seq"])
    metrics = []
    for m in payload.get("metrics", []):
        metric: dict[str, Any] = {
            # Tahu names types in CamelCase ("UInt64"); ours are UPPER_CASE
            "type": m["type"].upper(),
            "value": from_js(m["value"]),
            "timestamp": from_js(m.get("timestamp")),
        }
        if "name" in m:
            metric["name"] = m["name"]
        if "metadata" in m:  # Tahu fills the MetaData fields not sent with protobuf's defaults
            metric["metadata"] = {"description": m["metadata"]["description"]}
        if "alias" in m:
            metric["alias"] = from_js(m["alias"])
        if m.get("isHistorical"):
            metric["isHistorical"] = True
        if m.get("properties"):
            metric["properties"] = {
                key: {"type": p["type"], "value": from_js(p["value"])} for key, p in m["properties"].items()
            }
        metrics.append(metric)
    out["metrics"] = metrics
    return out


def test_tahu_decodes_what_we_encode(tahu: tuple[str, Path]) -> None:
    ours = our_payloads()
    decoded = run_node(
        tahu,
        """
        const out = {};
        for (const [kind, b64] of Object.entries(INPUT)) {
          out[kind] = plain(spb.decodePayload(Buffer.from(b64, "base64")));
        }
        console.log(JSON.stringify(out));
        """,
        {kind: base64.b64encode(p).decode() for kind, p in ours.items()},
    )
    assert set(decoded) == set(ours)
    for kind, payload in ours.items():
        assert tahu_normalised(decoded[kind]) == as_tahu_sees_ours(codec.decode(payload)), kind
    # and what the comparison rests on, spelled out for the metrics a host relies on most
    nbirth = tahu_normalised(decoded["nbirth"])
    assert (nbirth["seq"], nbirth["metrics"][0]["name"], nbirth["metrics"][0]["value"]) == (0, BDSEQ, 3)
    assert nbirth["metrics"][1] == {
        "name": REBIRTH,
        "alias": 2,
        "type": "BOOLEAN",
        "value": False,
        "timestamp": T0_MS,
    }
    ndeath = tahu_normalised(decoded["ndeath"])
    assert "seq" not in ndeath and ndeath["metrics"] == [
        {"name": BDSEQ, "type": "INT64", "value": 3, "timestamp": T0_MS}
    ]
    types = tahu_normalised(decoded["types"])
    assert [m["value"] for m in types["metrics"]] == [v for _, v in EVERY_TYPE]
    temp, count, ok, ref = tahu_normalised(decoded["ddata"])["metrics"]
    assert "name" not in temp and temp["isHistorical"] and temp["value"] == 37.02
    assert temp["properties"] == {
        "Quality": {"type": "Int32", "value": 500},
        "QualityReason": {"type": "String", "value": "sample_invalid"},
    }
    assert count["value"] is None and count["properties"]["Quality"]["value"] == 0
    assert ok["value"] is None and ok["properties"]["QualityReason"]["value"] == "type_mismatch"
    assert json.loads(ref["value"])["i"] == 3


# --- Tahu -> ours -------------------------------------------------------------------------------


def test_we_decode_what_tahu_encodes(tahu: tuple[str, Path]) -> None:
    encoded = run_node(
        tahu,
        """
        const ts = INPUT.ts;
        const payloads = {
          rebirth: {timestamp: ts, metrics: [{name: "Node Control/Rebirth", type: "Boolean", value: true}]},
          write: {timestamp: ts, seq: 0, metrics: [
            {name: "setpoint", type: "Double", value: 38.5},
            {name: "mode", type: "String", value: "manual"},
          ]},
          types: {timestamp: ts, seq: 255, metrics: [
            {name: "i8", type: "Int8", value: -5},
            {name: "i16", type: "Int16", value: -300},
            {name: "i32", type: "Int32", value: -70000},
            {name: "i64", type: "Int64", value: Long.fromString("-9223372036854775808")},
            {name: "u8", type: "UInt8", value: 255},
            {name: "u16", type: "UInt16", value: 65535},
            {name: "u32", type: "UInt32", value: 4294967295},
            {name: "u64", type: "UInt64", value: Long.fromString("18446744073709551615", true)},
            {name: "f", type: "Float", value: 1.5},
            {name: "d", type: "Double", value: 95.1},
            {name: "b", type: "Boolean", value: false},
            {name: "s", type: "String", value: "µS/cm ✓"},
            {name: "dt", type: "DateTime", value: ts},
            {name: "t", type: "Text", value: "a\\nb"},
            {name: "u", type: "UUID", value: "1b4e28ba-2fa1-11d2-883f-0016d3cca427"},
            {name: "by", type: "Bytes", value: Buffer.from([0, 255, 16])},
            {name: "temp", alias: 6, type: "Double", value: 37.0, timestamp: ts - 1000, isHistorical: true,
             properties: {engUnit: {type: "String", value: "degC"}, Quality: {type: "Int32", value: 500}},
             metadata: {description: "Culture temperature"}},
            {name: "gone", type: "Double", value: null},
          ]},
        };
        const out = {};
        for (const [kind, p] of Object.entries(payloads)) {
          out[kind] = Buffer.from(spb.encodePayload(p)).toString("base64");
        }
        console.log(JSON.stringify(out));
        """,
        {"ts": T0_MS},
    )
    rebirth = codec.decode(base64.b64decode(encoded["rebirth"]))
    assert codec.rebirth_requested(rebirth) and codec.command_writes(rebirth) == []
    write = codec.decode(base64.b64decode(encoded["write"]))
    assert not codec.rebirth_requested(write)
    assert codec.command_writes(write) == ["setpoint", "mode"]
    types = codec.decode(base64.b64decode(encoded["types"]))
    assert (types.timestamp, types.seq) == (T0_MS, 255)
    values = {m.name: m.value for m in types.metrics}
    assert values == {
        "i8": -5,
        "i16": -300,
        "i32": -70000,
        "i64": -(2**63),
        "u8": 255,
        "u16": 65535,
        "u32": 2**32 - 1,
        "u64": 2**64 - 1,
        "f": 1.5,
        "d": 95.1,
        "b": False,
        "s": "µS/cm ✓",
        "dt": T0_MS,
        "t": "a\nb",
        "u": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "by": b"\x00\xff\x10",
        "temp": 37.0,
        "gone": None,
    }
    temp = next(m for m in types.metrics if m.name == "temp")
    assert (temp.alias, temp.datatype, temp.timestamp, temp.is_historical) == (
        6,
        DataType.DOUBLE,
        T0_MS - 1000,
        True,
    )
    assert temp.properties == {"engUnit": "degC", "Quality": 500}
    assert temp.description == "Culture temperature"
    gone = next(m for m in types.metrics if m.name == "gone")
    assert gone.is_null
