"""The scheduler against a real Modbus simulator: absolute ticks, gaps as bad-quality
records, device_state events, reconnect with backoff, isolation between devices."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.app.config import load_config
from agent.core.events import DataLoss
from agent.core.records import Block, Event, Quality
from agent.sources.scheduler import Scheduler
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus


def config(tmp: Path, devices: Sequence[tuple[str, int]], interval: str = "200ms") -> Path:
    body = "\n".join(
        f"  - id: {dev}\n    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {port}, timeout: 300ms, retries: 0, degrade_after: 100, "
        f"backoff_min: 100ms, backoff_max: 400ms}}\n    groups: {{process: {{interval: {interval}}}}}"
        for dev, port in devices
    )
    path = tmp / "agent.yaml"
    path.write_text(f"agent: {{id: t}}\nbuffer: {{path: b.db}}\ndevices:\n{body}\n")
    return path


class Sink:
    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.events: list[Event] = []

    def __call__(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        self.blocks.extend(blocks)
        self.events.extend(events)

    def group(self, device: str, group: str = "process") -> list[Block]:
        return [b for b in self.blocks if b.device == device and b.group == group]


async def test_outage_is_visible_in_the_data_and_recovers(tmp_path: Path) -> None:
    # the simulator drops every connection between 1.5 s and 3.5 s after start
    async with serve_bioreactor_modbus(port=0, speed=1.0, faults=["comm_disconnect@1.5s+2s"]) as sim:
        loaded = load_config(config(tmp_path, [("br1", sim.port)]))
        sink = Sink()
        sched = Scheduler(loaded.devices, sink, {})
        sched.start()
        await asyncio.sleep(6.0)
        await sched.stop()
    blocks = sink.group("br1")
    good = [b for b in blocks if b.quality is None]
    bad = [b for b in blocks if b.quality is not None and all(q is Quality.BAD for q in b.quality)]
    assert good and bad
    assert {r for b in bad for r in (b.reasons or [])} <= {"comm_error", "timeout", "not_connected"}
    assert all(v is None for b in bad for v in b.values), "a failed poll carries no values"
    # good readings before and after the outage, bad in between
    first_bad = blocks.index(bad[0])
    assert blocks[first_bad - 1].quality is None and blocks[-1].quality is None
    states = [e.data["state"] for e in sink.events if e.kind == "device_state"]
    assert states[0] == "connected" and "disconnected" in states and states[-1] == "connected"
    # transitions are events (the simulator accepts connections and then drops them, so
    # the device flaps, at most once per failed poll of any of its groups: they poll on
    # phases of their own), never a repeat of the same state
    failed = [b for b in sink.blocks if b.device == "br1" and b.quality is not None]
    assert states.count("disconnected") <= len(failed)
    assert all(a != b for a, b in itertools.pairwise(states)), states
    # every tick produced a block, good or bad: no silent hole
    span_s = (blocks[-1].acq_ts_ns - blocks[0].acq_ts_ns) / 1e9
    assert len(blocks) >= round(span_s / 0.2) - 1


async def test_ticks_are_absolute_and_do_not_drift(tmp_path: Path) -> None:
    async with serve_bioreactor_modbus(port=0, speed=1.0) as sim:
        loaded = load_config(config(tmp_path, [("br1", sim.port)], interval="100ms"))
        sink = Sink()
        sched = Scheduler(loaded.devices, sink, {})
        sched.start()
        await asyncio.sleep(3.05)
        status = sched.status()
        await sched.stop()
    blocks = sink.group("br1")
    assert 29 <= len(blocks) <= 32
    # the n-th poll starts at t0 + n·interval (acquisition times include the read itself)
    t0 = blocks[0].acq_ts_ns
    worst = max(abs((b.acq_ts_ns - t0) / 1e9 - i * 0.1) for i, b in enumerate(blocks))
    assert worst < 0.08, f"poll {worst * 1000:.0f} ms off its tick"
    assert status["br1"]["groups"]["process"]["overruns"] == 0
    assert status["br1"]["driver"]["requests"] > 0


async def test_a_dead_device_does_not_delay_another(tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens: connection refused, backoff
    async with (
        serve_bioreactor_modbus(port=0, speed=1.0) as live,
        serve_bioreactor_modbus(port=0, speed=1.0, faults=["comm_timeout@0s"]) as mute,
    ):
        loaded = load_config(
            config(
                tmp_path, [("live", live.port), ("dead", dead_port), ("mute", mute.port)], interval="100ms"
            )
        )
        sink = Sink()
        sched = Scheduler(loaded.devices, sink, {})
        sched.start()
        await asyncio.sleep(3.05)
        status = sched.status()
        await sched.stop()
    live_blocks = sink.group("live")
    assert len(live_blocks) >= 29 and all(b.quality is None for b in live_blocks)
    assert status["live"]["groups"]["process"]["overruns"] == 0
    for dev in ("dead", "mute"):
        blocks = sink.group(dev)
        group = status[dev]["groups"]["process"]
        # every tick is accounted for: a (bad) block, or an overrun block for ticks a slow
        # timeout swallowed
        assert group["polls"] + group["overruns"] >= 29, group
        overrun_blocks = [b for b in blocks if b.reasons and b.reasons[0] == "overrun"]
        # each poll yields one block (the status was read while the last poll may still run)
        assert group["polls"] - 1 <= len(blocks) - len(overrun_blocks) <= group["polls"]
        assert bool(group["overruns"]) == bool(overrun_blocks), "missed ticks are marked in the data"
        assert all(b.quality is not None for b in blocks)
        if dev == "dead":
            assert status[dev]["connected"] is False  # "mute" accepts connections, then stays silent
        assert status[dev]["driver"]["errors"], "failures are counted by kind"


async def test_counter_records_missed_while_away_are_read_back_and_a_wrap_is_a_loss_event(
    tmp_path: Path,
) -> None:
    """The agent is gone while the counter keeps sampling: on return it reads every record
    it missed, in order, from the watermark it committed; records that rotated out of the
    counter's 3,000-record buffer become one ``data_loss`` event in the same commit."""
    from simulators.process.base import Clock
    from simulators.servers.modbus import serve_counter_modbus

    clock = Clock(60.0)  # one sample record per wall second
    async with serve_counter_modbus(port=0, clock=clock, seed=5) as sim:
        path = tmp_path / "agent.yaml"
        path.write_text(
            "agent: {id: t}\nbuffer: {path: b.db}\ndevices:\n"
            "  - id: pc1\n    profile: particle-counter-sim-modbus\n"
            f"    connection: {{host: 127.0.0.1, port: {sim.port}, timeout: 1s}}\n"
            "    groups: {records: {interval: 200ms}}\n"
        )
        loaded = load_config(path)
        committed: dict[str, str] = {}

        class CommittingSink(Sink):
            def __call__(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
                super().__call__(blocks, events)
                for b in blocks:
                    committed.update(b.state or {})

        first = CommittingSink()
        sched = Scheduler(loaded.devices, first, committed)
        sched.start()
        await asyncio.sleep(2.5)
        await sched.stop()
        seen = [b.source_ts_ns for b in first.group("pc1", "records")]
        assert seen and committed, "records were read and their watermark committed"

        async def away_then_back(speed: float, run_s: float) -> CommittingSink:
            """The agent is gone for one wall second at ``speed``, then runs for ``run_s``."""
            clock.speed = speed
            await asyncio.sleep(1.0)
            clock.speed = 60.0
            sink = CommittingSink()
            sched = Scheduler(loaded.devices, sink, dict(committed))
            sched.start()
            await asyncio.sleep(run_s)
            await sched.stop()
            return sink

        # away for 10 simulated minutes: 10 records to read back, no loss
        second = await away_then_back(600.0, 2.5)
        back = [b.source_ts_ns for b in second.group("pc1", "records")]
        assert len(back) >= 10
        steps = {(b - a) // 10**9 for a, b in zip([seen[-1], *back], back, strict=False)}
        assert steps == {60}, f"records read back one sample apart, none missed or repeated: {steps}"
        assert not [e for e in second.events if e.kind == "data_loss"]

        # away for ~3,600 records: the counter's buffer wrapped, 600 or so are gone for good
        third = await away_then_back(216_000.0, 3.0)
    losses = [e for e in third.events if e.kind == "data_loss"]
    assert len(losses) == 1 and losses[0].device == "pc1"
    assert losses[0].data["reason"] == "device_buffer_wrapped"
    loss = DataLoss.from_event(losses[0])  # the gap: last record read before, oldest one left after
    assert loss.first_ts is not None and loss.last_ts is not None
    assert 300 <= round((loss.last_ts - loss.first_ts) / 60e9) - 1 <= 1000, loss


async def test_stop_is_prompt_even_when_a_cancel_meets_a_finishing_poll(tmp_path: Path) -> None:
    """A cancel that lands in the same loop pass as a poll's reply is swallowed by Python
    3.11's wait_for (it returns the result); the poll loop must still stop at once rather
    than run on until stop() gives up on it. The race is made deterministic here: the real
    read's reply and the cancel are scheduled back to back."""
    async with serve_bioreactor_modbus(port=0, speed=1.0) as sim:
        loaded = load_config(config(tmp_path, [("br1", sim.port)]))
        sink = Sink()
        sched = Scheduler(loaded.devices, sink, {})
        runner = sched.runners[0]
        sched.start()
        await asyncio.sleep(0.5)
        assert sink.group("br1"), "the device is polled"
        poll_task = next(t for t in asyncio.all_tasks() if t.get_name() == "poll:br1:process")
        real_read = runner.driver.read

        cancels: list[bool] = []

        async def read_then_cancelled(group: Any) -> list[Block]:
            blocks = await real_read(group)
            if not cancels:  # one cancel, racing the reply
                cancels.append(True)
                asyncio.get_running_loop().call_soon(poll_task.cancel)
            return blocks

        runner.driver.read = read_then_cancelled  # type: ignore[method-assign]
        done, _ = await asyncio.wait([poll_task], timeout=2)  # ten polling intervals
        assert cancels and done and poll_task.cancelled()
        t = asyncio.get_running_loop().time()
        await sched.stop()
        assert asyncio.get_running_loop().time() - t < 2


async def test_the_end_of_each_burst_of_polls_is_told_once_all_have_handed_over(tmp_path: Path) -> None:
    """``polls.on_idle`` (the buffer's cue to commit at once) comes when no poll is running any
    more, after the blocks of every poll that ran: never while one is still reading."""
    async with serve_bioreactor_modbus(port=0, speed=1.0) as sim:
        loaded = load_config(config(tmp_path, [("br1", sim.port), ("br2", sim.port)], interval="250ms"))
        sink = Sink()
        sched = Scheduler(loaded.devices, sink, {})
        seen: list[tuple[int, int]] = []
        sched.polls.on_idle = lambda: seen.append((sched.polls.running, len(sink.blocks)))
        sched.start()
        await asyncio.sleep(2.0)
        await sched.stop()
    assert seen, "never told"
    assert all(running == 0 for running, _ in seen)
    polls = sum(g["polls"] for s in sched.status().values() for g in s["groups"].values())
    assert len(seen) <= polls, "at most once per poll"
    blocks_at = [n for _, n in seen]
    assert blocks_at == sorted(blocks_at) and blocks_at[-1] == len(sink.blocks), "after every block"
    # the two devices' groups share their ticks, so a burst ends once, not once per poll
    assert len(seen) < polls


async def test_a_devices_groups_due_together_are_one_poll_and_one_exchange(tmp_path: Path) -> None:
    """Process and status on the same ticks are one unit: one task, one Modbus request a tick for
    both (their registers are 4 apart, so the driver fuses them into one read), yet each group
    keeps its own block and counts; a silent device fails both groups at the same instants, and
    the setpoints group (another interval) is polled on its own."""
    async with serve_bioreactor_modbus(port=0, speed=1.0, faults=["comm_timeout@1.5s+1s"]) as sim:
        path = tmp_path / "agent.yaml"
        path.write_text(
            "agent: {id: t}\nbuffer: {path: b.db}\ndevices:\n  - id: br1\n    profile: bioreactor-sim\n"
            f"    connection: {{host: 127.0.0.1, port: {sim.port}, timeout: 300ms, retries: 0, "
            "degrade_after: 100, backoff_min: 100ms, backoff_max: 200ms}\n"
            "    groups: {process: {interval: 200ms}, status: {interval: 200ms}}\n"
        )
        sink = Sink()
        sched = Scheduler(load_config(path).devices, sink, {})
        sched.start()
        await asyncio.sleep(0.5)
        tasks = {t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("poll:br1:")}
        await asyncio.sleep(3.5)
        await sched.stop()
    status = sched.status()["br1"]  # after the stop: counts and blocks of the same polls
    assert tasks == {"poll:br1:process+status", "poll:br1:setpoints"}
    process, state = sink.group("br1"), sink.group("br1", "status")
    assert [b.acq_ts_ns for b in process] == [b.acq_ts_ns for b in state], "one poll, two blocks"
    assert len(process) >= 15
    assert [b.tags for b in state[:1]] == [("running", "temp_high", "temp_low", "ph_high", "ph_low", "do_low",
                                           "agitation_fault", "gas_supply_low", "base_pump_on")]  # fmt: skip
    good = [b for b in state if b.quality is None]
    assert good and all(isinstance(v, bool) for b in good for v in b.values)
    # the silence fails both groups on the same polls, and both recover
    bad_process = [b.acq_ts_ns for b in process if b.quality is not None]
    assert bad_process and bad_process == [b.acq_ts_ns for b in state if b.quality is not None]
    assert process[-1].quality is None and state[-1].quality is None
    groups = status["groups"]
    assert groups["process"]["polls"] == groups["status"]["polls"] >= 15
    assert groups["process"]["failed"] == groups["status"]["failed"] > 0
    # one request a tick for both groups: answered requests are the good polls of the unit and
    # of setpoints (each one read), not twice the unit's
    answered = status["driver"]["requests"]
    ok_polls = sum(1 for b in process if b.quality is None) + sum(
        1 for b in sink.group("br1", "setpoints") if b.quality is None
    )
    assert answered == ok_polls
