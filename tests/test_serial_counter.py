"""Serial particle-counter driver over a real pty against a protocol peer.

The peer speaks the Lasair-like protocol of docs/simulators.md on the master side of a
pty pair (checksummed replies, a record queue that CTD2 reads and CPQ pops) and can
garble, truncate, refuse or swallow replies. The "buffer" here is a dict standing for
the buffer's committed state: a test commits a block by numbering it and merging its
state, exactly what agent.buffer.store does in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import threading
import time
import tty
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Quality
from cleanroom_common.serial_counter import (
    M3_PER_UNIT,
    CounterRecord,
    FrameError,
    checksum,
    format_record,
    frame,
    parse_record,
    parse_reply,
)
from drivers.serial_counter.driver import SerialCounterDriver
from simulators.servers.faults import CommFault
from simulators.servers.serial_ascii import serve_counter_serial

T0 = 1_795_867_200  # 2026-11-28 08:00:00 UTC
SERIAL = "LSR-SIM-000123"


def record(
    i: int, counts: tuple[int, ...] = (12, 4, 1, 0), laser: int = 1, flow: int = 1, valid: int = 1
) -> str:
    ts = time.gmtime(T0 + 60 * i)
    pairs = ",".join(f"{s},{c}" for s, c in zip(("0.3", "0.5", "1.0", "5.0"), counts, strict=True))
    return (
        f"{time.strftime('%Y-%m-%d', ts)},{time.strftime('%H:%M:%S', ts)},PC1,{SERIAL},"
        f"{laser},{flow},{valid},60,28.3,L,4,{pairs}"
    )


class CounterPeer:
    """The device end of the pty: answers commands from a record queue, with faults."""

    def __init__(self, records: list[str]) -> None:
        self.master, self._slave = os.openpty()  # the slave stays open: a pty whose
        tty.setraw(self._slave)  # last slave fd closes answers EIO on the master
        self.path = os.ttyname(self._slave)
        self.queue: deque[str] = deque(records)
        self.faults: deque[str] = deque()
        self.silent = False
        self.lost: int | None = None
        """Records dropped from a full queue (CST); None: a counter without CST."""
        self.commands: list[str] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="counter-peer")
        self._thread.start()

    def _reply(self, cmd: str) -> str:
        if cmd == "CSN":
            return f"RSN {SERIAL}"
        if cmd == "CQC":
            return f"RQC {len(self.queue)}"
        if cmd == "CTD2":
            return f"RTD2 {self.queue[0]}" if self.queue else "RND2"
        if cmd == "CST" and self.lost is not None:
            return f"RST 1 {len(self.queue)} {self.lost}"
        if cmd == "CPQ":
            if self.queue:
                self.queue.popleft()
            return f"RPQ {len(self.queue)}"
        return "ERR UNKNOWN"

    def _serve(self) -> None:
        buf = b""
        while True:
            ready, _, _ = select.select([self.master, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            buf += data
            while b"\n" in buf or b"\r" in buf:
                cut = min(i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0)
                line, buf = buf[:cut].decode().strip(), buf[cut + 1 :]
                if not line:
                    continue
                payload, _, xx = line.partition("*")
                if xx and int(xx, 16) != checksum(payload.encode()):
                    self._send(frame("ERR CHECKSUM"))
                    continue
                self.commands.append(payload)
                self._answer(payload)

    def _answer(self, cmd: str) -> None:
        fault = self.faults.popleft() if self.faults else None
        if self.silent or fault == "silent":
            return
        if fault == "busy":
            self._send(frame("ERR BUSY"))
            return
        out = frame(self._reply(cmd))
        if fault == "garble":
            out = out[:6] + bytes([out[6] ^ 0x01]) + out[7:]
        elif fault == "partial":
            out = out[: len(out) // 2]
        elif fault == "late":  # a stale reply from before, then the real one
            out = frame("RQC 7") + out
        self._send(out)

    def _send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self.master, self._slave, self._stop_r, self._stop_w):
            os.close(fd)


TAGS: list[dict[str, Any]] = [
    {"name": "pc_0_5um", "field": "count", "size_um": 0.5, "unit": "counts"},
    {"name": "pc_5_0um", "field": "count", "size_um": 5.0, "unit": "counts"},
    {"name": "pc_0_5um_m3", "field": "count", "size_um": 0.5, "per": "m3", "unit": "counts/m3"},
    {"name": "pc_0_5um_ft3", "field": "count", "size_um": 0.5, "per": "ft3", "unit": "counts/ft3"},
    {"name": "laser_ok", "field": "laser_ok"},
    {"name": "laser_fault", "field": "laser_fault"},
    {"name": "flow_fault", "field": "flow_fault"},
    {"name": "volume", "field": "volume", "unit": "L"},
]


def make_driver(path: str, state: dict[str, str], timeout: str = "300ms") -> SerialCounterDriver:
    profile = SerialCounterDriver.profile_model().model_validate(
        {
            "profile": "pc",
            "protocol": "serial_counter",
            "groups": {"records": {"interval": "1s"}},
            "tags": [{**t, "group": "records"} for t in TAGS],
        }
    )
    conn = SerialCounterDriver.Connection.model_validate({"port": path, "timeout": timeout})
    ctx = DeviceContext(
        id="pc1", profile=profile, connection=conn, groups=build_groups("pc1", profile, conn, {}), state=state
    )
    return SerialCounterDriver(ctx)


class FakeBuffer:
    """Commits blocks the way agent.buffer.store does: numbers them, merges their state."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.blocks: list[Block] = []

    def commit(self, blocks: list[Block]) -> None:
        for b in blocks:
            b.seq_first = len(self.blocks)
            self.blocks.append(b)
            self.state.update(b.state or {})


