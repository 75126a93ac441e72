"""Modbus TCP driver against real pymodbus servers (and raw sockets for broken devices)
on loopback: decoding, coalescing, exception replies, garbage, silence, shared gateways,
records mode, and configuration errors."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Quality
from bench.modbus_requests import fewest_reads
from cleanroom_common.codec import DataType, WordOrder, encode
from cleanroom_common.net import free_port
from cleanroom_common.profilefiles import load_profile
from drivers.modbus import bus as buses
from drivers.modbus.driver import DEGRADED, Connection, ModbusDriver
from drivers.modbus.plan import coalesce
from simulators.servers.modbus import serve_counter_modbus, serve_incubator_modbus
from tests.support import MbapPeer, Script, mbap, registers_reply

Action = Callable[[int, int, int, int, list[int], Any], Awaitable[ExcCodes | None]]


def sim_device(
    unit: int,
    holding: Sequence[int] = (0,) * 8,
    inputs: Sequence[int] = (0,) * 8,
    coils: Sequence[bool] = (False,) * 16,
    action: Action | None = None,
) -> SimDevice:
    """A unit whose four tables start at PDU address 0; anything past them is an illegal address."""
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=list(coils), datatype=SimType.BITS)],
            [SimData(0, values=list(coils), datatype=SimType.BITS)],
            [SimData(0, values=list(holding), datatype=SimType.REGISTERS)],
            [SimData(0, values=list(inputs), datatype=SimType.REGISTERS)],
        ),
        action=action,
    )


class Server:
    """A pymodbus TCP server on a free port that counts the requests it receives."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.port = free_port()
        self.requests: list[tuple[int, int, int, int]] = []  # (unit, function, address, count)
        self.server = ModbusTcpServer(devices, address=("127.0.0.1", self.port), trace_pdu=self._trace)

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append((pdu.dev_id, pdu.function_code, pdu.address, pdu.count))
        return pdu


@asynccontextmanager
async def serving(*devices: SimDevice) -> AsyncIterator[Server]:
    srv = Server(list(devices))
    await srv.server.serve_forever(background=True)
    try:
        yield srv
    finally:
        await srv.server.shutdown()


def make_driver(
    tags: list[dict[str, Any]],
    port: int,
    *,
    unit: int = 1,
    device: str = "dev1",
    groups: dict[str, Any] | None = None,
    state: dict[str, str] | None = None,
    **conn: Any,
) -> ModbusDriver:
    profile = ModbusDriver.profile_model().model_validate(
        {"profile": "t", "protocol": "modbus", "groups": groups or {"default": {}}, "tags": tags}
    )
    connection = Connection.model_validate(
        {"host": "127.0.0.1", "port": port, "unit_id": unit, "timeout": 0.3, "retries": 0, **conn}
    )
    ctx = DeviceContext(
        id=device,
        profile=profile,
        connection=connection,
        groups=build_groups(device, profile, connection, {}),
        state=state or {},
    )
    return ModbusDriver(ctx)


async def read_one(driver: ModbusDriver, group: str = "default") -> Block:
    blocks = await driver.read(driver.ctx.groups[group])
    assert len(blocks) == 1
    return blocks[0]


def by_tag(block: Block) -> dict[str, Any]:
    return dict(zip(block.tags, block.values, strict=True))


def reasons(block: Block) -> dict[str, str | None]:
    return dict(zip(block.tags, block.reasons or [None] * len(block), strict=True))


# --------------------------------------------------------------------------- decoding


