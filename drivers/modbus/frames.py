"""Modbus framing without I/O: requests to bytes, received bytes to frames (or junk), and the
verdict on whether a frame answers the request it arrived for.

Kept apart from the link (:mod:`drivers.modbus.bus`) so the fuzz suite can drive millions of
malformed bytes through exactly the decoding the driver uses, without sockets.

The client side only ever needs a handful of functions (read coils, discrete inputs, holding
and input registers; write one register), so replies are decoded here, strictly: a frame
answers a request only if its unit id, function code and (TCP) transaction id match and its
byte count is the one the request implies. Everything else is a typed verdict, never an
exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

READ_COILS = 1
READ_DISCRETE = 2
READ_HOLDING = 3
READ_INPUT = 4
WRITE_REGISTER = 6
BIT_READS = frozenset({READ_COILS, READ_DISCRETE})
REGISTER_READS = frozenset({READ_HOLDING, READ_INPUT})

MAX_PDU = 253
"""Largest PDU the protocol allows (function code and data)."""

JUNK_BYTES_PER_BAD_FRAME = 256
"""Bytes that never form a frame count as one bad frame per this many (the largest RTU ADU):
a junk stream is judged by its volume, whether it comes in large pieces or small ones."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc, bits = 0, byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if (bits ^ crc) & 1 else crc >> 1
            bits >>= 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 of ``data``; on the wire it is sent low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the driver sends it: ``value`` is the count for reads, the register value
    for a write."""

    unit: int
    function: int
    address: int
    value: int

    def pdu(self) -> bytes:
        return struct.pack(">BHH", self.function, self.address, self.value)

    def data_bytes(self) -> int:
        """The byte count a normal reply to this read must carry."""
        if self.function in BIT_READS:
            return (self.value + 7) // 8
        return 2 * self.value

    def reply_size(self) -> int:
        """Length of the PDU of a normal reply."""
        if self.function == WRITE_REGISTER:
            return 5
        return 2 + self.data_bytes()

    def could_be_answered_by(self, frame: Frame) -> bool:
        """Whether ``frame`` looks like a reply to this request (unit, function, length): all an
        RTU frame, which carries no transaction id, can say about what it answers."""
        if frame.unit != self.unit or not frame.pdu:
            return False
        if frame.pdu[0] == self.function | 0x80:
            return len(frame.pdu) == 2
        return frame.pdu[0] == self.function and len(frame.pdu) == self.reply_size()


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete frame off the wire: unit id, transaction id (0 on RTU) and PDU."""

    unit: int
    tid: int
    pdu: bytes


class Fault(StrEnum):
    """Why a frame does not answer its request; each is a counter of the device's stats."""

    BAD_REPLY = "bad_reply"
    """A well-formed frame that answers something else (unit id, function code, transaction id)."""
    WRONG_LENGTH = "wrong_length"
    """A well-formed reply whose byte count is not the one the request asked for."""
    GARBLED = "garbled"
    """A frame whose own fields disagree (byte count against its length)."""
    AMBIGUOUS = "ambiguous_reply"
    """RTU: the only frame that came could answer this request or an earlier unanswered one."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame that answers its request: the registers or bits read, or the device's refusal."""

    registers: tuple[int, ...] = ()
    bits: tuple[bool, ...] = ()
    exception_code: int | None = None


@dataclass(frozen=True, slots=True)
class Mismatch:
    fault: Fault
    detail: str


def judge(request: Request, frame: Frame) -> Reply | Mismatch:
    """Whether ``frame`` answers ``request`` (the transaction id is the link's business)."""
    pdu = frame.pdu
    if request.unit and frame.unit != request.unit:
        return Mismatch(Fault.BAD_REPLY, f"unit id {frame.unit} answered a request to unit {request.unit}")
    fc = pdu[0]
    if fc == request.function | 0x80:
        if len(pdu) != 2:
            return Mismatch(Fault.GARBLED, f"exception reply of {len(pdu)} bytes")
        return Reply(exception_code=pdu[1])
    if fc != request.function:
        return Mismatch(Fault.BAD_REPLY, f"function {fc:#04x} answered function {request.function:#04x}")
    if request.function == WRITE_REGISTER:
        if pdu != request.pdu():
            return Mismatch(Fault.BAD_REPLY, "write reply does not echo the request")
        return Reply()
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
        return Mismatch(
            Fault.GARBLED, f"byte count {pdu[1] if len(pdu) > 1 else None} in a {len(pdu)}-byte PDU"
        )
    if pdu[1] != request.data_bytes():
        return Mismatch(
            Fault.WRONG_LENGTH,
            f"{pdu[1]} data bytes for {request.value} values ({request.data_bytes()} expected)",
        )
    data = pdu[2:]
    if request.function in BIT_READS:
        bits = tuple(bool(data[i >> 3] >> (i & 7) & 1) for i in range(request.value))
        return Reply(bits=bits)
    return Reply(registers=struct.unpack(f">{request.value}H", data))


