"""Batch commands from people and the MES: one JSON document (docs/batch-command.schema.json), one
model, one way to apply it, whether it came over MQTT (the MES) or through the control endpoint
(``cleanroom-agent batch``).

A command is parsed strictly (unknown members, wrong types and oversized payloads are refused
before anything else) and then handed to the :class:`~agent.app.batches.BatchRegistry`, which
refuses and audits what cannot be applied (an unknown device, a device holding another batch, a
missing actor or reason). What does not even parse is refused and audited here
(``batch_command_refused``): nothing a publisher sends ends the task that read it, and nothing
it sends goes unrecorded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.app.batches import TEXT_MAX, BatchRegistry, BatchResult, RefusalReason
from agent.buffer.audit import Auditor
from agent.core.batch import BatchContext, BatchSource
from agent.core.records import Severity

log = logging.getLogger("cleanroom.batch")

MAX_COMMAND_BYTES = 16 * 1024
"""A command is a few hundred bytes; anything beyond this is refused unread."""
MAX_DEVICES = 64
"""Devices one command may name."""
REFUSALS_AUDITED = 10
"""Unparsable commands audited one by one per :data:`REFUSAL_WINDOW_S`; beyond, they are counted
and the next audit record says how many were refused meanwhile (a flood of garbage on the topic
must not fill the buffer with audit records, nor go unrecorded)."""
REFUSAL_WINDOW_S = 60.0

COMMAND_REFUSED = "batch_command_refused"
"""Audit action of a command refused before it reached the registry."""
MALFORMED = "malformed"
"""Refusal reason of a command that does not parse (beside the registry's :class:`RefusalReason`)."""

Text = Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]


