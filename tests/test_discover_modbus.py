"""``discover modbus``: the register scan finds exactly the readable ranges of the bundled
simulators (computed from their register images), of pymodbus' own server (a different
stack, sparse blocks, illegal address elsewhere) and over RTU on a pty; it stays within its
request budget and deadline, fails clearly on a silent or absent device, and writes a
profile that ``validate`` accepts and the driver reads without a refused request."""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from agent.cli import main
from agent.core.discover import Discovery, DiscoveryError
from agent.core.driver import DeviceContext, build_groups
from cleanroom_common.modbus import TABLES, Table
from cleanroom_common.net import free_port
from drivers.modbus import bus as buses
from drivers.modbus.config import Connection
from drivers.modbus.discover import ModbusDiscoverer, split_host_port
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import coalesce
from drivers.modbus.scan import Budget, TableScan, scan_table, scan_tables
from simulators.servers.modbus import serve_modbus
from tests.support import MbapPeer, mbap, registers_reply

Ranges = dict[Table, list[tuple[int, int]]]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="discover modbus", exit_on_error=False)
    ModbusDiscoverer.add_arguments(parser)
    return parser.parse_args(list(argv))


async def discover(*argv: str) -> Discovery:
    return await ModbusDiscoverer().discover(parse(*argv))


def found(d: Discovery) -> Ranges:
    """The ranges a discovery wrote, read back from its profile's groups (first, last)."""
    out: Ranges = {t: [] for t in TABLES}
    table_of = {"hr": "holding", "ir": "input", "co": "coil", "di": "discrete"}
    for group in d.profile["groups"]:
        prefix, first, last = group.split("_")
        out[table_of[prefix]].append((int(first), int(last)))  # type: ignore[index]
    return out


def served(spans: dict[Table, tuple[int, int]], tables: Sequence[Table] = TABLES) -> Ranges:
    """The ranges a simulated unit serves (its register image's spans), as :func:`found` reads them."""
    out: Ranges = {t: [] for t in TABLES}
    for table, (lo, hi) in spans.items():
        if table in tables:
            out[table] = [(lo, hi - 1)]
    return out


# --------------------------------------------------------------------------- the bundled simulators


@pytest.mark.parametrize("kind", ["incubator", "bioreactor", "particle_counter"])
async def test_scan_finds_exactly_the_simulators_register_map(kind: str) -> None:
    async with serve_modbus(kind, port=0) as sim:
        spans = sim.server.units[1].image.spans  # what the simulator serves, from its profile
        end = max(hi for _, hi in spans.values()) + 8
        d = await discover(f"127.0.0.1:{sim.port}", "--end", str(end), "--delay", "0")
    assert found(d) == served(spans)
    assert "INCOMPLETE" not in d.summary


async def test_rtu_scan_on_a_pty_finds_the_incubator_map(tmp_path: Path) -> None:
    async with serve_modbus("incubator", transport="rtu", unit_ids=(3,)) as sim:
        assert sim.pty_path is not None
        spans = sim.server.units[3].image.spans
        end = max(hi for _, hi in spans.values()) + 4
        d = await discover(
            "--serial", sim.pty_path, "--baud", "9600", "--parity", "N", "--unit", "3",
            "--tables", "holding,input", "--end", str(end), "--delay", "0", "--timeout", "0.5",
        )  # fmt: skip
    assert found(d) == served(spans, ("holding", "input"))
    assert "serial" in d.header[0] and "9600 8N1" in d.header[0]
    assert d.profile["profile"].endswith("-unit3")
    assert not buses._BUSES


async def test_silent_unit_on_the_serial_line_is_a_clear_error() -> None:
    async with serve_modbus("incubator", transport="rtu", unit_ids=(3,)) as sim:
        assert sim.pty_path is not None
        with pytest.raises(DiscoveryError, match=r"no reply from unit 4 on serial .* asked twice"):
            await discover("--serial", sim.pty_path, "--unit", "4", "--timeout", "0.2", "--delay", "0")
    assert not buses._BUSES