async def test_reads_every_type_and_word_order_with_scaling() -> None:
    holding = (
        encode(-12, DataType.INT16)  # 40001
        + encode(451, DataType.UINT16)  # 40002 (×0.1)
        + encode(-70000, DataType.INT32, WordOrder.CDAB)  # 40003-04
        + encode(37.25, DataType.FLOAT32)  # 40005-06
        + encode(5.5, DataType.FLOAT32, WordOrder.CDAB)  # 40007-08 (BINDER-style)
        + encode(-1.0e10, DataType.FLOAT64, WordOrder.DCBA)  # 40009-12
        + encode("BR-7", DataType.STRING, length=6)  # 40013-15
        + encode(0b1000_0000_0000_0101, DataType.UINT16)  # 40016 status word
    )
    inputs = encode(3_000_000_000, DataType.UINT32, WordOrder.BADC)  # 30001-02
    coils = [True, False, True] + [False] * 13
    tags = [
        {"name": "i16", "address": 40001, "type": "int16"},
        {"name": "temp", "address": 40002, "scale": 0.1, "unit": "degC"},
        {"name": "i32", "address": 40003, "type": "int32", "word_order": "CDAB"},
        {"name": "f32", "address": 40005, "type": "float32"},
        {"name": "co2", "address": 40007, "type": "float32", "word_order": "CDAB"},
        {"name": "f64", "address": 40009, "type": "float64", "word_order": "DCBA"},
        {"name": "name", "address": 40013, "type": "string", "length": 6},
        {"name": "door", "address": 40016, "bit": 0},
        {"name": "alarm", "address": 40016, "bit": 15},
        {"name": "spare", "address": 40016, "bit": 1},
        {"name": "u32", "address": 30001, "type": "uint32", "word_order": "BADC"},
        {"name": "pump", "address": 1},
        {"name": "valve", "address": 2},
        {"name": "di", "address": 10003},
    ]
    async with serving(sim_device(1, holding, inputs + [0] * 6, coils)) as srv:
        driver = make_driver(tags, srv.port)
        await driver.connect()
        try:
            block = await read_one(driver)
        finally:
            await driver.close()
    assert block.quality is None, block.reasons
    values = by_tag(block)
    assert values == {
        "i16": -12,
        "temp": pytest.approx(45.1),
        "i32": -70000,
        "f32": 37.25,
        "co2": 5.5,
        "f64": -1.0e10,
        "name": "BR-7",
        "door": True,
        "alarm": True,
        "spare": False,
        "u32": 3_000_000_000,
        "pump": True,
        "valve": False,
        "di": True,
    }
    assert block.units[block.tags.index("temp")] == "degC"
    # one request per table: the holding map is contiguous
    assert sorted(f for _, f, _, _ in srv.requests) == [1, 2, 3, 4]
    assert driver.ctx.stats.requests == 4


async def test_integer_groups_stay_integers_on_the_fast_path() -> None:
    """A pure int16 group decodes as one array; unscaled values stay ints in the payload."""
    values = list(range(-50, 50))
    async with serving(sim_device(1, holding=[v & 0xFFFF for v in values])) as srv:
        tags = [{"name": f"t{i}", "address": 40001 + i, "type": "int16"} for i in range(100)]
        driver = make_driver(tags, srv.port)
        await driver.connect()
        try:
            block = await read_one(driver)
        finally:
            await driver.close()
    assert block.values == values
    assert all(type(v) is int for v in block.values)


# --------------------------------------------------------------------------- coalescing


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ({}, [(0, 3), (20, 11), (100, 2)]),  # gap 17 > max_gap 10 splits, gap 8 does not
        ({"max_gap": 0}, [(0, 3), (20, 2), (30, 1), (100, 2)]),
        ({"max_registers_per_request": 10}, [(0, 3), (20, 2), (30, 1), (100, 2)]),
        ({"one_request_per_tag": True}, [(0, 2), (2, 1), (20, 2), (30, 1), (100, 2)]),
    ],
)
async def test_coalescing_issues_the_planned_requests(
    conn: dict[str, Any], expected: list[tuple[int, int]]
) -> None:
    tags = [
        {"name": "a", "address": 40001, "type": "float32"},
        {"name": "b", "address": 40003},
        {"name": "c", "address": 40021, "type": "int32"},
        {"name": "d", "address": 40031},
        {"name": "e", "address": 40101, "type": "float32"},
    ]
    async with serving(sim_device(1, holding=[0] * 110)) as srv:
        driver = make_driver(tags, srv.port, **conn)
        await driver.connect()
        try:
            block = await read_one(driver)
        finally:
            await driver.close()
    assert block.quality is None
    assert [(a, c) for _, _, a, c in srv.requests] == expected


def test_coalesce_never_splits_a_value_and_respects_limits() -> None:
    reads = coalesce([(0, 4), (3, 4), (120, 4), (124, 2)], max_count=125, max_gap=200)
    assert reads == [(0, 124), (124, 2)]  # (120, 4) stays whole in the first read
    with pytest.raises(ValueError, match="exceeds"):
        coalesce([(0, 126)], max_count=125, max_gap=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from([1, 2, 4])), min_size=1, max_size=25),
    st.integers(4, 125),
    st.integers(0, 20),
)
def test_coalesce_is_minimal_and_valid(spans: list[tuple[int, int]], max_count: int, max_gap: int) -> None:
    reads = coalesce(spans, max_count, max_gap)
    assert len(reads) == fewest_reads(spans, max_count, max_gap)
    for start, width in spans:  # every value inside exactly one read, whole
        assert sum(1 for a, c in reads if a <= start and start + width <= a + c) >= 1
    assert all(c <= max_count for _, c in reads)
    for a, c in reads:  # no read bridges a hole wider than max_gap
        inside = sorted((s, w) for s, w in spans if a <= s and s + w <= a + c)
        covered = a
        for s, w in inside:
            assert s - covered <= max_gap
            covered = max(covered, s + w)
        assert covered == a + c


