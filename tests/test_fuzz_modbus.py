"""Fuzzing the Modbus driver's receive path, TCP and RTU (issue 11): more than 10,000
malformed replies each, random and structure-aware (wrong lengths, MBAP length lies,
truncation, bad CRC, exception codes, wrong function codes and ids, oversize byte counts,
noise around frames), in small and large pieces.

The bulk runs through the link the driver uses (:class:`drivers.modbus.bus._Link`: framing,
matching, junk accounting) over an in-memory transport, many replies per connection; a
sample then runs end to end over a real socket and a pty. Properties: nothing but the
driver's own typed failures escapes, a malformed reply is never taken for a good one, CPU
stays bounded, and the device is good again once it behaves.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.records import Block
from drivers.modbus.bus import BadReply, Garbled, _Link
from drivers.modbus.driver import Connection, ModbusDriver
from drivers.modbus.frames import Reply, Request
from tests.support import MbapPeer, PtyPeer, crc, mbap

CASES = 10_000
FUNCTIONS = (1, 2, 3, 4, 6)


def good_pdu(req: Request) -> bytes:
    """The correct reply: register i holds 1000 + i, every third bit is set, a write is echoed."""
    if req.function == 6:
        return req.pdu()
    if req.function in (1, 2):
        bits = [i % 3 == 0 for i in range(req.value)]
        packed = bytes(
            sum(1 << j for j in range(8) if 8 * k + j < len(bits) and bits[8 * k + j])
            for k in range(len(bits) // 8 + (len(bits) % 8 > 0))
        )
        return bytes([req.function, len(packed)]) + packed
    return bytes([req.function, 2 * req.value]) + struct.pack(
        f">{req.value}H", *(1000 + i for i in range(req.value))
    )


def expected(req: Request) -> Reply:
    if req.function == 6:
        return Reply()
    if req.function in (1, 2):
        return Reply(bits=tuple(i % 3 == 0 for i in range(req.value)))
    return Reply(registers=tuple(1000 + i for i in range(req.value)))


def decoy_pdu(req: Request) -> bytes:
    """A well-formed reply with other values: mutations start from it, so a malformed reply
    taken as good would show as wrong values."""
    pdu = bytearray(good_pdu(req))
    for i in range(2 if req.function != 6 else 3, len(pdu)):
        pdu[i] ^= 0x5A
    return bytes(pdu)


def valid_answer(req: Request, pdu: bytes) -> bool:
    """Whether a mutation happened to produce a well-formed reply (such a reply is legitimately
    taken; mutations that produce one are discarded)."""
    if len(pdu) == 2 and pdu[0] == req.function | 0x80:
        return True
    if req.function == 6:
        return pdu == req.pdu()
    return len(pdu) == req.reply_size() and pdu[0] == req.function and pdu[1] == len(pdu) - 2


def bad_pdu(rng: random.Random, req: Request) -> bytes:
    """One structure-aware or random malformation of the reply PDU."""
    base = decoy_pdu(req)
    kind = rng.randrange(8)
    if kind == 0:  # wrong function code
        fc = rng.choice([f for f in range(256) if f not in (req.function, req.function | 0x80)])
        return bytes([fc]) + base[1:]
    if kind == 1:  # exception reply, well-formed or not, any code
        return bytes([req.function | 0x80]) + rng.randbytes(rng.choice([0, 1, 1, 2, 5]))
    if kind == 2:  # byte count lies, data unchanged
        return base[:1] + bytes([rng.randrange(256)]) + base[2:]
    if kind == 3:  # oversize byte count with that much data
        n = rng.randrange(req.reply_size(), 256)
        return base[:1] + bytes([n]) + rng.randbytes(n)
    if kind == 4:  # truncated
        return base[: rng.randrange(len(base))]
    if kind == 5:  # extra bytes
        return base + rng.randbytes(rng.randint(1, 8))
    if kind == 6:  # random PDU
        return rng.randbytes(rng.randint(0, 260))
    return bytes([req.function]) + rng.randbytes(rng.randint(0, 20))  # right function, random body


def request(rng: random.Random) -> Request:
    fc = rng.choice(FUNCTIONS)
    value = rng.randrange(65536) if fc == 6 else rng.randint(1, 2000 if fc in (1, 2) else 125)
    return Request(unit=1, function=fc, address=rng.randrange(65536 - 2000), value=value)


def tcp_bad(rng: random.Random, req: Request, tid: int) -> bytes:
    """A malformed MBAP reply: a bad PDU, or a good PDU with a lying header."""
    pdu = bad_pdu(rng, req)
    unit, length, pid = req.unit, len(pdu) + 1, 0
    kind = rng.randrange(7)
    if kind == 1:
        pdu = good_pdu(req)
        tid = rng.choice([0, (tid + rng.randint(1, 500)) & 0xFFFF])
    elif kind == 2:
        pdu, unit = good_pdu(req), rng.choice([u for u in range(256) if u != req.unit])
    elif kind == 3:
        pdu, pid = good_pdu(req), rng.randint(1, 0xFFFF)
    elif kind == 4:  # MBAP length lies
        pdu = good_pdu(req)
        length = rng.choice([0, 1, rng.randrange(65536)])
    elif kind == 5:
        return rng.randbytes(rng.randint(1, 300))
    elif kind == 6:  # a truncated header or frame
        return (struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)[: rng.randint(1, 7 + len(pdu))]
    return struct.pack(">HHHB", tid, pid, length & 0xFFFF, unit) + pdu


def rtu_bad(rng: random.Random, req: Request) -> bytes:
    pdu = bad_pdu(rng, req)
    kind = rng.randrange(6)
    if kind == 1:  # good frame, bad CRC
        body = bytes([req.unit]) + good_pdu(req)
        return body + bytes(b ^ rng.randint(1, 255) for b in crc(body))
    if kind == 2:  # other unit
        body = bytes([rng.choice([u for u in range(256) if u != req.unit])]) + good_pdu(req)
        return body + crc(body)
    if kind == 3:  # noise
        return rng.randbytes(rng.randint(1, 300))
    if kind == 4:  # truncated frame
        body = bytes([req.unit]) + good_pdu(req)
        return (body + crc(body))[: rng.randint(1, len(body) + 1)]
    body = bytes([req.unit]) + pdu
    return body + crc(body)


class MemoryTransport:
    """An in-memory transport: what the link writes is answered by ``answer`` at once, delivered
    in pieces of 1 to 1024 bytes like a socket's reads."""

    def __init__(self, link: _Link, rng: random.Random, answer: Callable[[bytes], bytes]) -> None:
        self.link = link
        self.rng = rng
        self.answer = answer
        self.closed = False
        link.connection_made(self)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        out = self.answer(data)
        while out and not self.closed:
            n = self.rng.choice([1, 2, 7, 64, 1024])
            self.link.data_received(out[:n])
            out = out[n:]

    def close(self) -> None:
        self.closed = True


