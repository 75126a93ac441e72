"""``cleanroom-agent discover modbus``: probe a device's four tables and write a skeleton
profile of what it answers, for the engineer to name and type.

Modbus has no self-description, so discovery is a search: which addresses of the holding
registers, input registers, coils and discrete inputs does the device read without an
exception? :mod:`drivers.modbus.scan` walks each table in blocks and binary-searches where
a block is refused; this module talks to the device through the driver's own link
(:mod:`drivers.modbus.bus`: one request at a time, RTU frame gap, late replies told apart)
and turns the readable runs into a profile that ``validate`` accepts as it is.

**Polite and bounded.** One request at a time with ``--delay`` between them, each waiting at
most ``--timeout``; the whole scan stops at ``--max-requests`` or ``--deadline``, whichever
comes first, and the profile's header says where it stopped. A read that gets no reply is
sent once more and then counted as refused; a device that never answered, or stops answering
(:data:`SILENT_IN_A_ROW` requests in a row), is an error, not an empty profile.

**The profile.** One poll group per readable run (its name gives the table and the range),
one ``uint16`` tag per register or one ``bool`` per coil or discrete input, addressed by PDU
address (``vendor_notation: false``, ``address_base: 0``: the numbers that were sent, valid
for every address of every table). The driver reads each group with exactly the requests the
device answered during the scan (see :mod:`drivers.modbus.scan`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import ValidationError

from agent.core.discover import Discoverer, Discovery, DiscoveryError
from agent.core.driver import DeviceError
from cleanroom_common.fields import parse_duration
from cleanroom_common.modbus import (
    BIT_TABLES,
    LAST_PDU_ADDRESS,
    TABLES,
    AddressError,
    Table,
    table_and_number,
)
from drivers.modbus.bus import BadReply, Bus, Garbled, acquire_bus, release_bus
from drivers.modbus.config import Connection
from drivers.modbus.driver import EXCEPTION_NAMES, READ_FUNCTIONS
from drivers.modbus.frames import Request
from drivers.modbus.scan import Budget, Stop, TableScan, Unsupported, scan_tables

SILENT_IN_A_ROW = 5
"""Requests in a row without a reply after which the device is taken to be gone."""

BUSY = 6
"""Exception code: the device is busy; the read is repeated after the connection's ``retry_busy_wait``."""
ILLEGAL_FUNCTION = 1
GATEWAY_CODES = frozenset({10, 11})
"""Exception codes of a TCP gateway that cannot reach the unit: nothing behind it to scan."""

_PREFIX: dict[Table, str] = {"holding": "hr", "input": "ir", "coil": "co", "discrete": "di"}
"""Tag and group name prefix per table."""
_VENDOR_DIGIT: dict[Table, int] = {"holding": 4, "input": 3, "discrete": 1, "coil": 0}

DEFAULT_DELAY_S = {"tcp": 0.02, "rtu": 0.05}
"""Pause between requests unless ``--delay`` says otherwise: slow serial devices get more."""