# --------------------------------------------------------------------------- device errors


async def test_exception_replies_make_only_their_request_bad() -> None:
    tags = [
        {"name": "ok", "address": 40001},
        {"name": "missing", "address": 40500},  # past the map: illegal data address
        {"name": "failing", "address": 30001},
    ]

    async def action(
        fc: int, start: int, address: int, count: int, regs: list[int], values: Any
    ) -> ExcCodes | None:
        return ExcCodes.DEVICE_FAILURE if fc == 4 else None

    async with serving(sim_device(1, holding=[7] * 8, action=action)) as srv:
        driver = make_driver(tags, srv.port)
        await driver.connect()
        try:
            block = await read_one(driver)
            again = await read_one(driver)
        finally:
            await driver.close()
    assert by_tag(block) == {"ok": 7, "missing": None, "failing": None}
    assert reasons(block) == {
        "ok": None,
        "missing": "illegal_data_address",
        "failing": "slave_device_failure",
    }
    assert block.quality == [Quality.GOOD, Quality.BAD, Quality.BAD]
    assert by_tag(again)["ok"] == 7
    errors = driver.ctx.stats.errors
    assert errors["illegal_data_address"] == 2 and errors["slave_device_failure"] == 2


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (ExcCodes.ILLEGAL_FUNCTION, "illegal_function"),
        (ExcCodes.ILLEGAL_ADDRESS, "illegal_data_address"),
        (ExcCodes.ILLEGAL_VALUE, "illegal_data_value"),
        (ExcCodes.DEVICE_FAILURE, "slave_device_failure"),
        (ExcCodes.ACKNOWLEDGE, "acknowledge"),
        (ExcCodes.DEVICE_BUSY, "server_busy"),
        (ExcCodes.GATEWAY_PATH_UNAVIABLE, "gateway_path_unavailable"),
        (ExcCodes.GATEWAY_NO_RESPONSE, "gateway_target_failed"),
    ],
)
async def test_every_exception_code_has_its_reason(code: ExcCodes, reason: str) -> None:
    async def action(fc: int, start: int, address: int, count: int, regs: list[int], values: Any) -> ExcCodes:
        return code

    async with serving(sim_device(1, action=action)) as srv:
        driver = make_driver([{"name": "x", "address": 40001}], srv.port)
        await driver.connect()
        try:
            block = await read_one(driver)
        finally:
            await driver.close()
    assert block.values == [None] and block.reasons == [reason]
    assert driver.ctx.stats.errors[reason] == 1


async def test_server_busy_is_retried_after_the_configured_wait() -> None:
    busy = {"left": 2}

    async def action(
        fc: int, start: int, address: int, count: int, regs: list[int], values: Any
    ) -> ExcCodes | None:
        if busy["left"]:
            busy["left"] -= 1
            return ExcCodes.DEVICE_BUSY
        return None

    async with serving(sim_device(1, holding=[42] * 8, action=action)) as srv:
        driver = make_driver([{"name": "x", "address": 40001}], srv.port, retries=2, retry_busy_wait=0.05)
        await driver.connect()
        try:
            block = await read_one(driver)
            busy["left"] = 5
            refused = await read_one(driver)
        finally:
            await driver.close()
    assert block.values == [42] and block.quality is None
    assert refused.reasons == ["server_busy"]  # still busy after 2 retries: bad, not a crash
    assert driver.ctx.stats.retries == 4
    assert driver.ctx.stats.errors["server_busy"] == 5


@pytest.mark.parametrize(
    ("broken", "reason", "counter"),
    [
        (lambda t, u, p: b"\x13\x37garbage-that-is-no-modbus", "comm_error", "garbled"),
        # MBAP announces 9 bytes, 5 arrive: a truncated frame
        (lambda t, u, p: mbap(t, u, b"\x03\x06\x00", length=9), "comm_error", "garbled"),
        # well-formed frame, but byte count says 8 while 2 data bytes follow
        (lambda t, u, p: mbap(t, u, b"\x03\x08\x00\x01"), "comm_error", "garbled"),
        # well-formed reply with one register fewer than asked for
        (lambda t, u, p: registers_reply(t, u, p[:3] + b"\x00\x01"), "decode_error", "wrong_length"),
    ],
    ids=["garbage", "truncated", "bad-byte-count", "wrong-length"],
)
async def test_broken_replies_are_bad_readings_and_the_driver_recovers(
    broken: Script, reason: str, counter: str
) -> None:
    script = {"broken": True}

    def reply(tid: int, unit: int, pdu: bytes) -> bytes | None:
        if script["broken"]:
            script["broken"] = False
            return broken(tid, unit, pdu)
        return registers_reply(tid, unit, pdu)

    async with MbapPeer(reply) as srv:
        driver = make_driver([{"name": "a", "address": 40001}, {"name": "b", "address": 40002}], srv.port)
        await driver.connect()
        try:
            bad = await read_one(driver)
            good = await read_one(driver)
        finally:
            await driver.close()
    assert bad.values == [None, None] and bad.reasons == [reason, reason]
    assert driver.ctx.stats.errors[counter] == 1
    assert good.values == [9, 9] and good.quality is None


