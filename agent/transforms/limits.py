"""Deterministic GMP limit monitoring: alert/action limits, rate of change and cleanroom
particle limits (EU GMP Annex 1 grades, ISO 14644-1 classes), independent of any model.

Rules see exactly the committed readings (``on_committed``), so every excursion event
refers to readings that exist in the buffer. Each rule is a small state machine: a
limit is *crossed* after ``consecutive`` samples beyond it and *cleared* when a sample
is back inside by the deadband; an excursion event is emitted at the start and at the
end (with duration and peak). Bad-quality readings neither start nor end an excursion:
an unknown value is not evidence either way, and neither is a number no float holds.

Each reading is evaluated on its own: one that makes a rule raise is counted
(``failed_records`` in status) and logged once, and the rest of its commit batch is
evaluated, so another device's excursion in the same batch is never missed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase
from agent.core.problems import Problem
from agent.core.records import Block, Event, Quality, Severity, Value
from agent.core.supervise import FailureLog
from agent.transforms.debounce import Debounce
from cleanroom_common.fields import Duration, Strict
from cleanroom_common.particle_limits import GMP_ACTION, Grade, RoomState, iso_class_limit

log = logging.getLogger("cleanroom.limits")


class TagLimits(Strict):
    """Alert/action limits of one tag on one device (or on every device that has the tag)."""

    tag: str
    """Tag name as in the device profile."""
    devices: list[str] = Field(default_factory=list)
    """Device ids the limits apply to; empty = every device that has this tag."""
    alert_high: float | None = None
    """Early-warning upper limit (from trend data): crossing it emits an ``alert`` excursion."""
    action_high: float | None = None
    """Upper limit that requires investigation: crossing it emits an ``action`` excursion."""
    alert_low: float | None = None
    """Early-warning lower limit."""
    action_low: float | None = None
    """Lower limit that requires investigation."""
    deadband: float = Field(default=0.0, ge=0)
    """An excursion ends only when the value is back inside the limit by this much (stops chatter around a
    limit).
    """
    consecutive: int = Field(default=1, ge=1)
    """Samples in a row beyond a limit before the excursion starts (filters single-sample noise)."""
    rate_of_change: float | None = Field(default=None, gt=0)
    """Largest allowed change in engineering units per minute; faster change (in the direction
    ``rate_direction`` names) is an ``alert`` excursion.
    """
    rate_window: Duration = 60.0
    """Span over which the rate of change is measured (longer = less sensitive to noise)."""
    rate_direction: Literal["either", "rising", "falling"] = "either"
    """Which change counts against ``rate_of_change``: ``either`` (the absolute change), or only a
    ``rising`` or only a ``falling`` value, e.g. a culture bag's weight, which feeds raise but which
    must never fall without a harvest (a leak)."""

    @model_validator(mode="after")
    def _ordered(self) -> TagLimits:
        if (
            self.alert_high is not None
            and self.action_high is not None
            and self.alert_high > self.action_high
        ):
            raise ValueError("alert_high must not be above action_high (alert warns before action)")
        if self.alert_low is not None and self.action_low is not None and self.alert_low < self.action_low:
            raise ValueError("alert_low must not be below action_low (alert warns before action)")
        limits = (self.alert_high, self.action_high, self.alert_low, self.action_low, self.rate_of_change)
        if all(v is None for v in limits):
            raise ValueError(f"tag {self.tag!r}: no limit given (alert_/action_ high/low or rate_of_change)")
        return self


class ParticleLimits(Strict):
    """Cleanroom particle limits for one counter, by EU GMP grade or ISO class and room state."""

    device: str
    """Device id of the particle counter."""
    grade: Grade | None = None
    """EU GMP Annex 1 grade of the room (A-D); gives the 0.5 and 5.0 µm action limits per state."""
    iso_class_at_rest: int | None = Field(default=None, ge=1, le=9)
    """ISO 14644-1 class at rest (instead of a grade): limit Cn = 10^N x (0.1/D)^2.08, 3 s.f."""
    iso_class_in_operation: int | None = Field(default=None, ge=1, le=9)
    """ISO 14644-1 class in operation (instead of a grade)."""
    tag_0_5: str | None = None
    """Tag with the cumulative count >= 0.5 µm of each sample."""
    tag_5_0: str | None = None
    """Tag with the cumulative count >= 5.0 µm of each sample."""
    counts_are: Literal["per_sample", "per_m3"] = "per_sample"
    """``per_sample``: raw counts in the sampled volume (converted to /m³); ``per_m3``: already
    concentrations.
    """
    sample_volume_l: float = Field(default=28.3, gt=0)
    """Sampled volume per record in litres (28.3 L = 1 ft³ at 28.3 L/min for 1 min)."""
    volume_tag: str | None = None
    """Tag giving each sample's volume in litres; overrides ``sample_volume_l`` when good."""
    state: RoomState = "in_operation"
    """Room state when no ``state_tag`` is configured."""
    state_tag: str | None = None
    """Polled tag giving the room state: truthy/non-zero or ``in_operation`` = in operation. Until it is
    first read the stricter at-rest limits apply.
    """
    state_device: str | None = None
    """Device carrying ``state_tag`` (default: the counter itself)."""
    action_0_5: float | None = Field(default=None, gt=0)
    """Explicit 0.5 µm action limit (/m³), replacing the grade/ISO one; required for grade D in operation
    (set by risk assessment).
    """
    action_5_0: float | None = Field(default=None, gt=0)
    """Explicit 5.0 µm action limit (/m³), replacing the grade/ISO one."""
    alert_0_5: float | None = Field(default=None, gt=0)
    """0.5 µm alert limit (/m³), from trend data; none by default."""
    alert_5_0: float | None = Field(default=None, gt=0)
    """5.0 µm alert limit (/m³), from trend data; none by default."""
    consecutive_5_0: int = Field(default=2, ge=1)
    """Samples in a row over a 5.0 µm limit before an excursion starts: isolated single 5 µm counts are
    noise, repeated ones are an event (Annex 1).
    """
    min_count_5_0: int | None = Field(default=None, ge=1)
    """Count per sample that counts as "over" for the 5.0 µm rule; default: the smallest count above the
    limit for the sample volume.
    """

    @model_validator(mode="after")
    def _classified(self) -> ParticleLimits:
        iso = self.iso_class_at_rest is not None or self.iso_class_in_operation is not None
        if self.grade is not None and iso:
            raise ValueError("give either 'grade' or ISO classes, not both")
        if self.grade is None and not iso and self.action_0_5 is None and self.action_5_0 is None:
            raise ValueError("give a 'grade', ISO classes or explicit action limits")
        if self.tag_0_5 is None and self.tag_5_0 is None:
            raise ValueError("give 'tag_0_5' and/or 'tag_5_0' (the count tags to check)")
        if self.grade == "D" and (self.state_tag is not None or self.state == "in_operation"):
            for size, tag, action in (
                ("0_5", self.tag_0_5, self.action_0_5),
                ("5_0", self.tag_5_0, self.action_5_0),
            ):
                if tag is not None and action is None:
                    raise ValueError(
                        "grade D in operation has no Annex 1 limit (set by risk assessment): "
                        f"give action_{size}"
                    )
        return self


