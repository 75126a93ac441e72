"""Modbus fail-safe (issue 11): a reply counts only if it answers the request; a device
streaming junk is dropped within about a second and costs bounded CPU; ``close_after_scan``
never cuts another group's request; a late RTU reply is never taken for the next request's;
64-bit integers stay exact from the registers to the JSON payload.

Every peer here is hand-written (raw asyncio sockets, a pty, a subprocess streaming junk),
so it is independent of pymodbus's server.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from agent.buffer.rows import encode
from agent.core.chain import GENESIS, build_payload
from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.records import Block
from cleanroom_common.codec import DataType
from cleanroom_common.codec import encode as encode_value
from drivers.modbus.driver import Connection, ModbusDriver
from tests.support import MbapPeer, PtyPeer, Script, crc, mbap, registers_pdu, registers_reply

# --------------------------------------------------------------------------- helpers


def make_driver(port: int, tags: list[dict[str, Any]] | None = None, **conn: Any) -> ModbusDriver:
    tags = tags or [{"name": "a", "address": 40001}, {"name": "b", "address": 40002}]
    groups = conn.pop("groups", None) or {"default": {}}
    profile = ModbusDriver.profile_model().model_validate(
        {"profile": "t", "protocol": "modbus", "groups": groups, "tags": tags}
    )
    connection = Connection.model_validate(
        {"host": "127.0.0.1", "port": port, "unit_id": 1, "timeout": 1.0, "retries": 0, **conn}
    )
    return ModbusDriver(
        DeviceContext("dev", profile, connection, build_groups("dev", profile, connection, {}))
    )


async def read_one(driver: ModbusDriver, group: str = "default") -> Block:
    (block,) = await driver.read(driver.ctx.groups[group])
    return block


# --------------------------------------------------------------------------- item 1: matching


def _wrong_function(tid: int, unit: int, pdu: bytes) -> bytes:
    return mbap(tid, unit, registers_pdu(0x04, [7, 7]))  # input registers for a holding request


MISMATCHES: dict[str, tuple[Script, str, str]] = {
    "function-code": (_wrong_function, "bad_reply", "bad_reply"),
    "exception-of-another-function": (lambda t, u, p: mbap(t, u, b"\x84\x02"), "bad_reply", "bad_reply"),
    "transaction-id-zero": (lambda t, u, p: registers_reply(0, u, p, 7), "bad_reply", "bad_reply"),
    "transaction-id-other": (lambda t, u, p: registers_reply(t + 100, u, p, 7), "bad_reply", "bad_reply"),
    "unit-id": (lambda t, u, p: registers_reply(t, u + 1, p, 7), "bad_reply", "bad_reply"),
    # 5 data bytes for 2 registers: consistent frame, byte count that does not answer the request
    "odd-byte-count": (
        lambda t, u, p: mbap(t, u, b"\x03\x05" + b"\x00\x07\x00\x07\x00"),
        "decode_error",
        "wrong_length",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES), ids=list(MISMATCHES))
async def test_a_reply_that_does_not_answer_the_request_is_a_bad_reading(case: str) -> None:
    broken, reason, counter = MISMATCHES[case]
    first = {"done": False}

    def script(tid: int, unit: int, pdu: bytes) -> bytes:
        if not first["done"]:
            first["done"] = True
            return broken(tid, unit, pdu)
        return registers_reply(tid, unit, pdu)

    async with MbapPeer(script) as peer:
        driver = make_driver(peer.port)
        await driver.connect()
        try:
            t0 = time.monotonic()
            bad = await read_one(driver)
            elapsed = time.monotonic() - t0
            good = await read_one(driver)
        finally:
            await driver.close()
    assert bad.values == [None, None] and bad.reasons == [reason, reason]
    assert driver.ctx.stats.errors[counter] == 1
    assert elapsed < 0.5  # judged on arrival, not after the 1 s timeout
    assert good.values == [9, 9] and good.quality is None


async def test_coils_with_a_byte_count_that_does_not_answer_the_request_are_bad() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> bytes:
        return mbap(tid, unit, b"\x01\x02\x05\x00")  # 3 coils need 1 byte, 2 came

    async with MbapPeer(script) as peer:
        tags = [{"name": f"c{i}", "address": i + 1} for i in range(3)]
        driver = make_driver(peer.port, tags)
        await driver.connect()
        try:
            bad = await read_one(driver)
        finally:
            await driver.close()
    assert bad.values == [None] * 3 and bad.reasons == ["decode_error"] * 3
    assert driver.ctx.stats.errors["wrong_length"] == 1


async def test_a_late_tcp_reply_is_recognised_by_its_transaction_id() -> None:
    """The reply to a timed-out request arrives during the next one: ignored, the right one taken."""
    held: list[int] = []

    def script(tid: int, unit: int, pdu: bytes) -> bytes | None:
        if not held:
            held.append(tid)
            return None
        return registers_reply(held[0], unit, pdu, 7) + registers_reply(tid, unit, pdu, 9)

    async with MbapPeer(script) as peer:
        driver = make_driver(peer.port, timeout=0.2)
        await driver.connect()
        try:
            with pytest.raises(DeviceError):
                await read_one(driver)
            block = await read_one(driver)
        finally:
            await driver.close()
    assert block.values == [9, 9] and block.quality is None
    assert driver.ctx.stats.errors["late_reply"] == 1


# --------------------------------------------------------------------------- item 2: junk

JUNK_SERVER = r"""
import random, socket, struct, sys, threading, time
piece = int(sys.argv[1])
behave = threading.Event()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)