class ModbusDiscoverer(Discoverer):
    """``discover modbus HOST[:PORT] | --serial PORT``: the readable ranges of one unit."""

    protocol: ClassVar[str] = "modbus"
    help: ClassVar[str] = "probe a Modbus unit's registers, coils and inputs; write a skeleton profile"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "address",
            nargs="?",
            metavar="HOST[:PORT]",
            help="Modbus TCP device or gateway (port 502 by default)",
        )
        parser.add_argument(
            "--unit", type=_int_in(0, 255, "--unit"), default=1, help="unit (slave) id; default 1"
        )
        serial = parser.add_argument_group("Modbus RTU (instead of HOST)")
        serial.add_argument("--serial", metavar="PORT", help="serial device, e.g. /dev/ttyUSB0")
        serial.add_argument(
            "--baud", type=_int_in(1, 10_000_000, "--baud"), default=19200, help="default 19200"
        )
        serial.add_argument("--parity", choices=["N", "E", "O"], default="N", help="default N")
        serial.add_argument("--stopbits", type=int, choices=[1, 2], default=1, help="default 1")
        serial.add_argument("--bytesize", type=int, choices=[7, 8], default=8, help="default 8")
        scan = parser.add_argument_group("scan")
        scan.add_argument(
            "--tables",
            type=_tables,
            default=TABLES,
            metavar="LIST",
            help="comma-separated tables to probe; default holding,input,coil,discrete",
        )
        pdu = _int_in(0, LAST_PDU_ADDRESS, "address")
        scan.add_argument("--start", type=pdu, default=0, help="first PDU address probed; default 0")
        scan.add_argument(
            "--end", type=pdu, default=LAST_PDU_ADDRESS, help="last PDU address probed; default 65535"
        )
        scan.add_argument(
            "--max-requests",
            type=_int_in(1, 1_000_000, "--max-requests"),
            default=2000,
            help="requests the whole scan may send, shared fairly by the tables; default 2000",
        )
        scan.add_argument(
            "--timeout", type=_duration(positive=True), default=1.0, help="wait per request; default 1s"
        )
        scan.add_argument(
            "--deadline",
            type=_duration(positive=True),
            default=300.0,
            help="time the whole scan may take; default 5m",
        )
        scan.add_argument(
            "--delay",
            type=_duration(),
            default=None,
            help="pause between requests; default 20ms (TCP), 50ms (RTU)",
        )
        scan.add_argument(
            "--max-registers-per-request",
            type=_int_in(1, 125, "--max-registers-per-request"),
            default=125,
            help="largest register read the device accepts; default 125",
        )
        scan.add_argument(
            "--max-bits-per-request",
            type=_int_in(1, 2000, "--max-bits-per-request"),
            default=2000,
            help="largest coil/discrete-input read the device accepts; default 2000",
        )
        scan.add_argument(
            "--max-tags",
            type=_int_in(1, 1_000_000, "--max-tags"),
            default=10_000,
            help="refuse a profile with more tags (a device answering every address); default 10000",
        )
        parser.add_argument(
            "--profile",
            dest="profile_name",
            type=_profile_name,
            metavar="NAME",
            help="the profile's name; default discovered-<host or serial device>-unit<N>",
        )

    async def discover(self, args: argparse.Namespace) -> Discovery:
        if args.start > args.end:
            raise DiscoveryError(f"--start {args.start} is after --end {args.end}", bad_input=True)
        conn = connection_of(args)
        where = describe(conn)
        delay = args.delay if args.delay is not None else DEFAULT_DELAY_S[conn.transport]
        budget = Budget(args.max_requests, args.deadline)
        bus = acquire_bus(conn)
        try:
            try:
                await bus.ensure_connected(min(conn.timeout, budget.time_left()))
            except DeviceError as exc:
                raise DiscoveryError(f"cannot reach {where}: {exc.detail}") from None
            prober = _Prober(bus, conn, budget, delay, where)
            scans = await scan_tables(
                args.tables, args.start, args.end, prober.max_count, prober.read, budget
            )
        finally:
            release_bus(bus)
        return _discovery(args, conn, where, delay, scans, budget, prober)


# --------------------------------------------------------------------------- the device


