"""What bounds the time from submit to the broker (docs/architecture.md, "What bounds latency"),
against a real mosquitto: a reading is committed at most ``commit_interval`` after it was
submitted and published as soon as its commit is done and the in-flight window has room, under
light load and under a burst that fills the window; and the coalescing of delivery marks into
commits: every acknowledged segment is marked, a commit carries the marks beside its records, and
a crash between an acknowledgement and its mark re-sends the segment (a duplicate), never loses it.

Bounds are asserted generously on measured timestamps (what a bug costs is the forwarder's
10 s idle rescan or worse, far above them), never tightly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.rows import CommitResult
from agent.buffer.seqs import Sequencer
from agent.buffer.store import Buffer
from agent.core.records import Block, Event
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from tests.support import Mosquitto, until

IDENTITY = AgentIdentity(agent_id="gw-lat", version="0.1.0", config_hash="c0ffee")
SLACK_S = 3.0
"""Added to every bound: a loaded CI machine, never a bug (a missed wake costs the 10 s rescan)."""


class Arrivals:
    """A subscriber that notes, per reading seq, when it arrived (wall clock, like ``ts``)."""

    def __init__(self, port: int) -> None:
        self.at: dict[int, int] = {}
        """seq -> first arrival, ns."""
        self.ts: dict[int, int] = {}
        """seq -> the block's acquisition ts, ns."""
        self.copies = 0
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"arrivals-{id(self)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("lat/+/data", qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError("could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time_ns()
        with self._lock:
            for b in json.loads(msg.payload)["blocks"]:
                for seq in range(b["seq"], b["seq"] + b["n"]):
                    if seq in self.at:
                        self.copies += 1
                    else:
                        self.at[seq], self.ts[seq] = now, b["ts"]

    def count(self) -> int:
        with self._lock:
            return len(self.at)

    def worst_s(self) -> float:
        with self._lock:
            return max((self.at[s] - self.ts[s]) / 1e9 for s in self.at)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def arrivals(mosquitto: Mosquitto) -> Any:
    a = Arrivals(mosquitto.port)
    try:
        yield a
    finally:
        a.close()


Rig = tuple[AsyncBuffer, Forwarder]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    rigs: list[Rig] = []

    async def make(port: int, *, commit_interval: str = "100ms", window: int = 16) -> Rig:
        cfg = BufferConfig(path=tmp_path / "buf.db", synchronous="normal", commit_interval=commit_interval)
        buf = AsyncBuffer(cfg, "gw-lat")
        await buf.open()
        mqtt_cfg = MqttConfig.model_validate(
            {"host": "127.0.0.1", "port": port, "topic_prefix": "lat", "inflight_window": window}
        )
        fw = Forwarder(mqtt_cfg, buf, IDENTITY)
        await fw.start()
        await until(lambda: fw.stats()["connected"], what="connected")
        rigs.append((buf, fw))
        return buf, fw

    yield make
    for buf, fw in rigs:
        await fw.stop(grace_s=0.5)
        await buf.close()


def block(device: str, n: int = 5) -> Block:
    return Block(device, "g", time.time_ns(), [f"t{k}" for k in range(n)], ["u"] * n, [1.0] * n)


async def delivered(buf: AsyncBuffer) -> int:
    return int((await buf.stats())["delivered_readings_total"])


async def test_light_load_reaches_the_broker_within_the_commit_interval(
    mosquitto: Mosquitto, arrivals: Arrivals, make_rig: Callable[..., Any]
) -> None:
    """A few devices polling now and then: each reading waits for its commit (at most the
    interval), then goes out at once, never for an idle rescan."""
    buf, _ = await make_rig(mosquitto.port, commit_interval="200ms")
    for i in range(12):
        buf.submit([block(f"d{i % 3}")])
        await asyncio.sleep(0.07)
    await until(lambda: arrivals.count() == 60, within_s=15, what="every reading at the broker")
    assert arrivals.worst_s() < 0.2 + SLACK_S
    await until(lambda: _equal(delivered(buf), 60), what="all marked")