def serve(conn):
    rng = random.Random(7)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while not behave.is_set():
            conn.sendall(rng.randbytes(piece or rng.randint(1, 16)))
        while True:
            head = conn.recv(7, socket.MSG_WAITALL)
            if len(head) < 7:
                return
            tid, _, length, unit = struct.unpack(">HHHB", head)
            pdu = conn.recv(length - 1, socket.MSG_WAITALL)
            count = struct.unpack(">H", pdu[3:5])[0]
            body = bytes([pdu[0], 2 * count]) + struct.pack(f">{count}H", *([9] * count))
            conn.sendall(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
    except OSError:
        pass
    finally:
        conn.close()

def accept():
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
sys.stdin.readline()
behave.set()
sys.stdin.readline()
"""


@contextmanager
def junk_server(piece: int) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """A TCP device in another process (its CPU is not ours) that streams random bytes in pieces
    of ``piece`` bytes (0: 1 to 16) until told to behave; then it answers properly."""
    proc = subprocess.Popen(
        [sys.executable, "-c", JUNK_SERVER, str(piece)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


async def like_the_scheduler(
    driver: ModbusDriver,
    seconds: float,
    backoff: float,
    until: Callable[[], bool] = lambda: True,
    at_most_s: float = 15.0,
) -> list[Any]:
    """Poll every 100 ms; on a DeviceError close the driver and back off, as the scheduler does.
    Runs ``seconds``, and on past them until ``until()`` holds (a loaded machine reconnects fewer
    times per second), but never beyond ``at_most_s``."""
    outcomes: list[Any] = []
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end or (not until() and time.monotonic() < start + at_most_s):
        try:
            if driver._bus is None:
                await driver.connect()
            outcomes.append(await asyncio.wait_for(read_one(driver), 3.0))
            await asyncio.sleep(0.1)
        except DeviceError as exc:
            outcomes.append(exc)
            await driver.close()
            await asyncio.sleep(backoff)
    return outcomes


@pytest.mark.parametrize("piece", [0, 65536], ids=["small-pieces", "large-pieces"])
async def test_a_device_streaming_junk_is_dropped_quickly_and_costs_bounded_cpu(piece: int) -> None:
    with junk_server(piece) as (port, proc):
        driver = make_driver(port, timeout=2.0)
        await driver.connect()
        try:
            t0 = time.monotonic()
            with pytest.raises(DeviceError) as err:
                await read_one(driver)
            dropped_after = time.monotonic() - t0
            assert driver._bus is not None and not driver._bus.connected  # no reading while it streams
            await driver.close()
            cpu0, wall0 = time.process_time(), time.monotonic()
            outcomes = await like_the_scheduler(
                driver, 3.0, backoff=0.5, until=lambda: driver.ctx.stats.errors["bad_frame"] >= 5
            )
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            assert proc.stdin is not None
            proc.stdin.write("behave\n")
            proc.stdin.flush()
            await asyncio.sleep(0.2)
            recovered = await like_the_scheduler(driver, 1.0, backoff=0.1)
        finally:
            await driver.close()
    assert err.value.reason == "comm_error" and "bad frames" in err.value.detail
    assert dropped_after < 1.0  # within about a second, not after poll timeouts (2 s each)
    assert all(isinstance(o, DeviceError) for o in outcomes)  # every reconnect dropped again
    assert cpu / wall < 0.15, f"{cpu:.2f} s CPU in {wall:.1f} s while the device streamed junk"
    assert driver.ctx.stats.errors["bad_frame"] >= 5
    good = [o for o in recovered if isinstance(o, Block)]
    assert good and good[-1].values == [9, 9] and good[-1].quality is None


# --------------------------------------------------------------------------- item 3: close_after_scan


async def test_close_after_scan_with_two_groups_never_cuts_a_request() -> None:
    async with MbapPeer(registers_reply, delay=0.05) as peer:
        tags = [
            {"name": "a", "address": 40001, "group": "fast"},
            {"name": "b", "address": 40005, "group": "slow"},
        ]
        driver = make_driver(
            peer.port, tags, close_after_scan=True, groups={"fast": {"interval": 1}, "slow": {"interval": 1}}
        )
        await driver.connect()
        try:
            rounds = [
                await asyncio.gather(read_one(driver, "fast"), read_one(driver, "slow")) for _ in range(3)
            ]
            closed_after = driver._bus is not None and not driver._bus.connected
        finally:
            await driver.close()
    for fast, slow in rounds:
        assert fast.values == [9] and fast.quality is None
        assert slow.values == [9] and slow.quality is None
    assert closed_after  # the last scan out still closes the link
    assert peer.connections >= 3


# --------------------------------------------------------------------------- item 4: late RTU reply


class LateRtuPeer(PtyPeer):
    """Unit 1, holding registers 0 → 11 and 100 → 22. It holds back its reply to request number
    ``late`` until the next request arrives, then sends that late reply first and (if
    ``answer_next``) the right one after it."""

    def __init__(self, late: int, answer_next: bool) -> None:
        super().__init__()
        self.late = late
        self.answer_next = answer_next
        self.regs = {0: 11, 100: 22}
        self.seen = 0
        self.held: bytes | None = None

    def _reply(self, request: bytes) -> bytes:
        unit, fc, address, count = struct.unpack(">BBHH", request[:6])
        values = [self.regs.get(address + i, 0) for i in range(count)]
        body = bytes([unit, fc, 2 * count]) + struct.pack(f">{count}H", *values)
        return body + crc(body)

    def answer(self, request: bytes) -> bytes | None:
        self.seen += 1
        reply = self._reply(request)
        if self.seen == self.late:
            self.held = reply
            return None
        if self.held is None:
            return reply
        out, self.held = self.held, None
        return out + reply if self.answer_next else out


@pytest.mark.parametrize("answer_next", [True, False], ids=["then-answers", "drops-the-next"])
async def test_a_late_rtu_reply_is_never_taken_for_the_next_request(answer_next: bool) -> None:
    """Two reads of one register each (same unit, function and byte count): the reply to the
    second read of poll 1 (22) comes only when the first read of poll 2 is in flight."""
    peer = LateRtuPeer(late=2, answer_next=answer_next)
    async with peer.running():
        tags = [{"name": "a", "address": 40001}, {"name": "b", "address": 40101}]
        profile = ModbusDriver.profile_model().model_validate(
            {"profile": "t", "protocol": "modbus", "tags": tags}
        )
        connection = Connection.model_validate(
            {"transport": "rtu", "port": peer.path, "unit_id": 1, "timeout": 0.2, "retries": 0}
        )
        driver = ModbusDriver(
            DeviceContext("d", profile, connection, build_groups("d", profile, connection, {}))
        )
        await driver.connect()
        polls: list[Block | DeviceError] = []
        try:
            for _ in range(4):
                try:
                    polls.append(await read_one(driver))
                except DeviceError as exc:
                    polls.append(exc)
        finally:
            await driver.close()
    assert isinstance(polls[0], DeviceError) and polls[0].reason == "timeout"  # poll 1: b never answered
    blocks = [p for p in polls if isinstance(p, Block)]
    # "a" is register 0 (11): the late 22 must never be read as its value.
    assert all(b.values[0] in (11, None) for b in blocks), [b.values for b in blocks]
    assert all(b.values[1] in (22, None) for b in blocks), [b.values for b in blocks]
    last = polls[-1]
    assert isinstance(last, Block) and last.values == [11, 22] and last.quality is None
    if answer_next:
        assert isinstance(polls[1], Block) and polls[1].values == [11, 22]  # the right reply taken
        assert driver.ctx.stats.errors["late_reply"] == 1


# --------------------------------------------------------------------------- item 5: 64-bit integers


async def test_64_bit_integers_above_2_pow_53_stay_exact_into_the_json_payload() -> None:
    big_signed = -(2**62) - 3  # odd and far above 2^53 in magnitude: a double cannot hold it
    big_unsigned = 2**64 - 5
    regs = encode_value(big_signed, DataType.INT64) + encode_value(big_unsigned, DataType.UINT64)

    def script(tid: int, unit: int, pdu: bytes) -> bytes:
        address, count = struct.unpack(">HH", pdu[1:5])
        return mbap(tid, unit, registers_pdu(3, list(regs[address : address + count])))

    tags = [
        {"name": "s", "address": 40001, "type": "int64"},
        {"name": "u", "address": 40005, "type": "uint64"},
    ]
    async with MbapPeer(script) as peer:
        for group in (tags, tags[:1]):  # mixed (list path) and int64 only (the vectorised path)
            driver = make_driver(peer.port, group)
            await driver.connect()
            try:
                block = await read_one(driver)
            finally:
                await driver.close()
            block.seq_first = 1
            body = encode(block)
            payload = build_payload(
                kind="data", agent="agent", device="dev", stream="dev/data", i=0, prev=GENESIS,
                source=None, clock=None, bodies=[body],
            )  # fmt: skip
            assert str(big_signed) in payload.decode()
            (payload_block,) = json.loads(payload)["blocks"]
            assert payload_block["values"] == [big_signed, big_unsigned][: len(group)]
            assert all(type(v) is int for v in payload_block["values"])
