"""Fuzz: the serial particle counter's driver against tens of thousands of malformed replies.

Random bytes and structure-aware mutations of valid ``RTD2`` records and ``RST`` status
lines (wrong checksum, integers no field holds, NaN/inf, missing and extra fields, wrong
separators, non-ASCII, overlong lines, cut lines, error replies). Whatever arrives, nothing
but :class:`~agent.core.driver.DeviceError` leaves the driver (the contract: a device
problem, never a crash), the CPU it takes is bounded, and the device reads good records
again as soon as it behaves.

Three layers: the protocol parsers alone (the bulk), the whole driver in-process with the
operating system's serial device replaced by an in-memory line (``serial.Serial`` patched:
the driver's own port thread, framing, retries, decoding and draining all run), and a
representative sample end to end over a real pty through the scheduler.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.device import DeviceConfig, ResolvedDevice
from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.records import Block, Quality
from agent.sources.scheduler import DeviceRunner
from cleanroom_common.serial_counter import (
    Command,
    FrameError,
    checksum,
    frame,
    parse_record,
    parse_reply,
    parse_status,
    reply_body,
)
from drivers.serial_counter.driver import SerialCounterDriver
from drivers.serial_counter.readings import record_block
from tests.support import until
from tests.test_serial_counter import SERIAL, TAGS, CounterPeer, record

ROOT = Path(__file__).resolve().parent.parent
WEIRD_NUMBERS = (
    "9" * 400, "9" * 5000, "4294967296", "18446744073709551616", "-1", "-0", "+5", "1_000", " 12", "12 ",
    "nan", "NaN", "inf", "-inf", "1e999", "1e-999", "0x10", "", ".", "1.2.3", "١٢", "²", "0.0000001",
    "28.3e400",
)  # fmt: skip
JUNK = ("", " ", ",", ";", "\t", "é", "\u0660", "\x00", "\x7f", "ÿ", "💥", "*", "*00", "\r", "ERR")


class Fuzzer:
    """Malformed counter replies, reproducible from a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.i = 0

    def valid_record(self) -> str:
        self.i += 1
        r = self.rng
        return record(
            self.i, counts=(r.randrange(10**6), r.randrange(10**5), r.randrange(10**3), r.randrange(9))
        )

    def record_text(self) -> str:
        """A record with one to three structure-aware mutations."""
        fields = self.valid_record().split(",")
        for _ in range(self.rng.randint(1, 3)):
            fields = self.rng.choice(self._record_mutations)(self, fields)
        sep = self.rng.choice((",", ",", ",", ",", ";", "\t", " ", ", "))
        return sep.join(fields)

    def _at(self, f: list[str], wanted: tuple[int, ...]) -> int:
        """One of the ``wanted`` field positions, or any position when a mutation dropped them."""
        present = [i for i in wanted if i < len(f)]
        return self.rng.choice(present) if present else self.rng.randrange(len(f))

    def _weird_field(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self.rng.randrange(len(f))] = self.rng.choice(WEIRD_NUMBERS)
        return f

    def _huge_count(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self._at(f, (12, 14, 16, 18, 10, 7, 8))] = "9" * self.rng.choice((11, 20, 309, 400, 4000))
        return f

    def _drop(self, f: list[str]) -> list[str]:
        f = list(f)
        if len(f) > 1:
            del f[self.rng.randrange(len(f))]
        return f

    def _extra(self, f: list[str]) -> list[str]:
        f = list(f)
        f.insert(self.rng.randrange(len(f) + 1), self.rng.choice(("0", "0.5", "x", "")))
        return f

    def _junk(self, f: list[str]) -> list[str]:
        f = list(f)
        i = self.rng.randrange(len(f))
        at = self.rng.randrange(len(f[i]) + 1)
        f[i] = f[i][:at] + self.rng.choice(JUNK) + f[i][at:]
        return f

    def _overlong(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self.rng.randrange(len(f))] *= self.rng.choice((50, 500))
        return f

    def _bad_time(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self._at(f, (0, 1))] = self.rng.choice(
            (
                "2026-02-30",
                "2026-13-01",
                "99999-01-01",
                "25:00:00",
                "00:00:60",
                "2026/01/01",
                "",
                "0000-00-00",
            )
        )
        return f

    def _bad_flags_or_unit(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self._at(f, (4, 5, 6, 9))] = self.rng.choice(("2", "", "-1", "l", "M3", "ft³", "L ", "true"))
        return f

    def _channels(self, f: list[str]) -> list[str]:
        f = list(f)
        f[self._at(f, (10,))] = self.rng.choice(("0", "3", "5", "99", "4294967295", "-4"))
        return f

    _record_mutations: tuple[Callable[[Fuzzer, list[str]], list[str]], ...] = (
        _weird_field, _huge_count, _drop, _extra, _junk, _overlong, _bad_time, _bad_flags_or_unit, _channels,
    )  # fmt: skip

    def status_text(self) -> str:
        r = self.rng
        fields = ["RST", r.choice("01"), str(r.randrange(3000)), str(r.randrange(100))]
        for _ in range(r.randint(1, 2)):
            i = r.randrange(len(fields))
            fields[i] = r.choice((*WEIRD_NUMBERS, *JUNK, "RST", "2"))
            if r.random() < 0.2:
                del fields[r.randrange(len(fields))]
        return r.choice((" ", " ", "  ", ",", "\t")).join(fields)

    def payload(self, cmd: str) -> str:
        """A malformed reply payload to ``cmd`` (its checksum will be right)."""
        r = self.rng.random()
        if cmd == Command.READ_OLDEST and r < 0.7:
            return f"{Command.READ_OLDEST.reply} {self.record_text()}"
        if cmd == Command.STATUS and r < 0.7:
            return self.status_text()
        return self.rng.choice(
            (
                "ERR BUSY", "ERR CHECKSUM", "ERR UNKNOWN", "ERR", "ERRX", "RND2 x", "RTD2", "RSN",
                f"RSN {'S' * 3000}", "RPQ", "RPQ -1", "RQC 7", f"RTD2 {self.valid_record()}",
            )
        )  # fmt: skip

    def reply(self, cmd: str, line_only: bool = False) -> bytes:
        """One malformed reply as bytes; ``line_only`` keeps each one a whole line (over a real
        line a cut line costs a timeout)."""
        r = self.rng.random()
        if r < 0.15:
            data = self.rng.randbytes(self.rng.choice((1, 8, 80, 600)))
            return data + b"\r\n" if line_only or self.rng.random() < 0.5 else data
        text = self.payload(cmd)
        data = text.encode("utf-8", "surrogateescape")
        xx = checksum(data)
        if r < 0.25:
            xx ^= 1 << self.rng.randrange(8)  # wrong checksum
        line = data + b"*%02X\r\n" % xx
        if r < 0.30:
            line = line.replace(b"*", self.rng.choice((b"", b"#", b"**")), 1)
        elif r < 0.35 and not line_only:
            line = line[: self.rng.randrange(len(line))]  # cut short
        elif r < 0.40:
            ends = (b"\n", b"\n\n", b"\r\r\n") if line_only else (b"\r", b"\n", b"\n\n", b"\r\r\n")
            line = line.replace(b"\r\n", self.rng.choice(ends))
        return line


