"""Modbus RTU on a pty (several incubators on one bus, floats low word first) and the
particle counter's record map, each against the pymodbus client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from cleanroom_common.profilefiles import load_profile
from simulators.servers.counter import CMD_CLEAR, CMD_SET_CLOCK, CMD_START, CMD_STOP, NEWEST
from simulators.servers.faults import CommFault
from simulators.servers.modbus import serve_counter_modbus, serve_incubator_modbus
from tests.test_sim_servers_modbus import assert_matches_model

F32 = AsyncModbusSerialClient.DATATYPE.FLOAT32


async def test_incubators_share_one_rtu_bus_with_low_word_first_floats(tmp_path: Path) -> None:
    link = tmp_path / "bus"
    profile = load_profile("incubator-sim-rtu")
    async with serve_incubator_modbus(
        transport="rtu", speed=600, seed=3, unit_ids=(1, 2, 3), pty_link=link
    ) as sim:
        client = AsyncModbusSerialClient(str(link), baudrate=9600, timeout=0.5, retries=0)
        assert await client.connect()
        try:
            await asyncio.sleep(0.2)
            seen = []
            for unit in (1, 2, 3):
                rr = await client.read_holding_registers(0, count=36, device_id=unit)
                assert not rr.isError(), rr
                device = sim.devices[unit]
                values = {**device.model.signals(), **device.model.status(), **device.model.setpoints()}
                assert assert_matches_model(profile, {"holding": rr.registers}, values) == len(
                    profile["tags"]
                )
                low_word_first = client.convert_from_registers(rr.registers[0:2], F32, word_order="little")
                assert low_word_first == pytest.approx(values["temperature_c"], rel=1e-6)
                seen.append(tuple(rr.registers[:14]))
            assert len(set(seen)) == 3  # three incubators, three processes

            # a setpoint written as a CDAB float reaches that unit only
            words = client.convert_to_registers(36.0, F32, word_order="little")
            assert not (await client.write_registers(30, words, device_id=2)).isError()
            assert sim.devices[2].model.setpoints()["temperature_setpoint_c"] == pytest.approx(36.0)
            assert sim.devices[1].model.setpoints()["temperature_setpoint_c"] == pytest.approx(37.0)
            half = await client.write_registers(30, words[:1], device_id=2)
            assert half.isError() and half.exception_code == 3

            # an absent unit is silent on a bus; a faulted one too; the others keep answering
            with pytest.raises(ModbusIOException):
                await client.read_holding_registers(0, count=2, device_id=9)
            sim.devices[3].faults.force(CommFault.GARBLED)
            with pytest.raises(ModbusIOException):  # CRC error: the client discards the frame
                await client.read_holding_registers(0, count=2, device_id=3)
            sim.devices[3].faults.force(CommFault.TIMEOUT)
            with pytest.raises(ModbusIOException):
                await client.read_holding_registers(0, count=2, device_id=3)
            sim.devices[3].faults.force(CommFault.EXCEPTION)
            rr = await client.read_holding_registers(0, count=2, device_id=3)
            assert rr.isError() and rr.exception_code == 4
            rr = await client.read_holding_registers(0, count=2, device_id=1)
            assert not rr.isError()
        finally:
            client.close()
    assert not link.exists()


async def read_record(client: AsyncModbusTcpClient, index: int) -> list[int]:
    assert not (await client.write_register(24, index, device_id=1)).isError()
    rr = await client.read_input_registers(0, count=16, device_id=1)
    assert not rr.isError()
    return list(rr.registers)


def u32(hi: int, lo: int) -> int:
    return (hi << 16) | lo


async def test_counter_record_buffer_by_index_and_commands() -> None:
    async with serve_counter_modbus(port=0, speed=3000, seed=9) as sim:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim.port or 0, timeout=1, retries=0)
        assert await client.connect()
        try:
            await asyncio.sleep(0.25)
            status = (await client.read_holding_registers(0, count=36, device_id=1)).registers
            count = status[23]
            assert count >= 3 and status[2] & 0b101 == 0b101  # running (b0), new data (b2)
            assert status[0] == 1 and status[22] == 2830  # map version, flow 28.30 L/min
            records = sim.model.records()
            for i in range(3):  # positions 0.. are the oldest records, in order
                regs = await read_record(client, i)
                rec = records[i]
                assert u32(regs[0], regs[1]) == rec.timestamp_s
                assert u32(regs[2], regs[3]) == 60
                assert [u32(regs[j], regs[j + 1]) for j in (8, 10, 12, 14)] == list(rec.counts)
                assert regs[7] & 0b11 == 0  # laser and flow fine
            newest = await read_record(client, NEWEST)
            assert u32(newest[0], newest[1]) == sim.model.records()[-1].timestamp_s
            assert (await client.read_holding_registers(24, count=1, device_id=1)).registers == [NEWEST]
            beyond = await read_record(client, 2999)
            assert beyond == [0] * 16

            # commands: stop, clear, set clock, start: records follow the device clock
            assert not (await client.write_register(1, CMD_STOP, device_id=1)).isError()
            assert not sim.model.running
            assert not (await client.write_register(1, CMD_CLEAR, device_id=1)).isError()
            assert (await client.read_holding_registers(23, count=1, device_id=1)).registers == [0]
            target = 2_000_000_000
            await client.write_registers(34, [target >> 16, target & 0xFFFF], device_id=1)
            assert not (await client.write_register(1, CMD_SET_CLOCK, device_id=1)).isError()
            assert not (await client.write_register(1, CMD_START, device_id=1)).isError()
            await asyncio.sleep(0.1)
            regs = await read_record(client, 0)
            assert target < u32(regs[0], regs[1]) < target + 3600
            bad = await client.write_register(1, 99, device_id=1)
            assert bad.isError() and bad.exception_code == 3
            readonly = await client.write_register(2, 1, device_id=1)  # status word
            assert readonly.isError() and readonly.exception_code == 2
        finally:
            client.close()
