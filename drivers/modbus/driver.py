"""Modbus TCP and RTU driver (pymodbus client underneath).

What the driver adds to the protocol stack:

* **Read plans built once.** Each poll group's tags are resolved to table/PDU address at
  start-up and coalesced into the fewest read requests (:func:`coalesce`); per data type
  and word order an index array says where each value sits in the group's register
  image, so a poll is "N requests, one gather per type, one ``view``" (see
  :mod:`cleanroom_common.codec`).
* **Shared buses.** Several devices (unit ids) on one serial line, or behind one TCP
  gateway, share one client connection (:class:`Bus`, reference counted, one module-level
  registry per event loop). Requests on a bus are serialised by a lock, separated by the
  RTU inter-frame silence (3.5 character times; pymodbus does not enforce it) and the
  device's ``request_delay``; the lock is held for one request at a time, so a slow unit
  delays the others by at most its timeout, and waits (server-busy back-off) happen
  outside it. A unit that keeps failing is *degraded*: skipped for ``degrade_for``, so
  a dead device cannot eat the bus's time.
* **Errors as data.** An exception reply makes the tags of that request bad with the
  exception's name as reason; a garbled, truncated or CRC-failed reply makes them bad
  with ``comm_error``; a reply of the wrong length, ``decode_error``. Silence (timeout)
  and a lost connection raise :class:`DeviceError` so the scheduler reconnects. Every
  case counts in ``ctx.stats``; the log gets one line per change of a device's state,
  not one per failed request.
* **Records mode** for particle counters that keep a rotating record buffer (see
  :class:`RecordLayout`): each poll drains the records after a watermark, one block per
  record, with the record's own timestamp and status bits as quality.

Addresses (``Tag.address``) are written the way device manuals write them; see
:class:`Tag` for the exact rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU

from agent.core.driver import (
    ConnectionBase,
    DeviceContext,
    DeviceError,
    Driver,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
)
from agent.core.records import Block, Event, Quality, Reason, Severity, Value, now_ns
from cleanroom_common.codec import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    CodecError,
    DataType,
    WordOrder,
    decode,
    decode_many,
    register_count,
)
from cleanroom_common.fields import Duration, Strict

log = logging.getLogger("cleanroom.modbus")

if logging.getLogger("pymodbus").level == logging.NOTSET:
    # pymodbus logs every failed request at ERROR; this driver logs state changes instead.
    # Set the "pymodbus" logger's level explicitly to see its own trace.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

Table = Literal["holding", "input", "coil", "discrete"]
BIT_TABLES = ("coil", "discrete")

# Vendor ("Modicon") notation: the leading digit names the table; five digits address
# registers 1-9999, six digits 1-65536.
_PREFIX: dict[Table, int] = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}
_TABLE_OF_PREFIX: dict[int, Table] = {v: k for k, v in _PREFIX.items()}

EXCEPTION_NAMES = {
    1: "illegal_function",
    2: "illegal_data_address",
    3: "illegal_data_value",
    4: "slave_device_failure",
    5: "acknowledge",
    6: "server_busy",
    8: "memory_parity_error",
    10: "gateway_path_unavailable",
    11: "gateway_target_failed",
}
"""Modbus exception codes → the quality reason of the readings a refused request yields."""

DEGRADED = "degraded"
"""Quality reason while a failing device is skipped (``degrade_after``/``degrade_for``)."""

_READ_FUNCTIONS: dict[Table, str] = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


# --------------------------------------------------------------------------- models


def split_vendor_address(address: int) -> tuple[Table, int]:
    """``40001`` → ``("holding", 1)``; ``300010`` → ``("input", 10)``; ``17`` → ``("coil", 17)``.

    Five-digit numbers carry a one-digit table prefix and a register number 0-9999; six
    digits, a register number 0-65536.
    """
    if address < 10000:
        return "coil", address
    prefix, number = divmod(address, 10000 if address < 100000 else 100000)
    if prefix not in _TABLE_OF_PREFIX or number > 65536:
        raise ValueError(
            f"address {address} is not in vendor notation (0xxxx coil, 1xxxx discrete, 3xxxx input, "
            "4xxxx holding; 5 or 6 digits); write the plain register number with an explicit table "
            "and vendor_notation: false"
        )
    return _TABLE_OF_PREFIX[prefix], number


class Tag(TagBase):
    """One value in a Modbus device: where it is and how its registers decode.

    **Addresses.** With ``vendor_notation: true`` (the default) ``address`` is written as
    in most device manuals: the leading digit names the table (``4xxxx``/``4xxxxx``
    holding, ``3xxxx`` input, ``1xxxx`` discrete input, ``0xxxx`` i.e. a plain number below
    10000 for coils), the rest is the register number, counted from ``address_base``.
    With the default ``address_base: 1``, 40001 is holding register PDU address 0 (the
    number sent on the wire), 30010 is input register PDU address 9. With
    ``vendor_notation: false`` ``address`` is a plain register number in the table given
    by ``table``, again counted from ``address_base`` (``0`` when the manual lists PDU
    addresses, as e.g. MET ONE does). A device instance whose firmware is off by one
    overrides the base with its connection's ``address_base``.
    """

    address: int = Field(ge=0, le=465536)
    """Register (or coil) address. Vendor notation (default): the leading digit names the table
    (4xxxx holding, 3xxxx input, 1xxxx discrete input, below 10000 coil; six digits for
    registers above 9999) and the rest counts from ``address_base``, so 40001 is holding
    PDU address 0. With ``vendor_notation: false``: a plain number in ``table``, counted
    from ``address_base``."""
    table: Table | None = None
    """``holding``, ``input``, ``coil`` or ``discrete``; implied by a vendor-notation address
    (it must agree with it if given), required otherwise."""
    type: DataType | None = None
    """``int16``, ``uint16``, ``int32``, ``uint32``, ``int64``, ``uint64``, ``float32``,
    ``float64``, ``bool`` or ``string``; default ``uint16`` for registers, ``bool`` for coils,
    discrete inputs and bit fields. 64-bit integers above 2^53 lose precision (payload
    numbers are doubles)."""
    word_order: WordOrder = WordOrder.ABCD
    """How multi-register values are laid out: ``ABCD`` (Modbus default, high word first),
    ``CDAB`` (low word first, e.g. BINDER), ``BADC``/``DCBA`` (bytes swapped); see
    :mod:`cleanroom_common.codec`."""
    bit: int | None = Field(default=None, ge=0, le=15)
    """Read one bit (0 = least significant) of a 16-bit register as a boolean, e.g. a status word."""
    length: int | None = Field(default=None, ge=1, le=250)
    """Characters of a ``string`` tag (two per register)."""
    address_base: Literal[0, 1] = 1
    """Number of the first register in ``address`` (1 for 40001-style manuals, 0 for PDU addresses)."""
    vendor_notation: bool = True
    """Whether ``address`` carries the table prefix (``40001``) or is a plain number (``0``)."""

    @model_validator(mode="after")
    def _resolvable(self) -> Tag:
        table, number = self.table_and_number()
        if table in BIT_TABLES:
            if self.type not in (None, DataType.BOOL) or self.bit is not None:
                raise ValueError(f"a {table} is one bit: type must be bool and bit unset")
        elif self.bit is not None and self.type not in (None, DataType.BOOL, DataType.UINT16, DataType.INT16):
            raise ValueError("bit selects one bit of a 16-bit register: type must be bool (or unset)")
        if (self.type is DataType.STRING) != (self.length is not None):
            raise ValueError("length is required for type string, and only for it")
        if number - self.address_base > 65535:
            raise ValueError(f"address {self.address} is past the last register (PDU address 65535)")
        if number - self.address_base < 0:
            raise ValueError(
                f"address {self.address} is below the first register (address_base {self.address_base})"
            )
        return self

    def table_and_number(self) -> tuple[Table, int]:
        """The table and the register number as written (before subtracting the base)."""
        if not self.vendor_notation:
            if self.table is None:
                raise ValueError("a plain address (vendor_notation: false) needs an explicit table")
            return self.table, self.address
        table, number = split_vendor_address(self.address)
        if self.table is not None and self.table != table:
            raise ValueError(
                f"address {self.address} is a {table} address in vendor notation, but table is "
                f"{self.table!r}; use vendor_notation: false for plain register numbers"
            )
        return table, number

    @property
    def data_type(self) -> DataType:
        if self.bit is not None or self.table_and_number()[0] in BIT_TABLES:
            return DataType.BOOL
        return self.type or DataType.UINT16


class TagDefaults(Strict):
    """Tag fields set once for a whole profile (a tag's own value wins)."""

    table: Table | None = None
    """Default table (e.g. ``input`` for a device whose map is all input registers)."""
    type: DataType | None = None
    """Default data type."""
    word_order: WordOrder | None = None
    """Default word order (e.g. ``CDAB`` for a BINDER incubator)."""
    group: str | None = None
    """Default poll group."""
    address_base: Literal[0, 1] | None = None
    """Default address base (see :class:`Tag`)."""
    vendor_notation: bool | None = None
    """Default address notation (see :class:`Tag`)."""


class RecordLayout(Strict):
    """Where a record-keeping device (remote particle counter) keeps its record buffer.

    The model is the Lighthouse-like one: ``count`` records at positions
    ``first_index … first_index + count - 1``, oldest first; writing a position to the
    index register makes the group's tags (input registers) show that record. When the
    buffer is full the oldest record drops out and every position moves down by one.
    The record's own fields are ordinary tags of the group: its timestamp
    (``timestamp_tag``) and its status bits (bit-field tags named in ``bad_when`` /
    ``uncertain_when``). The driver never clears the buffer nor sets the clock.
    """

    count_address: int = Field(ge=40001, le=465536)
    """Holding register with the number of records in the buffer (vendor notation, e.g. ``40024``)."""
    index_address: int = Field(ge=40001, le=465536)
    """Holding register the driver writes to select a record (vendor notation, e.g. ``40025``)."""
    newest_index: int = Field(default=0xFFFF, ge=0, le=0xFFFF)
    """Index value that selects the newest record (used on first contact, when no watermark exists)."""
    first_index: int = Field(default=0, ge=0)
    """Index of the oldest record in the buffer (0 on the simulated counter; some firmware counts from 1)."""
    capacity: int = Field(default=3000, ge=1)
    """Buffer size: a full buffer rotates (positions shift while it is drained)."""
    timestamp_tag: str
    """Tag of this group holding the record's sample time, Unix seconds (becomes the block's source time)."""
    bad_when: list[str] = Field(default_factory=list)
    """Tags of this group (status bits) that, when true, make the record's other readings bad
    (reason ``device_status``), e.g. laser or flow fault. The values are kept: the original
    record is stored, flagged."""
    uncertain_when: list[str] = Field(default_factory=list)
    """Tags of this group that, when true, make the record's other readings uncertain
    (reason ``device_status``), e.g. overflow or service due."""
    max_records_per_read: int = Field(default=100, ge=1)
    """Records drained per poll at most (a poll also stops taking records after half the group's
    timeout); the rest follow next poll."""
    backfill: bool = False
    """On first contact (no watermark yet), deliver the whole buffer instead of only the newest record."""

    def referenced_tags(self) -> list[str]:
        return [self.timestamp_tag, *self.bad_when, *self.uncertain_when]


class Group(GroupSpec):
    """A Modbus poll group."""

    mode: Literal["poll", "records"] = "poll"
    """``poll``: read the tags' current values. ``records``: drain the device's record buffer
    (see ``records``), one block per record."""
    records: RecordLayout | None = None
    """Record buffer layout; required for ``mode: records``."""

    @model_validator(mode="after")
    def _layout_for_records(self) -> Group:
        if (self.mode == "records") != (self.records is not None):
            raise ValueError("mode: records needs a records layout, and a records layout needs mode: records")
        return self


class Connection(ConnectionBase):
    """How to reach one Modbus device (unit), and its quirks."""

    transport: Literal["tcp", "rtu"] = "tcp"
    """``tcp`` (Modbus TCP) or ``rtu`` (serial line)."""
    host: str | None = None
    """TCP: device or gateway host name / IP address."""
    port: int | str | None = None
    """TCP: port number (default 502). RTU: serial device path, e.g. ``/dev/ttyUSB0``."""
    unit_id: int = Field(default=1, ge=0, le=255)
    """Unit (slave) id of the device on its bus or behind its gateway."""
    baudrate: int = Field(default=19200, gt=0)
    """RTU: line speed in bit/s."""
    parity: Literal["N", "E", "O"] = "N"
    """RTU: parity."""
    stopbits: Literal[1, 2] = 1
    """RTU: stop bits."""
    bytesize: Literal[7, 8] = 8
    """RTU: data bits."""
    retries: int = Field(default=1, ge=0, le=10)
    """Repeats of a request that got no reply (or a server-busy reply) before giving up."""
    retry_busy_wait: Duration = 0.5
    """Wait before repeating a request the device refused as busy (exception 6); the bus is free meanwhile."""
    address_base: Literal[0, 1] | None = None
    """Override the profile's address base for this device (firmware that is off by one)."""
    connect_delay: Duration = 0.0
    """Pause after connecting before the first request (devices that need time to accept)."""
    request_delay: Duration = 0.0
    """Minimum pause between the end of one request on the bus and the next."""
    one_request_per_tag: bool = False
    """Never coalesce: one request per tag (devices that reject multi-register reads)."""
    max_registers_per_request: int = Field(default=125, ge=1, le=125)
    """Largest register read the device accepts (the protocol allows 125)."""
    max_bits_per_request: int = Field(default=2000, ge=1, le=2000)
    """Largest coil/discrete-input read the device accepts (the protocol allows 2000)."""
    max_gap: int = Field(default=10, ge=0)
    """Unused registers a coalesced read may span between two tags (0: only adjacent tags)."""
    close_after_scan: bool = False
    """Disconnect after every poll (devices or gateways that allow one TCP client and time it out)."""
    degrade_after: int = Field(default=3, ge=1)
    """Consecutive unanswered requests after which the device is skipped for ``degrade_for``."""
    degrade_for: Duration = 30.0
    """How long a degraded device is skipped (its readings are bad ``degraded``), so a dead
    unit cannot slow down the others on its bus."""

    @model_validator(mode="after")
    def _transport_fields(self) -> Connection:
        if self.transport == "tcp":
            if not self.host:
                raise ValueError("transport tcp needs a host")
            if self.port is not None and not isinstance(self.port, int):
                raise ValueError("transport tcp needs a numeric port")
        elif not isinstance(self.port, str) or not self.port:
            raise ValueError("transport rtu needs port: the serial device path, e.g. /dev/ttyUSB0")
        elif self.host is not None:
            raise ValueError("transport rtu has no host (port is the serial device)")
        return self

    def bus_key(self) -> tuple[str, ...]:
        if self.transport == "tcp":
            return ("tcp", str(self.host), str(self.port or 502))
        return ("rtu", str(self.port))

    def frame_gap_s(self) -> float:
        """RTU inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 bit/s
        (Modbus over serial line, §2.5.1.1). Zero on TCP."""
        if self.transport == "tcp":
            return 0.0
        if self.baudrate > 19200:
            return 0.00175
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return 3.5 * bits / self.baudrate


def _apply_defaults(data: Any) -> Any:
    if not isinstance(data, dict) or not data.get("defaults"):
        return data
    defaults = {
        k: v for k, v in TagDefaults.model_validate(data["defaults"]).model_dump().items() if v is not None
    }
    tags = [{**defaults, **t} if isinstance(t, dict) else t for t in data.get("tags", [])]
    return {**data, "tags": tags}


# --------------------------------------------------------------------------- planning


def coalesce(spans: Sequence[tuple[int, int]], max_count: int, max_gap: int) -> list[tuple[int, int]]:
    """Merge ``(start, width)`` spans of one table into the fewest ``(start, count)`` reads.

    A read covers whole spans only (a multi-register value is never split), is at most
    ``max_count`` long and never bridges more than ``max_gap`` unused registers. Greedy
    in address order is optimal here: any valid read covers a run of consecutive spans,
    and extending the current read as far as possible never leaves more for later.
    """
    reads: list[tuple[int, int]] = []
    start = end = -1  # current read covers [start, end)
    for s, w in sorted(spans):
        if w > max_count:
            raise ValueError(
                f"a value of {w} registers at {s} exceeds the {max_count}-register request limit"
            )
        if start >= 0 and s - end <= max_gap and max(end, s + w) - start <= max_count:
            end = max(end, s + w)
            continue
        if start >= 0:
            reads.append((start, end - start))
        start, end = s, s + w
    if start >= 0:
        reads.append((start, end - start))
    return reads


@dataclass(frozen=True, slots=True)
class _Read:
    table: Table
    start: int
    count: int
    offset: int
    """Position of the read's first register/bit in the group's register or bit image."""
    tags: tuple[int, ...]
    """Indices (in the plan) of the tags this read carries."""


@dataclass(slots=True)
class _Plan:
    """A tag list compiled into reads and decoders."""

    reads: list[_Read]
    n_regs: int
    n_bits: int
    numeric: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], DataType, WordOrder]]
    """(tag indices, register positions, type, order): one vectorised decode each."""
    other: list[tuple[int, Tag, int]]
    """(tag index, tag, image position) of bits, bit fields and strings."""
    n_tags: int
    fast: npt.DTypeLike | None
    """Result dtype when the whole group decodes as one numeric array, else ``None``."""