async def test_silence_raises_timeout_then_the_device_is_degraded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cleanroom.modbus")
    async with MbapPeer(lambda t, u, p: None) as srv:
        driver = make_driver([{"name": "a", "address": 40001}], srv.port, degrade_after=2, degrade_for=60)
        await driver.connect()
        try:
            for _ in range(2):
                with pytest.raises(DeviceError) as err:
                    await read_one(driver)
                assert err.value.reason == "timeout"
            asked = len(srv.requests)
            skipped = [await read_one(driver) for _ in range(3)]
        finally:
            await driver.close()
    assert len(srv.requests) == asked == 2  # a degraded device costs the bus nothing
    assert all(b.reasons == [DEGRADED] and b.values == [None] for b in skipped)
    assert driver.ctx.stats.errors["timeout"] == 2
    # one log line per state change (timeout, then degraded), not one per failed poll
    assert [r.message.split(":")[1].split()[0] for r in caplog.records] == ["timeout", "degraded"]


async def test_degrading_survives_the_scheduler_cancelling_a_slow_poll() -> None:
    """Retries can outlast the scheduler's poll deadline; the unanswered requests still count."""
    async with MbapPeer(lambda t, u, p: None) as srv:
        driver = make_driver(
            [{"name": "a", "address": 40001}], srv.port, retries=5, degrade_after=3, timeout=0.2
        )
        await driver.connect()
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read_one(driver), 0.5)  # cancelled during the 3rd attempt
            asked = len(srv.requests)
            with pytest.raises(DeviceError):
                await read_one(driver)  # the 3rd miss: degraded at once, the 5 retries not spent
            skipped = await read_one(driver)
        finally:
            await driver.close()
    assert len(srv.requests) == asked + 1
    assert skipped.reasons == [DEGRADED]


async def test_close_after_scan_reconnects_for_every_poll() -> None:
    connects: list[bool] = []
    srv = Server([sim_device(1, holding=[5] * 8)])
    srv.server.trace_connect = connects.append
    await srv.server.serve_forever(background=True)
    try:
        driver = make_driver([{"name": "x", "address": 40001}], srv.port, close_after_scan=True)
        await driver.connect()
        try:
            blocks = [await read_one(driver) for _ in range(3)]
        finally:
            await driver.close()
    finally:
        await srv.server.shutdown()
    assert [b.values for b in blocks] == [[5]] * 3
    assert connects.count(True) == 3


async def test_lost_connection_raises_and_reconnect_resumes() -> None:
    """The scheduler's cycle: a dropped link is a DeviceError; close + connect recovers."""
    srv = Server([sim_device(1, holding=[3] * 8)])
    await srv.server.serve_forever(background=True)
    driver = make_driver([{"name": "x", "address": 40001}], srv.port, retries=1)
    try:
        await driver.connect()
        before = await read_one(driver)
        await srv.server.shutdown()
        with pytest.raises(DeviceError) as err:
            await read_one(driver)
        await driver.close()
        with pytest.raises(DeviceError):
            await driver.connect()  # still down: a clean connect error, no bus left behind
        assert not buses._BUSES
        srv.server = ModbusTcpServer([sim_device(1, holding=[4] * 8)], address=("127.0.0.1", srv.port))
        await srv.server.serve_forever(background=True)
        await driver.connect()
        after = await read_one(driver)
    finally:
        await driver.close()
        await srv.server.shutdown()
    assert before.values == [3] and after.values == [4]
    assert err.value.reason in ("comm_error", "timeout")


async def test_unreachable_device_fails_connect_cleanly() -> None:
    driver = make_driver([{"name": "a", "address": 40001}], free_port())
    with pytest.raises(DeviceError) as err:
        await driver.connect()
    assert err.value.reason == "not_connected"
    assert not buses._BUSES  # the failed attempt left no bus behind


# --------------------------------------------------------------------------- gateways


