"""Issue 15, OPC UA arrays: a one-dimensional array variable read whole (``mode: value``,
one reading holding a JSON array) or as one tag per element (``mode: expand``, tags
``<name>.<i>`` with the tag's scale, offset and range each), polled and subscribed, against
a real asyncua server over TCP. An array of the wrong length or with an element that cannot
be a reading is a bad reading saying so, and counted; the conversion is fuzzed.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.driver import DeviceContext, build_groups
from agent.core.records import Block, Quality, dumps
from cleanroom_common.net import free_port
from drivers.opcua.config import ArraySpec
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.values import ARRAY_ELEMENT, ARRAY_LENGTH, Converted
from simulators.servers.opcua import serve_bioreactor_opcua
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, until, wait_for

NS = "urn:cleanroom-test:arrays"
PROFILES = Path(__file__).resolve().parent.parent / "deploy" / "profiles"


def node(name: str) -> str:
    return f"nsu={NS};s={name}"


PROFILE: dict[str, Any] = {
    "profile": "arrays",
    "protocol": "opcua",
    "groups": {
        "poll": {"interval": 0.1},
        "sub": {"interval": 0.2, "mode": "subscribe", "sampling_interval": 0.05},
    },
    "tags": [
        # expand: scale and range per element (200 is out of [0, 100])
        {"name": "counts", "node_id": node("Counts"), "group": "poll", "scale": 2.0, "range": [0, 100],
         "unit": "1/m3", "array": {"mode": "expand", "size": 3}},
        {"name": "zones", "node_id": node("Zones"), "group": "poll", "unit": "degC",
         "array": {"mode": "value", "size": 4}},
        {"name": "short", "node_id": node("Short"), "group": "poll", "array": {"mode": "expand", "size": 3}},
        {"name": "nan", "node_id": node("NaN"), "group": "poll", "array": {"mode": "value", "size": 2}},
        {"name": "nan_x", "node_id": node("NaN"), "group": "poll", "array": {"mode": "expand", "size": 2}},
        {"name": "scalar", "node_id": node("Scalar"), "group": "poll",
         "array": {"mode": "value", "size": 1}},
        {"name": "sub_counts", "node_id": node("Counts"), "group": "sub", "scale": 2.0,
         "array": {"mode": "expand", "size": 3}},
        {"name": "sub_zones", "node_id": node("Zones"), "group": "sub",
         "array": {"mode": "value", "size": 4}},
    ],
}  # fmt: skip


@asynccontextmanager
async def array_server() -> AsyncIterator[tuple[Server, dict[str, Any], str]]:
    port = free_port()
    server = Server()
    await server.init()
    url = f"opc.tcp://127.0.0.1:{port}"
    server.set_endpoint(url)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NS)
    obj = await server.nodes.objects.add_object(ua.NodeId("Counter", idx), ua.QualifiedName("Counter", idx))
    values = {
        "Counts": ua.Variant([100, 20, 3], ua.VariantType.Int32),
        "Zones": ua.Variant([36.9, 37.0, 37.1, 37.2], ua.VariantType.Double),
        "Short": ua.Variant([1.0, 2.0], ua.VariantType.Double),
        "NaN": ua.Variant([1.0, math.nan], ua.VariantType.Double),
        "Scalar": ua.Variant(5.0, ua.VariantType.Double),
    }
    nodes = {
        name: await obj.add_variable(ua.NodeId(name, idx), ua.QualifiedName(name, idx), v)
        for name, v in values.items()
    }
    await server.start()
    try:
        yield server, nodes, url
    finally:
        await server.stop()


def context(profile: dict[str, Any], url: str) -> DeviceContext:
    prof = OpcUaDriver.profile_model().model_validate(profile)
    conn = OpcUaDriver.Connection.model_validate({"url": url, "security_policy": "None", "record_raw": True})
    return DeviceContext(id="pc", profile=prof, connection=conn, groups=build_groups("pc", prof, conn, {}))


def readings(block: Block) -> dict[str, tuple[Any, str, str | None]]:
    return {
        t: (v, str(block.quality_of(i)), block.reasons[i] if block.reasons else None)
        for i, (t, v) in enumerate(zip(block.tags, block.values, strict=True))
    }


async def test_arrays_polled_and_subscribed_in_both_modes_bad_shapes_counted() -> None:
    async with array_server() as (_, nodes, url):
        ctx = context(PROFILE, url)
        driver = OpcUaDriver(ctx)
        await driver.connect()
        try:
            (block,) = await driver.read(ctx.groups["poll"])
            got = readings(block)
            assert got["counts.0"] == (None, "bad", "out_of_range")  # 100 × 2 > 100
            assert got["counts.1"] == (40.0, "good", None) and got["counts.2"] == (6.0, "good", None)
            assert block.raw is not None and block.raw[:3] == [100, 20, 3]  # each element as sent
            assert got["zones"] == ([36.9, 37.0, 37.1, 37.2], "good", None)
            assert [got[f"short.{i}"] for i in range(3)] == [(None, "bad", ARRAY_LENGTH)] * 3
            assert got["nan"] == (None, "bad", ARRAY_ELEMENT)
            assert got["nan_x.0"] == (1.0, "good", None) and got["nan_x.1"] == (None, "bad", ARRAY_ELEMENT)
            assert got["scalar"] == (None, "bad", ARRAY_LENGTH)
            assert block.units[block.tags.index("counts.2")] == "1/m3"
            assert ctx.stats.errors[ARRAY_LENGTH] == 4 and ctx.stats.errors[ARRAY_ELEMENT] == 2
            assert ctx.stats.requests == 1  # one Read, each array node once

            emitted: list[Block] = []
            await driver.subscribe(ctx.groups["sub"], emitted.append)
            await nodes["Counts"].write_value(ua.Variant([10, 20, 30], ua.VariantType.Int32))

            def changed() -> dict[str, Any] | None:
                seen = [readings(b) for b in emitted]
                return next((r for r in seen if r.get("sub_counts.0", (None,))[0] == 20.0), None)

            after = await until(changed, within_s=10, what="the subscribed array's change")
            assert [after[f"sub_counts.{i}"][0] for i in range(3)] == [20.0, 40.0, 60.0]
            first = readings(emitted[0])
            assert first["sub_zones"] == ([36.9, 37.0, 37.1, 37.2], "good", None)
        finally:
            await driver.close()


# --------------------------------------------------------------------------- configuration


def test_expand_names_each_element_and_keeps_the_tag_settings() -> None:
    profile = OpcUaDriver.profile_model().model_validate(PROFILE)
    names = [t.name for t in profile.tags]
    assert names[:4] == ["counts.0", "counts.1", "counts.2", "zones"]
    counts = profile.tags[2]
    assert (counts.scale, counts.range, counts.unit, counts.group) == (2.0, (0, 100), "1/m3", "poll")
    bundled = OpcUaDriver.profile_model().model_validate(
        yaml.safe_load((PROFILES / "bioreactor-sim-opcua.yaml").read_text())
    )
    assert [t.name for t in bundled.tags if t.name.startswith("zone_")] == [
        f"zone_temperature_c.{i}" for i in range(4)
    ]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "expand", "size": 2}},
          {"name": "a.1", "node_id": "i=2"}], "tag 'a.1' is defined twice"),
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "value", "size": 2}, "scale": 10}],
         "use mode 'expand' to scale"),
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "value", "size": 2}, "range": [0, 1]}],
         "use mode 'expand' to scale"),
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "expand", "size": 0}}],
         "greater than or equal to 1"),
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "expand", "size": 5000}}],
         "less than or equal to 4096"),
        ([{"name": "a", "node_id": "i=1", "array": {"mode": "flat", "size": 2}}], "'value' or 'expand'"),
        ([{"name": "a", "node_id": "i=1", "array": {"size": 2}}], "Field required"),
    ],
)  # fmt: skip
def test_bad_array_configuration_is_rejected(tags: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OpcUaDriver.profile_model().model_validate({"profile": "p", "protocol": "opcua", "tags": tags})


# --------------------------------------------------------------------------- fuzzing

_ELEMENT = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.just("\udc80"),
    st.builds(ua.LocalizedText, st.one_of(st.none(), st.text(max_size=4))),
    st.just(ua.NodeId(ua.Int32(5))),
)
_SENT = st.one_of(_ELEMENT, st.lists(st.one_of(_ELEMENT, st.lists(_ELEMENT, max_size=2)), max_size=6))


@settings(max_examples=400, deadline=None)
@given(sent=_SENT, size=st.integers(1, 6), data=st.data())
def test_any_array_becomes_readings_or_bad_readings_with_a_reason(sent: Any, size: int, data: Any) -> None:
    element = data.draw(st.one_of(st.none(), st.integers(0, size - 1)))
    spec = ArraySpec(mode="value" if element is None else "expand", size=size)
    variant = ua.Variant()
    variant.Value = sent  # as decoded off the wire: the declared type need not fit
    conv = Converted(1)
    conv.set(0, ua.DataValue(variant), spec, element)
    if conv.quality[0] is Quality.BAD:
        assert conv.values[0] is None and conv.reasons[0]
    else:
        value = conv.values[0]  # null only when the server sent null, as for a scalar
        assert (value is None and sent is None) or isinstance(value, list) == (element is None)
        assert len(value) == size if isinstance(value, list) else True
    json.loads(dumps([conv.values[0], conv.raw[0]]))  # strict JSON either way


def test_wrong_shapes_are_bad_with_the_reason() -> None:
    spec = ArraySpec(mode="value", size=3)
    cases = {
        ARRAY_LENGTH: [[1.0, 2.0], 7.0, "abc"],
        ARRAY_ELEMENT: [[1.0, math.inf, 2.0], [1.0, ua.NodeId(ua.Int32(1)), 2.0], [1, 2**64, 3]],
    }
    for reason, sents in cases.items():
        for sent in sents:
            conv = Converted(1)
            conv.set(0, ua.DataValue(ua.Variant(sent)), spec)
            assert (conv.values[0], conv.quality[0], conv.reasons[0]) == (None, Quality.BAD, reason), sent


# --------------------------------------------------------------------------- through the agent


def test_an_array_read_whole_reaches_the_broker_as_a_json_array(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    site = tmp_path / "profiles"
    site.mkdir()
    profile = yaml.safe_load((PROFILES / "bioreactor-sim-opcua.yaml").read_text())
    profile["profile"] = "bioreactor-sim-opcua-zones"
    profile.pop("alarms")
    for tag in profile["tags"]:
        if tag["name"] == "zone_temperature_c":
            tag["array"] = {"mode": "value", "size": 4}
            del tag["range"]
    (site / "bioreactor-sim-opcua-zones.yaml").write_text(yaml.safe_dump(profile))
    with ThreadedSim(lambda: serve_bioreactor_opcua(port=0, speed=1, seed=2, update_interval_s=0.1)) as sim:
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(
            f"""
agent: {{id: gw-arrays, status_listen: "127.0.0.1:{free_port()}"}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}
profiles_dirs: [profiles]
devices:
  - id: br1
    profile: bioreactor-sim-opcua-zones
    connection: {{url: "{sim.url}", timeout: 2s, security_policy: None}}
"""
        )
        agent = AgentProcess(cfg, tmp_path / "agent.log").start()
        try:

            def zones() -> list[tuple[Any, str]]:
                agent.running()
                out = []
                for m in collector.json("/br1/data"):
                    for b in m["blocks"]:
                        if "zone_temperature_c" in b["tags"]:
                            i = b["tags"].index("zone_temperature_c")
                            out.append((b["values"][i], b["quality"][i] if "quality" in b else "good"))
                return out

            got = wait_for(zones, timeout=30, what="the array reading")
        finally:
            agent.terminate()
    value, quality = got[0]
    assert quality == "good" and isinstance(value, list) and len(value) == 4
    assert all(30 < v < 45 for v in value)
