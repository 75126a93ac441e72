"""Fuzz suite for OPC UA values: whatever a server sends as a DataValue becomes a good,
uncertain or bad reading, never an exception, and the device is good again once the
server behaves.

The bulk (over 10,000 values, random and structure-aware) goes through the driver's value
conversion directly; a representative sample of what can travel on the wire goes through a
real server over a socket, read by polling and by a subscription.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from asyncua import Server, ua
from asyncua.ua.ua_binary import struct_to_binary

from agent.core.driver import DeviceContext, DeviceError, PollGroup, build_groups
from agent.core.records import Block, Quality, dumps
from cleanroom_common.net import free_port
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.values import Converted

INT64 = (-(2**63), 2**63 - 1)

ODD_SCALARS: list[Any] = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    1e300,
    0,
    -1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    10**30,
    -(10**400),
    True,
    False,
    "",
    "12.5",
    "nan",
    "\x00",
    "é" * 100,
    "\ud800",
    "x" * 10_000,
    b"",
    b"\xff\xfe",
    bytearray(b"ab"),
    None,
    [],
    [1, 2],
    [[1], [2]],
    [None],
    [math.nan],
    {"a": 1},
    object(),
    1 + 2j,
    Decimal("1e400"),
    Decimal("NaN"),
    datetime.min,
    datetime.max,
    datetime(1601, 1, 1),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-14))),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=14))),
    datetime(2024, 5, 1, tzinfo=UTC),
    ua.LocalizedText("x"),
    ua.LocalizedText(None),
    ua.QualifiedName("q", 1),
    ua.NodeId(5, 1),
    ua.ExtensionObject(),
    ua.StatusCode(ua.StatusCodes.BadInternalError),
    ua.Variant(1.0),
    ua.DataValue(),
    ua.Guid("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
]
STATUSES: list[Any] = [
    None,
    ua.StatusCode(),
    ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue),
    ua.StatusCode(ua.StatusCodes.BadSensorFailure),
    ua.StatusCode(0xFFFFFFFF),
    ua.StatusCode(0x0000FFFF),
    ua.StatusCode(ua.StatusCodes.Good | 0x0480),
    ua.StatusCode(0x80000000),
    ua.StatusCode(0xC0000000),
    ua.StatusCode(0x40000000 | 0x0400),
    5,
    "Good",
    -1,
]
TIMES: list[Any] = [
    None,
    datetime.min,
    datetime.max,
    datetime(1601, 1, 1),
    datetime(1970, 1, 1),
    datetime(2262, 4, 12),
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-14))),
    datetime(2024, 5, 1, tzinfo=UTC),
    12345,
    "now",
]
VARIANT_TYPES = list(ua.VariantType)


def mutate(rng: random.Random) -> Any:
    """A structure-aware odd value: a mutated Variant, a raw value where a Variant belongs, or
    a random number of the wrong size."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(ODD_SCALARS)
    if kind == 1:
        return rng.getrandbits(rng.choice((8, 32, 64, 65, 128, 2000))) * rng.choice((1, -1))
    if kind == 2:
        return struct_to_float(rng.getrandbits(64))
    if kind == 3:
        return [mutate(rng) for _ in range(rng.randrange(4))]
    if kind == 4:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(8)))
    return rng.randbytes(rng.randrange(10))


def struct_to_float(bits: int) -> float:
    import struct

    return float(struct.unpack("<d", bits.to_bytes(8, "little"))[0])


def odd_data_value(rng: random.Random) -> ua.DataValue:
    value = mutate(rng)
    dv = ua.DataValue()
    shape = rng.randrange(4)
    if shape == 0:  # a Variant whose declared type need not match its content
        variant = ua.Variant()
        variant.Value = value
        variant.VariantType = rng.choice(VARIANT_TYPES)
        dv.Value = variant
    elif shape == 1:
        try:
            dv.Value = ua.Variant(value)
        except Exception:
            dv.Value = ua.Variant()
            dv.Value.Value = value
    elif shape == 2:  # no Variant at all where one belongs
        dv.Value = value
    else:  # no value, or a Variant nested in a Variant
        dv.Value = None if rng.random() < 0.5 else ua.Variant()
        if dv.Value is not None:
            dv.Value.Value = ua.Variant()
            dv.Value.Value.Value = value
    dv.StatusCode = rng.choice(STATUSES)
    dv.SourceTimestamp = rng.choice(TIMES)
    dv.ServerTimestamp = rng.choice(TIMES)
    return dv