class LimitsConfig(Strict):
    """Rule-based limits (the ``limits:`` section): deterministic, evaluated on committed readings."""

    tags: list[TagLimits] = Field(default_factory=list)
    """Alert/action and rate-of-change limits per tag."""
    particles: list[ParticleLimits] = Field(default_factory=list)
    """Particle limits per counter."""


# --------------------------------------------------------------------------- runtime

Level = Literal["alert", "action"]


class Excursion:
    """Start/end bookkeeping of one limit: debounced "over" samples -> excursion events
    with start, end, duration and peak (the worst value while beyond the limit)."""

    def __init__(
        self,
        device: str,
        tag: str,
        kind: str,
        level: Level,
        raise_after: int,
        worse: Callable[[float, float], float],
    ) -> None:
        self.device, self.tag, self.kind, self.level = device, tag, kind, level
        self.debounce = Debounce(raise_after, 1)
        self.worse = worse
        self.peak: float | None = None
        self.start_ns = 0
        self.start_seq: int | None = None
        self._run_start: tuple[int, int | None] = (0, None)
        self.count = 0

    @property
    def active(self) -> bool:
        return self.debounce.active

    def update(self, ts_ns: int, value: float, over: bool, limit: float, seq: int | None) -> Event | None:
        if over and not self.active and self.debounce.run == 0:
            self._run_start = (ts_ns, seq)
            self.peak = None
        if over:
            self.peak = value if self.peak is None else self.worse(self.peak, value)
        change = self.debounce.update(over)
        if change is None:
            return None
        severity = Severity.ALARM if self.level == "action" else Severity.WARNING
        data: dict[str, Any] = {
            "tag": self.tag,
            "limit_kind": self.kind,
            "level": self.level,
            "limit": limit,
            "value": value,
            "peak": self.peak,
        }
        if change:
            self.count += 1
            self.start_ns, self.start_seq = self._run_start
            data.update(
                phase="start", start_ts=self.start_ns, start_seq=self.start_seq, detected_ts=ts_ns, seq=seq
            )
            return Event(self.device, "excursion", severity, data)
        data.update(
            phase="end",
            start_ts=self.start_ns,
            start_seq=self.start_seq,
            end_ts=ts_ns,
            end_seq=seq,
            duration_s=round((ts_ns - self.start_ns) / 1e9, 3),
        )
        self.peak = None
        return Event(self.device, "excursion", Severity.INFO, data)

    def status(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "kind": self.kind,
            "level": self.level,
            "active": self.active,
            "since_ts": self.start_ns if self.active else None,
            "peak": self.peak if self.active else None,
            "excursions": self.count,
        }


