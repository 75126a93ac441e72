"""OPC UA data changes decoded in bulk (``drivers.opcua.subscription``): whole publish responses
become blocks, item for item what asyncua's per-item objects made of them, and whatever a
message gets wrong is counted, never raised.

Messages are encoded with asyncua's own encoder and fed to both paths: the bulk decoder
(:class:`RawDataChanges`) and asyncua's decoder (``ua.DataChangeNotification``).
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary, struct_to_binary
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.driver import DeviceContext, DriverStats, PollGroup, build_groups
from agent.core.records import Block, Quality, Reason
from cleanroom_common.net import free_port
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.subscription import (
    GroupSubscription,
    RawDataChanges,
    decode_publish_response,
    decode_read_results,
)
from drivers.opcua.values import Converted

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
T0_NS = 1_772_366_400_123_456_000


def group_of(tags: list[dict[str, Any]]) -> PollGroup:
    profile = OpcUaDriver.profile_model().model_validate(
        {"profile": "t", "protocol": "opcua", "groups": {"default": {"interval": "1s"}}, "tags": tags}
    )
    return PollGroup("dev", "default", profile.groups["default"], profile.tags, 1.0)


def scalar_tags(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": f"t{i}", "node_id": f"ns=2;i={i}", **extra} for i in range(n)]


def subscription(
    group: PollGroup, record_raw: bool = False
) -> tuple[GroupSubscription, list[Block], list[str]]:
    blocks: list[Block] = []
    lost: list[str] = []
    sub = GroupSubscription(
        group,
        blocks.append,
        5.0,
        link_lost=lambda reason, detail: lost.append(reason),
        stats=DriverStats(),
        timeout_s=1.0,
        record_raw=record_raw,
    )
    return sub, blocks, lost


def item(handle: int, dv: ua.DataValue) -> ua.MonitoredItemNotification:
    return ua.MonitoredItemNotification(ClientHandle=handle, Value=dv)


def double(v: float, when: datetime | None = T0, status: int = 0) -> ua.DataValue:
    return ua.DataValue(
        ua.Variant(v, ua.VariantType.Double),
        ua.StatusCode(status),
        SourceTimestamp=when,
        ServerTimestamp=when,
    )


def body(items: list[ua.MonitoredItemNotification]) -> bytes:
    return struct_to_binary(ua.DataChangeNotification(MonitoredItems=items))


def bulk(items: list[ua.MonitoredItemNotification]) -> ua.PublishResult:
    return publish([RawDataChanges(body(items))])


def per_item(items: list[ua.MonitoredItemNotification]) -> ua.PublishResult:
    """The same message as asyncua decodes it, item by item."""
    return publish([struct_from_binary(ua.DataChangeNotification, Buffer(body(items)))])


def publish(data: list[Any]) -> ua.PublishResult:
    return ua.PublishResult(
        SubscriptionId=1, NotificationMessage=ua.NotificationMessage(NotificationData=data)
    )


def columns(block: Block) -> tuple[Any, ...]:
    return (
        list(block.tags),
        block.values,
        [block.quality_of(i) for i in range(len(block.values))],
        block.reasons,
        block.source_ts_ns,
        block.raw,
    )


# --------------------------------------------------------------------------- batching


def test_a_publish_response_with_n_notifications_yields_n_readings_in_order_with_source_times() -> None:
    n = 300
    sub, blocks, lost = subscription(group_of(scalar_tags(n, unit="degC")))
    items = [item(i, double(i * 0.5, T0 + timedelta(milliseconds=i))) for i in reversed(range(n))]
    response = ua.PublishResponse(
        Parameters=ua.PublishResult(
            SubscriptionId=7,
            AvailableSequenceNumbers=[3],
            NotificationMessage=ua.NotificationMessage(
                SequenceNumber=3, NotificationData=[ua.DataChangeNotification(MonitoredItems=items)]
            ),
        )
    )
    decoded = decode_publish_response(Buffer(struct_to_binary(response)))
    assert decoded.Parameters.SubscriptionId == 7 and decoded.Parameters.AvailableSequenceNumbers == [3]
    assert decoded.Parameters.NotificationMessage.SequenceNumber == 3
    [raw] = decoded.Parameters.NotificationMessage.NotificationData
    assert isinstance(raw, RawDataChanges), "a data change stays bytes until the subscription reads it"
    sub.on_publish(decoded.Parameters)
    [block] = blocks
    assert list(block.tags) == [f"t{i}" for i in range(n)], "group order, whatever the message order"
    assert block.values == [i * 0.5 for i in range(n)]
    assert block.source_ts_ns == [T0_NS + i * 1_000_000 for i in range(n)]
    assert block.quality is None and not lost and not sub._stats.errors


def test_queued_samples_of_a_message_become_successive_blocks() -> None:
    sub, blocks, _ = subscription(group_of(scalar_tags(3)))
    items = [item(0, double(1.0)), item(0, double(2.0)), item(2, double(9.0)), item(0, double(3.0))]
    sub.on_publish(bulk(items))
    assert [(list(b.tags), b.values) for b in blocks] == [
        (["t0", "t2"], [1.0, 9.0]),
        (["t0"], [2.0]),
        (["t0"], [3.0]),
    ]


def test_other_notifications_in_a_response_are_decoded_as_asyncua_does() -> None:
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    response = ua.PublishResponse(
        Parameters=ua.PublishResult(
            SubscriptionId=1,
            NotificationMessage=ua.NotificationMessage(
                NotificationData=[ua.DataChangeNotification(MonitoredItems=[item(0, double(4.0))]), status]
            ),
        )
    )
    decoded = decode_publish_response(Buffer(struct_to_binary(response)))
    sub, blocks, lost = subscription(group_of(scalar_tags(1)))
    sub.on_publish(decoded.Parameters)
    assert [b.values for b in blocks] == [[4.0]]
    assert lost == [Reason.COMM_ERROR], "a bad subscription status still reaches the scheduler"


# --------------------------------------------------------------------------- bad input


def test_an_unknown_handle_is_counted_and_the_others_still_arrive() -> None:
    sub, blocks, lost = subscription(group_of(scalar_tags(2)))
    sub.on_publish(bulk([item(0, double(1.0)), item(99, double(5.0)), item(1, double(2.0))]))
    assert [b.values for b in blocks] == [[1.0, 2.0]]
    assert sub._stats.errors["unknown_handle"] == 1 and not lost


def test_a_message_that_breaks_off_is_counted_not_raised() -> None:
    sub, blocks, lost = subscription(group_of(scalar_tags(3)))
    whole = body([item(i, double(float(i))) for i in range(3)])
    cut = whole[: len(whole) - 20]  # the third item's timestamps are missing
    sub.on_publish(publish([RawDataChanges(cut)]))
    assert [b.values for b in blocks] == [[0.0, 1.0]], "the items before the break are kept"
    assert sub._stats.errors[Reason.DECODE_ERROR] == 1 and not lost
    for junk in (b"", b"\x05\x00\x00\x00\xff", b"\xff\xff\xff\x7f" + bytes(40)):
        sub.on_publish(publish([RawDataChanges(junk)]))
    assert sub._stats.errors[Reason.DECODE_ERROR] == 4 and not lost


def test_the_overflow_bit_is_a_counted_loss_and_the_sample_still_arrives() -> None:
    for path in (bulk, per_item):
        sub, blocks, _ = subscription(group_of(scalar_tags(2)))
        sub.on_publish(path([item(0, double(1.0, status=0x0480)), item(1, double(2.0, status=0x0080))]))
        assert [b.values for b in blocks] == [[1.0, 2.0]]
        assert sub._stats.errors["queue_overflow"] == 1, "only a DataValue's info bits mean overflow"


def test_an_out_of_range_reading_is_bad_and_null() -> None:
    sub, blocks, _ = subscription(group_of(scalar_tags(2, range=[0, 10])))
    sub.on_publish(bulk([item(0, double(5.0)), item(1, double(11.0))]))
    [block] = blocks
    assert block.values == [5.0, None] and block.quality_of(1) is Quality.BAD
    assert block.reasons == [None, Reason.OUT_OF_RANGE]


# --------------------------------------------------------------------------- same meaning as before

_TYPED = st.one_of(
    st.floats(width=64).map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    st.floats(width=32).map(lambda v: ua.Variant(v, ua.VariantType.Float)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ua.Variant(v, ua.VariantType.Int64)),
    st.integers(0, 2**64 - 1).map(lambda v: ua.Variant(v, ua.VariantType.UInt64)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: ua.Variant(v, ua.VariantType.Int32)),
    st.integers(0, 255).map(lambda v: ua.Variant(v, ua.VariantType.Byte)),
    st.booleans().map(lambda v: ua.Variant(v, ua.VariantType.Boolean)),
    st.text(max_size=5).map(lambda v: ua.Variant(v, ua.VariantType.String)),
    st.lists(st.floats(width=64), max_size=3).map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    st.just(ua.Variant(None, ua.VariantType.Null)),
)
_STATUS = st.sampled_from(
    [0, 0x0480, 0x0080, ua.StatusCodes.UncertainLastUsableValue, ua.StatusCodes.BadSensorFailure, 0xFFFFFFFF]
)
_WHEN = st.one_of(
    st.none(),
    st.sampled_from([datetime(1601, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)]),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2300, 1, 1), timezones=st.just(UTC)),
)


@st.composite
def data_values(draw: st.DrawFn) -> ua.DataValue:
    dv = ua.DataValue(
        draw(_TYPED),
        ua.StatusCode(draw(_STATUS)),
        SourceTimestamp=draw(_WHEN),
        ServerTimestamp=draw(_WHEN),
    )
    if draw(st.booleans()):
        dv.SourcePicoseconds = draw(st.integers(0, 9999))
    return dv


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), data_values()), min_size=1, max_size=12),
    st.booleans(),
    st.booleans(),
)
def test_bulk_decoding_makes_the_blocks_asyncuas_objects_made(
    changes: list[tuple[int, ua.DataValue]], record_raw: bool, arrays: bool
) -> None:
    tags = scalar_tags(5, scale=2.0, range=[-1e300, 1e300])
    if arrays:  # handle 3: an array read whole; handle 4: both elements of another
        tags[3] = {"name": "t3", "node_id": "ns=2;i=3", "array": {"mode": "value", "size": 2}}
        tags[4] = {"name": "t4", "node_id": "ns=2;i=4", "array": {"mode": "expand", "size": 2}}
    items = [item(h, dv) for h, dv in changes]
    got = []
    for path in (bulk, per_item):
        sub, blocks, lost = subscription(group_of(tags), record_raw)
        if arrays:
            sub.targets = {0: (0,), 1: (1,), 2: (2,), 3: (3,), 4: (4, 5)}
        sub.on_publish(path(items))
        assert not lost
        got.append(([columns(b) for b in blocks], dict(sub._stats.errors)))
    assert got[0] == got[1]


@settings(max_examples=100, deadline=None)
@given(st.lists(data_values(), min_size=1, max_size=8))
def test_read_results_decoded_in_bulk_are_the_readings_asyncua_objects_make(dvs: list[ua.DataValue]) -> None:
    wire = struct_to_binary(ua.ReadResponse(Results=dvs))
    results = struct_from_binary(ua.ReadResponse, Buffer(wire)).Results
    buf = Buffer(wire)
    nodeid_from_binary(buf)
    struct_from_binary(ua.ResponseHeader, buf)
    columns = decode_read_results(buf.read(len(buf)))
    assert not columns.malformed and columns.handles == list(range(len(dvs)))
    bulk_conv, per_item_conv = Converted(len(dvs)), Converted(len(dvs))
    for p, dv in enumerate(results):
        per_item_conv.set(p, dv)
        full = columns.full.get(p)
        if full is None:
            bulk_conv.set_plain(p, columns.values[p], columns.raw(p), columns.src[p])
        else:
            bulk_conv.set(p, full)
    for name in Converted.__slots__:
        assert getattr(bulk_conv, name) == getattr(per_item_conv, name), name


# --------------------------------------------------------------------------- over a socket


async def test_a_burst_of_changes_all_arrive_at_the_default_queue_size() -> None:
    """Every change of a burst faster than the publishing interval arrives, in order, at the
    queue size the driver picks by itself (one publishing interval plus a late publish)."""
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:cleanroom-test:burst")
    var = await server.nodes.objects.add_variable(ua.NodeId("v", idx), "v", -1.0)
    await server.start()
    profile = OpcUaDriver.profile_model().model_validate(
        {
            "profile": "burst",
            "protocol": "opcua",
            "groups": {"default": {"interval": "500ms", "mode": "subscribe"}},
            "tags": [{"name": "v", "node_id": "nsu=urn:cleanroom-test:burst;s=v"}],
        }
    )
    conn = OpcUaDriver.Connection.model_validate(
        {"url": f"opc.tcp://127.0.0.1:{port}", "timeout": "1s", "keepalive": "1s", "security_policy": "None"}
    )
    drv = OpcUaDriver(DeviceContext("burst", profile, conn, build_groups("burst", profile, conn, {})))
    blocks: list[Block] = []
    wanted = 1
    arrived = asyncio.Event()

    def emit(block: Block) -> None:
        blocks.append(block)
        if sum(len(b.values) for b in blocks) >= wanted:
            arrived.set()

    try:
        await drv.connect()
        await drv.subscribe(drv.ctx.groups["default"], emit)
        await asyncio.wait_for(arrived.wait(), 10)
        blocks.clear()
        arrived.clear()
        burst = [float(i) for i in range(4)]  # the default queue holds ceil((0.5 + 1) / 0.5) + 1
        wanted = len(burst)
        for v in burst:
            await var.write_value(v)
        await asyncio.wait_for(arrived.wait(), 10)
        assert [v for b in blocks for v in b.values] == burst
        assert all(b.quality_of(0) is Quality.GOOD for b in blocks)
        assert not drv.ctx.stats.errors, "nothing dropped, nothing malformed"
    finally:
        await drv.close()
        await server.stop()


def test_a_float_keeps_its_shortest_decimal_and_its_widened_raw() -> None:
    sub, blocks, _ = subscription(group_of(scalar_tags(1)), record_raw=True)
    dv = ua.DataValue(ua.Variant(95.1, ua.VariantType.Float), SourceTimestamp=T0)
    sub.on_publish(bulk([item(0, dv)]))
    [block] = blocks
    assert block.values == [95.1]
    assert block.raw is not None and block.raw[0] != 95.1 and math.isclose(block.raw[0], 95.1, rel_tol=1e-7)