def group_of(n: int, scaled: bool) -> PollGroup:
    profile = OpcUaDriver.profile_model().model_validate(
        {
            "profile": "fuzz",
            "protocol": "opcua",
            "tags": [
                {
                    "name": f"t{i}",
                    "node_id": f"ns=1;i={i + 1}",
                    **({"scale": 0.1, "offset": 3} if scaled else {}),
                }
                | ({"range": [-1e6, 1e6]} if scaled and i % 2 else {})
                for i in range(n)
            ],
        }
    )
    return PollGroup("fuzz", "default", profile.groups["default"], profile.tags, 1.0)


def check(block: Block) -> int:
    """Every reading is good, uncertain or bad, a bad one has no value, and the block encodes
    as strict JSON (its raw values too, when it keeps them) with timestamps that fit the
    buffer's 64-bit columns."""
    block.seq_first = 1
    dumps(block.body())
    ts = block.source_ts_ns
    for t in ts if isinstance(ts, list) else [ts]:
        assert t is None or INT64[0] <= t <= INT64[1]
    bad = 0
    for i, v in enumerate(block.values):
        q = block.quality_of(i)
        assert q in (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)
        if q is Quality.BAD:
            assert v is None
            bad += 1
        else:
            assert v is None or isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v))
            if isinstance(v, int) and not isinstance(v, bool):
                assert INT64[0] <= v < 2**64
    return bad


def test_ten_thousand_odd_data_values_become_readings_not_exceptions() -> None:
    rng = random.Random(11)
    n = 16
    groups = {False: group_of(n, False), True: group_of(n, True)}
    cpu = time.process_time()
    total = bad = 0
    for round_ in range(800):
        group = groups[round_ % 2 == 1]
        conv = Converted(n)
        for i in range(n):
            conv.set(i, odd_data_value(rng))
        bad += check(conv.finish(group, time.time_ns(), record_raw=round_ % 4 < 2))
        total += n
    for value in ODD_SCALARS:  # each listed one, in each shape, at least once
        for dv in (ua.DataValue(Value=None), ua.DataValue()):
            dv.Value = ua.Variant()
            dv.Value.Value = value
            conv = Converted(1)
            conv.set(0, dv)
            bad += check(conv.finish(group_of(1, True), time.time_ns(), record_raw=True))
            total += 1
    assert total >= 10_000
    assert 0 < bad < total, "some odd values are bad readings, some are good"
    assert time.process_time() - cpu < 10, "bounded CPU"


# --------------------------------------------------------------------------- over a socket

WIRE_VALUES: list[ua.Variant] = [
    ua.Variant(math.nan, ua.VariantType.Double),
    ua.Variant(math.inf, ua.VariantType.Float),
    ua.Variant(-math.inf, ua.VariantType.Double),
    ua.Variant(2**63 - 1, ua.VariantType.Int64),
    ua.Variant(2**64 - 1, ua.VariantType.UInt64),
    ua.Variant(-(2**63), ua.VariantType.Int64),
    ua.Variant("12.5", ua.VariantType.String),
    ua.Variant("", ua.VariantType.String),
    ua.Variant(b"\x00\xff", ua.VariantType.ByteString),
    ua.Variant([], ua.VariantType.Double),
    ua.Variant([1.0, math.nan], ua.VariantType.Double),
    ua.Variant([[1, 2], [3, 4]], ua.VariantType.Int32, Dimensions=[2, 2]),
    ua.Variant(None, ua.VariantType.Null),
    ua.Variant(ua.LocalizedText(None), ua.VariantType.LocalizedText),
    ua.Variant(ua.QualifiedName("q", 3), ua.VariantType.QualifiedName),
    ua.Variant(ua.NodeId(7, 2), ua.VariantType.NodeId),
    ua.Variant(datetime(1601, 1, 1), ua.VariantType.DateTime),
    ua.Variant(datetime(9999, 12, 31), ua.VariantType.DateTime),
    ua.Variant(ua.Guid("72962b91-fa75-4ae6-8d28-b404dc7daf63"), ua.VariantType.Guid),
    ua.Variant(ua.StatusCode(ua.StatusCodes.BadInternalError), ua.VariantType.StatusCode),
    ua.Variant(True, ua.VariantType.Boolean),
]
WIRE_STATUS = [
    0,
    ua.StatusCodes.UncertainLastUsableValue,
    ua.StatusCodes.BadSensorFailure,
    0xFFFFFFFF,
    0x0480,
    0x80AB0000,
]
WIRE_TIMES = [
    None,
    datetime(1601, 1, 1),
    datetime(9999, 12, 31, 23, 59),
    datetime(1970, 1, 1),
    datetime.now(UTC),
]
N_VARS = 24