def connection_of(args: argparse.Namespace) -> Connection:
    """The driver's own connection model for what the arguments name (one of HOST or --serial)."""
    if (args.address is None) == (args.serial is None):
        raise DiscoveryError(
            "name the device: HOST[:PORT] for Modbus TCP, or --serial PORT for RTU (not both)",
            bad_input=True,
        )
    fields: dict[str, Any] = {
        "unit_id": args.unit,
        "timeout": args.timeout,
        "retries": 1,
        "max_registers_per_request": args.max_registers_per_request,
        "max_bits_per_request": args.max_bits_per_request,
    }
    if args.serial is not None:
        if args.unit == 0:
            raise DiscoveryError(
                "--unit 0 is the broadcast address on a serial line: no device answers it", bad_input=True
            )
        fields |= {
            "transport": "rtu",
            "port": args.serial,
            "baudrate": args.baud,
            "parity": args.parity,
            "stopbits": args.stopbits,
            "bytesize": args.bytesize,
        }
    else:
        host, port = split_host_port(args.address)
        fields |= {"transport": "tcp", "host": host, "port": port}
    try:
        return Connection.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            str(e["msg"]).removeprefix("Value error, ") for e in exc.errors(include_url=False)
        )
        raise DiscoveryError(f"bad connection settings: {problems}", bad_input=True) from None


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT`` → host and port (502 by default);
    :class:`DiscoveryError` naming what is wrong."""
    m = re.fullmatch(
        r"\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.\-]+)?)\](?::(\w+))?|([A-Za-z0-9_.\-]+)(?::(\w+))?|([0-9A-Fa-f:]+)",
        text,
        flags=re.ASCII,
    )
    if m is None:
        raise DiscoveryError(
            f"{text!r} is not HOST[:PORT]: write e.g. 192.168.1.20, plc.local:502 or [fe80::1]:5020",
            bad_input=True,
        )
    host = m.group(1) or m.group(3) or m.group(5)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        return host, 502
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DiscoveryError(f"port {port_text!r} in {text!r} is not a number 1-65535", bad_input=True)
    return host, int(port_text)


def describe(conn: Connection) -> str:
    """The device as the operator named it, for messages and the profile header."""
    if conn.transport == "rtu":
        line = f"{conn.baudrate} {conn.bytesize}{conn.parity}{conn.stopbits}"
        return f"unit {conn.unit_id} on serial {conn.port} ({line})"
    host = f"[{conn.host}]" if ":" in str(conn.host) else str(conn.host)
    return f"unit {conn.unit_id} at {host}:{conn.port or 502}"


class _Prober:
    """One read on the driver's link, judged for the scan: answered, refused, or the device gone."""

    def __init__(self, bus: Bus, conn: Connection, budget: Budget, delay: float, where: str) -> None:
        self.bus = bus
        self.conn = conn
        self.budget = budget
        self.delay = delay
        self.where = where
        self.answered = 0
        self.silent_in_a_row = 0
        self.timeouts = 0
        self.exceptions: Counter[str] = Counter()
        """Exception replies by name (``illegal_data_address``...), for the header."""
        self.line_errors: Counter[str] = Counter()
        """Garbled or mismatched replies, late replies and junk, counted by the link."""

    def max_count(self, table: Table) -> int:
        if table in BIT_TABLES:
            return self.conn.max_bits_per_request
        return self.conn.max_registers_per_request

    async def read(self, table: Table, start: int, count: int) -> bool:
        """Whether the device reads ``count`` from ``start``. No reply (or an unreadable one) is
        asked once more, then taken as a refusal; a busy device is asked again after a pause."""
        request = Request(self.conn.unit_id, READ_FUNCTIONS[table], start, count)
        for _ in range(2):
            self.budget.spend()
            try:
                wait = min(self.conn.timeout, self.budget.time_left())
                await self.bus.ensure_connected(wait)
                reply = await self.bus.request(request, wait, self.delay, self._line_error)
            except TimeoutError:
                self._silence(table, start, count)
                continue
            except (Garbled, BadReply) as exc:
                self.line_errors["garbled" if isinstance(exc, Garbled) else exc.fault] += 1
                continue
            except DeviceError as exc:
                # The link dropped (some gateways close it on a refused read): the next request reconnects.
                self._silence(table, start, count, str(exc))
                continue
            self.answered += 1
            self.silent_in_a_row = 0
            code = reply.exception_code
            if code is None:
                return True
            name = EXCEPTION_NAMES.get(code, f"exception_{code}")
            self.exceptions[name] += 1
            if code == ILLEGAL_FUNCTION:
                raise Unsupported(table)
            if code in GATEWAY_CODES:
                raise DiscoveryError(f"{self.where}: the gateway cannot reach the unit ({name})")
            if code == BUSY:
                await asyncio.sleep(max(0.0, min(self.conn.retry_busy_wait, self.budget.time_left())))
                continue
            return False
        return False

    def _line_error(self, kind: str) -> None:
        self.line_errors[kind] += 1

    def _silence(self, table: Table, start: int, count: int, why: str = "") -> None:
        """One request without a reply: past the deadline the scan stops; a device that never
        answered, or stopped answering, is gone."""
        if self.budget.time_left() <= 0:
            raise Stop("deadline reached", final=True)
        self.timeouts += 1
        self.silent_in_a_row += 1
        what = f"{table} {start} (count {count})"
        detail = f" ({why})" if why else ""
        if self.answered == 0 and self.silent_in_a_row >= 2:
            raise DiscoveryError(
                f"no reply from {self.where} to a read of {what}, asked twice with a "
                f"{self.conn.timeout:g} s timeout{detail}: check the address, unit id and line settings"
            )
        if self.silent_in_a_row >= SILENT_IN_A_ROW:
            raise DiscoveryError(
                f"{self.where} stopped answering: {self.silent_in_a_row} requests in a row got no reply "
                f"(last: {what}){detail}"
            )


