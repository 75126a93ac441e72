"""Polls every device on its own schedule and hands what it reads to the buffer.

One :class:`DeviceRunner` per device, one task per poll unit (below), so a dead or slow
device never delays another. Polls start on absolute ticks (``first + k·interval``), so
there is no drift over hours. A poll that runs past whole ticks is an overrun: the missed
ticks are counted and skipped, and a block of bad readings (reason ``overrun``) marks the
hole; a poll merely late starts at once. Poll-start jitter is measured against the group's
own ticks.

Devices that share a link (a serial line, a TCP gateway: one request at a time) must not
start on the same instant, or every poll on it queues behind the others and its readings
reach the broker a whole queue later (48 requests on one gateway at one instant were the
plant bench's 450 ms latency p99). So every device has a *phase* (:class:`PhasePlan`): the
devices of one link share its *cycle* (the shortest interval among their groups) and are spread
evenly over it in device id order, each phase rounded down to the plant's phase grid
(:data:`PHASE_STEP_S`); where some links are shared, devices alone on their link are spread
the same way among themselves (:data:`OWN_LINKS`). A device's groups all take its phase: a
device polls all its groups due on a tick on one instant, and its readings of one tick go in one
commit and reach the broker in one segment, not one per group (spreading the groups of a device
apart, as phases did first, sent the plant bench's broker a fifth more segments for no better
latency). The grid is common to all links, so the devices of different links that do not queue on each other
wake the event loop together and reach the buffer in one commit, instead of one wake-up and one
commit each (spreading every group apart, each link from its own offset, cost the plant bench a
fifth more CPU than a 0.1 s grid, side by side, for no better latency). A group's ticks are
``epoch + phase + k·interval`` on the scheduler's epoch; a group that starts later (a reload)
takes the first of its phase's instants on the cycle, at most one cycle away, and its period is
exact from there. A device added to a link that already has devices takes the middle of the
widest gap left between their phases (then onto the grid), so the devices already running keep
their ticks.

A device's groups that fall on the same ticks (same interval, so the same phase, and the same
timeout) and that its driver reads together (:meth:`~agent.core.driver.Driver.reads_together`)
are one *poll unit*: one task and one timer, and one exchange with the device (the Modbus driver
puts their registers in one plan, so a bioreactor's process and status words four addresses
apart are one request, not two). Each group still gets its own block, counts and jitter; a
failed request marks bad the readings it carried, and a lost link every group of the unit.

The runner owns the device connection: a failed connect or a
:class:`~agent.core.driver.DeviceError` closes the driver and reconnects with exponential
backoff and jitter, and while the device is away every tick of every group still
yields a block of bad-quality readings, so the gap is visible downstream in the data
itself, with ``device_state`` events marking its start and end.

Events a driver receives between blocks (OPC UA alarms) reach the buffer at once through
``ctx.submit_events``, on the same submit as blocks: an alarm never waits for a poll tick, and a
device read only for its events (no groups) still runs its connection loop.

Subscription groups (a driver with ``supports_subscribe`` and a group with
``mode: subscribe``) are subscribed after each connect; their tick calls ``read``,
which for such a group is the driver's liveness check (it returns nothing, or raises
:class:`DeviceError` when the link is dead).

No device task dies silently: the runner's loops and the driver's own tasks
(``ctx.tasks``) run under a :class:`~agent.core.supervise.Supervisor`. Whatever a device
task raises, and whatever a driver raises while connecting or reading, is logged once
(with its traceback when it is not a :class:`DeviceError`), counted (``driver_error``
unless the driver named a reason), marked by bad-quality readings and followed by a
reconnect with backoff; a loop of the runner itself that fails is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.core.backoff import backoff_delay
from agent.core.device import ResolvedDevice
from agent.core.driver import DeviceContext, DeviceError, Driver, PollGroup
from agent.core.events import DeviceConnected, DeviceDisconnected
from agent.core.records import Block, Event, Reason, now_ns
from agent.core.stats import percentile
from agent.core.supervise import FailureLog, Supervisor

log = logging.getLogger("cleanroom.scheduler")

Submit = Callable[[Sequence[Block], Sequence[Event]], None]

DRIVER_ERROR = "driver_error"
"""Quality reason and error kind of a driver fault that is not a :class:`DeviceError` (a bug,
or a protocol stack raising what it should not): the device reconnects as for a lost link."""

STATE_SEP = ":"
"""Driver state keys are stored as ``{device}:{key}`` so drivers need not namespace them."""


class DeviceState(Mapping[str, str]):
    """A device's view of the committed driver state: live (it follows every commit, so a
    driver can see that its watermark was committed) and with the device prefix removed."""

    def __init__(self, all_state: Mapping[str, str], device: str) -> None:
        self._all = all_state
        self._prefix = device + STATE_SEP

    def __getitem__(self, key: str) -> str:
        return self._all[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (k[n:] for k in list(self._all) if k.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class GroupStats:
    polls: int = 0
    failed: int = 0
    overruns: int = 0
    last_poll_ns: int | None = None
    last_ok_ns: int | None = None
    jitter_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


PHASE_STEP_S = 0.25
"""The plant's phase grid: every phase is a whole multiple of it. Each instant of the grid costs
an event-loop wake-up and a buffer commit a second, so the grid is coarse: the plant bench, side
by side, spent 6.5 % of a core with every group on one instant, 7.3 % on a 0.5 s grid, 7.9 % on
this one and 9.2 % on a 0.1 s grid, for the same latency p99 (160-170 ms) on all three grids. A
link whose devices are closer together than this shares instants among them: of ``n`` devices
on a cycle ``c``, at most ``ceil(n·step/c)`` start on one instant (4 of a gateway's 16 at 1 s),
not all ``n``."""

Link = tuple[str, ...]
"""What a group's requests queue on: a connection's shared bus, or the device's own link."""


def link_of(device: ResolvedDevice) -> Link:
    """The link the device's requests queue on: its connection's bus when it shares one
    (:meth:`~agent.core.driver.ConnectionBase.bus_key`), else a link of its own."""
    bus = device.connection.bus_key()
    return ("bus", *bus) if bus else ("device", device.id)


OWN_LINKS: Link = ("own links",)
"""Where the devices alone on their link are spread, as if they shared one, in a plant that has
links shared by several devices: nothing queues between them, but all on one instant they would
start in one burst, the last of them late (the plant bench's bioreactors and serial counters),
while the shared links' devices keep the grid's other instants in use anyway (the plant bench:
the same CPU, latency p99 129 → 47 ms). In a plant without a shared link they all stay on
instant 0, one wake-up and one commit a cycle: spread over the grid, ten devices of 10,000
registers each cost ``bench.modbus_load`` a quarter more CPU."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a group's ticks fall: ``epoch + phase_s + k·interval``."""

    phase_s: float = 0.0
    """Offset from the scheduler's epoch, within the link's cycle."""
    cycle_s: float | None = None
    """The link's cycle: a group starting after the epoch takes the first instant
    ``epoch + phase_s + j·cycle_s`` at or after its start (``None``: its own interval)."""


def first_tick(anchor: float, step: float, now: float) -> float:
    """The first instant ``anchor + j·step`` (``j`` a whole number) at or after ``now``."""
    return anchor + max(0, math.ceil((now - anchor) / step)) * step


class PollsInFlight:
    """The polls running plant-wide. When the last of them has handed its blocks over (the polls
    of a grid instant are all in), ``on_idle`` is told: the buffer then commits what waits at
    once, instead of guessing the end of the burst from a pause in submits. Polls that never all
    end together (a plant polled without a pause) leave the buffer to its own rules."""

    def __init__(self) -> None:
        self.running = 0
        self.on_idle: Callable[[], None] | None = None

    @contextlib.contextmanager
    def poll(self) -> Iterator[None]:
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            if self.running == 0 and self.on_idle is not None:
                self.on_idle()


class _Cycle:
    """The phases taken on one link, by device."""

    def __init__(self, cycle_s: float) -> None:
        self.cycle_s = cycle_s
        self.phases: dict[str, float] = {}

    def widest_gap_middle(self) -> float:
        """The middle of the widest gap between the phases taken (on the circle of the cycle)."""
        ps = sorted(self.phases.values())
        gaps = [(b - a, a) for a, b in itertools.pairwise(ps)] + [(ps[0] + self.cycle_s - ps[-1], ps[-1])]
        width, start = max(gaps, key=lambda g: (g[0], -g[1]))
        return (start + width / 2) % self.cycle_s


class PhasePlan:
    """The phase of every device, by link (the rule is in the module's docstring); a device's
    groups all take its phase.

    Deterministic: the same devices give the same phases on every start, so a plant's polls
    fall on the same instants from one run to the next."""

    def __init__(self, phased: bool = True) -> None:
        self._phased = phased
        self._links: dict[Link, _Cycle] = {}
        self._device_links: dict[str, Link] = {}

    def place(self, devices: Sequence[ResolvedDevice]) -> dict[str, dict[str, Slot]]:
        """Slots for the groups of ``devices``, beside the devices already placed."""
        by_link: dict[Link, list[tuple[str, float]]] = {}
        for d in devices:
            if d.groups:  # a device read for its alarms only has no poll group to place
                by_link.setdefault(link_of(d), []).append(
                    (d.id, min(g.interval_s for g in d.groups.values()))
                )
        shared = any(len(devs) > 1 for devs in by_link.values()) or any(
            len(c.phases) > 1 for link, c in self._links.items() if link != OWN_LINKS
        )
        members: dict[Link, list[tuple[str, float]]] = {}
        for link, devs in by_link.items():
            cycle = self._links.get(link)
            alone = len(devs) == 1 and (cycle is None or not cycle.phases)
            spread = OWN_LINKS if alone and shared else link
            members.setdefault(spread, []).extend(devs)
            self._device_links.update(dict.fromkeys((dev for dev, _ in devs), spread))
        placed: dict[str, Slot] = {}
        for link, devs in members.items():
            devs.sort()
            cycle = self._links.get(link)
            if cycle is None or not cycle.phases:
                cycle = self._links[link] = _Cycle(min(interval for _, interval in devs))
                for i, (dev, _) in enumerate(devs):
                    cycle.phases[dev] = i * cycle.cycle_s / len(devs)
            else:
                for dev, _ in devs:
                    cycle.phases[dev] = cycle.widest_gap_middle()
            for dev, _ in devs:
                placed[dev] = Slot(on_grid(cycle.phases[dev]) if self._phased else 0.0, cycle.cycle_s)
        return {d.id: {g: placed[d.id] for g in d.groups} for d in devices}

    def release(self, device: str) -> None:
        """Free the phase of a device that stopped (a reload), for the devices that come next."""
        link = self._device_links.pop(device, None)
        cycle = None if link is None else self._links.get(link)
        if cycle is not None:  # a device without poll groups took no phase
            cycle.phases.pop(device, None)


def on_grid(phase_s: float) -> float:
    """``phase_s`` rounded down to the phase grid (a hair of tolerance: ``0.3 / 0.1`` is 2.99...)."""
    return math.floor(phase_s / PHASE_STEP_S + 1e-9) * PHASE_STEP_S


class DeviceRunner:
    """Connection state machine and poll loops of one device.

    ``slots`` places its groups' ticks on the scheduler's ``epoch`` (set by the time it starts;
    ``None``: its start); without them (a runner made on its own) every group polls at once on
    start and every interval after."""

    def __init__(
        self,
        device: ResolvedDevice,
        submit: Submit,
        state: Mapping[str, str],
        seed: int = 0,
        *,
        slots: Mapping[str, Slot] | None = None,
        epoch: float | None = None,
        polls: PollsInFlight | None = None,
    ) -> None:
        self.device = device
        self.polls = polls or PollsInFlight()
        self.slots: Mapping[str, Slot] = slots or {}
        self.epoch = epoch
        self.id = device.id
        self._submit = submit
        conn = device.connection
        self.faults = FailureLog(log)
        self._loops = Supervisor(
            f"device {self.id}",
            log,
            on_failure=self._task_failed,
            backoff_min=conn.backoff_min,
            backoff_max=conn.backoff_max,
            failures=self.faults,
        )
        self.ctx = DeviceContext(
            id=device.id,
            profile=device.profile,
            connection=conn,
            groups=device.groups,
            state=DeviceState(state, device.id),
            tasks=Supervisor(
                f"driver {self.id}",
                log,
                on_failure=self._task_failed,
                expected=(DeviceError,),
                failures=self.faults,
            ),
            submit_events=self._submit_events,
        )
        self.driver: Driver = device.driver(self.ctx)
        self.connected = False
        self.state = "starting"
        self.last_error: str | None = None
        self.failures = 0
        self.group_stats = {name: GroupStats() for name in device.groups}
        self.up = asyncio.Event()
        self._lost = asyncio.Event()
        self._opened = False
        self._session_fault: DeviceError | None = None
        """A driver task that failed while the connection was being set up."""
        self._conn_task = f"conn:{self.id}"
        self._poll_tasks: dict[str, tuple[PollGroup, ...]] = {}
        self._rng = random.Random(f"{seed}:{device.id}")
        self._subscribed = [
            g
            for g in device.groups.values()
            if self.driver.supports_subscribe and getattr(g.spec, "mode", "poll") == "subscribe"
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float | None = None) -> None:
        """Start connecting and polling; ``now`` (the scheduler's epoch when it starts every
        runner at once) is when, so that a group at phase 0 polls at once."""
        self._loops.spawn(self._conn_task, self._connection_loop)
        now = time.monotonic() if now is None else now
        epoch = now if self.epoch is None else self.epoch
        for unit in self._units():
            name = f"poll:{self.id}:" + "+".join(g.name for g in unit)
            self._poll_tasks[name] = unit
            slot = self.slots.get(unit[0].name, Slot())
            first = first_tick(epoch + slot.phase_s, slot.cycle_s or unit[0].interval_s, now)
            self._loops.spawn(name, functools.partial(self._poll_loop, unit, first))

    def _units(self) -> list[tuple[PollGroup, ...]]:
        """The device's groups as they are polled: those the driver reads together
        (:meth:`~agent.core.driver.Driver.reads_together`) that fall on the same ticks (slot,
        interval, timeout) are one unit, one task and one exchange; every other group alone."""
        units: dict[object, list[PollGroup]] = {}
        for group in self.device.groups.values():
            key: object = group.name
            if group not in self._subscribed and self.driver.reads_together(group):
                key = (self.slots.get(group.name, Slot()), group.interval_s, group.spec.timeout)
            units.setdefault(key, []).append(group)
        return [tuple(unit) for unit in units.values()]

    async def stop(self) -> None:
        """Cancel the loops and close the driver, in bounded time: a protocol stack that
        swallows cancellation must not hang the agent's shutdown."""
        await self._loops.stop()
        await self._close_driver()

    def _task_failed(self, name: str, exc: Exception) -> None:
        """A device task raised (the supervisor has logged it): bad readings for the groups it
        served, and the device's session ends (a lost link, or a failed connect while it is being
        set up), so the device reconnects with backoff; counted as the error kind either way."""
        reason = exc.reason if isinstance(exc, DeviceError) else DRIVER_ERROR
        detail = str(exc) or repr(exc)
        unit = self._poll_tasks.get(name)
        groups = unit if unit is not None else tuple(self.device.groups.values())
        self._submit([g.bad(reason) for g in groups], ())
        if self.connected:
            self._link_lost(reason, detail)
        elif self.state == "connecting" and unit is None and name != self._conn_task:
            self._session_fault = DeviceError(reason, detail)  # the connect attempt fails with it
        else:
            self.ctx.stats.error(reason)

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self) -> None:
        conn = self.device.connection
        if self._opened:  # started again after a failure: the last session is released first
            self.connected = False
            await self._close_driver()
            self._lost.clear()
        while True:
            self.state = "connecting"
            self._session_fault = None
            try:
                self._opened = True
                await asyncio.wait_for(self._connect(), timeout=max(conn.timeout * 2, 1.0))
                _honour_cancel()
                if self._session_fault is not None:
                    raise self._session_fault
            except Exception as exc:  # whatever a protocol stack raises, the device retries
                reason = self._driver_fault(f"{self.id}: connect", exc)
                self._failed(reason, str(exc) or reason)
                await self._close_driver()
                self.state = "backoff"
                await asyncio.sleep(
                    backoff_delay(self.failures, conn.backoff_min, conn.backoff_max, self._rng)
                )
                continue
            self._mark_connected()
            await self._lost.wait()
            self._lost.clear()
            await self._close_driver()
            self.state = "backoff"
            await asyncio.sleep(backoff_delay(self.failures, conn.backoff_min, conn.backoff_max, self._rng))

    async def _connect(self) -> None:
        await self.driver.connect()
        for group in self._subscribed:
            await self.driver.subscribe(group, self._emit)

    def _emit(self, block: Block) -> None:
        self._hand_over([block])

    def _mark_connected(self) -> None:
        was = self.last_error
        self.connected = True
        self.state = "connected"
        self.failures = 0
        self.up.set()
        if was is not None:
            self.ctx.stats.reconnects += 1
        self.last_error = None
        if was is not None:
            log.info("%s: connected again", self.id, extra={"device": self.id})
        self._submit((), [DeviceConnected(previous_error=was).event(self.id)])

    def _failed(self, reason: str, detail: str) -> None:
        """Count a failure; on the transition to failed say so once (one log line and a
        ``device_state`` event), not once per retry."""
        announce = self.connected or self.last_error is None
        self.failures += 1
        self.ctx.stats.error(reason)
        self.connected = False
        self.up.clear()
        self.last_error = reason
        if announce:
            log.warning("%s: %s (%s); reconnecting with backoff", self.id, reason, detail,
                        extra={"device": self.id, "error_kind": reason})  # fmt: skip
            self._submit((), [DeviceDisconnected(reason, detail).event(self.id)])

    def _link_lost(self, reason: str, detail: str) -> None:
        if self.connected:
            self._failed(reason, detail)
            self._lost.set()

    async def _close_driver(self) -> None:
        self._opened = False
        try:
            await asyncio.wait_for(self.driver.close(), timeout=5)
        except Exception as exc:  # close must never take the agent down
            log.debug("%s: close failed: %s", self.id, exc)
        await self.ctx.tasks.stop()

    def _driver_fault(self, where: str, exc: Exception) -> str:
        """The quality reason of a failed driver call; a fault that is not a device problem
        (a bug, a stack raising what it should not) is logged through the failure log."""
        if isinstance(exc, DeviceError | TimeoutError | OSError):
            return _reason(exc)
        self.faults.record(where, exc)
        return DRIVER_ERROR

    # ------------------------------------------------------------------ polling

    def _poll_deadline(self, group: PollGroup) -> float:
        """A poll may take the group's timeout if set, else twice the connection timeout
        (room for the driver's own retry), but never longer than needed to keep ticking."""
        if group.spec.timeout is not None:
            return group.spec.timeout
        return max(self.device.connection.timeout * 2, min(group.interval_s, 10.0))

    async def _poll_loop(self, unit: tuple[PollGroup, ...], first: float) -> None:
        """Poll on the ticks ``first + k·interval``, from the last at or before now: a loop that
        starts a little after its first tick (the runner starts after the plan was made) polls at
        once rather than an interval later (an hour, for an identity group), and a loop started
        again after a failure does not count the ticks before it as overruns. The groups of a
        unit share interval and ticks, so each counts the same polls, overruns and jitter."""
        stats = [self.group_stats[g.name] for g in unit]
        interval = unit[0].interval_s
        k = max(0, math.floor((time.monotonic() - first) / interval)) - 1
        while True:
            k += 1
            tick = first + k * interval
            late = time.monotonic() - tick
            if late >= interval:
                # The previous poll ran past whole ticks: those polls did not happen.
                # One bad block (reason ``overrun``) per group marks the hole in the data.
                missed = math.floor(late / interval)
                for s in stats:
                    s.overruns += missed
                self._submit([g.bad(Reason.OVERRUN) for g in unit], ())
                k += missed
                tick = first + k * interval
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            jitter = time.monotonic() - tick
            for s in stats:
                s.jitter_s.append(jitter)
            with self.polls.poll():
                await self._poll_once(unit, stats)
            _honour_cancel()

    async def _poll_once(self, unit: tuple[PollGroup, ...], stats: list[GroupStats]) -> None:
        acq = now_ns()
        for s in stats:
            s.polls += 1
            s.last_poll_ns = acq
        deadline = self._poll_deadline(unit[0])
        if not self.connected and self.state == "connecting":
            # A connect attempt is under way: give it the poll's time before calling the poll failed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.up.wait(), deadline)
        if not self.connected:
            for s in stats:
                s.failed += 1
            reason = self.last_error or Reason.NOT_CONNECTED
            gaps = [g.bad(reason, acq) for g in unit if not self.driver.backfills(g)]
            if gaps:
                self._submit(gaps, ())
            return
        try:
            # A timeout scope, not ``wait_for``: on Python 3.11 that wraps every read in a task of
            # its own, a task per poll for nothing.
            async with asyncio.timeout(deadline * len(unit)):  # each group's requests, in one exchange
                if len(unit) == 1:
                    blocks = await self.driver.read(unit[0])
                else:
                    blocks = await self.driver.read_together(unit)
        except Exception as exc:
            # Whatever the driver raises, the poll is recorded as bad and the connection
            # recycled: a driver bug must not stop acquisition of this or any other device.
            names = "+".join(g.name for g in unit)
            reason = self._driver_fault(f"{self.id}/{names}: read", exc)
            for s in stats:
                s.failed += 1
            self._submit([g.bad(reason, acq) for g in unit], ())
            self._link_lost(reason, str(exc) or reason)
            return
        if blocks:
            self._hand_over(blocks)
        for s in stats:
            s.last_ok_ns = acq

    def _submit_events(self, events: Sequence[Event]) -> None:
        """Events the driver hands over at once (``ctx.submit_events``, e.g. an OPC UA alarm): they
        take the path of blocks, into the buffer's next group commit, whether or not a poll is due."""
        if events:
            self._submit((), events)

    def _hand_over(self, blocks: Sequence[Block]) -> None:
        """Submit what the driver produced: blocks with their state keys namespaced by
        device, and the events a driver attached to them (e.g. a counter's buffer wrap),
        in the same commit."""
        events: list[Event] = []
        for b in blocks:
            if b.state:
                b.state = {f"{self.id}{STATE_SEP}{k}": v for k, v in b.state.items()}
            if b.events:
                events.extend(b.events)
                b.events = None
        self._submit(blocks, events)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        groups = {}
        for name, s in self.group_stats.items():
            jitter = percentile(s.jitter_s, 0.99)
            groups[name] = {
                "interval_s": self.device.groups[name].interval_s,
                "mode": getattr(self.device.groups[name].spec, "mode", "poll"),
                "phase_ms": round(self.slots.get(name, Slot()).phase_s * 1000, 1),
                "polls": s.polls,
                "failed": s.failed,
                "overruns": s.overruns,
                "last_poll": _iso(s.last_poll_ns),
                "last_ok": _iso(s.last_ok_ns),
                "jitter_p99_ms": None if jitter is None else round(jitter * 1000, 3),
            }
        return {
            "protocol": self.device.driver.protocol,
            "profile": self.device.profile.profile,
            "state": self.state,
            "connected": self.connected,
            "last_error": self.last_error,
            "consecutive_failures": self.failures,
            "groups": groups,
            "driver": self.ctx.stats.snapshot(),
            "tasks": {**self._loops.status(), **self.ctx.tasks.status()},
        }


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DeviceError):
        return exc.reason
    return Reason.TIMEOUT if isinstance(exc, TimeoutError) else Reason.COMM_ERROR


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def _honour_cancel() -> None:
    """Python 3.11's ``wait_for`` returns the awaited result when a cancel arrives in the same
    loop pass, and the cancel is lost; a loop calls this after such a wait, or stop() waits its
    5 s and abandons a task that keeps polling a closed driver."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Scheduler:
    """All device runners; started and stopped together, or some replaced by a reload.

    The epoch every group's phase counts from is when the scheduler started."""

    phased: ClassVar[bool] = True
    """False puts every group at phase 0, all of a link's groups on the same instants (how
    groups were scheduled before phases): ``bench.plant`` runs it side by side."""

    def __init__(self, devices: Sequence[ResolvedDevice], submit: Submit, state: Mapping[str, str]) -> None:
        self._submit = submit
        self._state = state
        self._epoch: float | None = None
        self._plan = PhasePlan(self.phased)
        self.polls = PollsInFlight()
        """Every runner's polls, counted together (``polls.on_idle``: the end of each burst)."""
        self.runners = self._runners([d for d in devices if d.config.enabled])

    def _runners(self, devices: Sequence[ResolvedDevice]) -> list[DeviceRunner]:
        slots = self._plan.place(devices)
        return [
            DeviceRunner(d, self._submit, self._state, slots=slots[d.id], epoch=self._epoch, polls=self.polls)
            for d in devices
        ]

    async def replace(self, remove: Collection[str], add: Sequence[ResolvedDevice]) -> list[DeviceRunner]:
        """Stop the runners of ``remove`` and make (not start) runners for ``add``: the other
        runners keep their connections, phases and poll ticks, and the new ones' groups take
        the widest gaps left on their links. The caller wires the new runners and starts them,
        as for the first ones."""
        await asyncio.gather(*(r.stop() for r in self.runners if r.id in remove))
        for device in remove:
            self._plan.release(device)
        new = self._runners([d for d in add if d.config.enabled])
        self.runners = [r for r in self.runners if r.id not in remove] + new
        return new

    def start(self) -> None:
        """Start every runner on one epoch: the groups at phase 0 poll at once."""
        self._epoch = time.monotonic()
        for r in self.runners:
            r.epoch = self._epoch
            r.start(now=self._epoch)

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.runners))

    def status(self) -> dict[str, Any]:
        return {r.id: r.status() for r in self.runners}