async def test_absent_unit_behind_the_simulated_gateway_is_an_error() -> None:
    async with serve_modbus("incubator", port=0) as sim:
        with pytest.raises(DiscoveryError, match="gateway cannot reach the unit"):
            await discover(f"127.0.0.1:{sim.port}", "--unit", "9", "--end", "10", "--delay", "0")


# --------------------------------------------------------------------------- pymodbus' own server


HOLDING = [
    SimData(10, count=20, values=7, datatype=SimType.REGISTERS),
    SimData(100, values=[1, 2, 3, 4, 5], datatype=SimType.REGISTERS),
    SimData(105, values=[6], datatype=SimType.REGISTERS),  # adjacent: one block with 100-104
    SimData(300, count=140, values=9, datatype=SimType.REGISTERS),  # longer than one request
]
INPUTS = [SimData(0, count=4, datatype=SimType.REGISTERS), SimData(50, values=3, datatype=SimType.REGISTERS)]
COILS = [SimData(32, values=[True] * 32, datatype=SimType.BITS)]  # 16-bit aligned: pymodbus serves words
DISCRETE = [SimData(0, values=[False] * 16, datatype=SimType.BITS), SimData(48, values=[True] * 16,
            datatype=SimType.BITS)]  # fmt: skip


def pymodbus_ranges() -> Ranges:
    """The readable ranges of the pymodbus device, from its SimData: addresses it did not
    define are illegal addresses; blocks that touch read as one; bit blocks fill the gap
    between them (pymodbus keeps a table of bits as one array)."""
    out: Ranges = {}
    for table, blocks in (("holding", HOLDING), ("input", INPUTS)):
        spans: list[tuple[int, int]] = []
        for b in sorted(blocks, key=lambda b: b.address):
            n = b.count * (len(b.values) if isinstance(b.values, list) else 1)
            if spans and spans[-1][1] + 1 == b.address:
                spans[-1] = (spans[-1][0], b.address + n - 1)
            else:
                spans.append((b.address, b.address + n - 1))
        out[table] = spans  # type: ignore[index]
    for table, blocks in (("coil", COILS), ("discrete", DISCRETE)):
        first = min(b.address for b in blocks)
        last = max(b.address + len(b.values) - 1 for b in blocks if isinstance(b.values, list))
        out[table] = [(first, last)]  # type: ignore[index]
    return out