def valid_reply(cmd: str, queue: list[str]) -> bytes:
    if cmd == Command.SERIAL:
        return frame(f"RSN {SERIAL}")
    if cmd == Command.READ_OLDEST:
        return frame(f"RTD2 {queue[0]}" if queue else "RND2")
    if cmd == Command.STATUS:
        return frame(f"RST 1 {len(queue)} 0")
    if cmd == Command.POP_OLDEST:
        if queue:
            queue.pop(0)
        return frame(f"RPQ {len(queue)}")
    return frame("ERR UNKNOWN")


# --------------------------------------------------------------------------- the parsers


def test_parsers_raise_only_frame_error_and_accepted_records_make_sound_blocks() -> None:
    fz = Fuzzer(11)
    group = poll_driver(lambda cmd: b"").ctx.groups["records"]
    accepted = 0
    started = time.process_time()
    for i in range(20_000):
        cmd = (Command.READ_OLDEST, Command.STATUS)[i % 2]
        try:
            payload = parse_reply(fz.reply(cmd))
            if payload.startswith(Command.READ_OLDEST.reply):
                rec = parse_record(reply_body(Command.READ_OLDEST, payload))
                block = record_block(group, rec, False, {})
                assert all(v is None or (isinstance(v, int) or math.isfinite(v)) for v in block.values)  # type: ignore[arg-type]
                accepted += 1
            elif payload.startswith(Command.STATUS.reply):
                st = parse_status(payload)
                assert 0 <= st.lost < 2**32 and 0 <= st.queued < 2**32
        except FrameError:
            pass
    spent = time.process_time() - started
    assert accepted > 100, "some mutations keep a record valid: the accepting path is fuzzed too"
    assert spent < 10, f"{spent:.1f} s of CPU for 20,000 replies (about 1 s measured)"