async def test_a_burst_beyond_the_window_is_sent_on_acknowledgements(
    mosquitto: Mosquitto, arrivals: Arrivals, make_rig: Callable[..., Any]
) -> None:
    """One commit of 60 devices' blocks is 60 segments for a window of 2 and then nothing is
    committed: what follows the first two goes out as acknowledgements free the window (the rule
    that an acknowledgement wakes the sender only when the window was full must not strand them)."""
    buf, fw = await make_rig(mosquitto.port, window=2)
    buf.submit([block(f"d{k:02d}") for k in range(60)])
    await until(lambda: arrivals.count() == 300, within_s=15, what="every reading at the broker")
    assert arrivals.worst_s() < 0.1 + SLACK_S
    assert fw.stats()["published"] == 60 and arrivals.copies == 0


async def test_heavy_sustained_load_stays_within_the_bound(
    mosquitto: Mosquitto, arrivals: Arrivals, make_rig: Callable[..., Any]
) -> None:
    """40 devices every 50 ms for 2 s (4,000 readings/s), window 4: commits carry more segments
    than the window, and marks ride along with them."""
    buf, _ = await make_rig(mosquitto.port, window=4)
    rounds = 40
    for _ in range(rounds):
        buf.submit([block(f"d{k:02d}") for k in range(40)])
        await asyncio.sleep(0.05)
    total = rounds * 40 * 5
    await until(lambda: arrivals.count() == total, within_s=30, what="every reading at the broker")
    assert arrivals.worst_s() < 0.1 + SLACK_S
    await until(lambda: _equal(delivered(buf), total), what="all marked")
    assert arrivals.copies == 0


async def _equal(value: Any, expected: int) -> bool:
    return bool(await value == expected)


class Recording:
    """The store's commits as the buffer thread makes them: (records, delivery marks) each."""

    def __init__(self, core: Buffer) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.own_marks = 0
        real_commit, real_mark = core.commit, core.mark_delivered

        def commit(
            items: Sequence[Block | Event], seqs: Sequencer | None = None, delivered: Sequence[int] = ()
        ) -> CommitResult:
            self.calls.append((len(items), list(delivered)))
            return real_commit(items, seqs, delivered)

        def mark(ids: Sequence[int], when_ns: int | None = None) -> int:
            self.own_marks += 1
            return real_mark(ids, when_ns)

        core.commit = commit  # type: ignore[method-assign]
        core.mark_delivered = mark  # type: ignore[method-assign]


async def test_marks_are_coalesced_and_all_committed(tmp_path: Path) -> None:
    """Acknowledgements handed over together are marked in one transaction, with the records
    waiting beside them: all of them, none twice."""
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", commit_interval="1s"), "gw")
    await buf.open()
    try:
        buf.submit([block(f"d{k}") for k in range(6)])
        await buf.flush()
        ids = [s.id for s in await buf.take_for_sending(0, 10)]
        assert len(ids) == 6
        rec = Recording(buf.core)
        buf.submit([block("d9")])  # committed with the marks
        await asyncio.gather(*(buf.mark_delivered([i]) for i in ids[:4]), buf.mark_delivered(ids[4:]))
        assert rec.calls == [(1, ids)] and rec.own_marks == 0
        stats = await buf.stats()
        assert stats["delivered_readings_total"] == 30 and stats["depth_readings"] == 5
        await buf.mark_delivered(ids[:2])  # again: idempotent, alone in its transaction
        assert rec.calls[1:] == [(0, ids[:2])]
        assert (await buf.stats())["delivered_readings_total"] == 30
    finally:
        await buf.close()


async def test_marks_that_cannot_be_committed_raise_and_stay_undelivered(tmp_path: Path) -> None:
    """A failed commit fails its marks (the forwarder sends those segments again: a duplicate)
    and keeps its records for the retry: nothing is lost, nothing is marked that was not."""
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", commit_interval="50ms"), "gw")
    await buf.open()
    try:
        buf.submit([block("d1")])
        await buf.flush()
        ids = [s.id for s in await buf.take_for_sending(0, 10)]
        real = buf.core.commit
        failures = [RuntimeError("disk I/O error")]

        def failing(items: Sequence[Block | Event], seqs: Any = None, delivered: Sequence[int] = ()) -> Any:
            if failures:
                raise failures.pop()
            return real(items, seqs, delivered)

        buf.core.commit = failing  # type: ignore[method-assign]
        buf.submit([block("d2")])
        with pytest.raises(RuntimeError, match="disk I/O error"):
            await buf.mark_delivered(ids)
        assert await buf.flush(within_s=10), "the records are committed on the retry"
        stats = await buf.stats()
        assert stats["delivered_readings_total"] == 0 and stats["depth_readings"] == 10
    finally:
        await buf.close()