class Server:
    """pymodbus' TCP server on a free port, counting the requests it receives."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.port = free_port()
        self.requests = 0
        self.server = ModbusTcpServer(devices, address=("127.0.0.1", self.port), trace_pdu=self._trace)

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        self.requests += not sending
        return pdu


@asynccontextmanager
async def pymodbus_server() -> AsyncIterator[Server]:
    srv = Server([SimDevice(id=1, simdata=(COILS, DISCRETE, HOLDING, INPUTS))])
    await srv.server.serve_forever(background=True)
    try:
        yield srv
    finally:
        await srv.server.shutdown()


@pytest.fixture(scope="module")
def sparse_scan() -> tuple[Discovery, int]:
    """One scan of the pymodbus device, shared by the tests that check its result."""

    async def scan() -> tuple[Discovery, int]:
        async with pymodbus_server() as srv:
            d = await discover(f"127.0.0.1:{srv.port}", "--end", "460", "--delay", "0", "--profile", "sparse")
            return d, srv.requests

    return asyncio.run(scan())


def test_scan_finds_exactly_the_sparse_blocks_of_pymodbus_server(sparse_scan: tuple[Discovery, int]) -> None:
    d, requests = sparse_scan
    assert found(d) == pymodbus_ranges()
    assert f"{requests} in" in next(line for line in d.header if line.startswith("Requests:"))
    tags = d.profile["tags"]
    assert len(tags) == sum(last - first + 1 for spans in pymodbus_ranges().values() for first, last in spans)
    assert tags[0] == {
        "name": "hr_10", "group": "hr_10_29", "table": "holding", "address": 10, "type": "uint16",
        "description": "unnamed (40011 in 1-based manuals)",
    }  # fmt: skip
    assert all(t["table"] in ("coil", "discrete") or t["type"] == "uint16" for t in tags)


async def test_discover_command_writes_a_profile_that_validates_and_reads_without_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole path: ``cleanroom-agent discover modbus`` writes the file, ``validate`` accepts
    a configuration using it as it is, and the driver reads every group of it with no refused
    request (each group is read with the requests the device answered during the scan)."""
    path = tmp_path / "profiles" / "sparse.yaml"
    path.parent.mkdir()
    async with pymodbus_server() as srv:
        argv = ["discover", "modbus", f"127.0.0.1:{srv.port}", "--end", "460", "--delay", "0",
                "--profile", "sparse", "--out", str(path)]  # fmt: skip
        assert await asyncio.to_thread(main, argv) == 0, capsys.readouterr().err
        text = path.read_text()
        assert text.startswith("# Discovered by `cleanroom-agent discover modbus` from unit 1 at 127.0.0.1:")
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(
            "agent: {id: gw}\nprofiles_dirs: [profiles]\ndevices:\n"
            f"  - {{id: d1, profile: sparse, connection: {{host: 127.0.0.1, port: {srv.port}}}}}\n"
        )
        assert await asyncio.to_thread(main, ["validate", str(cfg)]) == 0, capsys.readouterr().err
        profile = ModbusDriver.profile_model().model_validate(yaml.safe_load(text))
        conn = Connection.model_validate({"host": "127.0.0.1", "port": srv.port, "timeout": 1.0})
        driver = ModbusDriver(DeviceContext("d1", profile, conn, build_groups("d1", profile, conn, {})))
        await driver.connect()
        try:
            blocks = [b for g in driver.ctx.groups.values() for b in await driver.read(g)]
        finally:
            await driver.close()
    assert sum(len(b) for b in blocks) == len(profile.tags)
    assert all(b.quality is None for b in blocks), [b.reasons for b in blocks if b.quality]
    values = {t: v for b in blocks for t, v in zip(b.tags, b.values, strict=True)}
    assert values["hr_100"] == 1 and values["hr_105"] == 6 and values["co_32"] is True


def test_discover_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "p.yaml")
    assert main(["discover", "modbus", "host:notaport", "--out", out]) == 2
    assert "port 'notaport'" in capsys.readouterr().err
    assert main(["discover", "modbus", f"127.0.0.1:{free_port()}", "--out", out]) == 1
    assert "cannot reach unit 1" in capsys.readouterr().err
    assert not Path(out).exists()


async def test_request_budget_bounds_the_scan_and_is_shared_by_the_tables() -> None:
    async with pymodbus_server() as srv:
        d = await discover(f"127.0.0.1:{srv.port}", "--max-requests", "200", "--delay", "0")
        sent = srv.requests
    assert sent <= 200
    assert "INCOMPLETE" in d.summary and "request budget (200) used up" in d.summary
    # each table had its share: the first blocks of every table were found, not only the holding ones
    ranges = found(d)
    assert ranges["holding"][0] == (10, 29) and ranges["input"][0] == (0, 3)
    assert ranges["coil"] == pymodbus_ranges()["coil"] and ranges["discrete"] == pymodbus_ranges()["discrete"]
    assert any("scanned 0-" in line and "only: request budget" in line for line in d.header)


# --------------------------------------------------------------------------- misbehaving devices


async def test_silent_device_is_a_clear_error_within_the_deadline() -> None:
    async with MbapPeer(lambda tid, unit, pdu: None) as peer:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError, match=r"no reply from unit 1 at 127\.0\.0\.1:\d+ .* asked twice"):
            await discover(f"127.0.0.1:{peer.port}", "--timeout", "0.2", "--deadline", "3s")
        assert time.monotonic() - t0 < 3
        assert len(peer.requests) == 2
    assert not buses._BUSES


async def test_device_that_stops_answering_mid_scan_is_an_error() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> bytes | None:
        return registers_reply(tid, unit, pdu) if len(peer.requests) <= 3 else None

    async with MbapPeer(script) as peer:
        with pytest.raises(DiscoveryError, match="stopped answering: 5 requests in a row got no reply"):
            await discover(f"127.0.0.1:{peer.port}", "--timeout", "0.25", "--delay", "0")
        assert len(peer.requests) == 3 + 5


