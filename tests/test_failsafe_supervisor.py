"""Fail-safe: no long-lived task dies silently (issue 11, "Bad device input").

A device task that raises (a driver's own task such as the serial counter's drain, a
connect that fails in an unforeseen way, the scheduler's own loops) is logged once with
its traceback, counted, shown as bad-quality readings and an error state, and the device
reconnects with backoff. Repeated identical failures are counted, not logged each time.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from agent.core.device import DeviceConfig, ResolvedDevice
from agent.core.driver import Driver, Emit, GroupSpec, PollGroup, build_groups
from agent.core.records import Block, Event, Quality
from agent.sources.scheduler import DeviceRunner
from drivers.serial_counter.driver import SerialCounterDriver
from tests.support import until
from tests.test_serial_counter import T0, TAGS, CounterPeer, record

ROOT = Path(__file__).resolve().parent.parent


class CommittingSink:
    """Stands for the buffer: takes blocks and events, numbers blocks and merges their state
    (the live committed state a driver sees through ``ctx.state``)."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.events: list[Event] = []
        self.state: dict[str, str] = {}

    def __call__(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        for b in blocks:
            b.seq_first = len(self.blocks)
            self.blocks.append(b)
            self.state.update(b.state or {})
        self.events.extend(events)

    def reasons(self) -> set[str]:
        return {r for b in self.blocks for r in (b.reasons or []) if r}

    def good(self) -> list[Block]:
        return [b for b in self.blocks if b.quality is None]


def tracebacks(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """ERROR records that carry a traceback mentioning ``text``."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.exc_info is not None and text in str(r.exc_info[1])
    ]


# --------------------------------------------------------------------------- the serial counter


def counter_device(port: str) -> ResolvedDevice:
    profile = SerialCounterDriver.profile_model().model_validate(
        {
            "profile": "pc",
            "protocol": "serial_counter",
            "groups": {"records": {"interval": "200ms"}},
            "tags": [{**t, "group": "records"} for t in TAGS],
        }
    )
    conn = SerialCounterDriver.Connection.model_validate(
        {"port": port, "timeout": "300ms", "backoff_min": "100ms", "backoff_max": "200ms"}
    )
    return ResolvedDevice(
        config=DeviceConfig(id="pc1", profile="pc"),
        driver=SerialCounterDriver,
        profile=profile,
        profile_path=ROOT / "pc.yaml",
        connection=conn,
        groups=build_groups("pc1", profile, conn, {}),
    )


@pytest.fixture
def poisoned_peer() -> Iterator[CounterPeer]:
    """A counter whose second queued record carries a count far too large for any field."""
    huge = int("9" * 400)  # no float holds it: int -> float raises OverflowError
    p = CounterPeer([record(0), record(1, counts=(12, huge, 1, 0)), record(2), record(3)])
    try:
        yield p
    finally:
        p.close()


async def test_an_oversized_integer_from_the_counter_is_a_bad_reading_and_the_drain_goes_on(
    poisoned_peer: CounterPeer,
) -> None:
    sink = CommittingSink()
    runner = DeviceRunner(counter_device(poisoned_peer.path), sink, sink.state)
    runner.start()
    try:
        last = (T0 + 3 * 60) * 10**9
        await until(
            lambda: any(b.source_ts_ns == last for b in sink.blocks), 10, "the record after the bad one"
        )
        # each record is popped after its commit: the last pop may still be on its way
        await until(lambda: not poisoned_peer.queue, 5, "every record popped, the bad one too")
    finally:
        await runner.stop()
    records = [b for b in sink.blocks if b.reasons is None or "decode_error" in b.reasons]
    assert len(records) == 4, "every record once: the bad one as bad readings, none stuck or repeated"
    bad = records[1]
    assert bad.quality is not None and all(q is Quality.BAD for q in bad.quality)
    assert bad.reasons is not None and set(bad.reasons) == {"decode_error"}
    assert [b.source_ts_ns for b in (records[0], *records[2:])] == [(T0 + 60 * i) * 10**9 for i in (0, 2, 3)]
    assert runner.ctx.stats.errors["decode_error"] >= 1
    assert not poisoned_peer.queue, "the bad record was popped like any other"


# --------------------------------------------------------------------------- the driver contract


class PushGroup(GroupSpec):
    mode: str = "subscribe"


class FlakyDriver(Driver):
    """Pushes one reading every 50 ms from a task of its own; what goes wrong is up to the test."""

    protocol: ClassVar[str] = "flaky"
    Group: ClassVar[type[GroupSpec]] = PushGroup
    supports_subscribe: ClassVar[bool] = True
    connect_fails: ClassVar[Callable[[int], BaseException | None]] = staticmethod(lambda n: None)
    push_fails: ClassVar[Callable[[int, int], BaseException | None]] = staticmethod(lambda session, n: None)
    connects: ClassVar[int] = 0

    async def connect(self) -> None:
        type(self).connects += 1
        exc = type(self).connect_fails(type(self).connects)
        if exc is not None:
            raise exc

    async def subscribe(self, group: PollGroup, emit: Emit) -> None:
        self.ctx.tasks.spawn(f"push:{self.ctx.id}", lambda: self._push(group, emit), restart=False)

    async def _push(self, group: PollGroup, emit: Emit) -> None:
        session = type(self).connects
        for n in itertools.count():
            exc = type(self).push_fails(session, n)
            if exc is not None:
                raise exc
            emit(group.finish([float(session)]))
            await asyncio.sleep(0.05)

    async def read(self, group: PollGroup) -> list[Block]:
        return []

    async def close(self) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[type[FlakyDriver]]:
    class Flaky(FlakyDriver):
        pass

    yield Flaky


def flaky_device(driver: type[Driver], backoff: str = "50ms") -> ResolvedDevice:
    profile = driver.profile_model().model_validate(
        {
            "profile": "f",
            "protocol": "flaky",
            "groups": {"push": {"interval": "100ms"}},
            "tags": [{"name": "x", "group": "push"}],
        }
    )
    conn = driver.Connection.model_validate(
        {"timeout": "200ms", "backoff_min": backoff, "backoff_max": backoff}
    )
    return ResolvedDevice(
        config=DeviceConfig(id="f1", profile="f"),
        driver=driver,
        profile=profile,
        profile_path=ROOT / "f.yaml",
        connection=conn,
        groups=build_groups("f1", profile, conn, {}),
    )


async def test_a_driver_task_that_raises_is_logged_once_counted_bad_and_the_device_reconnects(
    flaky: type[FlakyDriver], caplog: pytest.LogCaptureFixture
) -> None:
    flaky.push_fails = staticmethod(
        lambda session, n: RuntimeError("bug in push") if (session, n) == (1, 3) else None
    )
    sink = CommittingSink()
    runner = DeviceRunner(flaky_device(flaky), sink, sink.state)
    runner.start()
    try:
        await until(lambda: any(b.values == [2.0] for b in sink.blocks), 5, "readings of the second session")
        status = runner.status()
    finally:
        await runner.stop()
    assert flaky.connects >= 2, "the device reconnected"
    assert "driver_error" in sink.reasons(), "the failure is a bad-quality reading"
    assert status["driver"]["errors"]["driver_error"] == 1, "counted by kind, visible in status"
    assert status["tasks"]["push:f1"]["failures"] == 1
    assert len(tracebacks(caplog, "bug in push")) == 1, "logged once, with its traceback"
    states = [e.data["state"] for e in sink.events if e.kind == "device_state"]
    assert states[:3] == ["connected", "disconnected", "connected"]


async def test_an_unforeseen_connect_failure_is_retried_with_backoff_and_logged_once(
    flaky: type[FlakyDriver], caplog: pytest.LogCaptureFixture
) -> None:
    """asyncua raises AssertionError out of connect when a server rejects our certificate:
    whatever a driver raises while connecting, the device retries, it is never stuck."""
    flaky.connect_fails = staticmethod(lambda n: AssertionError("rejected") if n <= 4 else None)
    sink = CommittingSink()
    runner = DeviceRunner(flaky_device(flaky, backoff="250ms"), sink, sink.state)
    runner.start()
    try:
        await until(sink.good, 5, "readings once connect succeeds")
        status = runner.status()
    finally:
        await runner.stop()
    assert flaky.connects == 5
    assert status["state"] == "connected" and status["driver"]["errors"]["driver_error"] == 4
    assert len(tracebacks(caplog, "rejected")) == 1, "four identical failures, one traceback"
    assert "driver_error" in sink.reasons(), "ticks while the device is away are bad readings with the reason"


async def test_a_scheduler_loop_that_raises_is_restarted(
    flaky: type[FlakyDriver], caplog: pytest.LogCaptureFixture
) -> None:
    """A fault outside the driver (here: handing a block over fails once) must not end the
    device's acquisition for the rest of the run."""
    sink = CommittingSink()
    calls = 0

    def failing_once(blocks: Sequence[Block], events: Sequence[Event]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("hand-over failed")
        sink(blocks, events)

    runner = DeviceRunner(flaky_device(flaky), failing_once, sink.state)
    runner.start()
    try:
        await until(lambda: len(sink.good()) >= 5, 5, "readings after the failure")
        status = runner.status()
    finally:
        await runner.stop()
    assert len(tracebacks(caplog, "hand-over failed")) == 1
    assert sum(t["failures"] for t in status["tasks"].values()) == 1


# --------------------------------------------------------------------------- the supervisor


async def test_a_supervised_task_is_restarted_with_growing_delays_and_logged_rarely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agent.core.supervise import Supervisor

    starts: list[float] = []

    async def work() -> None:
        starts.append(time.monotonic())
        if len(starts) <= 5:
            raise ValueError("same fault")
        await asyncio.Event().wait()

    failures: list[tuple[str, BaseException]] = []
    sup = Supervisor(
        "test",
        logging.getLogger("cleanroom.test"),
        on_failure=lambda n, e: failures.append((n, e)),
        backoff_min=0.01,
        backoff_max=0.08,
    )
    sup.spawn("worker", work)
    await until(lambda: len(starts) == 6, 5, "the sixth start")
    status = sup.status()
    await sup.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[3] > gaps[0], f"backoff grows: {gaps}"
    assert status["worker"]["failures"] == 5 and status["worker"]["restarts"] == 5
    assert status["worker"]["last_error"] == "ValueError('same fault')"
    assert [n for n, _ in failures] == ["worker"] * 5, "the owner hears of every failure"
    assert len(tracebacks(caplog, "same fault")) == 1
    assert len([r for r in caplog.records if "same fault" in r.getMessage()]) == 1


async def test_a_supervised_task_that_returns_is_done_and_stop_cancels_the_rest() -> None:
    from agent.core.supervise import Supervisor

    ran: list[str] = []

    async def once() -> None:
        ran.append("once")

    sup = Supervisor("test", logging.getLogger("cleanroom.test"))
    done = sup.spawn("once", once)
    forever = sup.spawn("forever", lambda: asyncio.Event().wait())
    await until(done.done, 2, "the one-shot task")
    await sup.stop()
    assert ran == ["once"] and forever.done() and forever.failure is None


def test_drivers_start_tasks_only_through_the_supervisor() -> None:
    """A driver that starts a task itself could lose it silently; ``ctx.tasks.spawn`` cannot."""
    offenders = []
    for path in sorted((ROOT / "drivers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("create_task", "ensure_future", "TaskGroup"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not offenders, offenders


async def test_the_buffer_committer_is_restarted_after_it_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agent.buffer.async_buffer import AsyncBuffer
    from agent.buffer.config import BufferConfig

    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", commit_interval=0.01), "t")
    real = AsyncBuffer._commit_some
    calls = 0

    async def commit_some(self: AsyncBuffer) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("committer bug")
        await real(self)

    monkeypatch.setattr(AsyncBuffer, "_commit_some", commit_some)
    await buf.open()
    try:
        buf.submit([Block("d", "g", 1, ("x",), (None,), [1.0])])
        async with asyncio.timeout(5):
            await buf.flush()
        status = buf.tasks.status()
    finally:
        await buf.close()
    assert status["buffer-committer"]["failures"] == 1 and status["buffer-committer"]["restarts"] == 1
    assert len(tracebacks(caplog, "committer bug")) == 1
