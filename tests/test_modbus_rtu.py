"""Modbus RTU over a real pty pair: several units on one serial bus share one port, a
silent unit costs the others no more than its timeout, line noise (CRC errors, garbage)
becomes bad readings, and the bus keeps working afterwards.

The far end of the pty is a small RTU responder written here (frames, CRC and all), so
a test can make one unit silent or corrupt one reply; the driver side is the real
pymodbus RTU client on pyserial.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from typing import Any

import pytest

from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.records import Block
from cleanroom_common.profilefiles import load_profile
from drivers.modbus import bus as buses
from drivers.modbus.driver import Connection, ModbusDriver
from simulators.servers.modbus import serve_counter_modbus, serve_incubator_modbus
from tests.support import PtyPeer, crc


class RtuLine(PtyPeer):
    """Answers read-holding-register requests for its units."""

    def __init__(self, units: dict[int, list[int]]) -> None:
        super().__init__()
        self.units = units
        self.silent: set[int] = set()
        self.corrupt: list[bytes] = []  # replacement replies, used once each
        self.wire: list[tuple[str, float]] = []  # ("request" | "reply", time), in order

    def answer(self, request: bytes) -> bytes | None:
        unit, fc, address, count = struct.unpack(">BBHH", request[:6])
        self.wire.append(("request", time.monotonic()))
        if unit in self.silent or unit not in self.units:
            return None
        regs = self.units[unit][address : address + count]
        body = bytes([unit, fc, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)
        return self.corrupt.pop(0) if self.corrupt else body + crc(body)

    def send(self, reply: bytes) -> None:
        super().send(reply)
        self.wire.append(("reply", time.monotonic()))


def rtu_driver(path: str, unit: int, **conn: Any) -> ModbusDriver:
    profile = ModbusDriver.profile_model().model_validate(
        {
            "profile": "rtu",
            "protocol": "modbus",
            "tags": [{"name": "a", "address": 40001}, {"name": "b", "address": 40002, "type": "int16"}],
        }
    )
    connection = Connection.model_validate(
        {
            "transport": "rtu",
            "port": path,
            "unit_id": unit,
            "baudrate": 19200,
            "timeout": 0.3,
            "retries": 0,
            **conn,
        }
    )
    device = f"unit{unit}"
    return ModbusDriver(
        DeviceContext(
            id=device,
            profile=profile,
            connection=connection,
            groups=build_groups(device, profile, connection, {}),
        )
    )


async def poll(driver: ModbusDriver) -> Block:
    (block,) = await driver.read(driver.ctx.groups["default"])
    return block


async def test_units_share_one_port_and_a_silent_unit_does_not_starve_the_others() -> None:
    line = RtuLine({1: [11, 0xFFFF], 2: [22, 2], 3: [33, 3]})
    line.silent.add(3)
    async with line.running():
        drivers = [rtu_driver(line.path, unit, request_delay=0.02) for unit in (1, 2, 3)]
        for d in drivers:
            await d.connect()
        try:
            assert len({id(d._bus) for d in drivers}) == 1  # one serial port, opened once
            # Each good unit must finish within its own timeout plus the one silent request
            # that may hold the bus when it asks: bounded, not starved.
            bound = 0.3 + 0.3 + 0.1
            results = await asyncio.gather(
                asyncio.wait_for(poll(drivers[0]), bound),
                asyncio.wait_for(poll(drivers[1]), bound),
                poll(drivers[2]),
                return_exceptions=True,
            )
            again = await asyncio.wait_for(poll(drivers[0]), bound)
        finally:
            for d in drivers:
                await d.close()
    one, two, three = results
    assert isinstance(one, Block) and one.values == [11, -1]
    assert isinstance(two, Block) and two.values == [22, 2]
    assert isinstance(three, DeviceError) and three.reason == "timeout"
    assert again.values == [11, -1]
    assert not buses._BUSES  # last device closed the port
    # Requests on the bus never overlap, and the next frame waits out the request delay.
    pairs = list(zip(line.wire, line.wire[1:], strict=False))
    assert all(not (a == "request" == b and t2 - t1 < 0.29) for (a, t1), (b, t2) in pairs)
    gaps = [t2 - t1 for (a, t1), (b, t2) in pairs if (a, b) == ("reply", "request")]
    assert len(gaps) >= 2 and min(gaps) >= 0.015


@pytest.mark.parametrize(
    "noise",
    [
        bytes([1, 3, 4, 0, 11, 0, 1]) + b"\x00\x00",  # CRC wrong
        b"\xfe\xed\xfa\xce\x00\x01",  # garbage
        bytes([1, 3, 4, 0, 11]),  # truncated frame
    ],
    ids=["crc", "garbage", "truncated"],
)
async def test_line_noise_is_a_bad_reading_and_the_bus_recovers(noise: bytes) -> None:
    line = RtuLine({1: [5, 6]})
    line.corrupt.append(noise)
    async with line.running():
        driver = rtu_driver(line.path, 1)
        await driver.connect()
        try:
            bad = await poll(driver)
            good = await poll(driver)
        finally:
            await driver.close()
    assert bad.values == [None, None] and bad.reasons == ["comm_error", "comm_error"]
    assert driver.ctx.stats.errors["garbled"] == 1
    assert good.values == [5, 6] and good.quality is None


async def test_missing_serial_port_is_a_clean_connect_error(tmp_path: Any) -> None:
    driver = rtu_driver(str(tmp_path / "ttyUSB9"), 1)
    with pytest.raises(DeviceError) as err:
        await driver.connect()
    assert err.value.reason == "not_connected"
    assert not buses._BUSES


def test_rtu_devices_on_one_port_must_agree_on_line_settings() -> None:
    async def scenario() -> None:
        a = rtu_driver("/dev/ttyFAKE0", 1)
        b = rtu_driver("/dev/ttyFAKE0", 2, baudrate=9600)
        bus = buses.acquire_bus(a.conn)
        try:
            with pytest.raises(DeviceError, match="disagree on line settings"):
                buses.acquire_bus(b.conn)
        finally:
            buses.release_bus(bus)

    asyncio.run(scenario())
    assert not buses._BUSES


def test_inter_frame_gap_follows_the_baud_rate() -> None:
    def gap(**kw: Any) -> float:
        return Connection.model_validate({"transport": "rtu", "port": "/dev/x", **kw}).frame_gap_s()

    assert gap(baudrate=9600) == pytest.approx(3.5 * 10 / 9600)
    assert gap(baudrate=9600, parity="E") == pytest.approx(3.5 * 11 / 9600)
    assert gap(baudrate=115200) == pytest.approx(0.00175)  # fixed above 19200 bit/s
    assert Connection.model_validate({"host": "h"}).frame_gap_s() == 0.0


async def test_simulated_incubators_share_one_rtu_bus() -> None:
    """Two BINDER-like incubators (floats low word first) on the simulator's RTU bus."""
    async with serve_incubator_modbus(transport="rtu", unit_ids=(1, 2), seed=2) as sim:
        assert sim.pty_path is not None
        profile = ModbusDriver.profile_model().model_validate(load_profile("incubator-sim-rtu"))
        drivers = []
        for unit in (1, 2):
            connection = Connection.model_validate(
                {"transport": "rtu", "port": sim.pty_path, "unit_id": unit, "baudrate": 9600, "timeout": 1.0}
            )
            groups = build_groups(f"inc{unit}", profile, connection, {})
            drivers.append(ModbusDriver(DeviceContext(f"inc{unit}", profile, connection, groups)))
        for d in drivers:
            await d.connect()
        try:
            blocks = await asyncio.gather(*(d.read(d.ctx.groups["process"]) for d in drivers))
        finally:
            for d in drivers:
                await d.close()
    for (block,) in blocks:
        assert block.quality is None, block.reasons
        temperature = dict(zip(block.tags, block.values, strict=True))["temperature_c"]
        assert isinstance(temperature, float) and 30 < temperature < 40


async def test_simulated_particle_counter_records_over_rtu() -> None:
    """Records mode over a serial line: select-then-read pairs stay paired on the bus."""
    async with serve_counter_modbus(transport="rtu", speed=100, seed=4, params={"sample": 10}) as sim:
        assert sim.pty_path is not None
        profile = ModbusDriver.profile_model().model_validate(load_profile("particle-counter-sim-modbus"))
        connection = Connection.model_validate({"transport": "rtu", "port": sim.pty_path, "timeout": 1.0})
        driver = ModbusDriver(
            DeviceContext("pc", profile, connection, build_groups("pc", profile, connection, {}))
        )
        await driver.connect()
        try:
            first: list[Block] = []
            for _ in range(100):  # the first sample completes 0.1 s after start
                first = await driver.read(driver.ctx.groups["records"])
                if first:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.4)
            later = await driver.read(driver.ctx.groups["records"])
        finally:
            await driver.close()
    stamps = [b.source_ts_ns for b in first + later]
    assert len(stamps) >= 3
    assert {b - a for a, b in itertools.pairwise(stamps)} == {10 * 10**9}
    assert all(b.quality is None for b in first + later)
