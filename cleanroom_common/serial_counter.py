"""The serial particle counter's ASCII protocol (Lasair-like), both directions: line framing
with its XOR checksum, the command set, and the sample record of an ``RTD2`` reply.

The driver reads a counter by these rules and the simulator serves by them, so the two
cannot drift apart on a field position, a checksum or a command name. The protocol is
specified in docs/simulators.md ("Serial ASCII particle counter protocol").

Framing: every reply is ``<payload>*<XX>\\r\\n`` with XX the XOR of the payload bytes;
a command may carry the same checksum. Whatever bytes arrive, the only exception the
parsers here raise is :class:`FrameError`, so a host can count and retry and a device can
answer with an error line.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

M3_PER_UNIT = {"L": 0.001, "m3": 1.0, "ft3": 0.028316846592}
"""Cubic metres per volume unit a record may be expressed in."""
MAX_COUNT = 2**32 - 1
"""Largest count, channel number or queue figure a field may carry: the counter's registers are
unsigned 32-bit. A longer number is line noise, and refused here rather than overflowing a
float (a count per volume) further down."""
_UINT = re.compile(r"[0-9]{1,10}")
_DECIMAL = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")
"""Decimal numbers as the counter writes them (``60``, ``28.3``, ``0.5``): no sign, exponent,
``nan``/``inf``, underscore or spaces, all of which Python's ``float`` would accept."""


class FrameError(ValueError):
    """A line or record that does not follow the protocol. The only exception the parsers
    raise, whatever bytes arrive; ``kind`` names the counter a host counts it under."""

    def __init__(self, message: str, kind: str = "garbled") -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- framing


def checksum(payload: bytes) -> int:
    x = 0
    for b in payload:
        x ^= b
    return x


def frame(payload: str) -> bytes:
    """A command or reply line with its checksum (commands carry one too, so a command
    damaged on the wire is refused by the device instead of misread)."""
    data = payload.encode("ascii")
    return data + b"*%02X\r\n" % checksum(data)


def parse_reply(line: bytes) -> str:
    """The payload of one reply line, checksum verified (a reply must carry one)."""
    body = line.rstrip(b"\r\n")
    payload, star, xx = body.rpartition(b"*")
    if not star or len(xx) != 2:
        raise FrameError(f"no checksum in reply {line[:40]!r}")
    try:
        expected = int(xx.decode("ascii"), 16)
        text = payload.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        raise FrameError(f"garbled reply {line[:40]!r}") from None
    if not xx.isalnum() or checksum(payload) != expected:
        raise FrameError(f"checksum mismatch in reply {line[:40]!r}", kind="checksum")
    if not text.isprintable():
        raise FrameError(f"control characters in reply {line[:40]!r}")
    return text


def parse_command(line: str) -> str:
    """The command on one command line as a device reads it: surrounding spaces dropped,
    the checksum verified when the line carries one (a command may go without).

    Characters outside ASCII count as ``?`` in the checksum, so a line of noise is refused
    with a checksum error instead of failing to encode."""
    command, star, given = line.strip().partition("*")
    if star and given.upper() != f"{checksum(command.encode('ascii', 'replace')):02X}":
        raise FrameError(f"checksum mismatch in command {line[:40]!r}", kind="checksum")
    return command.strip()


# --------------------------------------------------------------------------- commands


class Command(StrEnum):
    """The counter's commands (docs/simulators.md, "Commands")."""

    START = "CSS"
    STOP = "CSP"
    QUEUED = "CQC"
    READ_OLDEST = "CTD2"
    """The oldest queued record, without removing it."""
    POP_OLDEST = "CPQ"
    SERIAL = "CSN"
    STATUS = "CST"

    @property
    def reply(self) -> str:
        """The first word of this command's reply (``R`` in place of the ``C``)."""
        return "R" + self.value[1:]

    @property
    def replies(self) -> tuple[str, ...]:
        """Every first word a reply to this command may have, besides an error."""
        return (self.reply, NO_RECORD) if self is Command.READ_OLDEST else (self.reply,)


NO_RECORD = "RND2"
"""The reply to :attr:`Command.READ_OLDEST` on an empty queue."""
ERR_PREFIX = "ERR"
ERR_UNKNOWN = "ERR UNKNOWN"
"""The reply to a command the device does not know (also to noise)."""
ERR_CHECKSUM = "ERR CHECKSUM"
ERR_BUSY = "ERR BUSY"