@pytest.fixture
def peer() -> Iterator[CounterPeer]:
    p = CounterPeer([record(i, counts=(10 + i, 4, 1, i % 2)) for i in range(3)])
    try:
        yield p
    finally:
        p.close()


async def drain(drv: SerialCounterDriver, buf: FakeBuffer, polls: int = 10) -> None:
    group = drv.ctx.groups["records"]
    for _ in range(polls):
        buf.commit(await drv.read(group))


async def test_records_drained_in_order_exactly_once_with_their_timestamps(peer: CounterPeer) -> None:
    buf = FakeBuffer()
    drv = make_driver(peer.path, buf.state)
    await drv.connect()
    try:
        await drain(drv, buf)
    finally:
        await drv.close()
    assert [b.source_ts_ns for b in buf.blocks] == [(T0 + 60 * i) * 10**9 for i in range(3)]
    first = dict(zip(buf.blocks[0].tags, buf.blocks[0].values, strict=True))
    assert first["pc_0_5um"] == 4 and first["pc_5_0um"] == 0 and first["laser_ok"] == 1
    assert first["pc_0_5um_m3"] == pytest.approx(4 / 0.0283)
    assert first["pc_0_5um_ft3"] == pytest.approx(4 / (0.0283 / 0.028316846592))
    assert first["volume"] == pytest.approx(28.3)
    assert all(b.quality is None for b in buf.blocks)
    assert [dict(zip(b.tags, b.values, strict=True))["pc_5_0um"] for b in buf.blocks] == [0, 1, 0]
    assert not peer.queue, "every committed record popped"
    assert buf.state["last_ts"] == str((T0 + 120) * 10**9) and buf.state["serial"] == SERIAL


async def test_a_record_is_never_popped_before_it_is_committed(peer: CounterPeer) -> None:
    drv = make_driver(peer.path, {})
    await drv.connect()
    try:
        group = drv.ctx.groups["records"]
        [block] = await drv.read(group)  # handed out, never committed
        assert await drv.read(group) == [] and await drv.read(group) == []
        assert len(peer.queue) == 3 and "CPQ" not in peer.commands
        assert block.state is not None and block.state["last_ts"] == str(T0 * 10**9)
    finally:
        await drv.close()


async def test_crash_between_commit_and_pop_does_not_duplicate(peer: CounterPeer) -> None:
    buf = FakeBuffer()
    drv = make_driver(peer.path, buf.state)
    await drv.connect()
    buf.commit(await drv.read(drv.ctx.groups["records"]))
    await drv.close()  # "crash": committed, never popped
    assert len(peer.queue) == 3
    restarted = make_driver(peer.path, buf.state)  # the buffer's state, as reloaded at start
    await restarted.connect()
    try:
        await drain(restarted, buf)
    finally:
        await restarted.close()
    assert [b.source_ts_ns for b in buf.blocks] == [(T0 + 60 * i) * 10**9 for i in range(3)]
    assert not peer.queue


async def test_without_live_state_a_block_numbered_for_a_while_counts_as_committed(peer: CounterPeer) -> None:
    """ctx.state loaded once at start: the driver falls back on the buffer's numbering,
    and only once the number has stuck (a failed commit takes it back)."""
    drv = make_driver(peer.path, {})
    group = drv.ctx.groups["records"]
    await drv.connect()
    try:
        [first] = await drv.read(group)
        first.seq_first = 0  # numbered by the buffer's commit...
        assert await drv.read(group) == []
        first.seq_first = None  # ...which failed: the number is taken back
        await asyncio.sleep(0.6)
        assert await drv.read(group) == [] and len(peer.queue) == 3
        first.seq_first = 0  # committed on retry
        assert await drv.read(group) == []
        await asyncio.sleep(0.6)
        [second] = await drv.read(group)
        assert second.source_ts_ns == (T0 + 60) * 10**9 and len(peer.queue) == 2
    finally:
        await drv.close()