def build_plan(tags: Sequence[Tag], conn: Connection) -> _Plan:
    located: list[tuple[Table, int, int]] = []
    for tag in tags:
        table, number = tag.table_and_number()
        base = conn.address_base if conn.address_base is not None else tag.address_base
        pdu = number - base
        if not 0 <= pdu <= 65535:
            raise ValueError(
                f"tag {tag.name!r}: address {tag.address} gives PDU address {pdu}, outside 0-65535"
            )
        dtype = tag.data_type
        width = 1 if dtype is DataType.BOOL else register_count(dtype, tag.length)
        located.append((table, pdu, width))
    reads: list[_Read] = []
    image = {"reg": 0, "bit": 0}
    position: dict[int, int] = {}
    for table in ("holding", "input", "coil", "discrete"):
        members = [i for i, loc in enumerate(located) if loc[0] == table]
        if not members:
            continue
        bits = table in BIT_TABLES
        limit = conn.max_bits_per_request if bits else conn.max_registers_per_request
        spans = [(located[i][1], located[i][2]) for i in members]
        chunks = sorted(set(spans)) if conn.one_request_per_tag else coalesce(spans, limit, conn.max_gap)
        kind = "bit" if bits else "reg"
        for start, count in chunks:
            mine = tuple(
                i
                for i in members
                if start <= located[i][1] and located[i][1] + located[i][2] <= start + count
            )
            reads.append(_Read(table, start, count, image[kind], mine))
            for i in mine:
                position.setdefault(i, image[kind] + located[i][1] - start)
            image[kind] += count
    numeric: dict[tuple[DataType, WordOrder], tuple[list[int], list[int]]] = {}
    other: list[tuple[int, Tag, int]] = []
    for i, tag in enumerate(tags):
        dtype = tag.data_type
        if dtype in INTEGER_TYPES or dtype in FLOAT_TYPES:
            idx, pos = numeric.setdefault((dtype, tag.word_order), ([], []))
            idx.append(i)
            pos.append(position[i])
        else:
            other.append((i, tag, position[i]))
    types = {dtype for dtype, _ in numeric}
    fast: npt.DTypeLike | None = None
    if not other and types:
        if types <= INTEGER_TYPES - {DataType.UINT64}:
            fast = np.int64
        elif not types & INTEGER_TYPES:
            fast = np.float64
    return _Plan(
        reads=reads,
        n_regs=image["reg"],
        n_bits=image["bit"],
        numeric=[
            (np.array(idx, dtype=np.intp), np.array(pos, dtype=np.intp), dt, order)
            for (dt, order), (idx, pos) in numeric.items()
        ],
        other=other,
        n_tags=len(tags),
        fast=fast,
    )


