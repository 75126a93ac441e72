"""Issue 12, "attributable" and "original": drivers report who the device is (serial number,
firmware, model, vendor) on every connect, and with ``record_raw`` keep each value as the
device sent it beside the engineering value. ``raw`` is the original: it stays wherever the
device sent something, also for a reading that is bad because of the device's status, a
decode error or the tag's range; it is null only where nothing came back.

Everything runs against real sockets and ptys: the simulators for the identity they expose,
and small hand-written devices for the replies no honest simulator sends (a serial number
in garbage, a refused identity register, a serial counter without ``CSN``). A device whose
identity cannot be read still measures: its identity is unknown, counted, logged once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua

from agent.core.driver import (
    IDENTITY_UNAVAILABLE,
    DeviceContext,
    DeviceIdentity,
    Driver,
    build_groups,
)
from agent.core.records import Block, Quality, dumps
from cleanroom_common.codec import DataType, encode
from cleanroom_common.net import free_port
from cleanroom_common.profilefiles import load_profile
from drivers.modbus.driver import ModbusDriver
from drivers.opcua.driver import OpcUaDriver
from drivers.opcua.values import Converted
from drivers.serial_counter.driver import SerialCounterDriver
from simulators.servers.counter import FIRMWARE, MODEL_NAME, serial_number
from simulators.servers.modbus import serve_counter_modbus
from simulators.servers.opcua import FIRMWARE as BR_FIRMWARE
from simulators.servers.opcua import MANUFACTURER, serve_bioreactor_opcua
from simulators.servers.opcua import MODEL_NAME as BR_MODEL
from simulators.servers.serial_ascii import serve_counter_serial
from tests.support import until
from tests.test_serial_counter import CounterPeer, record

PROFILES = Path(__file__).resolve().parent.parent / "deploy" / "profiles"


def context(driver: type[Driver], profile: dict[str, Any], connection: dict[str, Any]) -> DeviceContext:
    """A device context whose identity reports land in ``ctx.reports`` (the runtime's listener)."""
    prof = driver.profile_model().model_validate(profile)
    conn = driver.Connection.model_validate(connection)
    ctx = DeviceContext(id="dev", profile=prof, connection=conn, groups=build_groups("dev", prof, conn, {}))
    reports: list[DeviceIdentity] = []
    ctx.on_identity = reports.append
    ctx.reports = reports  # type: ignore[attr-defined]
    return ctx


def reports(ctx: DeviceContext) -> list[DeviceIdentity]:
    return ctx.reports  # type: ignore[attr-defined,no-any-return]


def numbered(block: Block) -> dict[str, Any]:
    block.seq_first = 1
    return block.body()


# --------------------------------------------------------------------------- the shared model


def test_identity_drops_unknown_fields_and_raw_follows_values_in_the_body() -> None:
    assert DeviceIdentity(serial="A1", vendor="V").as_dict() == {"serial": "A1", "vendor": "V"}
    assert DeviceIdentity().as_dict() == {}
    block = Block("d", "g", 5, ["a", "b"], [None, None], [1.5, None], [Quality.GOOD, Quality.BAD], ["x", "y"])
    assert "raw" not in numbered(block)
    block.raw = [15, None]
    assert list(numbered(block)) == [
        "seq",
        "n",
        "group",
        "ts",
        "tags",
        "units",
        "values",
        "raw",
        "quality",
        "reasons",
        "batch",
    ]


def test_identity_names_a_tag_of_the_profile() -> None:
    with pytest.raises(ValueError, match=r"identity\.serial names tag 'nope'"):
        ModbusDriver.profile_model().model_validate(
            {
                "profile": "p",
                "protocol": "modbus",
                "identity": {"serial": "nope"},
                "tags": [{"name": "a", "address": 40001}],
            }
        )


def test_a_failing_identity_listener_never_fails_the_device() -> None:
    ctx = context(
        ModbusDriver,
        {"profile": "p", "protocol": "modbus", "tags": [{"name": "a", "address": 40001}]},
        {"host": "127.0.0.1"},
    )

    def broken(identity: DeviceIdentity) -> None:
        raise RuntimeError("listener bug")

    ctx.on_identity = broken
    ctx.identify(DeviceIdentity(serial="S"))
    assert ctx.identity == DeviceIdentity(serial="S")
    assert ctx.stats.errors["identity_listener_failed"] == 1


# --------------------------------------------------------------------------- Modbus


class ModbusDevice:
    """A Modbus TCP device answering reads from one address space (holding and input share it,
    so do coils and discrete inputs), refusing the addresses in ``refuse``."""

    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.bits: dict[int, bool] = {}
        self.refuse: set[int] = set()
        self.port = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    def answer(self, fc: int, address: int, count: int) -> bytes:
        if any(a in self.refuse for a in range(address, address + count)):
            return bytes([fc | 0x80, 2])
        if fc in (1, 2):
            data = bytearray((count + 7) // 8)
            for i in range(count):
                if self.bits.get(address + i):
                    data[i >> 3] |= 1 << (i & 7)
            return bytes([fc, len(data)]) + bytes(data)
        words = [self.regs.get(a, 0) for a in range(address, address + count)]
        return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *words)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                fc, address, count = struct.unpack(">BHH", await reader.readexactly(length - 1))
                reply = self.answer(fc, address, count)
                writer.write(struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._links.discard(writer)
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ModbusDevice]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for link in list(self._links):
                link.close()
            if self._handlers:  # each sees its link closed and ends
                await asyncio.wait(self._handlers, timeout=2)
            await server.wait_closed()


MODBUS_PROFILE: dict[str, Any] = {
    "profile": "identity-test",
    "protocol": "modbus",
    "groups": {"default": {"interval": "1s"}, "ident": {"interval": "1h"}},
    "identity": {"serial": "serial", "firmware": "fw", "model": "model"},
    "tags": [
        {"name": "temp", "address": 40001, "type": "int16", "scale": 0.1},
        {"name": "wide", "address": 40002, "type": "uint32"},
        {"name": "door", "address": 40004, "bit": 3},
        {"name": "valve", "address": 1},
        {"name": "switch", "address": 10002},
        {"name": "refused", "address": 40050},
        {"name": "hot", "address": 40008, "type": "int16", "range": [0, 100]},
        {"name": "nan", "address": 40009, "type": "float32"},
        {"name": "serial", "group": "ident", "address": 40101, "type": "string", "length": 8},
        {"name": "fw", "group": "ident", "address": 40105, "type": "uint16"},
        {"name": "model", "group": "ident", "address": 40106, "type": "string", "length": 4},
    ],
}


def put(dev: ModbusDevice, pdu: int, words: list[int]) -> None:
    dev.regs.update({pdu + i: w for i, w in enumerate(words)})


def honest(dev: ModbusDevice) -> None:
    put(dev, 0, [*encode(-215, DataType.INT16), *encode(70000, DataType.UINT32), 0b1000])
    put(dev, 7, [500, 0x7FC0, 0])  # 500 beyond the tag's range; a float32 NaN
    dev.bits.update({0: True, 1: False})
    put(dev, 100, encode("SN-00042", DataType.STRING, length=8))
    put(dev, 104, [312])
    put(dev, 105, encode("X9", DataType.STRING, length=4))
    dev.refuse = {49}


async def test_modbus_identity_and_raw_register_words() -> None:
    async with ModbusDevice().running() as dev:
        honest(dev)
        ctx = context(
            ModbusDriver, MODBUS_PROFILE, {"host": "127.0.0.1", "port": dev.port, "record_raw": True}
        )
        driver = ModbusDriver(ctx)
        await driver.connect()
        try:
            (block,) = await driver.read(ctx.groups["default"])
        finally:
            await driver.close()
    assert reports(ctx) == [DeviceIdentity(serial="SN-00042", firmware="312", model="X9")]
    assert ctx.stats.errors[IDENTITY_UNAVAILABLE] == 0
    values = dict(zip(block.tags, block.values, strict=True))
    raw = dict(zip(block.tags, block.raw or [], strict=True))
    assert values["temp"] == pytest.approx(-21.5) and raw["temp"] == 0xFFFF - 214  # the int16 word as sent
    assert values["wide"] == 70000 and raw["wide"] == [1, 70000 - 65536]  # one value, two registers
    assert values["door"] is True and raw["door"] == 0b1000  # a bit field's raw is its whole register
    assert raw["valve"] is True and raw["switch"] is False
    assert values["refused"] is None and raw["refused"] is None  # refused: nothing came back
    quality = dict(zip(block.tags, block.quality or [], strict=True))
    reasons = dict(zip(block.tags, block.reasons or [], strict=True))
    # bad readings the device did send keep their words: the originals a reviewer asks for
    assert (values["hot"], quality["hot"], reasons["hot"], raw["hot"]) == (
        None,
        Quality.BAD,
        "out_of_range",
        500,
    )
    assert (values["nan"], reasons["nan"], raw["nan"]) == (None, "decode_error", [0x7FC0, 0])
    assert numbered(block)["raw"] == block.raw


async def test_modbus_without_record_raw_keeps_the_payload_as_it_was() -> None:
    async with ModbusDevice().running() as dev:
        honest(dev)
        ctx = context(ModbusDriver, MODBUS_PROFILE, {"host": "127.0.0.1", "port": dev.port})
        driver = ModbusDriver(ctx)
        await driver.connect()
        try:
            (block,) = await driver.read(ctx.groups["default"])
        finally:
            await driver.close()
    assert block.raw is None and "raw" not in numbered(block)


async def test_malformed_modbus_identity_is_unknown_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fuzz-ish: garbage in the identity registers, refused ones, a missing model: whatever
    the device answers, every connect succeeds, each field is readable text or unknown, and
    the process values are still read."""
    rng = random.Random(12)
    caplog.set_level(logging.WARNING, logger="cleanroom.modbus")
    async with ModbusDevice().running() as dev:
        honest(dev)
        ctx = context(ModbusDriver, MODBUS_PROFILE, {"host": "127.0.0.1", "port": dev.port, "timeout": 0.5})
        driver = ModbusDriver(ctx)
        malformed = 0
        for _ in range(25):
            honest(dev)
            put(dev, 100, [rng.randrange(0x10000) for _ in range(4)])  # noise where the serial is
            refused = rng.random() < 0.3
            if refused:
                dev.refuse = {49, 104}  # the firmware register answers illegal address
            await driver.connect()
            try:
                (block,) = await driver.read(ctx.groups["default"])
            finally:
                await driver.close()
            got = reports(ctx)[-1]
            if refused:  # the identity registers are read together: the refusal takes them all
                assert got == DeviceIdentity()
            else:
                assert got.model == "X9" and got.firmware == "312"
                assert got.serial is None or (got.serial.isprintable() and got.serial.isascii())
            malformed += got.serial is None or refused
            assert dict(zip(block.tags, block.values, strict=True))["wide"] == 70000
    assert malformed > 10 and ctx.stats.errors[IDENTITY_UNAVAILABLE] == malformed
    assert len([r for r in caplog.records if "identity incomplete" in r.message]) == 1


async def test_modbus_identity_of_a_silent_device_does_not_fail_the_connect() -> None:
    """The identity registers time out (a map without them): the connect still succeeds."""
    async with ModbusDevice().running() as dev:
        honest(dev)
        ctx = context(ModbusDriver, MODBUS_PROFILE, {"host": "127.0.0.1", "port": dev.port, "timeout": 0.3})
        original = dev.answer

        def silent_identity(fc: int, address: int, count: int) -> bytes:
            if address >= 100:
                raise ConnectionResetError  # the device drops the request (closes the link)
            return original(fc, address, count)

        dev.answer = silent_identity  # type: ignore[method-assign]
        driver = ModbusDriver(ctx)
        await driver.connect()
        await driver.close()
    assert reports(ctx) == [DeviceIdentity()]
    assert ctx.stats.errors[IDENTITY_UNAVAILABLE] == 1


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_simulated_particle_counter_identity_and_raw_records(transport: str) -> None:
    async with serve_counter_modbus(transport=transport, speed=100, seed=4, params={"sample": 10}) as sim:
        where = {"host": sim.host, "port": sim.port} if transport == "tcp" else {"port": sim.pty_path}
        ctx = context(
            ModbusDriver,
            load_profile("particle-counter-sim-modbus"),
            {"transport": transport, **where, "timeout": 1.0, "record_raw": True},
        )
        driver = ModbusDriver(ctx)
        await driver.connect()
        try:
            blocks: list[Block] = await until(lambda: driver.read(ctx.groups["records"]), what="a record")
        finally:
            await driver.close()
    expected = DeviceIdentity(
        serial=str(serial_number(sim.device.device_id)), firmware=str(FIRMWARE), model=MODEL_NAME
    )
    assert reports(ctx) == [expected]
    assert expected.as_dict() == {"serial": expected.serial, "firmware": "112", "model": MODEL_NAME}
    block = blocks[0]
    raw = dict(zip(block.tags, block.raw or [], strict=True))
    values = dict(zip(block.tags, block.values, strict=True))
    words = raw["sample_end_ts"]
    assert isinstance(words, list) and len(words) == 2  # a uint32: its two registers, as sent
    assert (words[0] << 16 | words[1]) == values["sample_end_ts"] == block.source_ts_ns // 10**9  # type: ignore[operator]


# --------------------------------------------------------------------------- OPC UA


def opcua_profile(**identity: Any) -> dict[str, Any]:
    profile: dict[str, Any] = yaml.safe_load((PROFILES / "bioreactor-sim-opcua.yaml").read_text())
    if identity:
        profile["identity"] = identity
    return profile


def opcua_ctx(url: str, profile: dict[str, Any], **conn: Any) -> DeviceContext:
    return context(
        OpcUaDriver,
        profile,
        {"url": url, "timeout": "1s", "keepalive": "500ms", "security_policy": "None", **conn},
    )


async def connected(ctx: DeviceContext) -> OpcUaDriver:
    driver = OpcUaDriver(ctx)
    await driver.connect()
    return driver


async def test_opcua_identity_from_identification_nodes_and_build_info() -> None:
    async with serve_bioreactor_opcua(speed=60) as sim:
        ctx = opcua_ctx(sim.url, opcua_profile())
        await (await connected(ctx)).close()
        bare = opcua_ctx(sim.url, {k: v for k, v in opcua_profile().items() if k != "identity"})
        await (await connected(bare)).close()
        gateway = opcua_ctx(sim.url, opcua_profile(serial="serial_number", build_info=False))
        await (await connected(gateway)).close()
    assert reports(ctx) == [
        DeviceIdentity(serial=sim.server.serial, firmware=BR_FIRMWARE, model=BR_MODEL, vendor=MANUFACTURER)
    ]
    # BuildInfo alone: product, manufacturer, software version with its build number
    assert reports(bare) == [
        DeviceIdentity(firmware=f"{BR_FIRMWARE} (build 2041)", model=BR_MODEL, vendor=MANUFACTURER)
    ]
    assert reports(gateway) == [DeviceIdentity(serial=sim.server.serial)]
    assert ctx.stats.errors[IDENTITY_UNAVAILABLE] == bare.stats.errors[IDENTITY_UNAVAILABLE] == 0


async def test_opcua_identity_of_wrong_types_and_missing_nodes_is_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    profile = opcua_profile(serial="ghost", model="temperature_c", firmware="running", build_info=False)
    profile["tags"].append({"name": "ghost", "group": "identity", "node_id": "ns=2;s=No.Such.Node"})
    caplog.set_level(logging.WARNING, logger="cleanroom.drivers.opcua")
    async with serve_bioreactor_opcua(speed=60) as sim:
        ctx = opcua_ctx(sim.url, profile)
        driver = OpcUaDriver(ctx)  # one driver per device, reconnecting, as the scheduler runs it
        for _ in range(2):
            await driver.connect()
            try:
                (block,) = await driver.read(ctx.groups["status"])
            finally:
                await driver.close()
    assert reports(ctx) == [DeviceIdentity(), DeviceIdentity()]
    assert ctx.stats.errors[IDENTITY_UNAVAILABLE] == 2
    assert len([r for r in caplog.records if "identity incomplete" in r.message]) == 1
    assert block.quality is None or Quality.GOOD in block.quality  # the device still measures


async def test_opcua_raw_is_the_value_before_scaling_polled_and_subscribed() -> None:
    profile = opcua_profile()
    for tag in profile["tags"]:
        if tag["name"] in ("temperature_c", "ph"):
            tag["scale"], tag["range"] = 2.0, None
    async with serve_bioreactor_opcua(speed=60) as sim:
        ctx = opcua_ctx(sim.url, profile, record_raw=True)
        driver = await connected(ctx)
        got: list[Block] = []
        try:
            (polled,) = await driver.read(ctx.groups["status"])
            await driver.subscribe(ctx.groups["process"], got.append)
            await until(lambda: any("temperature_c" in b.tags for b in got), what="a notification")
        finally:
            await driver.close()
    assert polled.raw is not None
    for value, raw, q in zip(
        polled.values, polled.raw, polled.quality or [Quality.GOOD] * len(polled), strict=True
    ):
        assert q is Quality.BAD or raw == value  # unscaled: the same value
    block = next(b for b in got if "temperature_c" in b.tags)
    i = list(block.tags).index("temperature_c")
    assert block.raw is not None and isinstance(block.raw[i], float)
    assert block.values[i] == pytest.approx(2 * block.raw[i])  # type: ignore[operator]


ODD_SENT: dict[str, tuple[ua.Variant, int]] = {
    # tag: (what the server sends, its status); a server sends no value with a bad status
    "empty": (ua.Variant(21.5, ua.VariantType.Double), ua.StatusCodes.BadSensorFailure),
    "nan": (ua.Variant(math.nan, ua.VariantType.Double), 0),
    "minus_inf": (ua.Variant(-math.inf, ua.VariantType.Double), 0),
    "array": (ua.Variant([1.0, 2.0], ua.VariantType.Double), 0),
    "doubtful": (ua.Variant(7.0, ua.VariantType.Double), ua.StatusCodes.UncertainLastUsableValue),
}


async def test_opcua_raw_keeps_what_the_server_sent_for_bad_readings() -> None:
    """An unusable value makes the reading bad; what the server sent stays in ``raw`` (a
    non-finite double by name: payloads are strict JSON), null only where it sent nothing (a
    bad status: the server nulls the value) or nothing a payload can hold (an array)."""
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:cleanroom-test:raw")
    nodes = {
        name: (await server.nodes.objects.add_variable(ua.NodeId(name, ns), name, 0.0)).nodeid
        for name in ODD_SENT
    }
    async with server:
        for name, (variant, status) in ODD_SENT.items():
            await server.write_attribute_value(
                nodes[name], ua.DataValue(Value=variant, StatusCode=ua.StatusCode(status))
            )
        profile = {
            "profile": "raw-test",
            "protocol": "opcua",
            "groups": {"default": {"interval": "1s"}},
            "tags": [
                {"name": name, "node_id": f"nsu=urn:cleanroom-test:raw;s={name}", "scale": 10.0}
                for name in ODD_SENT
            ],
        }
        ctx = opcua_ctx(f"opc.tcp://127.0.0.1:{port}", profile, record_raw=True)
        driver = await connected(ctx)
        try:
            (block,) = await driver.read(ctx.groups["default"])
        finally:
            await driver.close()
    assert block.raw is not None and block.quality is not None and block.reasons is not None
    got = {
        t: (v, str(q), why, r)
        for t, v, q, why, r in zip(
            block.tags, block.values, block.quality, block.reasons, block.raw, strict=True
        )
    }
    assert got == {
        "empty": (None, "bad", "BadSensorFailure", None),
        "nan": (None, "bad", "decode_error", "NaN"),
        "minus_inf": (None, "bad", "decode_error", "-Infinity"),
        "array": (None, "bad", "unsupported_type", None),
        "doubtful": (pytest.approx(70.0), "uncertain", "UncertainLastUsableValue", 7.0),
    }
    assert dumps(numbered(block))  # strict JSON: would raise on a NaN


def test_opcua_raw_keeps_a_value_sent_with_a_bad_status() -> None:
    """A server that breaks the rule and sends a value with a bad status: the reading is bad,
    the value it sent is the original and stays in ``raw``."""
    group = build_groups(
        "dev",
        OpcUaDriver.profile_model().model_validate(
            {
                "profile": "p",
                "protocol": "opcua",
                "tags": [{"name": "t", "node_id": "ns=2;s=t", "scale": 2.0}],
            }
        ),
        OpcUaDriver.Connection.model_validate({"url": "opc.tcp://127.0.0.1:4840", "security_policy": "None"}),
        {},
    )["default"]
    conv = Converted(1)
    conv.set(
        0,
        ua.DataValue(
            Value=ua.Variant(21.5, ua.VariantType.Double),
            StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure),
        ),
    )
    block = conv.finish(group, 1, record_raw=True)
    assert (block.values, block.reasons, block.raw) == ([None], ["BadSensorFailure"], [21.5])
    assert conv.finish(group, 1).raw is None  # without record_raw nothing changes


# --------------------------------------------------------------------------- serial counter


def serial_ctx(path: str, **conn: Any) -> DeviceContext:
    profile = yaml.safe_load((PROFILES / "particle-counter-sim-serial.yaml").read_text())
    profile["groups"]["records"]["mode"] = "poll"
    return context(SerialCounterDriver, profile, {"port": path, "timeout": "500ms", **conn})


async def test_simulated_serial_counter_identity_and_raw_fields() -> None:
    async with serve_counter_serial(speed=1200, seed=3) as sim:
        await asyncio.sleep(0.2)  # the counter queues a few one-minute records
        ctx = serial_ctx(sim.pty_path, record_raw=True)
        driver = SerialCounterDriver(ctx)
        await driver.connect()
        try:
            blocks: list[Block] = await until(lambda: driver.read(ctx.groups["records"]), what="a record")
        finally:
            await driver.close()
    assert reports(ctx) == [DeviceIdentity(serial=sim.server.serial)]
    block = blocks[0]
    raw = dict(zip(block.tags, block.raw or [], strict=True))
    values = dict(zip(block.tags, block.values, strict=True))
    assert raw["count_0_5um"] == values["count_0_5um"] and isinstance(raw["count_0_5um"], int)
    assert raw["conc_0_5um_per_m3"] == values["count_0_5um"]  # the count the concentration came from
    assert raw["volume_l"] == "28.3 L" and values["volume_l"] == pytest.approx(28.3)
    assert raw["laser_ok"] == str(values["laser_ok"]) and raw["sample_time_s"] == "60"


class OddCounter(CounterPeer):
    """A counter whose ``CSN`` answer is ``csn`` (``None``: it does not know the command)."""

    def __init__(self, csn: str | None) -> None:
        super().__init__([record(0), record(1)])
        self.csn = csn

    def _reply(self, cmd: str) -> str:
        if cmd == "CSN":
            return "ERR UNKNOWN" if self.csn is None else self.csn
        return super()._reply(cmd)


@pytest.mark.parametrize(
    "csn", [None, "RSN", "RSN " + "9" * 400, "RSN \x7f\x01"], ids=["unknown", "empty", "long", "control"]
)
async def test_serial_counter_without_a_usable_serial_still_drains(csn: str | None) -> None:
    peer = OddCounter(csn)
    try:
        ctx = serial_ctx(peer.path)
        driver = SerialCounterDriver(ctx)
        await driver.connect()
        try:
            (block,) = await driver.read(ctx.groups["records"])
        finally:
            await driver.close()
    finally:
        peer.close()
    assert reports(ctx) == [DeviceIdentity()] and driver.serial_number is None
    assert ctx.stats.errors[IDENTITY_UNAVAILABLE] == 1
    assert block.state is not None and block.state["serial"] == ""
    assert dict(zip(block.tags, block.values, strict=True))["count_0_5um"] == 4


async def test_serial_counter_with_unknown_serial_keeps_the_committed_watermark() -> None:
    """The committed record (its digest covers the serial number in its text) is popped, not
    emitted again, even though the counter cannot say its serial number this time."""
    peer = OddCounter(None)
    try:
        state = {"serial": "LSR-SIM-000123", "last_digest": "", "last_ts": ""}
        ctx = serial_ctx(peer.path)
        first = SerialCounterDriver(ctx)
        await first.connect()
        (block,) = await first.read(ctx.groups["records"])
        await first.close()
        assert block.state is not None
        state.update(block.state, serial="LSR-SIM-000123")  # committed by a run that knew the serial
        again = context(
            SerialCounterDriver, ctx.profile.model_dump(), {"port": peer.path, "timeout": "500ms"}
        )
        again.state = state
        second = SerialCounterDriver(again)
        await second.connect()
        try:
            (nxt,) = await second.read(again.groups["records"])
        finally:
            await second.close()
    finally:
        peer.close()
    assert nxt.source_ts_ns != block.source_ts_ns and "CPQ" in peer.commands


@pytest.mark.parametrize(("laser", "flow"), [(0, 1), (1, 0)], ids=["laser_fault", "flow_fault"])
async def test_serial_counter_raw_keeps_the_counts_of_a_faulted_record(laser: int, flow: int) -> None:
    """The status bits make the counts (laser) or concentrations (flow) bad; the counts the
    record holds are still what the counter said, and ``raw`` keeps them."""
    peer = CounterPeer([record(0, counts=(12, 4, 1, 0), laser=laser, flow=flow)])
    try:
        ctx = serial_ctx(peer.path, record_raw=True)
        driver = SerialCounterDriver(ctx)
        await driver.connect()
        try:
            (block,) = await driver.read(ctx.groups["records"])
        finally:
            await driver.close()
    finally:
        peer.close()
    values = dict(zip(block.tags, block.values, strict=True))
    quality = dict(zip(block.tags, [str(q) for q in block.quality or []], strict=True))
    raw = dict(zip(block.tags, block.raw or [], strict=True))
    bad = "count_0_5um" if laser == 0 else "conc_0_5um_per_m3"
    assert (values[bad], quality[bad], raw[bad]) == (None, "bad", 4)
    assert raw["count_5_0um"] == 0 and raw["laser_ok"] == str(laser) and raw["flow_ok"] == str(flow)