# --------------------------------------------------------------------------- the driver in-process


class MemorySerial:
    """Stands for ``serial.Serial``: what the driver writes is answered by ``respond``."""

    def __init__(self, respond: Callable[[str], bytes]) -> None:
        self.respond = respond
        self.pending = b""
        self.timeout: float | None = None

    def reset_input_buffer(self) -> None:
        self.pending = b""

    def write(self, data: bytes) -> int:
        self.pending += self.respond(data.split(b"*")[0].decode())
        return len(data)

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        end = self.pending.find(expected)
        n = len(self.pending) if end < 0 else end + len(expected)
        if size is not None:
            n = min(n, size)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def close(self) -> None:
        pass


def poll_driver(respond: Callable[[str], bytes], state: dict[str, str] | None = None) -> SerialCounterDriver:
    profile = SerialCounterDriver.profile_model().model_validate(
        {
            "profile": "pc",
            "protocol": "serial_counter",
            "groups": {"records": {"interval": "1s", "mode": "poll"}},
            "tags": [{**t, "group": "records"} for t in TAGS],
        }
    )
    conn = SerialCounterDriver.Connection.model_validate({"port": "memory", "timeout": "200ms"})
    ctx = DeviceContext(
        id="pc1", profile=profile, connection=conn, groups=build_groups("pc1", profile, conn, {}),
        state={} if state is None else state,
    )  # fmt: skip
    return SerialCounterDriver(ctx)