async def test_odd_values_served_over_a_socket_then_the_device_is_good_again() -> None:
    rng = random.Random(5)
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:cleanroom-test:fuzz")
    nodes = [
        (await server.nodes.objects.add_variable(ua.NodeId(f"v{i}", idx), f"v{i}", 1.0)).nodeid
        for i in range(N_VARS)
    ]
    await server.start()
    tags = [
        {"name": f"v{i}", "node_id": f"nsu=urn:cleanroom-test:fuzz;s=v{i}", "scale": 2.0}
        for i in range(N_VARS)
    ]
    profile = OpcUaDriver.profile_model().model_validate(
        {
            "profile": "fuzz",
            "protocol": "opcua",
            "groups": {
                "polled": {"interval": "1s"},
                "pushed": {"interval": "1s", "mode": "subscribe", "sampling_interval": "20ms"},
            },
            "tags": [t | {"group": "polled"} for t in tags]
            + [t | {"name": f"s{i}", "group": "pushed"} for i, t in enumerate(tags)],
        }
    )
    connection = OpcUaDriver.Connection.model_validate(
        {"url": f"opc.tcp://127.0.0.1:{port}", "security_policy": "None", "timeout": "2s"}
    )
    drv = OpcUaDriver(
        DeviceContext(
            id="fz",
            profile=profile,
            connection=connection,
            groups=build_groups("fz", profile, connection, {}),
        )
    )
    pushed: list[Block] = []
    sent = 0
    cpu = time.process_time()
    try:
        await drv.connect()
        await drv.subscribe(drv.ctx.groups["pushed"], pushed.append)
        for _ in range(40):
            for node in nodes:
                dv = ua.DataValue(
                    Value=rng.choice(WIRE_VALUES),
                    StatusCode=ua.StatusCode(rng.choice(WIRE_STATUS)),
                    SourceTimestamp=rng.choice(WIRE_TIMES),
                    ServerTimestamp=rng.choice(WIRE_TIMES),
                )
                struct_to_binary(dv)  # only what can travel on the wire
                await server.write_attribute_value(node, dv)
                sent += 1
            for block in await drv.read(drv.ctx.groups["polled"]):
                check(block)
            await asyncio.sleep(0.03)
        assert sent >= 900
        await asyncio.sleep(0.2)
        assert pushed
        for block in pushed:
            check(block)
        # The server behaves again: every reading is good.
        for i, node in enumerate(nodes):
            await server.write_attribute_value(node, ua.DataValue(ua.Variant(float(i))))
        await asyncio.sleep(0.2)
        [block] = await drv.read(drv.ctx.groups["polled"])
        assert block.quality is None and block.values == [2.0 * i for i in range(N_VARS)]
        latest = {
            t: (v, b.quality_of(j))
            for b in pushed
            for j, (t, v) in enumerate(zip(b.tags, b.values, strict=True))
        }
        assert latest == {f"s{i}": (2.0 * i, Quality.GOOD) for i in range(N_VARS)}
        assert await drv.read(drv.ctx.groups["pushed"]) == [], "the subscription is still alive"
    except DeviceError as exc:  # pragma: no cover - the assertion below says why
        raise AssertionError(f"an odd value took the device down: {exc}") from exc
    finally:
        await drv.close()
        await server.stop()
    assert time.process_time() - cpu < 20
