"""Device phases: devices sharing a link (a gateway, a serial line) are spread over its cycle
instead of starting on one instant, a device's groups share its phase and each keeps its own
period, and a device added by a reload takes a phase in the widest gap without moving the
devices already running."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.app.config import load_config
from agent.core.device import ResolvedDevice
from agent.core.driver import DeviceContext, Driver, PollGroup
from agent.core.records import Block
from agent.sources.scheduler import (
    PHASE_STEP_S,
    DeviceRunner,
    PhasePlan,
    Scheduler,
    Slot,
    first_tick,
    link_of,
    on_grid,
)


def devices(
    tmp: Path, units: Sequence[tuple[str, int, int]], name: str = "agent.yaml"
) -> list[ResolvedDevice]:
    """Modbus bioreactors (process 1 s, status 1 s, setpoints 10 s), as (id, gateway port, unit)."""
    body = "\n".join(
        f"  - id: {dev}\n    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {port}, unit_id: {unit}}}"
        for dev, port, unit in units
    )
    path = tmp / name
    path.write_text(f"agent: {{id: t}}\nbuffer: {{path: b.db}}\ndevices:\n{body}\n")
    return load_config(path).devices


def phases(slots: dict[str, dict[str, Slot]]) -> dict[tuple[str, str], float]:
    return {(dev, g): s.phase_s for dev, groups in slots.items() for g, s in groups.items()}


def circular_gaps(values: Sequence[float], cycle: float) -> list[float]:
    ps = sorted(values)
    return [b - a for a, b in itertools.pairwise(ps)] + [ps[0] + cycle - ps[-1]]


def most_on_one_instant(values: Sequence[float]) -> int:
    return max(Counter(round(v, 6) for v in values).values())


def device_phases(slots: dict[str, dict[str, Slot]]) -> dict[str, float]:
    """Each device's one phase (the test fails if its groups do not share one)."""
    out: dict[str, float] = {}
    for dev, groups in slots.items():
        (phase,) = {s.phase_s for s in groups.values()}
        out[dev] = phase
    return out


def test_devices_sharing_a_link_are_spread_evenly_over_its_cycle(tmp_path: Path) -> None:
    ids = [f"br-{c}" for c in "abcde"]
    devs = devices(tmp_path, [(dev, 5020, i + 1) for i, dev in enumerate(ids)])
    assert len({link_of(d) for d in devs}) == 1, "one gateway: one link"
    slots = PhasePlan().place(devs)
    assert sum(len(g) for g in slots.values()) == 15  # 5 devices x (process, status, setpoints)
    assert {s.cycle_s for groups in slots.values() for s in groups.values()} == {1.0}, "the shortest interval"
    placed = device_phases(slots)  # every group of a device at the device's phase
    # i/5 of the cycle, in device id order, rounded down onto the grid
    assert [placed[d] for d in ids] == pytest.approx([on_grid(i / 5) for i in range(5)])
    assert max(placed.values()) >= 1.0 - 1 / 5 - PHASE_STEP_S, "over the whole cycle"
    assert most_on_one_instant(list(placed.values())) <= math.ceil(5 * PHASE_STEP_S / 1.0) < 5


def test_phases_are_deterministic_and_on_one_grid_for_every_link(tmp_path: Path) -> None:
    devs = devices(tmp_path, [("br-a", 5020, 1), ("br-b", 5020, 2), ("solo", 5021, 1)])
    first, again = PhasePlan().place(devs), PhasePlan().place(devs)
    assert phases(first) == phases(again)
    assert link_of(devs[2]) != link_of(devs[0])
    # a device on a link of its own polls all its groups on one instant
    assert device_phases(first)["solo"] == 0.0
    assert device_phases(first)["br-b"] == on_grid(0.5)
    # every phase is on the plant's grid, so groups of different links wake the loop together
    for p in phases(first).values():
        assert p / PHASE_STEP_S == pytest.approx(round(p / PHASE_STEP_S))


def test_devices_alone_on_their_link_are_spread_among_themselves(tmp_path: Path) -> None:
    """Nothing queues between them, but on one instant they would start in one burst."""
    ids = ["br-a", "br-b", "br-c", "br-d", "gw-a"]
    devs = devices(tmp_path, [("br-a", 5021, 1), ("br-b", 5022, 1), ("br-c", 5023, 1), ("br-d", 5024, 1),
                              ("gw-a", 5020, 1), ("gw-b", 5020, 2)])  # fmt: skip
    assert len({link_of(d) for d in devs}) == 5
    placed = device_phases(PhasePlan().place(devs))
    assert [placed[d] for d in ids[:4]] == [0.0, 0.25, 0.5, 0.75]
    assert (placed["gw-a"], placed["gw-b"]) == (0.0, 0.5), "a shared link is spread on its own"


def test_without_a_shared_link_every_device_alone_on_its_link_polls_on_instant_0(tmp_path: Path) -> None:
    """No shared link keeps the grid's other instants in use: spreading would only add wake-ups
    and commits."""
    devs = devices(tmp_path, [("br-a", 5021, 1), ("br-b", 5022, 1), ("br-c", 5023, 1)])
    assert set(device_phases(PhasePlan().place(devs)).values()) == {0.0}