# --------------------------------------------------------------------------- the profile


def _discovery(
    args: argparse.Namespace,
    conn: Connection,
    where: str,
    delay: float,
    scans: Sequence[TableScan],
    budget: Budget,
    prober: _Prober,
) -> Discovery:
    found = sum(s.readable for s in scans)
    stopped = [s for s in scans if s.stopped]
    if not found:
        why = f"; the scan stopped early ({stopped[0].stopped})" if stopped else ""
        if prober.line_errors:
            why += "; unreadable replies: " + ", ".join(
                f"{k} {v}" for k, v in sorted(prober.line_errors.items())
            )
        raise DiscoveryError(
            f"{where} answered {prober.answered} requests but read no address of "
            f"{', '.join(args.tables)} in {args.start}-{args.end}{why}"
        )
    if found > args.max_tags:
        raise DiscoveryError(
            f"{where} reads {found} addresses, more than --max-tags {args.max_tags}: it answers unmapped "
            "addresses too; narrow the scan with --start/--end/--tables (or raise --max-tags)"
        )
    name = args.profile_name or default_profile_name(conn)
    profile = skeleton(name, where, scans)
    header = _header(args, where, delay, scans, budget, prober)
    blocks = sum(len(s.runs) for s in scans)
    counts = ", ".join(f"{s.table} {s.readable}" for s in scans)
    summary = (
        f"{where}: {found} readable addresses in {blocks} block{'s' if blocks != 1 else ''} ({counts}); "
        f"{budget.used} requests in {budget.elapsed_s:.1f} s"
    )
    if stopped:
        summary += f"; INCOMPLETE: {stopped[0].stopped}"
    return Discovery(profile=profile, header=header, summary=summary)


def default_profile_name(conn: Connection) -> str:
    """``discovered-<host or serial device>-unit<N>``, within the profile name's alphabet."""
    place = str(conn.host) if conn.transport == "tcp" else str(conn.port).rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", f"discovered-{place}-unit{conn.unit_id}")


def skeleton(name: str, where: str, scans: Sequence[TableScan]) -> dict[str, Any]:
    """The profile: one poll group per readable run, one tag per address, in table and address order."""
    groups: dict[str, Any] = {}
    tags: list[dict[str, Any]] = []
    for scan in scans:
        prefix = _PREFIX[scan.table]
        bits = scan.table in BIT_TABLES
        for first, count in scan.runs:
            group = f"{prefix}_{first}_{first + count - 1}"
            groups[group] = {"interval": "1s"}
            for address in range(first, first + count):
                tag: dict[str, Any] = {
                    "name": f"{prefix}_{address}",
                    "group": group,
                    "table": scan.table,
                    "address": address,
                }
                if not bits:
                    tag["type"] = "uint16"
                manual = vendor_address(scan.table, address)
                tag["description"] = f"unnamed ({manual} in 1-based manuals)" if manual else "unnamed"
                tags.append(tag)
    return {
        "profile": name,
        "protocol": "modbus",
        "device_kind": "generic",
        "description": f"Skeleton from a register scan of {where}: name, type and scale the tags "
        "from the device's manual; delete what is not needed.",
        "defaults": {"vendor_notation": False, "address_base": 0},
        "groups": groups,
        "tags": tags,
    }