class LevelRule:
    """value beyond a fixed limit (``high``: above, ``low``: below); ends when back inside by the deadband."""

    def __init__(self, device: str, tag: str, high: bool, level: Level, limit: float, cfg: TagLimits) -> None:
        self.high, self.limit, self.deadband = high, limit, cfg.deadband
        self.exc = Excursion(
            device, tag, "high" if high else "low", level, cfg.consecutive, max if high else min
        )

    def update(self, ts_ns: int, value: float, seq: int | None) -> Event | None:
        edge = self.limit - self.deadband if self.exc.active else self.limit
        if not self.high:
            edge = self.limit + self.deadband if self.exc.active else self.limit
        over = value > edge if self.high else value < edge
        return self.exc.update(ts_ns, value, over, self.limit, seq)


class RateRule:
    """Δvalue per minute over ``rate_window`` (absolute, or in ``rate_direction``) above
    ``rate_of_change`` (alert level)."""

    SIGN = {"either": 0.0, "rising": 1.0, "falling": -1.0}

    def __init__(self, device: str, tag: str, cfg: TagLimits) -> None:
        assert cfg.rate_of_change is not None
        self.limit, self.window = cfg.rate_of_change, cfg.rate_window
        self.sign = self.SIGN[cfg.rate_direction]
        self.points: deque[tuple[float, float]] = deque()
        self.exc = Excursion(device, tag, "rate_of_change", "alert", cfg.consecutive, max)

    def update(self, ts_ns: int, value: float, seq: int | None) -> Event | None:
        t = ts_ns / 1e9
        self.points.append((t, value))
        while len(self.points) > 2 and t - self.points[1][0] >= self.window:
            self.points.popleft()
        t0, v0 = self.points[0]
        if t - t0 < self.window / 2:
            return None
        delta = value - v0
        rate = (delta * self.sign if self.sign else abs(delta)) / (t - t0) * 60.0
        return self.exc.update(ts_ns, rate, rate > self.limit, self.limit, seq)