def _decode_plan(
    plan: _Plan, regs: npt.NDArray[np.uint16], bits: npt.NDArray[np.bool_], failed: dict[int, str]
) -> tuple[list[Value] | npt.NDArray[Any], list[Quality] | None, list[str | None] | None]:
    """Values of every tag of the plan; failed tags (and undecodable ones) are bad."""
    if plan.fast is not None and not failed:
        out = np.empty(plan.n_tags, dtype=plan.fast)
        for idx, pos, dtype, order in plan.numeric:
            out[idx] = decode_many(regs, pos, dtype, order)
        return out, None, None
    values: list[Value] = [None] * plan.n_tags
    quality = [Quality.GOOD] * plan.n_tags
    reasons: list[str | None] = [None] * plan.n_tags
    for idx, pos, dtype, order in plan.numeric:
        for i, v in zip(idx.tolist(), decode_many(regs, pos, dtype, order).tolist(), strict=True):
            values[i] = v
    for i, tag, at in plan.other:
        if i in failed:
            continue
        try:
            if tag.table_and_number()[0] in BIT_TABLES:
                values[i] = bool(bits[at])
            else:
                width = register_count(tag.data_type, tag.length) if tag.bit is None else 1
                values[i] = decode(
                    regs[at : at + width], tag.data_type, tag.word_order, bit=tag.bit, length=tag.length
                )
        except CodecError:
            quality[i], reasons[i] = Quality.BAD, Reason.DECODE_ERROR
    for i, reason in failed.items():
        values[i], quality[i], reasons[i] = None, Quality.BAD, reason
    return values, quality, reasons