async def test_marks_after_close_are_refused(tmp_path: Path) -> None:
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db"), "gw")
    await buf.open()
    await buf.close()
    with pytest.raises(RuntimeError, match="not open"):
        await buf.mark_delivered([1])


CRASHING_AGENT = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from pathlib import Path
    from agent.buffer.async_buffer import AsyncBuffer
    from agent.buffer.config import BufferConfig
    from agent.core.records import Block
    from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig

    async def main(path, port):
        buf = AsyncBuffer(BufferConfig(path=Path(path), commit_interval="60s"), "gw-lat")
        await buf.open()
        cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix="lat")
        fw = Forwarder(cfg, buf, AgentIdentity("gw-lat", "0.1.0", "c0ffee"))
        await fw.start()
        while not fw.stats()["connected"]:
            await asyncio.sleep(0.02)
        buf.submit([Block(f"d{k}", "g", time.time_ns(), ["a", "b"], ["u", "u"], [1.0, 2.0])
                    for k in range(5)])
        await buf.flush()  # committed now; the marks would wait for the next commit (60 s)
        while fw.stats()["acked"] < 5:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)  # acknowledged, not marked

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_a_crash_between_ack_and_mark_resends_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, arrivals: Arrivals, make_rig: Callable[..., Any]
) -> None:
    path = tmp_path / "buf.db"
    crashed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASHING_AGENT, str(path), str(mosquitto.port)],
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL
    await until(lambda: arrivals.count() == 10, what="the broker had every reading")
    core = Buffer(BufferConfig(path=path), None)
    core.open(readonly=True)
    try:
        stats = core.stats()
    finally:
        core.close()
    assert stats["delivered_readings_total"] == 0 and stats["depth_readings"] == 10, "none marked"
    buf, _ = await make_rig(mosquitto.port)  # the restart, on the same file
    await until(lambda: _equal(delivered(buf), 10), what="sent again, marked")
    await until(lambda: arrivals.copies == 10, what="the duplicates arrived")
    assert sorted(arrivals.at) == list(range(10)), "every seq, none missing"
    assert (await buf.stats())["depth_readings"] == 0


class Timed:
    """The store's commits with when each began (monotonic) and how many records and marks it held."""

    def __init__(self, core: Buffer) -> None:
        self.calls: list[tuple[float, int, int]] = []
        real = core.commit

        def commit(
            items: Sequence[Block | Event], seqs: Sequencer | None = None, delivered: Sequence[int] = ()
        ) -> CommitResult:
            self.calls.append((time.monotonic(), len(items), len(delivered)))
            return real(items, seqs, delivered)

        core.commit = commit  # type: ignore[method-assign]

    def records(self) -> list[tuple[float, int]]:
        return [(at, n) for at, n, _ in self.calls if n]


@contextlib.asynccontextmanager
async def timed_buffer(tmp_path: Path, **cfg: Any) -> AsyncIterator[tuple[AsyncBuffer, Timed]]:
    """An open buffer with ``cfg`` whose commits are timed from the start."""
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", **cfg), "gw")
    await buf.open()
    try:
        yield buf, Timed(buf.core)
    finally:
        await buf.close()


async def test_a_burst_goes_in_one_commit_after_it_pauses(tmp_path: Path) -> None:
    """The polls of one grid instant finish a few ms apart: they are committed together once
    submits pause for ``commit_pause``, not the first alone and the rest an interval later."""
    async with timed_buffer(tmp_path, commit_interval="400ms", commit_pause="50ms") as (buf, rec):
        started = time.monotonic()
        for k in range(8):
            buf.submit([block(f"d{k}")])
            await asyncio.sleep(0.005)
        last = time.monotonic()
        await until(rec.records, what="the burst committed")
        [(at, n)] = rec.records()
        assert n == 8, "the whole burst in one transaction"
        assert at >= last + 0.05 - 0.01, "not before the pause"
        assert at - started < 0.4 + SLACK_S, "within the interval of the first"