class ParticleRule:
    """One size channel of one counter: concentration vs the alert/action limit of the
    current room state; the 5 µm channel needs ``consecutive_5_0`` samples in a row."""

    def __init__(self, cfg: ParticleLimits, size: str, tag: str, level: Level) -> None:
        self.cfg, self.size, self.level = cfg, size, level
        raise_after = cfg.consecutive_5_0 if size == "5.0" else 1
        self.exc = Excursion(cfg.device, tag, f"particles_{size}um", level, raise_after, max)

    def limit(self, state: RoomState) -> float | None:
        c = self.cfg
        i = 0 if self.size == "0.5" else 1
        if self.level == "alert":
            return c.alert_0_5 if i == 0 else c.alert_5_0
        explicit = c.action_0_5 if i == 0 else c.action_5_0
        if explicit is not None:
            return explicit
        if c.grade is not None:
            return GMP_ACTION[(c.grade, state)][i]
        iso = c.iso_class_at_rest if state == "at_rest" else c.iso_class_in_operation
        return None if iso is None else iso_class_limit(iso, float(self.size))

    def update(
        self, ts_ns: int, count: float, volume_l: float, state: RoomState, seq: int | None
    ) -> Event | None:
        limit = self.limit(state)
        if limit is None:
            return None
        c = self.cfg
        conc = count if c.counts_are == "per_m3" else count / (volume_l / 1000.0)
        over = conc > limit
        if self.size == "5.0" and c.min_count_5_0 is not None and c.counts_are == "per_sample":
            over = count >= c.min_count_5_0
        event = self.exc.update(ts_ns, conc, over, limit, seq)
        if event is not None:
            event.data.update(state=state, count=count, volume_l=volume_l)
        return event


def _reading_ts(block: Block, i: int) -> int:
    src = block.source_ts_ns
    if isinstance(src, int):
        return src
    if isinstance(src, list) and src[i] is not None:
        return int(src[i])  # type: ignore[arg-type]
    return block.acq_ts_ns


def _good_number(block: Block, i: int) -> float | None:
    if block.quality is not None and block.quality[i] is not Quality.GOOD:
        return None
    v = block.values[i]
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        try:
            x = float(v)
        except OverflowError:  # an integer beyond any float: not a value a limit can judge
            return None
        return x if math.isfinite(x) else None
    return None


def room_state(value: Value) -> RoomState:
    if isinstance(value, str):
        return (
            "in_operation"
            if value.strip().lower().replace(" ", "_") in ("in_operation", "operation", "1", "true")
            else "at_rest"
        )
    return "in_operation" if value else "at_rest"