# --------------------------------------------------------------------------- buses


def _guarded(framer: Any, bus: Bus) -> Any:
    """The pymodbus framer, made to note that bytes arrived for the current request and to
    treat a frame it cannot decode as garbage instead of letting the exception escape into
    the transport (which would drop the connection other units on the bus share)."""
    inner = framer.handleFrame

    def handle_frame(data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, Any]:
        bus.rx_bytes += len(data)
        try:
            return inner(data, exp_devid, exp_tid)  # type: ignore[no-any-return]
        except ModbusException:
            return len(data), None

    framer.handleFrame = handle_frame
    return framer


class _Garbled(Exception):
    """Bytes arrived but no valid reply could be read from them before the timeout."""


class Bus:
    """One client connection shared by every device on a serial line or behind a gateway."""

    def __init__(self, key: tuple[str, ...], conn: Connection) -> None:
        self.key = key
        self.conn = conn
        self.lock = asyncio.Lock()
        self.refs = 0
        self.rx_bytes = 0
        self.idle_since = 0.0
        self.gap_s = conn.frame_gap_s()
        # pymodbus's own retry and timeout are disabled: the driver times each request
        # itself (per device) and counts retries; its auto-reconnect is off (the scheduler
        # reconnects with backoff).
        self.client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if conn.transport == "tcp":
            self.client = AsyncModbusTcpClient(
                str(conn.host), port=int(conn.port or 502), timeout=3600, retries=0, reconnect_delay=0
            )
            framer: Any = FramerSocket(DecodePDU(False))
        else:
            self.client = AsyncModbusSerialClient(
                str(conn.port),
                baudrate=conn.baudrate,
                parity=conn.parity,
                stopbits=conn.stopbits,
                bytesize=conn.bytesize,
                timeout=3600,
                retries=0,
                reconnect_delay=0,
            )
            framer = FramerRTU(DecodePDU(False))
        self.client.ctx.framer = _guarded(framer, self)
        # A unit that never answers must not make pymodbus drop the shared connection.
        self.client.set_max_no_responses(1 << 30)

    def compatible(self, conn: Connection) -> bool:
        if conn.transport == "tcp":
            return True
        return (conn.baudrate, conn.parity, conn.stopbits, conn.bytesize) == (
            self.conn.baudrate,
            self.conn.parity,
            self.conn.stopbits,
            self.conn.bytesize,
        )

    async def ensure_connected(self, timeout_s: float) -> None:
        if self.client.connected:
            return
        async with self.lock:
            if self.client.connected:
                return
            try:
                async with asyncio.timeout(timeout_s):
                    ok = await self.client.connect()
            except TimeoutError:
                ok = False
            if not ok:
                self.client.close()
                where = "/".join(self.key[1:])
                raise DeviceError(Reason.NOT_CONNECTED, f"cannot open {self.key[0]} {where}")
            self.idle_since = time.monotonic()

    async def request(
        self, fn: str, address: int, count_or_value: int, unit: int, timeout_s: float, pause: float
    ) -> Any:
        """One request/reply under the bus lock, after the line has been quiet for ``pause``."""
        async with self.lock:
            wait = self.idle_since + max(pause, self.gap_s) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.client.connected:
                raise DeviceError(Reason.COMM_ERROR, "connection lost")
            self.rx_bytes = 0
            method = getattr(self.client, fn)
            kwargs: dict[str, int] = {"device_id": unit}
            if fn.startswith("read_"):
                kwargs["count"] = count_or_value
                call = method(address, **kwargs)
            else:
                call = method(address, count_or_value, **kwargs)
            try:
                async with asyncio.timeout(timeout_s):
                    return await call
            except TimeoutError:
                if self.rx_bytes:
                    raise _Garbled() from None
                raise
            except ModbusIOException as exc:
                raise _Garbled() from exc
            except ConnectionException as exc:
                raise DeviceError(Reason.COMM_ERROR, str(exc)) from exc
            finally:
                self.idle_since = time.monotonic()

    def disconnect(self) -> None:
        self.client.close()


