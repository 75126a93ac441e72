"""Reference samples from people and the LIMS: one JSON document, one model, one way to enter it,
whether it came over MQTT (``reference.mqtt_commands``) or through the control endpoint
(``cleanroom-agent sample add``).

A sample is parsed strictly (unknown members, wrong types, a value that is no finite number, a time
without a time zone, oversized payloads are refused), then checked against the configuration (a
known device, a tag of its profile, the tag's unit, an actor and a reason, a time not in the
future). Every refusal is audited (``reference_sample_refused``, within a budget as for batch
commands); an accepted sample is compared with the online reading (:mod:`agent.transforms.reference`),
committed as a ``reference_sample`` event and audited (``reference_sample``). Nothing a publisher
sends ends the task that read it, and nothing it sends goes unrecorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.app.batchcommands import RefusalBudget, parse_json
from agent.app.batches import TEXT_MAX
from agent.app.referenceconfig import ReferenceConfig
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.core.device import ResolvedDevice
from agent.core.records import AGENT_DEVICE, Event, Severity, now_ns
from agent.transforms.reference import Sample, event, nearest

log = logging.getLogger("cleanroom.reference")

MAX_SAMPLE_BYTES = 4 * 1024
"""A sample is a couple of hundred bytes; anything beyond this is refused unread."""
FUTURE_TOLERANCE_NS = 60 * 1_000_000_000
"""A sample time this far ahead of the agent's clock is refused: it cannot have been drawn yet
(a little slack for a LIMS whose clock runs ahead)."""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REFERENCE_PATH = "/api/reference"
"""The control endpoint's path for reference samples (``cleanroom-agent sample add``)."""
REFUSED = "reference_sample_refused"
"""Audit action of a refused sample."""
ENTERED = "reference_sample"
"""Audit action of an entered sample (the committed event has the same kind)."""

Text = Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]


class ReferenceCommand(BaseModel):
    """A reference sample as JSON. ``actor`` and ``reason`` may be left out here so that their
    absence is refused and audited like any other refusal."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    device: Text
    tag: Text
    value: float = Field(allow_inf_nan=False)
    """The offline value, in ``unit``."""
    unit: Text | None = None
    """The offline value's unit; refused when it is not the tag's (a value is never converted)."""
    at: int | str
    """When the sample was drawn: ns since the epoch (UTC), or ISO 8601 with a time zone."""
    actor: str = Field(default="", max_length=TEXT_MAX)
    reason: str = Field(default="", max_length=1000)
    sample_id: Text | None = None
    """The sample's id in the LIMS (or the lab notebook)."""

    @field_validator("at")
    @classmethod
    def _time(cls, at: int | str) -> int | str:
        at_ns(at)
        return at

    def at_ns(self) -> int:
        return at_ns(self.at)


def at_ns(at: int | str) -> int:
    """``at`` as ns since the epoch; ValueError naming what is wrong."""
    if isinstance(at, int):
        if at < 0:
            raise ValueError("a time in ns must not be negative")
        return at
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise ValueError("not an ISO 8601 time (e.g. 2026-12-07T03:15:00Z)") from None
    if when.tzinfo is None:
        raise ValueError("an ISO 8601 time needs its time zone (Z or +01:00): a local time is ambiguous")
    ns = (when - EPOCH) // timedelta(microseconds=1) * 1000  # exact: no float on the way
    if ns < 0:
        raise ValueError("a time before 1970 is no sample time")
    return ns


class SampleError(ValueError):
    """A sample that does not parse; the message says what is wrong and never quotes the payload."""


def parse_sample(payload: bytes | str) -> ReferenceCommand:
    """The sample in ``payload``, or :class:`SampleError` naming every mistake."""
    return parse_json(payload, ReferenceCommand, MAX_SAMPLE_BYTES, "sample", SampleError)


@dataclass(frozen=True)
class Entered:
    """What came of a sample: its event's data, or why it was refused."""

    ok: bool
    refusal: str | None = None
    detail: str = ""
    data: Mapping[str, Any] | None = None
    severity: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "refusal": self.refusal,
            "detail": self.detail,
            "severity": self.severity,
            "event": None if self.data is None else dict(self.data),
        }


INPUT_REFUSALS = frozenset(
    {
        "malformed",
        "unknown_device",
        "unknown_tag",
        "unit_mismatch",
        "missing_actor",
        "missing_reason",
        "future",
    }
)
"""Every refusal: each says the sample itself was wrong."""