async def test_units_behind_one_gateway_share_one_connection() -> None:
    connections: list[bool] = []
    devices = [sim_device(1, holding=[11] * 8), sim_device(2, holding=[22] * 8)]
    srv = Server(devices)
    srv.server.trace_connect = connections.append
    await srv.server.serve_forever(background=True)
    try:
        one = make_driver([{"name": "x", "address": 40001}], srv.port, unit=1, device="one")
        two = make_driver([{"name": "x", "address": 40001}], srv.port, unit=2, device="two")
        await one.connect()
        await two.connect()
        assert one._bus is two._bus and one._bus is not None and one._bus.refs == 2
        a, b = await asyncio.gather(read_one(one), read_one(two))
        await one.close()
        c = await read_one(two)  # the gateway connection survives the first device closing
        await two.close()
    finally:
        await srv.server.shutdown()
    assert (a.values, b.values, c.values) == ([11], [22], [22])
    assert {u for u, *_ in srv.requests} == {1, 2}
    assert not buses._BUSES


# --------------------------------------------------------------------------- records mode

RECORD_GROUPS = {
    "counts": {
        "interval": "10s",
        "mode": "records",
        "records": {
            "count_address": 40024,
            "index_address": 40025,
            "timestamp_tag": "sample_end_ts",
            "bad_when": ["laser_fault"],
            "uncertain_when": ["service_due"],
            "capacity": 5,
            "max_records_per_read": 3,
        },
    }
}
RECORD_TAGS = [
    {"name": "sample_end_ts", "address": 30001, "type": "uint32", "group": "counts", "unit": "s"},
    {"name": "laser_fault", "address": 30008, "bit": 0, "group": "counts"},
    {"name": "service_due", "address": 30008, "bit": 3, "group": "counts"},
    {"name": "um0_5", "address": 30009, "type": "uint32", "group": "counts", "unit": "counts"},
    {"name": "um5_0", "address": 30011, "type": "uint32", "group": "counts", "unit": "counts"},
]


class Counter:
    """A Lighthouse-like remote counter: a rotating buffer of (ts, status, c1, c2) records,
    positions 0..count-1 oldest first (0xFFFF: newest), selected by writing 40025."""

    def __init__(self, capacity: int = 5) -> None:
        self.capacity = capacity
        self.records: list[tuple[int, int, int, int]] = []
        self.selected = 0xFFFF
        self.writes = 0
        self.add_after_record_reads: int | None = None  # a new record arrives mid-drain
        self.record_read_delay = 0.0  # a slow device or line

    def add(self, ts: int, status: int = 0, c1: int = 0, c2: int = 0) -> None:
        self.records = [*self.records, (ts, status, c1, c2)][-self.capacity :]

    async def action(
        self, fc: int, start: int, address: int, count: int, regs: list[int], values: Any
    ) -> None:
        if fc == 6 and address == 24 and values:
            self.selected = int(values[0])
            self.writes += 1
        elif fc == 3:
            regs[23] = len(self.records)
        elif fc == 4 and self.records:
            if count > 2:  # a whole record, not a timestamp probe
                await asyncio.sleep(self.record_read_delay)
            if count > 2 and self.add_after_record_reads is not None:
                self.add_after_record_reads -= 1
                if self.add_after_record_reads < 0:
                    self.add_after_record_reads = None
                    self.add(self.records[-1][0] + 60, c1=self.records[-1][2] + 1)
            ts, status, c1, c2 = self.records[-1 if self.selected == 0xFFFF else self.selected]
            image = encode(ts, DataType.UINT32) + [0] * 4 + encode(status, DataType.UINT32)
            regs[0:12] = image + encode(c1, DataType.UINT32) + encode(c2, DataType.UINT32)


async def drain(driver: ModbusDriver) -> list[Block]:
    return await driver.read(driver.ctx.groups["counts"])