class BatchCommand(BaseModel):
    """A batch command as JSON (docs/batch-command.schema.json). ``actor`` and ``reason`` may be
    left out here so that the registry refuses and audits their absence like any other refusal."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    action: Literal["start", "step", "end"]
    devices: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_DEVICES)
    group: Text | None = None
    batch_id: Text | None = None
    coi_id: Text | None = None
    product: Text | None = None
    step: Text | None = None
    actor: str = Field(default="", max_length=TEXT_MAX)
    reason: str = Field(default="", max_length=1000)
    ts: int | None = Field(default=None, ge=0)
    """When the MES issued the command (ns since the epoch, UTC): logged with the outcome."""

    @model_validator(mode="after")
    def _complete(self) -> BatchCommand:
        if (self.devices is None) == (self.group is None):
            raise ValueError("give either devices or group")
        if self.action == "start" and self.batch_id is None:
            raise ValueError("start needs batch_id")
        if self.action == "step" and self.step is None:
            raise ValueError("step needs step")
        if self.action != "start" and (self.coi_id or self.product):
            raise ValueError(f"{self.action} takes no coi_id or product (they are fixed at start)")
        return self

    def targets(self) -> list[str]:
        """The devices (or the group's name, which the registry expands) it names."""
        return list(self.devices) if self.devices is not None else [self.group or ""]


_M = TypeVar("_M", bound=BaseModel)


class CommandError(ValueError):
    """A command that does not parse; the message says what is wrong and never quotes the payload."""


def parse_command(payload: bytes | str) -> BatchCommand:
    """The command in ``payload``, or :class:`CommandError` naming every mistake."""
    return parse_json(payload, BatchCommand, MAX_COMMAND_BYTES, "command", CommandError)


def parse_json(
    payload: bytes | str, model: type[_M], max_bytes: int, what: str, error: type[ValueError]
) -> _M:
    """One JSON command of ``model`` from an MQTT payload (batch commands, reference samples), or
    ``error`` naming every mistake without quoting the payload."""
    if len(payload) > max_bytes:
        raise error(f"the {what} is {len(payload)} bytes, more than {max_bytes}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise error(validation_errors(exc)) from None
    except ValueError as exc:  # e.g. bytes that are not UTF-8
        raise error(f"not a JSON object: {exc}"[:300]) from None


def validation_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
        if len(parts) == 5:
            parts.append(f"and {len(exc.errors()) - 5} more")
            break
    return "; ".join(parts)[:600]


@dataclass(frozen=True)
class Outcome:
    """What came of a command: the contexts it applied, or why it was refused."""

    ok: bool
    refusal: str | None = None
    """A :class:`~agent.app.batches.RefusalReason`, or :data:`MALFORMED`."""
    detail: str = ""
    contexts: tuple[BatchContext, ...] = ()
    changed: bool = False

    @classmethod
    def of(cls, result: BatchResult) -> Outcome:
        if result.refusal is not None:
            return cls(False, str(result.refusal.reason), result.refusal.detail)
        return cls(True, contexts=result.contexts, changed=result.changed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "refusal": self.refusal,
            "detail": self.detail,
            "changed": self.changed,
            "contexts": [c.data() for c in self.contexts],
        }


def apply_command(
    registry: BatchRegistry, command: BatchCommand, source: BatchSource, groups: Mapping[str, Sequence[str]]
) -> Outcome:
    """Hand ``command`` to the registry. A step or an end names devices (or a group of
    ``batch.groups``) that each hold a batch with their group; each group is stepped or ended once,
    in the order named, and the first refusal stops the rest (the registry audited it). A step or
    an end naming another ``batch_id`` than a device holds is refused and recorded as a conflict."""
    who: dict[str, Any] = {"source": source, "actor": command.actor, "reason": command.reason}
    if command.action == "start":
        assert command.batch_id is not None  # the model requires it
        return Outcome.of(
            registry.start(
                command.targets(),
                command.batch_id,
                coi_id=command.coi_id,
                product=command.product,
                step=command.step,
                **who,
            )
        )
    if command.devices is not None:
        devices = list(command.devices)
    else:  # one member stands for its group; an unknown name goes on to be refused as unknown
        group = command.group or ""
        devices = list(groups.get(group, [group]))[:1]
    done: list[BatchContext] = []
    covered: set[str] = set()
    changed = False
    for device in devices:
        if device in covered:
            continue
        held = registry.current(device)
        if command.batch_id is not None and held is not None and held.batch_id != command.batch_id:
            return Outcome(
                False, str(RefusalReason.ALREADY_ASSIGNED), _mismatch(registry, device, command, held, source)
            )
        if command.action == "step":
            assert command.step is not None  # the model requires it
            result = registry.step(device, command.step, **who)
        else:
            result = registry.end(device, **who)
        if result.refusal is not None:
            return Outcome.of(result)
        covered.add(device)
        for ctx in result.contexts:
            covered.update(ctx.group)
        done.extend(result.contexts)
        changed = changed or result.changed
    return Outcome(True, contexts=tuple(done), changed=changed)


def _mismatch(
    registry: BatchRegistry, device: str, command: BatchCommand, held: BatchContext, source: BatchSource
) -> str:
    """A step or end for another batch than the device holds: recorded as a conflict (the
    assignment stays as it is; a person decides)."""
    detail = (
        f"{command.action} of batch {command.batch_id!r} refused: device {device!r} holds "
        f"batch {held.batch_id!r} ({held.ref})"
    )
    claimed = {
        "action": command.action,
        "batch_id": command.batch_id,
        "step": command.step,
        "actor": command.actor,
        "reason": command.reason,
    }
    registry.conflict(device, source=source, claimed=claimed, detail=detail)
    return detail


@dataclass
class RefusalBudget:
    """How many refusals may be audited one by one now (see :data:`REFUSALS_AUDITED`)."""

    clock: Callable[[], float] = time.monotonic
    window_start: float = -1e18
    audited: int = 0
    unaudited: int = 0
    """Refused since the last audit record without one of their own."""

    def take(self) -> int | None:
        """None: over budget (counted); else how many went unaudited before this one."""
        now = self.clock()
        if now - self.window_start >= REFUSAL_WINDOW_S:
            self.window_start, self.audited = now, 0
        if self.audited >= REFUSALS_AUDITED:
            self.unaudited += 1
            return None
        self.audited += 1
        skipped, self.unaudited = self.unaudited, 0
        return skipped


@dataclass
class CommandRefusals:
    """Audits commands refused before the registry saw them, within a budget."""

    auditor: Auditor
    budget: RefusalBudget = field(default_factory=RefusalBudget)
    count: int = 0

    def refuse(self, source: BatchSource, target: str, payload: bytes, error: str) -> None:
        self.count += 1
        skipped = self.budget.take()
        if skipped is None:
            log.debug("batch command from %s on %s refused (over budget): %s", source, target, error)
            return
        log.warning("batch command from %s on %s refused: %s", source, target, error)
        extra: dict[str, Any] = {
            "source": str(source),
            "refusal": MALFORMED,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        if skipped:
            extra["refused_unaudited_before"] = skipped
        self.auditor.record(COMMAND_REFUSED, target, reason=error, extra=extra, severity=Severity.WARNING)


class MqttBatchCommands:
    """The handler of the MQTT command topic (``batch.mqtt_commands``): parse, apply with source
    ``mqtt``, log the outcome. The MES reads the outcome where everyone reads it: the committed
    ``batch_context`` events and the audit trail (``batch_refused``, ``batch_command_refused``)."""

    def __init__(
        self, registry: BatchRegistry, auditor: Auditor, groups: Callable[[], Mapping[str, Sequence[str]]]
    ) -> None:
        """``groups``: the configured ``batch.groups`` (read at each command: a reload may change them)."""
        self.registry = registry
        self.groups = groups
        self.refusals = CommandRefusals(auditor)
        self.applied = 0
        self.refused = 0

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        if retained:
            error = (
                "a retained message is no command (it would be applied again at every "
                "reconnect): publish commands with retain false"
            )
            self.refusals.refuse(BatchSource.MQTT, topic, payload, error)
            return
        try:
            command = parse_command(payload)
        except CommandError as exc:
            self.refusals.refuse(BatchSource.MQTT, topic, payload, f"malformed batch command: {exc}")
            return
        outcome = apply_command(self.registry, command, BatchSource.MQTT, self.groups())
        if not outcome.ok:
            self.refused += 1  # the registry logged and audited why
        else:
            self.applied += 1
            log.info(
                "batch command %s from the MES (ts %s) applied to %d device(s)",
                command.action,
                command.ts,
                len(outcome.contexts),
            )

    def stats(self) -> dict[str, int]:
        return {"applied": self.applied, "refused": self.refused, "refused_unparsed": self.refusals.count}