_BUSES: dict[tuple[int, tuple[str, ...]], Bus] = {}


def _acquire_bus(conn: Connection) -> Bus:
    key = (id(asyncio.get_running_loop()), conn.bus_key())
    bus = _BUSES.get(key)
    if bus is None:
        bus = _BUSES[key] = Bus(conn.bus_key(), conn)
    elif not bus.compatible(conn):
        raise DeviceError(Reason.COMM_ERROR, f"devices on {'/'.join(key[1][1:])} disagree on line settings")
    bus.refs += 1
    return bus


def _release_bus(bus: Bus) -> None:
    bus.refs -= 1
    if bus.refs <= 0:
        for k, b in list(_BUSES.items()):
            if b is bus:
                del _BUSES[k]
        bus.disconnect()


# --------------------------------------------------------------------------- driver


@dataclass
class _Outcome:
    """What the reads of one plan produced."""

    regs: npt.NDArray[np.uint16]
    bits: npt.NDArray[np.bool_]
    failed: dict[int, str] = field(default_factory=dict)


class ModbusDriver(Driver):
    protocol = "modbus"
    Tag: ClassVar[type[TagBase]] = Tag
    Group: ClassVar[type[GroupSpec]] = Group
    Connection: ClassVar[type[ConnectionBase]] = Connection

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.connection, Connection):
            raise TypeError("ModbusDriver needs a modbus Connection")
        self.conn: Connection = ctx.connection
        self._plans: dict[str, _Plan] = {}
        self._records: dict[str, _RecordReader] = {}
        for name, group in ctx.groups.items():
            tags = [_as_tag(t) for t in group.tag_specs]
            spec = group.spec
            if isinstance(spec, Group) and spec.records is not None:
                self._records[name] = _RecordReader(self, group, spec.records, tags)
            else:
                self._plans[name] = build_plan(tags, self.conn)
        self._bus: Bus | None = None
        self._misses = 0
        self._degraded_until = 0.0
        self._health = "ok"

    # -- lifecycle

    def backfills(self, group: PollGroup) -> bool:
        """A records-mode group reads the counter's own buffer back after an outage."""
        return group.name in self._records

    async def connect(self) -> None:
        if self._bus is None:
            self._bus = _acquire_bus(self.conn)
        try:
            await self._bus.ensure_connected(self.conn.timeout)
        except DeviceError as exc:
            self._set_health(exc.reason, exc.detail)
            await self.close()
            raise
        if self.conn.connect_delay:
            await asyncio.sleep(self.conn.connect_delay)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            try:
                _release_bus(bus)
            except Exception as exc:  # close must not raise
                log.debug("%s: closing bus failed: %s", self.ctx.id, exc)

    # -- reading

    async def read(self, group: PollGroup) -> list[Block]:
        if time.monotonic() < self._degraded_until:
            return [group.bad(DEGRADED)]
        if self._bus is None or not self._bus.client.connected:
            await self.connect()
        try:
            reader = self._records.get(group.name)
            if reader is not None:
                return await reader.read()
            acq = now_ns()
            outcome = await self._execute(self._plans[group.name])
            values, quality, reasons = _decode_plan(
                self._plans[group.name], outcome.regs, outcome.bits, outcome.failed
            )
            return [group.finish(values, acq_ts_ns=acq, quality=quality, reasons=reasons)]
        finally:
            if self.conn.close_after_scan and self._bus is not None and self._bus.refs == 1:
                self._bus.disconnect()

    async def _execute(self, plan: _Plan) -> _Outcome:
        """Run a plan's reads; exception replies and garbage fail only their own read.

        Raises :class:`DeviceError` when the device stays silent (after retries).
        """
        out = _Outcome(np.zeros(plan.n_regs, dtype=np.uint16), np.zeros(plan.n_bits, dtype=np.bool_))
        for rd in plan.reads:
            reply = await self._call(_READ_FUNCTIONS[rd.table], rd.start, rd.count)
            if isinstance(reply, str):
                out.failed.update(dict.fromkeys(rd.tags, reply))
                continue
            got = reply.bits[: rd.count] if rd.table in BIT_TABLES else reply.registers
            if len(got) != rd.count:
                self.ctx.stats.error("wrong_length")
                self._set_health(
                    Reason.DECODE_ERROR, f"{rd.table} {rd.start}: {len(got)} of {rd.count} values"
                )
                out.failed.update(dict.fromkeys(rd.tags, Reason.DECODE_ERROR))
                continue
            if rd.table in BIT_TABLES:
                out.bits[rd.offset : rd.offset + rd.count] = got
            else:
                out.regs[rd.offset : rd.offset + rd.count] = got
        if not out.failed:
            self._set_health("ok")
        return out

    async def _call(self, fn: str, address: int, count_or_value: int) -> Any:
        """One request with retries. Returns the reply, or the quality reason (``str``) of
        a refused or garbled request; raises :class:`DeviceError` on silence."""
        if self._bus is None:
            # Another poll group's failure closed the connection while this poll waited.
            raise DeviceError(Reason.NOT_CONNECTED, "connection closed")
        stats = self.ctx.stats
        attempts = self.conn.retries + 1
        for attempt in range(attempts):
            if attempt:
                stats.retries += 1
            t0 = time.monotonic()
            try:
                reply = await self._bus.request(
                    fn, address, count_or_value, self.conn.unit_id, self.conn.timeout, self.conn.request_delay
                )
            except TimeoutError:
                stats.error(Reason.TIMEOUT)
                # Counted per request, not per poll: the scheduler may cancel a poll whose
                # retries outlast its deadline, and the count must survive that.
                if self._missed():
                    break
                continue
            except _Garbled:
                stats.error("garbled")
                self._set_health(Reason.COMM_ERROR, f"garbled reply to {fn} {address}")
                return Reason.COMM_ERROR
            except DeviceError as exc:
                stats.error(exc.reason)
                self._set_health(exc.reason, exc.detail)
                raise
            stats.request_done(time.monotonic() - t0)
            self._misses = 0
            if not reply.isError():
                return reply
            name = EXCEPTION_NAMES.get(reply.exception_code, f"exception_{reply.exception_code}")
            stats.error(name)
            if reply.exception_code == 6 and attempt + 1 < attempts:
                await asyncio.sleep(self.conn.retry_busy_wait)
                continue
            self._set_health(name, f"{fn} {address}")
            return name
        if time.monotonic() >= self._degraded_until:  # else "degraded" was just logged
            self._set_health(Reason.TIMEOUT, f"unit {self.conn.unit_id} did not answer {fn} {address}")
        raise DeviceError(Reason.TIMEOUT, f"unit {self.conn.unit_id} did not answer")

    def _missed(self) -> bool:
        """Count an unanswered request; True when that degrades the device."""
        self._misses += 1
        if self._misses < self.conn.degrade_after:
            return False
        self._degraded_until = time.monotonic() + self.conn.degrade_for
        self._misses = self.conn.degrade_after - 1  # one more miss after the pause degrades again
        self._set_health(DEGRADED, f"skipped for {self.conn.degrade_for:g}s after repeated timeouts")
        return True

    def _set_health(self, state: str, detail: str = "") -> None:
        """Log a device's state only when it changes: a dead device is one line, not one per poll."""
        if state == self._health:
            return
        if state == "ok":
            log.info("%s: communicating again (was %s)", self.ctx.id, self._health)
        else:
            log.warning("%s: %s %s", self.ctx.id, state, detail)
        self._health = state

    async def write_register(self, address: int, value: int) -> str | None:
        """Write one holding register (PDU address); the exception name if refused."""
        reply = await self._call("write_register", address, value)
        return reply if isinstance(reply, str) else None

    @classmethod
    def profile_model(cls) -> type[ProfileBase]:
        """The generic profile plus ``defaults:`` (tag fields set once for all tags)."""
        cached = cls.__dict__.get("_modbus_profile_model")
        if cached is None:
            generic: Any = super().profile_model()

            class ModbusProfile(generic):  # type: ignore[misc]
                defaults: TagDefaults | None = None
                """Tag fields applied to every tag that does not set them (e.g. ``table: input``,
                ``word_order: CDAB``)."""

                @model_validator(mode="before")
                @classmethod
                def _defaults(cls, data: Any) -> Any:
                    return _apply_defaults(data)

                @model_validator(mode="after")
                def _record_tags_in_group(self) -> Any:
                    for name, spec in self.groups.items():
                        if isinstance(spec, Group) and spec.records is not None:
                            here = {t.name for t in self.tags if t.group == name}
                            missing = [n for n in spec.records.referenced_tags() if n not in here]
                            if missing:
                                raise ValueError(
                                    f"group {name!r}: records layout names tags not in the group: {missing}"
                                )
                    return self

            cached = ModbusProfile
            cls._modbus_profile_model = cached  # type: ignore[attr-defined]
        return cached