# --------------------------------------------------------------------------- deframing


class Deframer:
    """Splits a received byte stream into frames and junk.

    ``feed`` returns what the new bytes completed, in order: :class:`Frame` objects and
    ints (a number of junk bytes dropped). It never raises and never holds more than one
    maximal ADU, so a stream of junk costs memory and time in proportion to what arrives.
    """

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[Frame | int]:
        self.buf += data
        out: list[Frame | int] = []
        while self.buf:
            item = self._next()
            if item is None:
                break
            out.append(item)
        return out

    def clear(self) -> None:
        self.buf = b""

    def _next(self) -> Frame | int | None:
        raise NotImplementedError

    @staticmethod
    def encode(request: Request, tid: int) -> bytes:
        raise NotImplementedError


class TcpDeframer(Deframer):
    """MBAP frames: transaction id, protocol id 0, length (unit + PDU, at most 254), unit id.

    A header that cannot be Modbus (protocol id not 0, impossible length) makes the whole
    buffer junk: a TCP stream cannot be resynchronised from inside, and waiting on a lying
    length would only buffer more junk.
    """

    def _next(self) -> Frame | int | None:
        buf = self.buf
        if len(buf) < 7:
            return None
        tid, pid, length, unit = struct.unpack_from(">HHHB", buf)
        if pid != 0 or not 2 <= length <= MAX_PDU + 1:
            dropped, self.buf = len(buf), b""
            return dropped
        end = 6 + length
        if len(buf) < end:
            return None
        frame, self.buf = Frame(unit, tid, buf[7:end]), buf[end:]
        return frame

    @staticmethod
    def encode(request: Request, tid: int) -> bytes:
        pdu = request.pdu()
        return struct.pack(">HHHB", tid, 0, len(pdu) + 1, request.unit) + pdu


def rtu_frame_size(head: bytes) -> int | None:
    """Length of the RTU reply starting ``head`` (unit, function[, byte count]), 0 if it cannot
    start a reply this client understands, ``None`` if more bytes are needed to tell."""
    if len(head) < 2:
        return None
    fc = head[1]
    if fc & 0x80:
        return 5 if (fc & 0x7F) in BIT_READS | REGISTER_READS | {WRITE_REGISTER} else 0
    if fc == WRITE_REGISTER:
        return 8
    if fc in BIT_READS or fc in REGISTER_READS:
        if len(head) < 3:
            return None
        count = head[2]
        if count == 0 or count > 250 or (fc in REGISTER_READS and count % 2):
            return 0
        return 5 + count
    return 0


class RtuDeframer(Deframer):
    """RTU frames: unit, PDU, CRC; no length field, so the function code says how long a reply
    is. A position that cannot start a reply, or whose CRC fails, is junk: the deframer
    drops that byte and hunts on (noise before a reply costs the reply nothing)."""

    def _next(self) -> Frame | int | None:
        dropped = 0
        buf = self.buf
        while True:
            at = dropped
            size = rtu_frame_size(buf[at : at + 3])
            if size is None:
                break
            if size and len(buf) - at < size:
                break
            if size and crc16(buf[at : at + size - 2]) == int.from_bytes(
                buf[at + size - 2 : at + size], "little"
            ):
                if dropped:
                    break  # report the junk first; the frame comes on the next call
                self.buf = buf[size:]
                return Frame(buf[0], 0, buf[1 : size - 2])
            dropped += 1
            if dropped >= JUNK_BYTES_PER_BAD_FRAME:
                break
        if dropped:
            self.buf = buf[dropped:]
            return dropped
        return None

    @staticmethod
    def encode(request: Request, tid: int) -> bytes:
        adu = bytes([request.unit]) + request.pdu()
        return adu + crc16(adu).to_bytes(2, "little")
