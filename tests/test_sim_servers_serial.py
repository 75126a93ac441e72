"""Serial ASCII counter over a real pty, driven with pyserial as a host would."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path

import serial

from simulators.servers.faults import CommFault
from simulators.servers.serial_ascii import SerialSim, serve_counter_serial

DOC = Path(__file__).resolve().parents[1] / "docs" / "simulators.md"


def xor(payload: bytes) -> str:
    return f"{reduce(lambda a, b: a ^ b, payload, 0):02X}"


def parse(line: bytes) -> str:
    """Check framing and checksum independently of the server's code; return the payload."""
    assert line.endswith(b"\r\n"), line
    payload, star, cs = line[:-2].rpartition(b"*")
    assert star and xor(payload) == cs.decode(), line
    return payload.decode()


async def talk(sim: SerialSim, commands: list[str], wait_s: float = 1.0) -> list[bytes]:
    def run() -> list[bytes]:
        with serial.Serial(sim.pty_path, 9600, timeout=wait_s) as port:
            out = []
            for c in commands:
                port.write(c.encode() + b"\r\n")
                out.append(port.readline())
            return out

    return await asyncio.to_thread(run)


async def wait_records(sim: SerialSim, n: int) -> None:
    for _ in range(200):
        sim.device.now()  # the model only moves when someone looks
        if len(sim.model.records()) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} records")