@dataclass
class ReferenceChecks:
    """Enters reference samples: checks, compares with the buffer's committed readings, commits the
    event and audits it."""

    buffer: AsyncBuffer
    auditor: Auditor
    emit: Callable[[Event], None]
    devices: Callable[[], Mapping[str, ResolvedDevice]]
    """The configured devices (read at each sample: a reload may change them)."""
    config: Callable[[], ReferenceConfig]
    clock: Callable[[], int] = now_ns
    budget: RefusalBudget = field(default_factory=RefusalBudget)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("entered", "refused", "alarms"), 0))
    _pending: set[asyncio.Task[Entered]] = field(default_factory=set)

    def refuse(
        self, source: str, target: str, refusal: str, detail: str, payload: bytes, asked_by: str
    ) -> Entered:
        """Audit a refusal (by the agent, naming who asked), within the budget."""
        self.counts["refused"] += 1
        skipped = self.budget.take()
        if skipped is None:
            log.debug("reference sample from %s refused (over budget): %s", source, detail)
        else:
            log.warning("reference sample from %s refused (%s): %s", source, refusal, detail)
            extra: dict[str, Any] = {
                "refusal": refusal,
                "source": source,
                "requested_by": asked_by.strip() or None,
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
            if skipped:
                extra["refused_unaudited_before"] = skipped
            device = target.split("/", 1)[0]
            self.auditor.record(
                REFUSED,
                target,
                device=device if device in self.devices() else AGENT_DEVICE,
                reason=detail,
                extra=extra,
                severity=Severity.WARNING,
            )
        return Entered(False, refusal, detail)

    async def enter_payload(self, payload: bytes, source: str, where: str) -> Entered:
        """Parse, check, compare and commit one sample (``where``: the topic or path it came on);
        never raises for what ``payload`` holds."""
        try:
            command = parse_sample(payload)
        except SampleError as exc:
            return self.refuse(source, where, "malformed", f"malformed reference sample: {exc}", payload, "")
        return await self.enter(command, source, payload)

    async def enter(self, cmd: ReferenceCommand, source: str, payload: bytes) -> Entered:
        target = f"{cmd.device}/{cmd.tag}"
        problem = self._check(cmd)
        if problem is not None:
            return self.refuse(source, target, *problem, payload, cmd.actor)
        device = self.devices()[cmd.device]
        tag = next(t for t in device.profile.tags if t.name == cmd.tag)
        interval = device.profile.groups[tag.group].interval if tag.group in device.profile.groups else 0.0
        window_ns = int(max(self.config().window, 2 * interval) * 1e9)
        at = cmd.at_ns()
        records = await self.buffer.on_buffer_thread(
            lambda: list(self.buffer.core.records(cmd.device, at - window_ns, at + window_ns + 1))
        )
        online = nearest(records, cmd.tag, at, window_ns)
        sample = Sample(
            cmd.device, cmd.tag, cmd.value, cmd.unit or tag.unit, at, cmd.actor.strip(), cmd.reason.strip(),
            cmd.sample_id, source,
        )  # fmt: skip
        ev = event(sample, online, device.profile.reference_limits.get(cmd.tag), window_ns)
        self.emit(ev)
        self.counts["entered"] += 1
        if ev.severity is Severity.ALARM:
            self.counts["alarms"] += 1
            log.warning("reference sample of %s: online %s differs from offline %s by more than %s",
                        target, ev.data["online"], cmd.value, ev.data["limit"])  # fmt: skip
        self.auditor.record(
            ENTERED,
            target,
            actor=sample.actor,
            reason=sample.reason,
            device=cmd.device,
            new={"offline": cmd.value, "unit": sample.unit, "sample_ts": at, "sample_id": cmd.sample_id},
            extra={
                "source": source,
                "online": ev.data["online"],
                "difference": ev.data["difference"],
                "within": ev.data["within"],
            },
        )
        return Entered(True, data=ev.data, severity=str(ev.severity))

    def _check(self, cmd: ReferenceCommand) -> tuple[str, str] | None:
        """Why ``cmd`` cannot be entered, or None."""
        devices = self.devices()
        device = devices.get(cmd.device)
        if device is None:
            return "unknown_device", f"device {cmd.device!r} is not configured"
        tag = next((t for t in device.profile.tags if t.name == cmd.tag), None)
        if tag is None:
            return "unknown_tag", f"device {cmd.device!r} has no tag {cmd.tag!r}"
        if cmd.unit is not None and tag.unit is not None and cmd.unit != tag.unit:
            return "unit_mismatch", (
                f"the sample is in {cmd.unit!r}, tag {cmd.tag!r} in {tag.unit!r}: give the value in the "
                "tag's unit (it is never converted)"
            )
        if not cmd.actor.strip():
            return "missing_actor", "an actor (who took or entered the sample) is required"
        if not cmd.reason.strip():
            return "missing_reason", "a reason (why the sample is entered) is required"
        if cmd.at_ns() > self.clock() + FUTURE_TOLERANCE_NS:
            return "future", "the sample time is in the future: a sample cannot have been drawn yet"
        return None

    def on_mqtt(self, topic: str, payload: bytes, retained: bool) -> None:
        """The handler of the LIMS topic: the comparison reads the buffer, so it runs as a task of
        its own (the forwarder's handler must not wait)."""
        if retained:
            detail = (
                "a retained message is no sample (it would be entered again at every reconnect): "
                "publish samples with retain false"
            )
            self.refuse("mqtt", topic, "malformed", detail, payload, "")
            return
        task = asyncio.get_running_loop().create_task(self._entered(topic, payload))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _entered(self, topic: str, payload: bytes) -> Entered:
        try:
            return await self.enter_payload(payload, "mqtt", topic)
        except Exception as exc:  # e.g. the buffer closing under it: logged, never a dead task
            log.error("reference sample from mqtt could not be entered: %s", exc)
            return Entered(False, "error", str(exc))

    async def drain(self) -> None:
        """Wait for samples being entered (at stop: each is committed or logged before the buffer closes)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def stats(self) -> dict[str, int]:
        return dict(self.counts)