def tcp_answers(rng: random.Random, req: Request, adu: bytes) -> tuple[bytes, bytes, bool]:
    """(malformed reply, correct reply, whether the mutation happened to be well-formed)."""
    tid = struct.unpack(">H", adu[:2])[0]
    good = struct.pack(">HHHB", tid, 0, len(good_pdu(req)) + 1, req.unit) + good_pdu(req)
    bad = tcp_bad(rng, req, tid)
    valid = (
        len(bad) >= 7
        and bad[:4] == adu[:2] + b"\0\0"
        and bad[6] == req.unit
        and struct.unpack(">H", bad[4:6])[0] == len(bad) - 6
        and valid_answer(req, bad[7:])
    )
    return bad, good, valid


def rtu_answers(rng: random.Random, req: Request, adu: bytes) -> tuple[bytes, bytes, bool]:
    body = bytes([req.unit]) + good_pdu(req)
    bad = rtu_bad(rng, req)
    valid = (
        len(bad) >= 4 and bad[0] == req.unit and crc(bad[:-2]) == bad[-2:] and valid_answer(req, bad[1:-2])
    )
    return bad, body + crc(body), valid


async def fuzz_link(rtu: bool, seed: int) -> dict[str, int]:
    """Each request gets a malformed reply followed by the correct one, many per connection: the
    link returns the correct reply or one of its typed failures, never a malformed reply as good."""
    rng = random.Random(seed)
    make = rtu_answers if rtu else tcp_answers
    outcomes: dict[str, int] = {}
    counters: dict[str, int] = {}
    state: dict[str, Any] = {"behave": False}

    def answer(adu: bytes) -> bytes:
        bad, good, valid = make(rng, state["req"], adu)
        state["valid"] = valid
        return good if state["behave"] else bad + good

    def count(kind: str) -> None:
        counters[kind] = counters.get(kind, 0) + 1

    def tally(kind: str) -> None:
        outcomes[kind] = outcomes.get(kind, 0) + 1

    link = _Link(rtu)
    MemoryTransport(link, rng, answer)
    for _ in range(CASES):
        if link.transport is None:  # dropped for junk: reconnect (the backoff is the scheduler's)
            tally("dropped")
            link = _Link(rtu)
            MemoryTransport(link, rng, answer)
        req = state["req"] = request(rng)
        try:
            reply = await link.exchange(req, 0.0, count)  # every byte is in: no verdict now is none ever
        except (BadReply, Garbled, DeviceError, TimeoutError) as exc:
            tally(type(exc).__name__)
            continue
        if reply.exception_code is not None or state["valid"]:
            tally("well-formed mutation")
            continue
        assert reply == expected(req), f"a malformed reply was taken as good for {req}"
        tally("good")
    state["behave"] = True
    link = _Link(rtu)
    MemoryTransport(link, rng, answer)
    for _ in range(5):
        req = state["req"] = request(rng)
        assert await link.exchange(req, 0.5, count) == expected(req)
    return {**outcomes, **{f"counter:{k}": v for k, v in counters.items()}}