async def test_records_mode_drains_in_order_with_watermark_status_and_wrap_loss() -> None:
    counter = Counter(capacity=5)
    for k in range(4):
        counter.add(1_700_000_000 + 60 * k, c1=100 + k, c2=k)
    counter.records[1] = (*counter.records[1][:1], 0b1, *counter.records[1][2:])  # laser fault
    counter.records[2] = (*counter.records[2][:1], 0b1000, *counter.records[2][2:])  # service due
    device = sim_device(1, holding=[0] * 30, inputs=[0] * 16, action=counter.action)
    async with serving(device) as srv:
        drv = make_driver(RECORD_TAGS, srv.port, groups=RECORD_GROUPS, state={"counts.last_ts": "1699999000"})
        await drv.connect()
        try:
            first = await drain(drv)  # 3 of 4 (max_records_per_read)
            second = await drain(drv)  # the 4th
            nothing = await drain(drv)
            for k in range(4, 12):  # 8 more records into a 5-slot buffer: 3 are overwritten
                counter.add(1_700_000_000 + 60 * k, c1=100 + k)
            after_wrap = await drain(drv) + await drain(drv)
        finally:
            await drv.close()
        # a fresh agent without a watermark takes only the newest record
        fresh = make_driver(RECORD_TAGS, srv.port, groups=RECORD_GROUPS)
        await fresh.connect()
        try:
            newest = await drain(fresh)
        finally:
            await fresh.close()

    delivered = first + second
    assert [b.values[3] for b in delivered] == [100, 101, 102, 103]
    assert [b.source_ts_ns for b in delivered] == [(1_700_000_000 + 60 * k) * 10**9 for k in range(4)]
    assert delivered[-1].state == {"counts.last_ts": str(1_700_000_000 + 180)}
    assert delivered[0].quality is None
    # laser fault: the counts are bad (values kept: the original record, flagged); the
    # timestamp and the status bits themselves are the device's own report
    assert delivered[1].quality == [Quality.GOOD] * 3 + [Quality.BAD] * 2
    assert delivered[1].reasons == [None] * 3 + ["device_status"] * 2
    assert delivered[1].values == [1_700_000_060, True, False, 101, 1]
    assert delivered[2].quality == [Quality.GOOD] * 3 + [Quality.UNCERTAIN] * 2
    assert nothing == []
    assert [b.values[3] for b in after_wrap] == [107, 108, 109, 110, 111]
    loss = after_wrap[0].events
    assert loss is not None and loss[0].kind == "data_loss"
    # gone: the records between the last one delivered (k=3) and the oldest left (k=7)
    assert DataLoss.from_event(loss[0]) == DataLoss(
        LossReason.DEVICE_BUFFER_WRAPPED,
        group="counts",
        first_ts=(1_700_000_000 + 180) * 10**9,
        last_ts=(1_700_000_000 + 420) * 10**9,
        detail="about 3 records (one every 60 s)",
    )
    assert [b.values[3] for b in newest] == [111]
    assert counter.writes > 0 and not any(e.kind for b in delivered for e in (b.events or []))


async def test_records_shifting_during_a_drain_lose_and_repeat_nothing() -> None:
    """A new record on a full buffer moves every position down by one mid-drain: the
    batch is dropped and re-read, so the delivered sequence has neither gap nor repeat."""
    counter = Counter(capacity=5)
    for k in range(5):
        counter.add(1_700_000_000 + 60 * k, c1=100 + k)
    counter.add_after_record_reads = 1  # the 6th record lands after the first record read
    async with serving(sim_device(1, holding=[0] * 30, inputs=[0] * 16, action=counter.action)) as srv:
        drv = make_driver(RECORD_TAGS, srv.port, groups=RECORD_GROUPS, state={"counts.last_ts": "1700000060"})
        await drv.connect()
        try:
            polls = [await drain(drv) for _ in range(3)]
        finally:
            await drv.close()
    assert polls[0] == []  # the rotated batch was dropped
    delivered = [b.values[3] for b in polls[1] + polls[2]]
    assert delivered == [102, 103, 104, 105]
    assert not any(b.events for b in polls[1] + polls[2])  # nothing was lost at the device


async def test_records_backlog_on_a_slow_device_drains_over_several_polls() -> None:
    """Each poll stops taking records after half the group's timeout (so the scheduler
    never cancels it empty-handed); the backlog still arrives complete and in order."""
    counter = Counter(capacity=50)
    for k in range(6):
        counter.add(1_700_000_000 + 60 * k, c1=100 + k)
    counter.record_read_delay = 0.06
    groups = {"counts": {**RECORD_GROUPS["counts"], "timeout": "250ms"}}
    groups["counts"]["records"] = {**RECORD_GROUPS["counts"]["records"], "max_records_per_read": 100}
    async with serving(sim_device(1, holding=[0] * 30, inputs=[0] * 16, action=counter.action)) as srv:
        drv = make_driver(RECORD_TAGS, srv.port, groups=groups, state={"counts.last_ts": "1699999999"})
        await drv.connect()
        try:
            polls = [await drain(drv) for _ in range(6)]
        finally:
            await drv.close()
    assert 1 <= max(len(p) for p in polls) < 6  # no single poll took the whole backlog
    assert [b.values[3] for p in polls for b in p] == [100 + k for k in range(6)]


