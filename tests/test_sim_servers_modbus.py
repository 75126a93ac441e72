"""Modbus TCP front end against a reference client (pymodbus), decoding with pymodbus's
own converters, not our codec: profile, server and codec must agree with a third party."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from cleanroom_common.modbus import locate
from cleanroom_common.profilefiles import load_profile
from simulators.servers.faults import CommFault
from simulators.servers.modbus import ModbusSim, serve_bioreactor_modbus

DT = AsyncModbusTcpClient.DATATYPE
_TYPES = {
    "int16": DT.INT16,
    "uint16": DT.UINT16,
    "int32": DT.INT32,
    "uint32": DT.UINT32,
    "float32": DT.FLOAT32,
}


def reference_decode(tag: dict[str, Any], regs: list[int]) -> float | bool:
    """Decode one tag from a table dump (index = PDU address) the way a third-party client would."""
    _, start = locate(tag["address"], tag["table"])
    if "bit" in tag:
        return bool((regs[start] >> tag["bit"]) & 1)
    dtype = _TYPES[tag["type"]]
    words = regs[start : start + dtype.value[1]]
    assert tag.get("word_order", "ABCD") in ("ABCD", "CDAB")
    order = "little" if tag.get("word_order") == "CDAB" else "big"
    raw = AsyncModbusTcpClient.convert_from_registers(words, dtype, word_order=order)
    assert isinstance(raw, int | float)
    return raw * tag.get("scale", 1.0) + tag.get("offset", 0.0)


def resolution(tag: dict[str, Any], value: float) -> float:
    """How close the wire value must be: half a count of a scaled integer, float32 rounding."""
    if tag["type"].startswith(("int", "uint")):
        return abs(tag.get("scale", 1.0)) / 2 + 1e-9
    return abs(value) * 1e-6 + 1e-9


async def read_table(client: AsyncModbusTcpClient, table: str, count: int, unit: int = 1) -> list[int]:
    fn = client.read_input_registers if table == "input" else client.read_holding_registers
    rr = await fn(0, count=count, device_id=unit)
    assert not rr.isError(), rr
    return list(rr.registers)


@contextlib.asynccontextmanager
async def client_for(sim: ModbusSim, wait_s: float = 1.0) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port or 0, timeout=wait_s, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


def assert_matches_model(
    profile: dict[str, Any], tables: dict[str, list[int]], values: dict[str, Any]
) -> int:
    checked = 0
    for tag in profile["tags"]:
        got = reference_decode(tag, tables[tag["table"]])
        want = values[tag["name"]]
        if "bit" in tag:
            assert got is bool(want), tag["name"]
        else:
            assert abs(got - want) <= resolution(tag, want), (tag["name"], got, want)
        checked += 1
    return checked


async def test_bioreactor_registers_are_the_model_at_the_same_instant() -> None:
    profile = load_profile("bioreactor-sim")
    async with serve_bioreactor_modbus(port=0, speed=3600, seed=7) as sim, client_for(sim) as client:
        await asyncio.sleep(0.2)  # a few simulated minutes: values move away from their initial state
        for _ in range(3):
            inputs = await read_table(client, "input", 31)
            # the model is only advanced when a request arrives, so it still holds the served instant
            values = {**sim.model.signals(), **sim.model.status(), **sim.model.setpoints()}
            holding = await read_table(client, "holding", 3)
            assert assert_matches_model(profile, {"input": inputs, "holding": holding}, values) == 29
        assert sim.model.signals()["culture_day"] > 0.005


async def test_setpoint_write_reaches_the_model_and_range_is_enforced() -> None:
    async with serve_bioreactor_modbus(port=0, speed=1, seed=1) as sim, client_for(sim) as client:
        rr = await client.write_register(0, 3650, device_id=1)  # 36.50 °C
        assert not rr.isError()
        assert sim.model.setpoints()["temperature_setpoint_c"] == pytest.approx(36.5)
        bad = await client.write_register(0, 9000, device_id=1)  # 90 °C: refused by the device
        assert bad.isError() and bad.exception_code == 3
        assert sim.model.setpoints()["temperature_setpoint_c"] == pytest.approx(36.5)
        both = await client.write_registers(1, [7100, 300], device_id=1)  # pH 7.1, DO 30 %
        assert not both.isError()
        assert sim.model.setpoints()["ph_setpoint"] == pytest.approx(7.1)
        assert sim.model.setpoints()["do_setpoint_pct"] == pytest.approx(30.0)
        outside = await client.read_input_registers(200, count=2, device_id=1)
        assert outside.isError() and outside.exception_code == 2


async def test_gateway_serves_several_units_with_their_own_process() -> None:
    async with serve_bioreactor_modbus(port=0, speed=600, seed=3, unit_ids=(1, 2, 5)) as sim:
        async with client_for(sim) as client:
            await asyncio.sleep(0.1)
            dumps = {u: await read_table(client, "input", 31, unit=u) for u in (1, 2, 5)}
            assert len({tuple(d) for d in dumps.values()}) == 3  # independent noise per device
            missing = await client.read_input_registers(0, count=1, device_id=9)
            assert missing.isError() and missing.exception_code == 0x0B  # gateway: target failed
        assert sorted(d.device_id for d in sim.devices.values()) == [
            "bioreactor-1",
            "bioreactor-2",
            "bioreactor-5",
        ]


async def test_comm_faults_are_seen_by_the_client_and_clear_again() -> None:
    async with serve_bioreactor_modbus(port=0, speed=1, seed=1) as sim:
        faults = sim.device.faults
        faults.force(CommFault.EXCEPTION, code=6)
        async with client_for(sim) as client:
            rr = await client.read_input_registers(0, count=4, device_id=1)
            assert rr.isError() and rr.exception_code == 6
        faults.force(CommFault.TIMEOUT)
        async with client_for(sim, wait_s=0.3) as client:
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(0, count=4, device_id=1)
        faults.force(CommFault.GARBLED)
        async with client_for(sim, wait_s=0.3) as client:
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(0, count=4, device_id=1)
        faults.force(CommFault.DISCONNECT)
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        writer.write(bytes.fromhex("000100000006010400000004"))  # read 4 input registers, unit 1
        assert await asyncio.wait_for(reader.read(100), 2) == b""  # closed without a reply
        writer.close()
        faults.force(None)
        async with client_for(sim) as client:
            rr = await client.read_input_registers(0, count=4, device_id=1)
            assert not rr.isError() and len(rr.registers) == 4


async def test_scheduled_fault_window_in_simulated_time() -> None:
    # at 100x, simulated 0..20 s is healthy, 20..60 s times out: 0.2..0.6 wall seconds
    faults = ["comm_exception=4@20s+40s"]
    async with serve_bioreactor_modbus(port=0, speed=100, faults=faults) as sim, client_for(sim) as client:
        assert not (await client.read_input_registers(0, count=1, device_id=1)).isError()
        await asyncio.sleep(0.35)
        rr = await client.read_input_registers(0, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 4
        await asyncio.sleep(0.4)
        assert not (await client.read_input_registers(0, count=1, device_id=1)).isError()


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "bioreactor",
            "--port",
            "0",
            "--speed",
            "60",
            "--unit-id",
            "1,2",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].split()[:3] == ["bioreactor-1", "bioreactor", "modbus-tcp"]
        port = int(lines[1].split()[3].rsplit(":", 1)[1])

        async def read() -> list[int]:
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
            await client.connect()
            try:
                rr = await client.read_input_registers(0, count=2, device_id=2)
                return list(rr.registers)
            finally:
                client.close()

        temperature, ph = asyncio.run(read())
        assert 3500 < temperature < 3900 and 6800 < ph < 7600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_arguments_cleanly() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "simulators.cli", "bioreactor", "--fault", "comm_nonsense@1s"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode == 2
    assert "unknown fault" in out.stderr and "Traceback" not in out.stderr


async def test_malformed_requests_get_exceptions_and_the_connection_survives() -> None:
    async with serve_bioreactor_modbus(port=0) as sim:
        reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        try:

            async def ask(hex_frame: str) -> bytes:
                writer.write(bytes.fromhex(hex_frame))
                return await asyncio.wait_for(reader.read(260), 2)

            assert (await ask("000100000002015500")).hex() == "00010000000301d501"  # unknown function: 1
            short_rw = await ask("0002000000050117000000")  # read/write multiple, cut short
            assert short_rw[7] == 0x97 and short_rw[8] == 1
            ok = await ask("000300000006010400000002")  # read 2 input registers still works
            assert ok[:9].hex() == "000300000007010404"
        finally:
            writer.close()