async def test_garbled_partial_late_and_busy_replies_resync(peer: CounterPeer) -> None:
    buf = FakeBuffer()
    drv = make_driver(peer.path, buf.state)
    await drv.connect()
    try:
        peer.faults.extend(["garble", "busy", "late"])
        await drain(drv, buf, polls=1)
        assert len(buf.blocks) == 1 and buf.blocks[0].quality is None
        errors = drv.ctx.stats.errors
        assert errors["checksum"] == 1 and errors["device_busy"] == 1 and errors["unexpected_reply"] == 1
        peer.faults.append("partial")
        with pytest.raises(DeviceError) as err:
            await drv.read(drv.ctx.groups["records"])
        assert err.value.reason == "timeout" and errors["partial_frame"] == 1
        await drain(drv, buf)
        assert [b.source_ts_ns for b in buf.blocks] == [(T0 + 60 * i) * 10**9 for i in range(3)]
    finally:
        await drv.close()


async def test_records_dropped_at_the_device_become_one_data_loss_event(peer: CounterPeer) -> None:
    peer.lost = 2  # dropped before the agent ever drained this counter
    buf = FakeBuffer()
    drv = make_driver(peer.path, buf.state)
    await drv.connect()
    group = drv.ctx.groups["records"]
    try:
        buf.commit(await drv.read(group))
        peer.lost = 7  # the queue overflowed while the agent was away
        [second] = await drv.read(group)
        events = second.events
        buf.commit([second])
    finally:
        await drv.close()
    first_events = buf.blocks[0].events or []
    assert [e.data["records"] for e in first_events] == [2]
    assert events is not None and [e.kind for e in events] == ["data_loss"]
    assert DataLoss.from_event(events[0]) == DataLoss(
        LossReason.DEVICE_QUEUE_FULL,
        records=5,
        first_ts=T0 * 10**9,
        last_ts=(T0 + 60) * 10**9,
        group="records",
        detail="the counter has dropped 7 records since it started",
    )
    restarted = make_driver(peer.path, dict(buf.state))  # the committed count survives a restart
    await restarted.connect()
    try:
        await drain(restarted, buf)
    finally:
        await restarted.close()
    assert len(buf.blocks) == 3 and not buf.blocks[2].events, "no loss reported twice"


async def test_loss_across_a_clock_set_back_is_reported_without_a_reversed_interval() -> None:
    p = CounterPeer([record(5), record(1)])  # the device clock went back between the two
    p.lost = 0
    buf = FakeBuffer()
    drv = make_driver(p.path, buf.state)
    group = drv.ctx.groups["records"]
    try:
        await drv.connect()
        buf.commit(await drv.read(group))
        p.lost = 4
        [second] = await drv.read(group)
    finally:
        await drv.close()
        p.close()
    [event] = second.events or []
    loss = DataLoss.from_event(event)
    assert (loss.records, loss.first_ts, loss.last_ts) == (4, None, (T0 + 60) * 10**9)
    assert loss.detail is not None and f"at {(T0 + 300) * 10**9} ns" in loss.detail


async def test_another_instrument_on_the_port_ignores_the_old_watermark(peer: CounterPeer) -> None:
    peer.lost = 3
    buf = FakeBuffer()
    buf.state.update(
        {
            "serial": "LSR-OTHER-1",
            "last_digest": "0" * 16,
            "last_ts": str((T0 + 3600) * 10**9),
            "device_lost": "9",
        }
    )
    drv = make_driver(peer.path, buf.state)
    await drv.connect()
    try:
        await drain(drv, buf)
    finally:
        await drv.close()
    assert [b.source_ts_ns for b in buf.blocks] == [(T0 + 60 * i) * 10**9 for i in range(3)]
    assert all(b.quality is None for b in buf.blocks), "not out of order: another clock, another queue"
    assert [e.data["records"] for e in buf.blocks[0].events or []] == [3]


async def test_silent_device_is_a_timeout_device_error(peer: CounterPeer) -> None:
    drv = make_driver(peer.path, {})
    await drv.connect()
    try:
        peer.silent = True
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            await drv.read(drv.ctx.groups["records"])
        assert err.value.reason == "timeout" and time.monotonic() - t0 < 2.0
    finally:
        await drv.close()
    with pytest.raises(DeviceError):
        await make_driver("/dev/nonexistent-tty", {}).connect()


