"""Batch schedules: which batch each simulated device holds when, and the MES commands that say so.

A scenario's ``batches:`` section (``docs/simulators.md``, Batches) lists batches, each with its
lot id, product, chain-of-identity id, the devices (or agent device group) that hold it, its
start as an offset from the scenario start, and its ISA-88 procedure steps with durations::

    batches:
      - id: LOT-0001
        product: CAR-T
        coi_id: COI-PAT-0001
        devices: [br-01, inc-01]
        group: suite-1          # optional: the MES addresses the agent's device group by name
        start: 10m
        steps:
          - {name: inoculation, duration: 30m}
          - {name: expansion, duration: 2d}

The same schedule drives both sides of the plant: the devices expose the batch they hold
(the OPC UA bioreactor's ``ActiveProgram`` nodes), and ``cleanroom-sim mes`` publishes the
assignment commands an MES would send the agent (start, one step per step change, end) for the
batches whose ``source`` is ``mes`` (the default; ``device``: the devices alone say it). The
model is data only: no clock, no I/O; times are simulated Unix seconds once anchored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from pydantic import Field, model_validator

from cleanroom_common.fields import Duration, Strict

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
"""Batch, chain-of-identity and group ids: what an MES, the agent's ``ref`` (``{batch_id}#{n}``)
and an MQTT payload carry unambiguously."""

DEFAULT_ACTOR = "mes-sim"
DEFAULT_REASON = "scheduled by the simulated MES"


class StepSpec(Strict):
    """One ISA-88 procedure step of a batch."""

    name: str = Field(min_length=1, max_length=64)
    """Step name as the device and the MES show it (``inoculation``, ``expansion``, ``harvest``)."""
    duration: Duration = Field(gt=0)
    """How long the step lasts (``30m``, ``2d``)."""


class BatchSpec(Strict):
    """One batch on one device or a group of devices, from start to release."""

    id: str = Field(pattern=ID_PATTERN, max_length=64)
    """Batch/lot id."""
    product: str | None = None
    """Product name or code."""
    coi_id: str | None = Field(None, pattern=ID_PATTERN, max_length=64)
    """Chain-of-identity id (autologous therapy: the patient's), where there is one."""
    devices: list[str] = Field(min_length=1)
    """Devices that hold the batch (a bioreactor with its incubator); they expose it on their nodes."""
    group: str | None = Field(None, pattern=ID_PATTERN, max_length=64)
    """Agent device group (``batch.groups``) the MES names instead of the devices; empty: the devices."""
    start: Duration = Field(ge=0)
    """When the batch starts, as an offset from the scenario start."""
    steps: list[StepSpec] = Field(min_length=1)
    """Procedure steps in order; the batch ends when the last one does."""
    source: Literal["mes", "device"] = "mes"
    """Who tells the agent: ``mes`` (``cleanroom-sim mes`` publishes the commands) or ``device``
    (only the devices' batch nodes say it, as a LADS device running a program does)."""
    actor: str = Field(DEFAULT_ACTOR, min_length=1)
    """Who the MES commands name as having made the assignment."""
    reason: str = Field(DEFAULT_REASON, min_length=1)
    """Why, as the MES commands state it (the agent audits actor and reason)."""

    @model_validator(mode="after")
    def _distinct(self) -> BatchSpec:
        dupes = sorted({d for d in self.devices if self.devices.count(d) > 1})
        if dupes:
            raise ValueError(f"batch {self.id!r}: device {', '.join(dupes)} listed twice")
        return self

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.steps)

    @property
    def end(self) -> float:
        """Offset from the scenario start at which the batch is released."""
        return self.start + self.duration


Action = Literal["start", "step", "end"]


@dataclass(frozen=True)
class Command:
    """One MES assignment command, due at simulated time ``t`` (Unix seconds)."""

    t: float
    action: Action
    batch: BatchSpec
    step: str | None

    def payload(self) -> dict[str, Any]:
        """The command JSON the agent's MQTT command topic takes (``docs/batches.md``)."""
        out: dict[str, Any] = {"action": self.action}
        if self.batch.group is not None:
            out["group"] = self.batch.group
        else:
            out["devices"] = list(self.batch.devices)
        out["batch_id"] = self.batch.id
        if self.action == "start":  # identifiers the batch has; an absent one is omitted, not null
            out |= {k: v for k, v in (("coi_id", self.batch.coi_id), ("product", self.batch.product)) if v}
        if self.step is not None:
            out["step"] = self.step
        out["actor"] = self.batch.actor
        out["reason"] = self.batch.reason
        return out


@dataclass(frozen=True)
class Held:
    """What a device holds at an instant: the batch and its current step."""

    batch: BatchSpec
    step: str


def check_schedule(batches: Sequence[BatchSpec], device_ids: Iterable[str] | None = None) -> None:
    """Reject a schedule the plant could not run: unknown devices, and two batches on one device
    at the same time (a device holds at most one batch; the agent would refuse the second)."""
    known = set(device_ids) if device_ids is not None else None
    by_device: dict[str, list[BatchSpec]] = {}
    for i, b in enumerate(batches):
        for d in b.devices:
            if known is not None and d not in known:
                raise ValueError(f"batches[{i}] ({b.id}): no device {d!r} in the scenario")
            by_device.setdefault(d, []).append(b)
    for device, held in by_device.items():
        held.sort(key=lambda b: b.start)
        for a, b in pairwise(held):
            if b.start < a.end:
                raise ValueError(f"device {device!r}: batch {b.id!r} starts before batch {a.id!r} ends")


class BatchSchedule:
    """A scenario's batches anchored at simulated time ``start_time_s`` (the plant clock's start)."""

    def __init__(self, batches: Sequence[BatchSpec], start_time_s: float) -> None:
        check_schedule(batches)
        self.batches = sorted(batches, key=lambda b: (b.start, b.id))
        self.start_time_s = start_time_s

    def __bool__(self) -> bool:
        return bool(self.batches)

    def held(self, device_id: str, t: float) -> Held | None:
        """The batch and step ``device_id`` holds at simulated time ``t``; None between batches."""
        for b in self.batches:
            if device_id not in b.devices:
                continue
            offset = t - self.start_time_s - b.start
            if offset < 0 or offset >= b.duration:
                continue
            for step in b.steps:
                if offset < step.duration:
                    return Held(b, step.name)
                offset -= step.duration
        return None

    def commands(self, end_s: float = math.inf) -> list[Command]:
        """Every MES command due before ``end_s`` (simulated Unix seconds), in time order: a batch's
        start names its first step, each later step is a ``step`` command, its release ``end``.
        Batches the devices declare themselves (``source: device``) have none."""
        out: list[Command] = []
        for b in self.batches:
            if b.source != "mes":
                continue
            t = self.start_time_s + b.start
            out.append(Command(t, "start", b, b.steps[0].name))
            for prev, step in pairwise(b.steps):
                t += prev.duration
                out.append(Command(t, "step", b, step.name))
            out.append(Command(self.start_time_s + b.end, "end", b, None))
        order = {"end": 0, "start": 1, "step": 2}  # a device released and reassigned at one instant
        return sorted((c for c in out if c.t < end_s), key=lambda c: (c.t, order[c.action], c.batch.id))


__all__ = ["BatchSchedule", "BatchSpec", "Command", "Held", "StepSpec", "check_schedule"]