async def test_a_stream_that_never_pauses_is_committed_once_per_interval(tmp_path: Path) -> None:
    """Submits every 10 ms never leave a 50 ms pause: the interval bounds the wait of every record,
    and there is at most one transaction of records per interval, whatever the submit rate."""
    interval = 0.2
    async with timed_buffer(tmp_path, commit_interval="200ms", commit_pause="50ms") as (buf, rec):
        submitted: list[float] = []
        while len(submitted) < 150:  # 1.5 s
            buf.submit([block("d1")])
            submitted.append(time.monotonic())
            await asyncio.sleep(0.01)
        await buf.flush()
        commits = rec.records()
        assert sum(n for _, n in commits) == len(submitted)
        starts = [at for at, _ in commits]
        assert len(commits) >= 4, "committed while the stream went on, not held until it ended"
        gaps = [b - a for a, b in itertools.pairwise(starts[:-1])]  # the last is the flush
        assert min(gaps) >= interval * 0.9, f"more than one transaction per interval: {gaps}"
        # Every record's wait until the commit that carried it began: at most the interval (and
        # the scheduling slack of this machine).
        waits, i = [], 0
        for at, n in commits:
            waits += [at - t for t in submitted[i : i + n]]
            i += n
        assert max(waits) < interval + SLACK_S
        assert sorted(waits)[len(waits) // 2] < interval + 0.1, "the typical wait is bounded too"


async def test_marks_alone_wait_the_mark_interval_and_ride_with_records(tmp_path: Path) -> None:
    """Acknowledgements with no records beside them are committed ``mark_interval`` after the
    first; a record arriving meanwhile takes them along in its own commit."""
    cfg = BufferConfig(path=tmp_path / "b.db", commit_interval="50ms", mark_interval="600ms")
    buf = AsyncBuffer(cfg, "gw")
    await buf.open()
    try:
        buf.submit([block(f"d{k}") for k in range(3)])
        await buf.flush()
        ids = [s.id for s in await buf.take_for_sending(0, 10)]
        rec = Timed(buf.core)
        asked = time.monotonic()
        await buf.mark_delivered(ids[:1])
        [(at, n, marks)] = rec.calls
        assert (n, marks) == (0, 1) and at - asked >= 0.6 - 0.01, "alone, after the mark interval"
        rec.calls.clear()
        marked = buf.mark_delivered_soon(ids[1:])
        await asyncio.sleep(0.1)
        assert not rec.calls, "marks alone are not urgent"
        buf.submit([block("d9")])
        await marked
        assert [(n, marks) for _, n, marks in rec.calls] == [(1, 2)], "they rode along with the record"
        assert rec.calls[0][0] - asked < 0.6 + 0.1 + SLACK_S
    finally:
        await buf.close()


async def test_hurried_marks_go_at_once(tmp_path: Path) -> None:
    """A stopping forwarder waits for its marks: ``hurry_marks`` commits them without waiting for
    the mark interval."""
    cfg = BufferConfig(path=tmp_path / "b.db", mark_interval="60s")
    buf = AsyncBuffer(cfg, "gw")
    await buf.open()
    try:
        buf.submit([block("d1")])
        await buf.flush()
        ids = [s.id for s in await buf.take_for_sending(0, 10)]
        marked = buf.mark_delivered_soon(ids)
        await asyncio.sleep(0.05)
        assert not marked.done()
        buf.hurry_marks()
        await asyncio.wait_for(marked, SLACK_S)
        assert (await buf.stats())["delivered_readings_total"] == 5
    finally:
        await buf.close()


async def test_sources_idle_ends_the_pause_but_not_the_interval(tmp_path: Path) -> None:
    """When the scheduler says every poll running has handed over (``sources_idle``), what waits is
    committed without waiting for ``commit_pause``; the interval between commits still holds."""
    interval = 2.5
    async with timed_buffer(tmp_path, commit_interval="2500ms", commit_pause="30s") as (buf, rec):
        buf.submit([block("d1")])
        buf.sources_idle()
        await until(rec.records, within_s=SLACK_S, what="committed without the pause")
        first = rec.records()[0][0]
        buf.submit([block("d2")])
        buf.sources_idle()
        await until(lambda: len(rec.records()) == 2, within_s=interval + SLACK_S, what="the second")
        assert rec.records()[1][0] - first >= interval * 0.95, "still at most one commit per interval"
        await asyncio.sleep(interval + 0.1)
        buf.submit([block("d3")])  # nobody says the burst is over: the pause (capped) is waited for
        await asyncio.sleep(0.5)
        assert len(rec.records()) == 2
        idle = time.monotonic()
        buf.sources_idle()
        await until(lambda: len(rec.records()) == 3, within_s=SLACK_S, what="the third, once idle")
        assert rec.records()[2][0] - idle < interval - 1.0, "at once, not at the interval's end"