async def test_deadline_stops_a_slow_device_with_what_was_found() -> None:
    async with MbapPeer(registers_reply, delay=0.03) as peer:
        t0 = time.monotonic()
        d = await discover(f"127.0.0.1:{peer.port}", "--deadline", "0.5", "--tables", "holding,input")
        assert time.monotonic() - t0 < 0.5 + 1.0  # no request waits past the deadline
    assert "INCOMPLETE: deadline reached" in d.summary
    ranges = found(d)
    assert ranges["holding"] and ranges["holding"][0][0] == 0 and not ranges["input"]
    assert "input: not scanned: deadline reached" in d.header


async def test_tables_the_device_does_not_implement_are_reported_not_probed() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> bytes | None:
        if pdu[0] in (1, 2):  # no coils, no discrete inputs: illegal function
            return mbap(tid, unit, bytes([pdu[0] | 0x80, 1]))
        return registers_reply(tid, unit, pdu)

    async with MbapPeer(script) as peer:
        d = await discover(f"127.0.0.1:{peer.port}", "--end", "9", "--delay", "0")
        assert [p[0] for p in peer.requests] == [3, 4, 1, 2]
    assert found(d) == {"holding": [(0, 9)], "input": [(0, 9)], "coil": [], "discrete": []}
    assert "coil: not supported by the device (illegal function on its first read)" in d.header


async def test_busy_device_is_asked_again_after_a_pause() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> bytes | None:
        if len(peer.requests) == 1:
            return mbap(tid, unit, bytes([pdu[0] | 0x80, 6]))  # server busy
        return registers_reply(tid, unit, pdu)

    async with MbapPeer(script) as peer:
        d = await discover(f"127.0.0.1:{peer.port}", "--end", "9", "--tables", "holding", "--delay", "0")
        assert peer.requests[0] == peer.requests[1]  # the same read, repeated
    assert found(d)["holding"] == [(0, 9)]
    assert "Exception replies: server_busy 1" in d.header


async def test_device_answering_every_address_is_refused_past_max_tags() -> None:
    async with MbapPeer(registers_reply) as peer:
        with pytest.raises(DiscoveryError, match="reads 600 addresses, more than --max-tags 500"):
            await discover(f"127.0.0.1:{peer.port}", "--end", "299", "--tables", "holding,input",
                           "--max-tags", "500", "--delay", "0")  # fmt: skip


async def test_nothing_listening_is_a_clear_error() -> None:
    port = free_port()
    with pytest.raises(DiscoveryError, match=rf"cannot reach unit 1 at 127\.0\.0\.1:{port}: cannot open tcp"):
        await discover(f"127.0.0.1:{port}")
    assert not buses._BUSES


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["host:notaport"], "port 'notaport' in 'host:notaport' is not a number"),
        (["host:70000"], "is not a number 1-65535"),
        (["a b"], "is not HOST[:PORT]"),
        (["[::1"], "is not HOST[:PORT]"),
        ([], "name the device"),
        (["host", "--serial", "/dev/ttyUSB0"], "not both"),
        (["--serial", "/dev/ttyUSB0", "--unit", "0"], "broadcast address"),
        (["host", "--start", "10", "--end", "5"], "--start 10 is after --end 5"),
    ],
)
async def test_bad_arguments_are_clear_errors(argv: list[str], message: str) -> None:
    with pytest.raises(DiscoveryError) as err:
        await discover(*argv)
    assert message in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["h", "--unit", "256"], "--unit: 256 is outside 0-255"),
        (["h", "--end", "65536"], "address: 65536 is outside 0-65535"),
        (["h", "--tables", "holding,registers"], "--tables: registers: choose from"),
        (["h", "--timeout", "0"], "must be more than zero"),
        (["h", "--delay", "soon"], "'soon' is not a duration"),
        (["h", "--max-registers-per-request", "126"], "outside 1-125"),
        (["h", "--profile", "my device"], "may hold only letters, digits"),
    ],
)
def test_bad_option_values_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError) as err:
        parse(*argv)
    assert message in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_address_text_is_a_host_and_port_or_a_clear_error(text: str) -> None:
    try:
        host, port = split_host_port(text)
    except DiscoveryError as exc:
        assert repr(text) in str(exc)
        return
    assert host and host.isascii() and host.isprintable() and " " not in host and 1 <= port <= 65535