async def test_status_bits_and_bad_records_become_quality() -> None:
    p = CounterPeer(
        [
            record(0, laser=0),
            record(1, flow=0),
            record(2, valid=0),
            "2026-11-28,not-a-time,PC1,X,1,1,1,60,28.3,L,0",
            record(3),
            record(2),  # the clock went back: kept, flagged
        ]
    )
    buf = FakeBuffer()
    drv = make_driver(p.path, buf.state)
    try:
        await drv.connect()
        await drain(drv, buf)
    finally:
        await drv.close()
        p.close()

    def q(b: Block, tag: str) -> tuple[Any, Quality, str | None]:
        i = list(b.tags).index(tag)
        return b.values[i], b.quality_of(i), b.reasons[i] if b.reasons else None

    laser, flow, invalid, garbage, ok, back = buf.blocks
    assert q(laser, "pc_0_5um") == (None, Quality.BAD, "laser_fault") and q(laser, "laser_ok")[0] == 0
    assert q(laser, "laser_fault") == (1, Quality.GOOD, None) and q(laser, "flow_fault")[0] == 0
    assert q(flow, "flow_fault") == (1, Quality.GOOD, None) and q(flow, "laser_fault")[0] == 0
    assert q(flow, "pc_0_5um") == (4, Quality.UNCERTAIN, "flow_fault")
    assert q(flow, "pc_0_5um_m3") == (None, Quality.BAD, "flow_fault")
    assert q(invalid, "pc_0_5um") == (4, Quality.UNCERTAIN, "sample_invalid")
    assert all(r == "decode_error" for r in garbage.reasons or []) and len(garbage.reasons or []) == len(TAGS)
    assert ok.quality is None
    assert q(back, "pc_0_5um") == (4, Quality.UNCERTAIN, "timestamp_before_watermark")
    assert not p.queue, "the undecodable record was recorded as bad, then popped"


def test_tag_and_connection_config_errors_are_clear() -> None:
    with pytest.raises(ValidationError, match="a count tag needs size_um"):
        SerialCounterDriver.Tag.model_validate({"name": "x", "field": "count"})
    with pytest.raises(ValidationError, match="apply to count tags only"):
        SerialCounterDriver.Tag.model_validate({"name": "x", "field": "laser_ok", "per": "m3"})
    with pytest.raises(ValidationError, match="port"):
        SerialCounterDriver.Connection.model_validate({"baudrate": 9600})
    two_groups = {
        "profile": "pc",
        "protocol": "serial_counter",
        "groups": {"a": {}, "b": {}},
        "tags": [{"name": "x", "field": "laser_ok", "group": "a"}],
    }
    with pytest.raises(ValidationError, match="exactly one group"):
        SerialCounterDriver.profile_model().model_validate(two_groups)


# --------------------------------------------------------------------------- framer properties


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_reply_parser_raises_only_frame_error(data: bytes) -> None:
    try:
        text = parse_reply(data)
    except FrameError:
        return
    assert frame(text).rstrip(b"\r\n") == data.rstrip(b"\r\n")


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_record_parser_raises_only_frame_error(text: str) -> None:
    with contextlib.suppress(FrameError):
        parse_record(text)


@given(
    st.lists(
        st.sampled_from(
            ["2026-11-28", "12:01:00", "PC1", "1", "0", "60", "28.3", "L", "ft3", "4", "-1", "x", ""]
        ),
        max_size=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_record_parser_on_near_valid_fields(fields: list[str]) -> None:
    try:
        rec = parse_record(",".join(fields))
    except FrameError:
        return
    assert len(rec.channels) == int(fields[10])


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120))
def test_frame_round_trip(payload: str) -> None:
    assert parse_reply(frame(payload)) == payload


_NAME = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz0123456789-_.", max_size=16)
_TENTHS = st.integers(min_value=0, max_value=10**6).map(lambda k: k / 10)
_CHANNELS = st.lists(st.tuples(_TENTHS, st.integers(min_value=0, max_value=10**9)), max_size=8).map(tuple)


@given(
    st.builds(
        CounterRecord,
        ts_ns=st.integers(min_value=0, max_value=4_102_444_799).map(lambda s: s * 1_000_000_000),
        sensor=_NAME,
        serial=_NAME,
        laser_ok=st.booleans(),
        flow_ok=st.booleans(),
        sample_valid=st.booleans(),
        sample_time_s=st.integers(min_value=0, max_value=86_400).map(float),
        volume=_TENTHS,
        volume_unit=st.sampled_from(sorted(M3_PER_UNIT)),
        channels=_CHANNELS,
    )
)
@settings(max_examples=300, deadline=None)
def test_record_format_round_trip(rec: CounterRecord) -> None:
    """What the simulated counter writes, the driver reads back field for field."""
    assert parse_record(format_record(rec)) == rec