@pytest.fixture
def no_busy_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ERR BUSY`` makes the port thread pause 50 ms; the fuzz sends hundreds of them."""
    monkeypatch.setattr("drivers.serial_counter.port._BUSY_PAUSE_S", 0.0)


async def test_ten_thousand_malformed_replies_through_the_driver(
    monkeypatch: pytest.MonkeyPatch, no_busy_pause: None
) -> None:
    import serial

    fz = Fuzzer(12)
    queue = [record(i) for i in range(1000, 1005)]
    served = {"bad": 0}
    behaving = False

    def respond(cmd: str) -> bytes:
        if behaving or cmd == Command.SERIAL or fz.rng.random() < 0.1:
            return valid_reply(cmd, queue)
        served["bad"] += 1
        return fz.reply(cmd)

    monkeypatch.setattr(serial, "Serial", lambda *a, **k: MemorySerial(respond))
    state: dict[str, str] = {}
    drv = poll_driver(respond, state)
    group = drv.ctx.groups["records"]
    await drv.connect()
    blocks: list[Block] = []
    device_errors = 0
    started = time.process_time()
    try:
        while served["bad"] < 10_000:
            try:
                for b in await drv.read(group):
                    blocks.append(b)
                    state.update(b.state or {})  # committed at once
            except DeviceError:
                device_errors += 1
        spent = time.process_time() - started
        behaving = True
        queue[:] = [record(10**6 + i) for i in range(3)]  # newer than any record the fuzz sent
        good: list[Block] = []
        for _ in range(10):
            good += [b for b in await drv.read(group) if b.quality is None]
            for b in good:
                state.update(b.state or {})
    finally:
        await drv.close()
    assert device_errors > 100 and drv.ctx.stats.errors["checksum"] > 100, "the fuzz reached the framing"
    assert any(b.reasons and "decode_error" in b.reasons for b in blocks), (
        "malformed records became bad readings"
    )
    assert spent < 15, f"{spent:.1f} s of CPU for 10,000 malformed replies (about 2 s measured)"
    assert good, "good readings again once the device behaves"
    assert all(v is not None for v in good[0].values)


# --------------------------------------------------------------------------- end to end over a pty


class FuzzingPeer(CounterPeer):
    """The pty peer answering with malformed lines until told to behave."""

    def __init__(self, records: list[str], fuzzer: Fuzzer) -> None:
        self.fuzzer = fuzzer
        self.bad_sent = 0
        self.fuzzing = True
        super().__init__(records)

    def _answer(self, cmd: str) -> None:
        if self.fuzzing and cmd != "CSN" and self.fuzzer.rng.random() < 0.9:
            self.bad_sent += 1
            self._send(self.fuzzer.reply(cmd, line_only=True))
            return
        super()._answer(cmd)


@pytest.fixture
def fuzzing_peer() -> Iterator[FuzzingPeer]:
    p = FuzzingPeer([record(i) for i in range(10**6, 10**6 + 400)], Fuzzer(13))
    try:
        yield p
    finally:
        p.close()


async def test_malformed_replies_over_a_pty_never_stop_the_drain(
    fuzzing_peer: FuzzingPeer, no_busy_pause: None, caplog: pytest.LogCaptureFixture
) -> None:
    profile = SerialCounterDriver.profile_model().model_validate(
        {
            "profile": "pc",
            "protocol": "serial_counter",
            "groups": {"records": {"interval": "50ms"}},
            "tags": [{**t, "group": "records"} for t in TAGS],
        }
    )
    conn = SerialCounterDriver.Connection.model_validate(
        {"port": fuzzing_peer.path, "timeout": "200ms", "backoff_min": "20ms", "backoff_max": "50ms"}
    )
    device = ResolvedDevice(
        DeviceConfig(id="pc1", profile="pc"), SerialCounterDriver, profile, ROOT / "pc.yaml", conn,
        build_groups("pc1", profile, conn, {}),
    )  # fmt: skip
    blocks: list[Block] = []
    state: dict[str, Any] = {}

    def commit(new: Any, events: Any) -> None:
        for b in new:
            b.seq_first = len(blocks)
            blocks.append(b)
            state.update(b.state or {})

    runner = DeviceRunner(device, commit, state)
    started = time.process_time()
    runner.start()
    try:
        await until(lambda: fuzzing_peer.bad_sent >= 300, 20, "300 malformed replies")
        spent = time.process_time() - started
        fuzzing_peer.fuzzing = False
        n = len(blocks)

        def good_again() -> bool:
            return any(b.quality is None and b.source_ts_ns is not None for b in blocks[n:])

        await until(good_again, 10, "good readings once the device behaves")
        status = runner.status()
    finally:
        await runner.stop()
    assert "driver_error" not in status["driver"]["errors"], status["driver"]["errors"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "nothing unexpected was raised"
    assert spent < 10, f"{spent:.1f} s of CPU for 300 malformed replies (under 1 s measured)"
    assert any(q is Quality.BAD for b in blocks for q in (b.quality or ())), "bad replies were bad readings"