def vendor_address(table: Table, pdu: int) -> int | None:
    """PDU address ``pdu`` as a 1-based vendor-notation address (holding 0 → 40001), or ``None``
    where that notation has none (coils above 9999)."""
    number = pdu + 1
    digit = _VENDOR_DIGIT[table]
    address = digit * 10000 + number if number <= 9999 else digit * 100000 + number
    try:
        ok = table_and_number(address) == (table, number)
    except AddressError:
        return None
    return address if ok else None


def _ranges(scan: TableScan) -> str:
    """One table's line of the header: what was readable, at what cost, and what was not scanned."""
    if scan.unsupported:
        return "not supported by the device (illegal function on its first read)"
    if scan.stopped and scan.next_address == scan.start:
        return f"not scanned: {scan.stopped}"
    found = ", ".join(f"{a}-{a + n - 1}" if n > 1 else str(a) for a, n in scan.runs) or "none"
    unit = "bits" if scan.table in BIT_TABLES else "registers"
    text = f"readable {found} ({scan.readable} {unit}, {scan.requests} requests)"
    if scan.stopped and scan.next_address is not None:
        text += f"; scanned {scan.start}-{scan.next_address - 1} only: {scan.stopped}"
    return text


def _header(
    args: argparse.Namespace,
    where: str,
    delay: float,
    scans: Sequence[TableScan],
    budget: Budget,
    prober: _Prober,
) -> list[str]:
    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    options = (
        f"--unit {args.unit} --tables {','.join(args.tables)} --start {args.start} --end {args.end} "
        f"--max-requests {args.max_requests} --timeout {args.timeout:g}s --deadline {args.deadline:g}s "
        f"--delay {delay:g}s --max-registers-per-request {args.max_registers_per_request} "
        f"--max-bits-per-request {args.max_bits_per_request}"
    )
    lines = [
        f"Discovered by `cleanroom-agent discover modbus` from {where} at {when}.",
        f"Options: {options}",
        *(f"{s.table}: {_ranges(s)}" for s in scans),
        f"Requests: {budget.used} in {budget.elapsed_s:.1f} s ({prober.timeouts} without reply)",
    ]
    if prober.exceptions:
        lines.append(
            "Exception replies: " + ", ".join(f"{k} {v}" for k, v in sorted(prober.exceptions.items()))
        )
    if prober.line_errors:
        lines.append("Line errors: " + ", ".join(f"{k} {v}" for k, v in sorted(prober.line_errors.items())))
    if any(s.stopped for s in scans):
        lines.append(
            "INCOMPLETE: rerun with a narrower --start/--end or --tables, or more --max-requests/--deadline."
        )
    if args.max_registers_per_request < 125 or args.max_bits_per_request < 2000:
        lines.append(
            "Set max_registers_per_request / max_bits_per_request on the device's connection as scanned."
        )
    lines += [
        "Addresses are PDU addresses (the numbers sent on the wire); each poll group is one readable",
        "block, read with the requests the device answered during the scan. Tags are uint16 registers",
        "or bool bits named after their table and address: name, type, scale and unit them from the",
        "manual (a 32-bit value spans two tags: keep one, with its type and word order).",
    ]
    return lines


# --------------------------------------------------------------------------- argument types


def _int_in(low: int, high: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}: {value} is outside {low}-{high}")
        return value

    return parse


def _duration(positive: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            seconds = parse_duration(text if not text.replace(".", "", 1).isdigit() else float(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if positive and seconds <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than zero")
        return seconds

    return parse


def _profile_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", text):
        raise argparse.ArgumentTypeError(f"--profile: {text!r} may hold only letters, digits and _ . -")
    return text


def _tables(text: str) -> tuple[Table, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TABLES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--tables: {', '.join(unknown) or 'empty'}: choose from {','.join(TABLES)}"
        )
    return tuple(t for t in TABLES if t in names)