# --------------------------------------------------------------------------- against the simulator

PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles" / "particle-counter-sim-serial.yaml"


def sim_driver(path: str, state: dict[str, str]) -> SerialCounterDriver:
    """The simulator's own profile, drained in its default (subscribe) mode."""
    profile = SerialCounterDriver.profile_model().model_validate(yaml.safe_load(PROFILE.read_text()))
    conn = SerialCounterDriver.Connection.model_validate({"port": path, "timeout": "500ms"})
    groups = build_groups("pc1", profile, conn, {"records": SerialCounterDriver.Group(interval=0.2)})
    return SerialCounterDriver(
        DeviceContext(id="pc1", profile=profile, connection=conn, groups=groups, state=state)
    )


class LaggingBuffer(FakeBuffer):
    """Commits an emitted block a little later, like the buffer's group commit."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[asyncio.TimerHandle] = []

    def emit(self, block: Block) -> None:
        self.pending.append(asyncio.get_running_loop().call_later(0.05, self.commit, [block]))

    def crash(self) -> dict[str, str]:
        """What a restarted agent finds: the committed state; what was not committed yet is gone."""
        for handle in self.pending:
            handle.cancel()
        return dict(self.state)


def record_times(buf: FakeBuffer) -> list[int]:
    return [b.source_ts_ns for b in buf.blocks]  # type: ignore[misc]


async def test_simulator_backlog_drains_in_order_exactly_once_across_a_restart() -> None:
    async with serve_counter_serial(speed=1200, seed=3) as sim:
        await asyncio.sleep(0.6)  # the counter queues ~12 one-minute records meanwhile
        buf = LaggingBuffer()
        drv = sim_driver(sim.pty_path, buf.state)
        await drv.connect()
        group = drv.ctx.groups["records"]
        try:
            await drv.subscribe(group, buf.emit)
            await eventually(lambda: len(buf.blocks) >= 8, what="backlog drained")
            assert await drv.read(group) == [], "liveness check of a healthy drain"
        finally:
            await drv.close()  # a crash: the last record may be committed but not popped
        restarted = sim_driver(sim.pty_path, buf.crash())
        await restarted.connect()
        try:
            await restarted.subscribe(restarted.ctx.groups["records"], buf.emit)
            await eventually(lambda: len(buf.blocks) >= 20, within=15, what="records after restart")
        finally:
            await restarted.close()
    times = record_times(buf)
    steps = {b - a for a, b in itertools.pairwise(times)}
    assert steps == {60 * 10**9}, f"one record per 60 s sample, none lost or repeated: {steps}"
    vals = dict(zip(buf.blocks[0].tags, buf.blocks[0].values, strict=True))
    assert vals["sample_time_s"] == 60 and vals["laser_ok"] == 1
    assert vals["conc_0_5um_per_m3"] == pytest.approx(vals["count_0_5um"] / (vals["volume_l"] / 1000))


async def test_simulator_garbled_line_is_counted_and_the_drain_recovers() -> None:
    async with serve_counter_serial(speed=1200, seed=4) as sim:
        await asyncio.sleep(0.3)
        buf = LaggingBuffer()
        drv = sim_driver(sim.pty_path, buf.state)
        await drv.connect()
        group = drv.ctx.groups["records"]
        try:
            sim.device.faults.force(CommFault.GARBLED)
            await drv.subscribe(group, buf.emit)
            # Every reply garbled: retries exhausted, the liveness check reports it.
            with pytest.raises(DeviceError) as err:
                await eventually(lambda: drv._drain is not None and drv._drain.failure, what="drain failure")
                await drv.read(group)
            assert err.value.reason == "decode_error" and drv.ctx.stats.errors["checksum"] >= 3
        finally:
            await drv.close()
        sim.device.faults.force(None)
        drv = sim_driver(sim.pty_path, buf.state)  # the scheduler reconnects
        await drv.connect()
        try:
            await drv.subscribe(drv.ctx.groups["records"], buf.emit)
            await eventually(lambda: len(buf.blocks) >= 5, what="records after the fault")
        finally:
            await drv.close()
    assert {b - a for a, b in itertools.pairwise(record_times(buf))} == {60 * 10**9}


async def eventually(cond: Any, within: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
    return v