def test_unphased_plan_puts_every_group_at_zero(tmp_path: Path) -> None:
    devs = devices(tmp_path, [("br-a", 5020, 1), ("br-b", 5020, 2)])
    assert set(phases(PhasePlan(phased=False).place(devs)).values()) == {0.0}


async def test_a_device_added_at_reload_takes_the_widest_gap(tmp_path: Path) -> None:
    first = devices(tmp_path, [("br-a", 5020, 1), ("br-b", 5020, 2), ("br-c", 5020, 3), ("br-d", 5020, 4)])
    sched = Scheduler(first, lambda blocks, events: None, {})
    before = {r.id: dict(r.slots) for r in sched.runners}
    assert device_phases(before) == {"br-a": 0.0, "br-b": 0.25, "br-c": 0.5, "br-d": 0.75}
    # br-b and br-c leave, br-e joins the same gateway; the others keep their phases
    added = devices(tmp_path, [("br-e", 5020, 5)], name="more.yaml")
    new = await sched.replace({"br-b", "br-c"}, added)
    assert [r.id for r in new] == ["br-e"]
    kept = {r.id: dict(r.slots) for r in sched.runners if r.id != "br-e"}
    assert kept == {"br-a": before["br-a"], "br-d": before["br-d"]}
    # the widest gap is between br-a (0) and br-d (0.75): br-e takes its middle, on the grid
    assert device_phases({"br-e": dict(new[0].slots)}) == {"br-e": on_grid(0.375)}
    await sched.stop()


def test_first_tick_is_the_next_instant_on_the_grid() -> None:
    assert first_tick(10.25, 1.0, 5.0) == 10.25, "not started yet: the phase's own instant"
    assert first_tick(10.25, 1.0, 12.0) == pytest.approx(12.25)
    assert first_tick(10.25, 1.0, 12.25) == pytest.approx(12.25)
    assert first_tick(10.25, 0.5, 12.3) == pytest.approx(12.75)


class Recorder(Driver):
    """Remembers when each group's read started."""

    protocol = "recorder"
    reads: dict[str, list[float]]

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.reads = {}

    async def connect(self) -> None:
        pass

    async def read(self, group: PollGroup) -> list[Block]:
        self.reads.setdefault(group.name, []).append(time.monotonic())
        return []

    async def close(self) -> None:
        pass


async def test_each_group_polls_on_its_own_phase_and_period(tmp_path: Path) -> None:
    """No group polls before its phase's instant, and every tick of its own period is
    accounted for (a poll, or an overrun on a busy machine): the period does not drift."""
    (dev,) = devices(tmp_path, [("br-a", 5020, 1)])
    for g in dev.groups.values():
        g.interval_s = 0.3
    dev = dataclasses.replace(dev, driver=Recorder)
    epoch = time.monotonic()
    slots = {name: Slot(phase_s=0.05 + i * 0.1, cycle_s=0.3) for i, name in enumerate(sorted(dev.groups))}
    runner = DeviceRunner(dev, lambda blocks, events: None, {}, slots=slots, epoch=epoch)
    runner.start()
    try:
        await asyncio.sleep(1.5)
    finally:
        await runner.stop()
    stopped = time.monotonic()
    assert isinstance(runner.driver, Recorder)
    reads = runner.driver.reads
    assert set(reads) == set(dev.groups)
    for name, times in reads.items():
        anchor = epoch + slots[name].phase_s
        assert times[0] >= anchor - 1e-3, f"{name} polled {anchor - times[0]:.3f} s before its phase"
        stats = runner.group_stats[name]
        ticks = math.floor((stopped - anchor) / 0.3) + 1
        assert ticks - 1 <= stats.polls + stats.overruns <= ticks, (name, stats)
        assert min(stats.jitter_s) >= -1e-3


def test_a_device_without_poll_groups_is_placed_with_none(tmp_path: Path) -> None:
    """A device read for its alarms only has no group, on a link of its own: nothing to place,
    and the other devices keep their phases."""
    dev, other = devices(tmp_path, [("br-a", 5021, 1), ("br-b", 5020, 2)])
    bare = dataclasses.replace(dev, groups={})
    slots = PhasePlan().place([bare, other])
    assert slots["br-a"] == {}
    assert phases(slots) == phases(PhasePlan().place([other]))


def test_a_device_without_poll_groups_is_released_at_reload(tmp_path: Path) -> None:
    """It took no phase: releasing it frees nothing and fails nothing, and a device placed after
    it on the same link starts the link afresh."""
    (dev,) = devices(tmp_path, [("br-a", 5020, 1)])
    plan = PhasePlan()
    assert plan.place([dataclasses.replace(dev, groups={})]) == {"br-a": {}}
    plan.release("br-a")
    plan.release("never-placed")
    assert device_phases(plan.place([dev])) == {"br-a": 0.0}