def test_host_port_forms() -> None:
    assert split_host_port("plc.local") == ("plc.local", 502)
    assert split_host_port("10.0.0.5:5020") == ("10.0.0.5", 5020)
    assert split_host_port("[fe80::1]:5020") == ("fe80::1", 5020)
    assert split_host_port("fe80::1") == ("fe80::1", 502)


# --------------------------------------------------------------------------- the walk itself


def device_map(readable: set[int], boundaries: set[int], log: list[tuple[int, int, bool]]) -> Any:
    """A device as the walk sees it: a read is answered when every address in it is readable
    and it crosses no boundary (devices that refuse reads spanning two sections)."""

    async def read(table: Table, start: int, count: int) -> bool:
        ok = all(a in readable for a in range(start, start + count)) and not any(
            start < b < start + count for b in boundaries
        )
        log.append((start, count, ok))
        return ok

    return read


@st.composite
def maps(draw: st.DrawFn) -> tuple[set[int], set[int], int, int]:
    size = draw(st.integers(1, 700))
    cuts = sorted(draw(st.sets(st.integers(0, size), max_size=12)))
    readable = {a for lo, hi in zip(cuts[::2], cuts[1::2], strict=False) for a in range(lo, hi)}
    boundaries = draw(st.sets(st.integers(1, size - 1), max_size=3)) if size > 1 else set()
    return readable, boundaries, size, draw(st.sampled_from([1, 3, 16, 125]))


@settings(max_examples=100, deadline=None)
@given(maps())
def test_walk_finds_every_readable_address_with_reads_the_driver_repeats(
    case: tuple[set[int], set[int], int, int],
) -> None:
    readable, boundaries, size, max_count = case
    log: list[tuple[int, int, bool]] = []
    scan = TableScan("holding", 0, size - 1)
    asyncio.run(scan_table(scan, max_count, device_map(readable, boundaries, log)))
    assert {a for first, n in scan.runs for a in range(first, first + n)} == readable
    answered = {(s, n) for s, n, ok in log if ok}
    for first, n in scan.runs:
        # the driver's read plan for a group holding exactly this run sends only answered reads
        assert set(coalesce([(a, 1) for a in range(first, first + n)], max_count, 0)) <= answered
    # cost: one request per unreadable address, a binary search per run end, one per block
    runs, unreadable = len(scan.runs), size - len(readable)
    bound = unreadable + runs * (3 + math.ceil(math.log2(max_count))) + len(readable) // max_count + 2
    assert len(log) <= bound + len(boundaries) * (3 + math.ceil(math.log2(max_count)))


def test_budget_is_shared_by_the_tables_and_never_exceeded() -> None:
    budget = Budget(100, deadline_s=60)
    log: list[tuple[int, int, bool]] = []
    read = device_map(set(), set(), log)

    async def walk() -> list[TableScan]:
        async def counted(table: Table, start: int, count: int) -> bool:
            budget.spend()
            return bool(await read(table, start, count))

        return await scan_tables(TABLES, 0, 65535, lambda t: 125, counted, budget)

    scans = asyncio.run(walk())
    assert len(log) == budget.used == 100
    assert [s.requests for s in scans] == [25, 25, 25, 25]
    assert all(s.stopped == "request budget (100) used up" and s.next_address for s in scans)


def test_deadline_stops_every_later_table() -> None:
    now = [0.0]
    budget = Budget(1000, deadline_s=1.0, clock=lambda: now[0])

    async def walk() -> Sequence[TableScan]:
        async def slow(table: Table, start: int, count: int) -> bool:
            budget.spend()
            now[0] += 0.3
            return False

        return await scan_tables(TABLES, 0, 100, lambda t: 125, slow, budget)

    scans = asyncio.run(walk())
    assert budget.used == 4
    assert [s.stopped for s in scans] == ["deadline reached"] * 4
    assert [s.requests for s in scans] == [4, 0, 0, 0]