async def test_records_cleared_at_the_device_is_a_loss_event() -> None:
    counter = Counter(capacity=50)
    for k in range(4):
        counter.add(1_700_000_000 + 60 * k, c1=100 + k)
    async with serving(sim_device(1, holding=[0] * 30, inputs=[0] * 16, action=counter.action)) as srv:
        drv = make_driver(RECORD_TAGS, srv.port, groups=RECORD_GROUPS, state={"counts.last_ts": "1700000060"})
        await drv.connect()
        try:
            before = await drain(drv)
            counter.records = []  # someone cleared the buffer at the counter...
            for k in range(6, 8):  # ...and it kept sampling; records 4 and 5 are gone
                counter.add(1_700_000_000 + 60 * k, c1=100 + k)
            after = await drain(drv)
        finally:
            await drv.close()
    assert [b.values[3] for b in before] == [102, 103]
    assert [b.values[3] for b in after] == [106, 107]
    assert after[0].events is not None
    event = after[0].events[0]
    assert event.kind == "data_loss"
    assert DataLoss.from_event(event) == DataLoss(
        LossReason.DEVICE_BUFFER_CLEARED,
        group="counts",
        first_ts=(1_700_000_000 + 180) * 10**9,
        last_ts=(1_700_000_000 + 360) * 10**9,
        detail="about 2 records (one every 60 s)",
    )


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ({"name": "a", "address": 40001, "table": "input"}, "is a holding address"),
        ({"name": "a", "address": 5, "vendor_notation": False}, "needs an explicit table"),
        ({"name": "a", "address": 25001}, "not in vendor notation"),
        ({"name": "a", "address": 1, "type": "float32"}, "coil is one bit"),
        ({"name": "a", "address": 40001, "type": "float32", "bit": 3}, "16-bit register"),
        ({"name": "a", "address": 40001, "type": "string"}, "length is required"),
        ({"name": "a", "address": 40000}, "below the first register"),
        ({"name": "a", "address": 465536, "address_base": 0}, "past the last register"),
        ({"name": "a", "address": 40001, "word_order": "ABDC"}, "word_order"),
    ],
)
def test_bad_tags_are_rejected_with_the_reason(tag: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusDriver.profile_model().model_validate({"profile": "p", "protocol": "modbus", "tags": [tag]})


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        ({"transport": "tcp"}, "needs a host"),
        ({"transport": "rtu", "port": 502}, "serial device path"),
        ({"transport": "rtu", "port": "/dev/ttyS0", "host": "x"}, "has no host"),
        ({"host": "h", "max_registers_per_request": 200}, "less than or equal to 125"),
        ({"host": "h", "parity": "X"}, "parity"),
    ],
)
def test_bad_connections_are_rejected_with_the_reason(conn: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Connection.model_validate(conn)


def test_profile_defaults_apply_to_tags_that_do_not_set_them() -> None:
    profile: Any = ModbusDriver.profile_model().model_validate(
        {
            "profile": "binder",
            "protocol": "modbus",
            "defaults": {"word_order": "CDAB", "table": "input", "vendor_notation": False, "address_base": 0},
            "tags": [
                {"name": "t", "address": 4, "type": "float32"},
                {"name": "u", "address": 6, "word_order": "ABCD"},
            ],
        }
    )
    t, u = profile.tags
    assert (t.word_order, t.table_and_number()) == (WordOrder.CDAB, ("input", 4))
    assert u.word_order == WordOrder.ABCD


# --------------------------------------------------------------------------- simulators


def profile_driver(
    profile_name: str, device: str = "sim", state: dict[str, str] | None = None, **conn: Any
) -> ModbusDriver:
    """A driver for a shipped profile (deploy/profiles), as the agent builds it."""
    profile = ModbusDriver.profile_model().model_validate(load_profile(profile_name))
    connection = Connection.model_validate({"timeout": 1.0, **conn})
    groups = build_groups(device, profile, connection, {})
    return ModbusDriver(
        DeviceContext(id=device, profile=profile, connection=connection, groups=groups, state=state or {})
    )


async def test_simulated_particle_counter_records_drain_without_gaps() -> None:
    """The simulator's counter (one record per 10 s sample at 100× speed): the driver picks
    up where it left off, record after record, each exactly one sample period apart."""
    async with serve_counter_modbus(speed=100, seed=3, params={"sample": 10, "buffer_size": 50}) as sim:
        driver = profile_driver("particle-counter-sim-modbus", host=sim.host, port=sim.port)
        await driver.connect()
        try:
            status = await read_one(driver, "status")
            first: list[Block] = []
            for _ in range(100):
                first = await driver.read(driver.ctx.groups["records"])
                if first:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)  # ~6 more samples
            later = await driver.read(driver.ctx.groups["records"])
        finally:
            await driver.close()
    assert status.quality is None, status.reasons
    assert by_tag(status)["map_version"] >= 1
    assert len(first) == 1 and len(later) >= 3
    stamps = [b.source_ts_ns for b in first + later]
    assert all(isinstance(t, int) for t in stamps)
    assert {b - a for a, b in itertools.pairwise(stamps)} == {10 * 10**9}  # no gap, no repeat
    for block in first + later:
        values = by_tag(block)
        assert block.quality is None, block.reasons
        assert (
            values["count_0_3um"]
            >= values["count_0_5um"]
            >= values["count_1_0um"]
            >= values["count_5_0um"]
            >= 0
        )
        assert block.state == {"records.last_ts": str(values["sample_end_ts"])}