class _RecordReader:
    """Drains a record buffer after the watermark (the newest record timestamp delivered).

    Positions shift while a full buffer is drained (a new record pushes the oldest out),
    so the reader finds its place by timestamp (binary search: timestamps grow with
    position), checks that each record is newer than the one before, and after a batch
    on a full buffer re-checks that the first position still holds the same record; if
    not, the batch is dropped and re-read next poll (the watermark has not moved, so
    nothing is lost or duplicated).
    """

    def __init__(self, driver: ModbusDriver, group: PollGroup, layout: RecordLayout, tags: list[Tag]) -> None:
        self.driver = driver
        self.group = group
        self.layout = layout
        names = [t.name for t in tags]  # the profile checked that the layout's tags are here
        self.ts_index = names.index(layout.timestamp_tag)
        self.bad_bits = [names.index(n) for n in layout.bad_when]
        self.uncertain_bits = [names.index(n) for n in layout.uncertain_when]
        self.exempt = {self.ts_index, *self.bad_bits, *self.uncertain_bits}
        conn = driver.conn
        self.record_plan = build_plan(tags, conn)
        self.ts_plan = build_plan([tags[self.ts_index]], conn)
        self.count_plan = build_plan([Tag(name="record_count", address=layout.count_address)], conn)
        self.index_address = (
            build_plan([Tag(name="record_index", address=layout.index_address)], conn).reads[0].start
        )
        self.state_key = f"{group.name}.last_ts"
        stored = driver.ctx.state.get(self.state_key)
        self.watermark: int | None = int(stored) if stored else None
        self.last_count: int | None = None

    async def _values(self, plan: _Plan) -> list[Value]:
        outcome = await self.driver._execute(plan)
        values, _, _ = _decode_plan(plan, outcome.regs, outcome.bits, outcome.failed)
        if outcome.failed:
            raise _RecordUnavailable(next(iter(outcome.failed.values())))
        return values.tolist() if isinstance(values, np.ndarray) else values

    async def _select(self, index: int) -> None:
        refused = await self.driver.write_register(self.index_address, index)
        if refused is not None:
            raise _RecordUnavailable(refused)

    async def _ts_at(self, position: int) -> int:
        await self._select(position)
        ts = (await self._values(self.ts_plan))[0]
        if not isinstance(ts, int):
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        return ts

    async def read(self) -> list[Block]:
        try:
            return await self._drain()
        except _RecordUnavailable as exc:
            return [self.group.bad(exc.reason)]

    async def _drain(self) -> list[Block]:
        # Blocks are returned only when the poll ends, so a poll the scheduler cancels
        # delivers nothing: stop taking records after half the group's timeout, and a
        # large backlog drains over several polls instead of never.
        budget_end = time.monotonic() + 0.5 * self.group.timeout_s
        layout = self.layout
        count = (await self._values(self.count_plan))[0]
        if not isinstance(count, int) or count < 0:
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        previous_count, self.last_count = self.last_count, count
        if count == 0:
            return []
        first, last = layout.first_index, layout.first_index + count - 1
        wm = self.watermark
        loss: dict[str, Any] | None = None
        if wm is None and not layout.backfill:
            block = await self._record(layout.newest_index)
            self.watermark = _seconds(block)
            return [block]
        if wm is None:
            start = first
        else:
            if await self._ts_at(last) <= wm:
                return []
            lo, hi = first, last  # invariant: ts(hi) > wm
            if last > first:  # the common case, one new record, costs one probe
                if await self._ts_at(last - 1) <= wm:
                    lo = last
                else:
                    hi = last - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if await self._ts_at(mid) > wm:
                    hi = mid
                else:
                    lo = mid + 1
            start = lo
            if start == first and (count >= layout.capacity or (previous_count or 0) > count):
                why = "device_buffer_wrapped" if count >= layout.capacity else "device_buffer_cleared"
                loss = {"reason": why, "group": self.group.name, "after_ts": wm}
        blocks: list[Block] = []
        prev = wm
        for position in range(start, min(last, start + layout.max_records_per_read - 1) + 1):
            if blocks and time.monotonic() > budget_end:
                break
            block = await self._record(position)
            if prev is not None and _seconds(block) <= prev:
                break  # positions moved under us: the rest comes next poll
            prev = _seconds(block)
            blocks.append(block)
        if blocks and count >= layout.capacity and await self._ts_at(start) != _seconds(blocks[0]):
            return []  # the buffer rotated during the batch: re-read it next poll
        if loss is not None and blocks:
            oldest = _seconds(blocks[0])
            loss["oldest_available_ts"] = oldest
            if len(blocks) > 1 and _seconds(blocks[1]) > oldest and wm is not None:
                loss["estimated_records"] = max(0, round((oldest - wm) / (_seconds(blocks[1]) - oldest)) - 1)
            self.driver.ctx.stats.error("device_records_lost")
            blocks[0].events = [Event(self.driver.ctx.id, "data_loss", Severity.ALARM, loss)]
        if prev is not None:
            self.watermark = prev
        return blocks

    async def _record(self, index: int) -> Block:
        acq = now_ns()
        await self._select(index)
        values = await self._values(self.record_plan)
        ts = values[self.ts_index]
        if not isinstance(ts, int):
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        block = self.group.finish(values, acq_ts_ns=acq, source_ts_ns=ts * 1_000_000_000)
        block.state = {self.state_key: str(ts)}
        worst = None
        if any(values[i] for i in self.bad_bits):
            worst = Quality.BAD
        elif any(values[i] for i in self.uncertain_bits):
            worst = Quality.UNCERTAIN
        if worst is not None:
            # Readings taken under a device fault keep their values (the original record)
            # but never pass as good; a reading already bad (out of range) stays so. The
            # timestamp and the status bits themselves are the device's own report.
            n = len(values)
            qs = block.quality or [Quality.GOOD] * n
            rs = block.reasons or [None] * n
            block.quality = [q if q is Quality.BAD or i in self.exempt else worst for i, q in enumerate(qs)]
            block.reasons = [
                r if q is Quality.BAD or i in self.exempt else Reason.DEVICE_STATUS
                for i, (q, r) in enumerate(zip(qs, rs, strict=True))
            ]
        return block


class _RecordUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _seconds(block: Block) -> int:
    assert isinstance(block.source_ts_ns, int)
    return block.source_ts_ns // 1_000_000_000


def _as_tag(spec: TagBase) -> Tag:
    if isinstance(spec, Tag):
        return spec
    raise TypeError(f"tag {spec.name!r} is not a modbus tag (profile protocol mismatch)")