async def test_records_drain_oldest_first_and_match_the_model() -> None:
    async with serve_counter_serial(speed=3000, seed=4) as sim:
        await wait_records(sim, 4)
        sn, qc = (parse(x) for x in await talk(sim, ["CSN", "CQC"]))
        assert re.fullmatch(r"RSN LSR-SIM-\d{6}", sn)
        queued = int(qc.split()[1])
        assert queued >= 4
        model_records = {r.timestamp_s: r for r in sim.model.records()}
        lines = await talk(sim, ["CTD2", "CTD2", "CPQ", "CTD2", "CPQ"])
        first, again, popped, second, _ = (parse(x) for x in lines)
        assert first == again  # CTD2 peeks, only CPQ removes
        assert re.fullmatch(r"RPQ \d+", popped)
        stamps = []
        for line in (first, second):
            assert line.startswith("RTD2 ")
            f = line[5:].split(",")
            ts = int(datetime.strptime(f"{f[0]} {f[1]}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
            rec = model_records[ts]
            assert f[2] == "particle-counter-1" and f[3] == sn[4:]
            assert (f[4], f[5], f[6]) == ("1", "1", "1")
            assert f[7] == "60" and f[8] == "28.3" and f[9] == "L" and f[10] == "4"
            pairs = list(zip(f[11::2], f[12::2], strict=True))
            assert [p[0] for p in pairs] == ["0.3", "0.5", "1.0", "5.0"]
            assert tuple(int(p[1]) for p in pairs) == rec.counts
            stamps.append(ts)
        assert stamps[1] - stamps[0] == 60  # consecutive one-minute samples, oldest first


async def test_empty_queue_unknown_command_and_checksummed_commands() -> None:
    async with serve_counter_serial(speed=1, seed=1, params={"auto_start": False}) as sim:
        replies = [parse(x) for x in await talk(sim, ["CTD2", "CPQ", "CQC*51", "CQC*00", "HELLO", "CST"])]
        assert replies == ["RND2", "RPQ 0", "RQC 0", "ERR CHECKSUM", "ERR UNKNOWN", "RST 0 0 0"]
        assert [parse(x) for x in await talk(sim, ["CSS", "CSP"])] == ["RSS 1", "RSP 1"]
        assert sim.model.running is False


async def test_full_queue_drops_oldest_and_counts_the_loss() -> None:
    async with serve_counter_serial(speed=6000, seed=2) as sim:
        sim.server.queue.capacity = 3
        await wait_records(sim, 6)
        running, queued, lost = parse((await talk(sim, ["CST"]))[0]).split()[1:]
        assert running == "1" and queued == "3" and int(lost) >= 3
        newest = sim.model.records()[-1]
        assert [r.index for r in sim.server.queue.queue][-1] == newest.index


async def test_comm_faults_on_the_line() -> None:
    async with serve_counter_serial(speed=1, seed=1) as sim:
        faults = sim.device.faults
        faults.force(CommFault.TIMEOUT)
        assert await talk(sim, ["CQC"], wait_s=0.3) == [b""]
        faults.force(CommFault.EXCEPTION)
        assert parse((await talk(sim, ["CQC"]))[0]) == "ERR BUSY"
        faults.force(CommFault.GARBLED)
        (line,) = await talk(sim, ["CSN"])
        payload, _, cs = line[:-2].rpartition(b"*")
        assert line.endswith(b"\r\n") and xor(payload) != cs.decode()  # detectably corrupt
        faults.force(CommFault.DISCONNECT)
        assert await talk(sim, ["CSN"], wait_s=0.3) == [b""]
        faults.force(None)
        assert parse((await talk(sim, ["CSN"]))[0]).startswith("RSN ")


async def test_pty_link_and_garbage_input_do_not_break_the_server(tmp_path: Path) -> None:
    link = tmp_path / "counter"
    async with serve_counter_serial(speed=1, pty_link=link) as sim:

        def noise() -> list[bytes]:
            assert os.path.realpath(link) == os.path.realpath(sim.pty_path)
            with serial.Serial(str(link), 9600, timeout=0.5) as port:
                port.write(bytes(range(256)) * 3)  # junk, some of it line ends
                port.write(b"\r\n\xff\xfe\r\nCSN\r\n")
                lines = []
                while (line := port.readline()) and len(lines) < 50:
                    lines.append(line)
                return lines

        lines = await asyncio.to_thread(noise)
        replies = [parse(x) for x in lines]  # every reply, even to junk, is framed and checksummed
        assert replies[-1].startswith("RSN ")
        assert set(replies[:-1]) <= {"ERR UNKNOWN", "ERR CHECKSUM"}
    assert not link.exists()


async def test_non_ascii_before_a_checksum_is_refused_not_a_crash() -> None:
    async with serve_counter_serial(speed=1) as sim:

        def run() -> list[bytes]:
            with serial.Serial(sim.pty_path, 9600, timeout=1.0) as port:
                port.write(b"\xffCQC*00\r\nCSN\r\n")
                return [port.readline(), port.readline()]

        first, second = (parse(x) for x in await asyncio.to_thread(run))
        assert first == "ERR CHECKSUM" and second.startswith("RSN ")


def test_doc_examples_have_valid_checksums() -> None:
    text = DOC.read_text()
    examples = re.findall(r"`((?:R[A-Z]{2}|ERR)[^`*]*)\*([0-9A-F]{2})(?:\\r\\n)?`", text)
    examples += re.findall(r"^(RTD2 [^*\n]+)\*([0-9A-F]{2})$", text, flags=re.M)
    assert len(examples) >= 2
    for payload, cs in examples:
        assert xor(payload.encode()) == cs, payload
    cmd = re.search(r"checksum \(`([A-Z0-9]+)\*([0-9A-F]{2})`\)", text)
    assert cmd and xor(cmd[1].encode()) == cmd[2]


async def test_records_rotated_out_of_the_sensor_before_queueing_count_as_lost() -> None:
    async with serve_counter_serial(speed=6000, seed=2, params={"buffer_size": 4}) as sim:
        await wait_records(sim, 4)
        await asyncio.sleep(0.2)  # ~20 more samples; the sensor keeps only the last 4
        queued, lost = parse((await talk(sim, ["CST"]))[0]).split()[2:]
        newest = sim.model.records()[-1].index
        assert int(queued) == 4 and int(lost) == newest + 1 - 4  # every record is queued or counted