class LimitMonitor:
    """Evaluates :class:`LimitsConfig` on committed readings and emits ``excursion`` events."""

    def __init__(
        self,
        config: LimitsConfig | None,
        devices: Mapping[str, ProfileBase],
        emit: Callable[[Event], None],
        auditor: Auditor,
    ) -> None:
        self.config = config or LimitsConfig()
        self.emit = emit
        self.auditor = auditor
        self.problems = [str(p) for p in self.check(self.config, devices)]
        for p in self.problems:
            log.error("limits: %s", p)
        self._tag_rules: dict[tuple[str, str], list[LevelRule | RateRule]] = {}
        for cfg in self.config.tags:
            targets = cfg.devices or [d for d, p in devices.items() if any(t.name == cfg.tag for t in p.tags)]
            for device in targets:
                if device in devices:
                    self._tag_rules.setdefault((device, cfg.tag), []).extend(_tag_rules(device, cfg))
        self._particles: list[tuple[ParticleLimits, dict[str, list[ParticleRule]]]] = []
        self._states: dict[int, RoomState] = {}
        for idx, pcfg in enumerate(self.config.particles):
            if pcfg.device not in devices:
                continue
            rules: dict[str, list[ParticleRule]] = {}
            for size, tag in (("0.5", pcfg.tag_0_5), ("5.0", pcfg.tag_5_0)):
                if tag is not None:
                    rules[tag] = [ParticleRule(pcfg, size, tag, lvl) for lvl in ("alert", "action")]
            self._particles.append((pcfg, rules))
            self._states[idx] = "at_rest" if pcfg.state_tag is not None else pcfg.state
        self._started = False
        self._faults = FailureLog(log)
        self._plans: dict[tuple[str, int], tuple[Sequence[str], _Plan]] = {}
        """Each block shape's rules, by device and the identity of its tags tuple (a poll group
        hands over the same tuple at every poll): resolved once, not per reading per commit."""

    @staticmethod
    def check(config: LimitsConfig, devices: Mapping[str, ProfileBase]) -> list[Problem]:
        """Configuration problems against the configured devices (for ``validate``)."""
        problems = []
        tags = {d: {t.name for t in p.tags} for d, p in devices.items()}
        for i, cfg in enumerate(config.tags):
            at, subject = ("limits", "tags", i), f"({cfg.tag})"
            if not cfg.devices and not any(cfg.tag in t for t in tags.values()):
                problems.append(Problem(f"no configured device has tag {cfg.tag!r}", at, subject=subject))
            for d in cfg.devices:
                if d not in tags:
                    problems.append(Problem(f"device {d!r} is not configured", at, subject=subject))
                elif cfg.tag not in tags[d]:
                    problems.append(Problem(f"device {d!r} has no tag {cfg.tag!r}", at, subject=subject))
        for i, pcfg in enumerate(config.particles):
            at, subject = ("limits", "particles", i), f"({pcfg.device})"
            if pcfg.device not in tags:
                problems.append(Problem(f"device {pcfg.device!r} is not configured", at, subject=subject))
                continue
            state_dev = pcfg.state_device or pcfg.device
            wanted = [(pcfg.device, t) for t in (pcfg.tag_0_5, pcfg.tag_5_0, pcfg.volume_tag) if t]
            wanted += [(state_dev, pcfg.state_tag)] if pcfg.state_tag else []
            for d, t in wanted:
                if d not in tags:
                    problems.append(Problem(f"device {d!r} is not configured", at, subject=subject))
                elif t not in tags[d]:
                    problems.append(Problem(f"device {d!r} has no tag {t!r}", at, subject=subject))
        return problems

    async def start(self) -> None:
        self._started = True
        self.auditor.record(
            "limits_load",
            "limits",
            new=self.config.model_dump(mode="json"),
            reason="limits from configuration"
            + (f"; problems: {'; '.join(self.problems)}" if self.problems else ""),
        )

    async def stop(self) -> None:
        self._started = False

    def on_committed(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        """Evaluate every rule on the committed readings, in commit order."""
        if not self._started:
            return
        for block in blocks:
            plan = self._plan(block)
            if plan is _NOTHING:
                continue
            for idx, i in plan.states:
                try:
                    self._update_state(idx, block, i)
                except Exception as exc:
                    self._faults.record(f"limits: room state from {block.device}", exc)
            for i, tag, rules in plan.tags:
                try:
                    self._reading(block, i, rules)
                except Exception as exc:
                    self._faults.record(f"limits: {block.device}/{tag}", exc)
            for idx, volume_at, channels in plan.particles:
                try:
                    self._particle_block(idx, volume_at, channels, block)
                except Exception as exc:
                    self._faults.record(f"limits: particles of {block.device}", exc)

    def _plan(self, block: Block) -> _Plan:
        """The rules that see ``block``, resolved once per device and tags tuple (a tuple cannot
        change); tags in another kind of sequence are resolved each time."""
        tags = block.tags
        if type(tags) is not tuple:
            return self._resolve(block.device, tags)
        key = (block.device, id(tags))
        hit = self._plans.get(key)
        if hit is not None and hit[0] is tags:
            return hit[1]
        plan = self._resolve(block.device, tags)
        if len(self._plans) >= _PLANS_MAX:  # subsets and reloads come and go: bound it
            self._plans.clear()
        self._plans[key] = (tags, plan)
        return plan

    def _resolve(self, device: str, tags: Sequence[str]) -> _Plan:
        at: dict[str, int] = {}
        for i, tag in enumerate(tags):
            at.setdefault(tag, i)  # the first of a repeated name, as ``list.index`` finds it
        states = [
            (idx, at[pcfg.state_tag])
            for idx, (pcfg, _) in enumerate(self._particles)
            if pcfg.state_tag is not None
            and device == (pcfg.state_device or pcfg.device)
            and pcfg.state_tag in at
        ]
        rules = [
            (i, tag, found) for i, tag in enumerate(tags) if (found := self._tag_rules.get((device, tag)))
        ]
        particles = []
        for idx, (pcfg, prules) in enumerate(self._particles):
            if pcfg.device != device:
                continue
            volume_at = at.get(pcfg.volume_tag) if pcfg.volume_tag is not None else None
            channels = [(at[tag], prule) for tag, prule in prules.items() if tag in at]
            particles.append((idx, volume_at, channels))
        if not (states or rules or particles):
            return _NOTHING
        return _Plan(states, rules, particles)

    def _reading(self, block: Block, i: int, rules: list[LevelRule | RateRule]) -> None:
        value = _good_number(block, i)
        if value is None:
            return
        ts, seq = _reading_ts(block, i), _seq(block, i)
        for rule in rules:
            self._emit(rule.update(ts, value, seq))

    def _update_state(self, idx: int, block: Block, i: int) -> None:
        if block.quality_of(i) is Quality.GOOD and block.values[i] is not None:
            self._states[idx] = room_state(block.values[i])

    def _particle_block(
        self, idx: int, volume_at: int | None, channels: list[tuple[int, list[ParticleRule]]], block: Block
    ) -> None:
        pcfg = self._particles[idx][0]
        volume = pcfg.sample_volume_l
        if volume_at is not None:
            v = _good_number(block, volume_at)
            if v is not None and v > 0:
                volume = v
        for i, rules in channels:
            count = _good_number(block, i)
            if count is None:
                continue
            for rule in rules:
                self._emit(
                    rule.update(_reading_ts(block, i), count, volume, self._states[idx], _seq(block, i))
                )

    def _emit(self, event: Event | None) -> None:
        if event is not None:
            self.emit(event)

    def status(self) -> dict[str, Any]:
        rules = [r.exc.status() | {"device": d} for (d, _), rs in self._tag_rules.items() for r in rs]
        for idx, (pcfg, prules) in enumerate(self._particles):
            for rs in prules.values():
                rules += [
                    r.exc.status()
                    | {"device": pcfg.device, "state": self._states[idx], "limit": r.limit(self._states[idx])}
                    for r in rs
                ]
        return {
            "problems": self.problems,
            "active": [r for r in rules if r["active"]],
            "rules": len(rules),
            "excursions": sum(r["excursions"] for r in rules),
            "failed_records": self._faults.total,
        }


_PLANS_MAX = 4096
"""Block shapes whose rules :class:`LimitMonitor` keeps resolved at most."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What :class:`LimitMonitor` evaluates on a block of one shape (one device, one tags tuple),
    each entry with the reading's index in the block."""

    states: list[tuple[int, int]]
    """(particle config, index of its room-state tag) for each counter this device's state drives."""
    tags: list[tuple[int, str, list[LevelRule | RateRule]]]
    """(index, tag, its rules) for each tag with rules."""
    particles: list[tuple[int, int | None, list[tuple[int, list[ParticleRule]]]]]
    """(particle config, index of its volume tag, (index, rules) of each size channel present)
    for each particle limit of this device."""


_NOTHING = _Plan([], [], [])
"""The plan of a block no rule looks at (most of them)."""


def _seq(block: Block, i: int) -> int | None:
    return None if block.seq_first is None else block.seq_first + i


def _tag_rules(device: str, cfg: TagLimits) -> list[LevelRule | RateRule]:
    rules: list[LevelRule | RateRule] = []
    for high, level, limit in (
        (True, "alert", cfg.alert_high),
        (True, "action", cfg.action_high),
        (False, "alert", cfg.alert_low),
        (False, "action", cfg.action_low),
    ):
        if limit is not None:
            rules.append(LevelRule(device, cfg.tag, high, level, limit, cfg))  # type: ignore[arg-type]
    if cfg.rate_of_change is not None:
        rules.append(RateRule(device, cfg.tag, cfg))
    return rules