def reply(command: Command, *fields: object) -> str:
    """The payload of a reply to ``command``: its first word, then the fields, space-separated."""
    return " ".join([command.reply, *map(str, fields)])


def reply_body(command: Command, payload: str) -> str:
    """What follows the first word of a reply payload to ``command``."""
    return payload[len(command.reply) :].strip()


class Status(NamedTuple):
    """The ``CST`` reply: ``RST <running> <queued> <lost>``."""

    running: bool
    queued: int
    lost: int
    """Records dropped from a full queue since the counter started."""


def format_status(status: Status) -> str:
    return reply(Command.STATUS, int(status.running), status.queued, status.lost)


def parse_status(payload: str) -> Status:
    """The status in a ``CST`` reply payload."""
    fields = payload.split(" ")
    if len(fields) != 4 or fields[0] != Command.STATUS.reply:
        raise FrameError(f"malformed status reply {payload[:40]!r}")
    return Status(_flag(fields[1]), _uint(fields[2], "queued"), _uint(fields[3], "lost"))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CounterRecord:
    """One sample record as the counter reports it (docs/simulators.md, "Record format")."""

    ts_ns: int
    """Sample end, UTC; the wire carries whole seconds."""
    sensor: str
    serial: str
    laser_ok: bool
    flow_ok: bool
    sample_valid: bool
    sample_time_s: float
    """Whole seconds on the wire."""
    volume: float
    """In ``volume_unit``; one decimal on the wire."""
    volume_unit: str
    channels: tuple[tuple[float, int], ...]
    """(size µm, cumulative count) pairs, smallest size first; sizes have one decimal on the wire."""

    @property
    def volume_m3(self) -> float:
        return self.volume * M3_PER_UNIT[self.volume_unit]


def format_record(record: CounterRecord) -> str:
    """The CSV of an ``RTD2`` reply, fields in the documented order."""
    ts = time.gmtime(record.ts_ns // 1_000_000_000)
    fields = [
        time.strftime("%Y-%m-%d", ts),
        time.strftime("%H:%M:%S", ts),
        record.sensor,
        record.serial,
        str(int(record.laser_ok)),
        str(int(record.flow_ok)),
        str(int(record.sample_valid)),
        str(round(record.sample_time_s)),
        f"{record.volume:.1f}",
        record.volume_unit,
        str(len(record.channels)),
    ]
    for size, count in record.channels:
        fields += [f"{size:.1f}", str(count)]
    return ",".join(fields)


def _flag(s: str) -> bool:
    if s not in ("0", "1"):
        raise FrameError(f"status flag {s[:20]!r} is not 0/1")
    return s == "1"


def _uint(s: str, what: str) -> int:
    if _UINT.fullmatch(s) is None or (n := int(s)) > MAX_COUNT:
        raise FrameError(f"{what} {s[:20]!r} is not a whole number up to {MAX_COUNT}")
    return n


def _decimal(s: str, what: str) -> float:
    if _DECIMAL.fullmatch(s) is None:
        raise FrameError(f"{what} {s[:20]!r} is not a decimal number")
    return float(s)


def parse_record(text: str) -> CounterRecord:
    """The record in the CSV of an ``RTD2`` reply."""
    f = text.split(",")
    if len(f) < 11:
        raise FrameError(f"record has {len(f)} fields, expected at least 11")
    try:
        ts = calendar.timegm(time.strptime(f"{f[0]} {f[1]}", "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        raise FrameError(f"malformed record time {f[0][:12]!r} {f[1][:12]!r}") from None
    k = _uint(f[10], "channel count")
    sample_time, volume = _decimal(f[7], "sample time"), _decimal(f[8], "volume")
    pairs = f[11:]
    if len(pairs) != 2 * k:
        raise FrameError(f"record announces {k} channels but carries {len(pairs) / 2:g}")
    channels = tuple(
        (_decimal(pairs[2 * i], "channel size"), _uint(pairs[2 * i + 1], "count")) for i in range(k)
    )
    if f[9] not in M3_PER_UNIT:
        raise FrameError(f"unknown volume unit {f[9][:20]!r}")
    return CounterRecord(
        ts_ns=ts * 1_000_000_000,
        sensor=f[2],
        serial=f[3],
        laser_ok=_flag(f[4]),
        flow_ok=_flag(f[5]),
        sample_valid=_flag(f[6]),
        sample_time_s=sample_time,
        volume=volume,
        volume_unit=f[9],
        channels=channels,
    )