async def test_simulated_incubator_over_tcp_reads_every_group_good() -> None:
    async with serve_incubator_modbus(speed=1, seed=1) as sim:
        driver = profile_driver("incubator-sim-modbus", host=sim.host, port=sim.port)
        await driver.connect()
        try:
            blocks = {g: await read_one(driver, g) for g in driver.ctx.groups}
        finally:
            await driver.close()
    for block in blocks.values():
        assert block.quality is None, (block.group, block.reasons)
    process = by_tag(blocks["process"])
    assert 30 < process["temperature_c"] < 40 and 0 < process["co2_pct"] < 25


@pytest.mark.parametrize(
    "name",
    ["generic-modbus-example", "incubator-sim-modbus", "incubator-sim-rtu", "particle-counter-sim-modbus"],
)
def test_shipped_profiles_validate_and_plan(name: str) -> None:
    """Every shipped Modbus profile loads and compiles to read plans within protocol limits."""
    driver = profile_driver(name, host="127.0.0.1", port=502)
    plans = [*driver._plans.values(), *(r.record_plan for r in driver._records.values())]
    assert plans and all(p.reads for p in plans)
    for plan in plans:
        for rd in plan.reads:
            assert rd.count <= (2000 if rd.table in ("coil", "discrete") else 125)


async def test_groups_read_together_share_requests_and_a_refusal_fails_only_what_it_carried() -> None:
    """Two groups read together are one plan: the registers of both within the gap limit go in
    one request, so three requests for the groups apart are two together; a refused request marks
    bad the tags it carried, whichever group they are in, and each group gets its own block with
    the values it gets when read alone."""
    tags = [
        {"name": "a", "address": 40001, "group": "process"},
        {"name": "b", "address": 40002, "group": "process", "scale": 0.1},
        {"name": "c", "address": 40004, "group": "status", "bit": 1},
        {"name": "d", "address": 30001, "group": "status"},
    ]

    async def action(
        fc: int, start: int, address: int, count: int, regs: list[int], values: Any
    ) -> ExcCodes | None:
        return ExcCodes.DEVICE_FAILURE if fc == 4 else None

    groups = {"process": {"interval": "1s"}, "status": {"interval": "1s"}}
    async with serving(sim_device(1, holding=[5, 451, 0, 0b10, 0, 0, 0, 0], action=action)) as srv:
        driver = make_driver(tags, srv.port, groups=groups, record_raw=True)
        await driver.connect()
        try:
            alone = [await read_one(driver, g) for g in ("process", "status")]
            apart = len(srv.requests)
            together = await driver.read_together([driver.ctx.groups["process"], driver.ctx.groups["status"]])
            fused = len(srv.requests) - apart
        finally:
            await driver.close()
    assert all(driver.reads_together(g) for g in driver.ctx.groups.values())
    assert (apart, fused) == (3, 2)
    assert srv.requests[-2:] == [(1, 3, 0, 4), (1, 4, 0, 1)]
    assert [b.group for b in together] == ["process", "status"]
    assert [by_tag(b) for b in together] == [by_tag(b) for b in alone]
    assert by_tag(together[0]) == {"a": 5, "b": 45.1}
    assert together[0].quality is None
    assert by_tag(together[1]) == {"c": True, "d": None}
    assert reasons(together[1]) == {"c": None, "d": "slave_device_failure"}
    assert together[0].acq_ts_ns == together[1].acq_ts_ns
    # what the device sent, split the same way: the status word whole, nothing for the refused read
    assert [b.raw for b in together] == [[5, 451], [2, None]] == [b.raw for b in alone]


def test_records_groups_are_never_read_together() -> None:
    """A counter's records group is an exchange of its own (select, then read the record)."""
    driver = profile_driver("particle-counter-sim-modbus", host="127.0.0.1", port=502)
    assert driver.reads_together(driver.ctx.groups["status"])
    assert not driver.reads_together(driver.ctx.groups["records"])