@pytest.mark.parametrize("rtu", [False, True], ids=["tcp", "rtu"])
async def test_ten_thousand_malformed_replies_through_the_link(rtu: bool) -> None:
    cpu0 = time.process_time()
    outcomes = await fuzz_link(rtu, seed=11 + rtu)
    cpu = time.process_time() - cpu0
    handled = sum(v for k, v in outcomes.items() if not k.startswith("counter:") and k != "dropped")
    assert handled == CASES, outcomes
    # every class of outcome occurred: failures of each kind, junk drops, and good replies after
    # malformed ones (the link resynchronised)
    for kind in ("BadReply", "DeviceError", "good", "dropped"):
        assert outcomes.get(kind, 0) > 0, (kind, outcomes)
    assert outcomes.get("counter:bad_frame", 0) > 0
    assert cpu < 12.0, f"{cpu:.1f} s CPU for {CASES} malformed replies"


# --------------------------------------------------------------------------- end to end samples


def make_tcp_driver(port: int) -> ModbusDriver:
    tags = [{"name": "a", "address": 40001}, {"name": "b", "address": 40002}, {"name": "c", "address": 1}]
    profile = ModbusDriver.profile_model().model_validate(
        {"profile": "t", "protocol": "modbus", "tags": tags}
    )
    connection = Connection.model_validate(
        {"host": "127.0.0.1", "port": port, "timeout": 0.05, "retries": 0, "degrade_after": 10}
    )
    return ModbusDriver(DeviceContext("d", profile, connection, build_groups("d", profile, connection, {})))


async def poll_through(driver: ModbusDriver, polls: int) -> list[Block | DeviceError]:
    """Poll like the scheduler (close and reconnect on DeviceError, no backoff to keep it short)."""
    out: list[Block | DeviceError] = []
    for _ in range(polls):
        try:
            if driver._bus is None:
                await driver.connect()
            (block,) = await driver.read(driver.ctx.groups["default"])
            out.append(block)
        except DeviceError as exc:
            out.append(exc)
            await driver.close()
    return out


GOOD_VALUES = [1000, 1001, True]


def check_sample(results: list[Block | DeviceError]) -> None:
    for r in results:
        if isinstance(r, Block):
            for v, q, want in zip(r.values, r.quality or [None] * 3, GOOD_VALUES, strict=True):
                assert q is not None or v == want, f"malformed reply read as good: {r.values}"


async def test_malformed_replies_over_a_real_socket_then_good() -> None:
    rng = random.Random(5)
    behave = {"on": False}

    def script(tid: int, unit: int, pdu: bytes) -> bytes:
        fc, address, value = struct.unpack(">BHH", pdu)
        bad, good, _ = tcp_answers(rng, Request(unit, fc, address, value), mbap(tid, unit, pdu))
        return good if behave["on"] or rng.random() < 0.1 else bad

    async with MbapPeer(script) as peer:
        driver = make_tcp_driver(peer.port)
        try:
            cpu0 = time.process_time()
            results = await poll_through(driver, 150)
            cpu = time.process_time() - cpu0
            behave["on"] = True
            await driver.close()
            after = await poll_through(driver, 3)
        finally:
            await driver.close()
    check_sample(results)
    assert any(isinstance(r, DeviceError) for r in results)
    assert cpu < 5.0
    assert all(isinstance(b, Block) and b.values == GOOD_VALUES and b.quality is None for b in after)


class FuzzRtuPeer(PtyPeer):
    """Answers every request with a malformed reply (some good)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.behave = False

    def answer(self, request: bytes) -> bytes:
        req = Request(*struct.unpack(">BBHH", request[:6]))
        bad, good, _ = rtu_answers(self.rng, req, request)
        return good if self.behave or self.rng.random() < 0.1 else bad


async def test_malformed_replies_over_a_pty_then_good() -> None:
    peer = FuzzRtuPeer(random.Random(6))
    async with peer.running():
        tags = [{"name": "a", "address": 40001}, {"name": "b", "address": 40002}, {"name": "c", "address": 1}]
        profile = ModbusDriver.profile_model().model_validate(
            {"profile": "t", "protocol": "modbus", "tags": tags}
        )
        connection = Connection.model_validate(
            {
                "transport": "rtu",
                "port": peer.path,
                "baudrate": 115200,
                "timeout": 0.05,
                "retries": 0,
                "degrade_after": 10,
            }
        )
        driver = ModbusDriver(
            DeviceContext("d", profile, connection, build_groups("d", profile, connection, {}))
        )
        try:
            results = await poll_through(driver, 60)
            peer.behave = True
            await driver.close()
            await asyncio.sleep(0.1)
            after = await poll_through(driver, 4)
        finally:
            await driver.close()
    check_sample(results)
    assert after[-1] is not None and isinstance(after[-1], Block)
    assert after[-1].values == GOOD_VALUES and after[-1].quality is None
