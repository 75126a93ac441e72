"""Which batch each device holds: the one place assignments change (issue 18).

Every source (the CLI, the MES on the MQTT command topic, the device itself) calls
:class:`BatchRegistry`; nothing else changes an assignment. A change commits one
``batch_context`` event per device in that device's events stream, with the device's batch state
(``batch/{device}`` in the buffer's state) in the same transaction, so the assignment survives a
restart exactly as committed; and it is audited (``batch_start``, ``batch_step``, ``batch_end``)
with who asked and why. A request that cannot be applied is refused, audited (``batch_refused``)
and returned, never raised: a malformed MES command must not kill the task that read it.

The buffer stamps every record with the ref its device held at the record's acquisition time
(:meth:`BatchRegistry.resolve`), so the registry keeps a short history of changes per device:
a counter's backfilled records, or a limit event about an earlier reading, get the context of
their own time, not of the moment they reached the buffer.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from agent.buffer.audit import Auditor
from agent.core.batch import CONFLICT_KIND, BatchContext, BatchPhase, BatchSource, make_ref
from agent.core.records import AGENT_DEVICE, Event, Severity, now_ns

log = logging.getLogger("cleanroom.batch")

STATE_PREFIX = "batch/"
"""Buffer state key of a device's batch state: ``batch/{device}``."""
HISTORY_MAX = 32
"""Changes kept per device for stamping records by their acquisition time (and across a restart):
a record older than the oldest kept change is stamped ``null``. At one change a minute this spans
half an hour, far more than a driver's backfill or a held commit."""
COUNTS_MAX = 64
"""Batches per device whose change count is kept, so that a batch started again on a device
(after another one) continues its refs instead of repeating ``#1``."""
TEXT_MAX = 200
"""Longest batch id, chain-of-identity id, product or step accepted (a topic, a report heading)."""


class RefusalReason(StrEnum):
    """Why a request was not applied. Closed: a caller (an MES reading the audit trail) may act
    on each value."""

    UNKNOWN_DEVICE = "unknown_device"
    ALREADY_ASSIGNED = "already_assigned"
    """A device holds another batch (or the same batch with other identifiers)."""
    NOT_ASSIGNED = "not_assigned"
    MISSING_ACTOR = "missing_actor"
    MISSING_REASON = "missing_reason"
    INVALID = "invalid"
    """A value that cannot be an identifier (blank, too long, control characters, not text)."""


@dataclass(frozen=True, slots=True)
class BatchRefusal:
    reason: RefusalReason
    detail: str
    """What was wrong, naming the device or the member: the audit record's reason."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of a request: the devices' contexts after it, or why it was refused."""

    contexts: tuple[BatchContext, ...] = ()
    """One per device the request applied to (the whole group); for an end, the end's contexts."""
    refusal: BatchRefusal | None = None
    changed: bool = False
    """False for a request that repeats what holds already (a command delivered twice): nothing
    was committed."""

    @property
    def ok(self) -> bool:
        return self.refusal is None


class _Refused(Exception):
    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.refusal = BatchRefusal(reason, detail)


@dataclass(frozen=True, slots=True)
class _History:
    """One device's changes, oldest first, replaced as a whole: the buffer thread reads it
    (:meth:`BatchRegistry.resolve`) while the loop replaces it, and a tuple swap is atomic."""

    times: tuple[int, ...] = ()
    refs: tuple[str | None, ...] = ()

    def add(self, ts_ns: int, ref: str | None) -> _History:
        k = bisect.bisect_right(self.times, ts_ns)
        times = (*self.times[:k], ts_ns, *self.times[k:])[-HISTORY_MAX:]
        refs = (*self.refs[:k], ref, *self.refs[k:])[-HISTORY_MAX:]
        return _History(times, refs)


class BatchRegistry:
    """The batch each device holds, its changes, and the ref any record of it should carry."""

    def __init__(
        self,
        devices: Iterable[str],
        groups: Mapping[str, Sequence[str]],
        submit: Callable[[Event], None],
        auditor: Auditor,
        clock: Callable[[], int] = now_ns,
    ) -> None:
        """``submit`` commits an event (the buffer's submit); ``groups``: devices assigned together,
        by group name (``batch.groups``)."""
        self._submit = submit
        self._auditor = auditor
        self._clock = clock
        self._devices: frozenset[str] = frozenset()
        self._groups: dict[str, tuple[str, ...]] = {}
        self._group_of: dict[str, tuple[str, ...]] = {}
        self._last: dict[str, BatchContext] = {}
        """Per device, its last change (an end included): ``current`` is it while it is held."""
        self._history: dict[str, _History] = {}
        self._counts: dict[str, dict[str, int]] = {}
        """Per device, per batch id, the ``n`` of its last change there."""
        self.configure(devices, groups)

    def configure(self, devices: Iterable[str], groups: Mapping[str, Sequence[str]]) -> None:
        """The configured devices and groups (at start and after a reload). A device that left the
        configuration keeps what it held, for when it comes back; it takes no new assignment."""
        self._devices = frozenset(devices)
        self._groups = {name: tuple(members) for name, members in groups.items()}
        self._group_of = {d: members for members in self._groups.values() for d in members}

    # ------------------------------------------------------------------ reading

    def resolve(self, device: str, ts_ns: int) -> str | None:
        """The ref ``device`` held at ``ts_ns`` (None: none). The buffer calls this for every
        record, on the loop and on the buffer thread, so it only reads one immutable history."""
        history = self._history.get(device)
        if history is None:
            return None
        k = bisect.bisect_right(history.times, ts_ns)
        return history.refs[k - 1] if k else None

    def current(self, device: str) -> BatchContext | None:
        last = self._last.get(device)
        return last if last is not None and last.held else None

    def snapshot(self) -> dict[str, Any]:
        """Per device holding a batch, its context (for ``/api/status``)."""
        return {d: ctx.data() for d, ctx in sorted(self._last.items()) if ctx.held}

    # ------------------------------------------------------------------ restart

    def restore(self, state: Mapping[str, str]) -> None:
        """Take the assignments back from the buffer's state after a restart. A state that cannot be
        read is logged and audited, and the device starts with no batch: a restart never fails on
        it, and never says nothing about it."""
        for key, text in state.items():
            if not key.startswith(STATE_PREFIX):
                continue
            device = key[len(STATE_PREFIX) :]
            try:
                last, history, counts = _parse_state(text)
            except ValueError as exc:
                log.error("buffer state %s cannot be read (%s): %s starts with no batch", key, exc, device)
                self._auditor.record(
                    "batch_restore_failed",
                    f"state {key}",
                    device=device,
                    reason=f"the stored batch state cannot be read ({exc}): the device starts with no batch",
                    severity=Severity.WARNING,
                )
                continue
            self._last[device] = last
            self._history[device] = history
            self._counts[device] = counts
            if last.held:
                log.info("%s holds batch %s (%s) since before the restart", device, last.batch_id, last.ref)

    # ------------------------------------------------------------------ changes

    def start(
        self,
        devices: Sequence[str],
        batch_id: str,
        *,
        coi_id: str | None = None,
        product: str | None = None,
        step: str | None = None,
        source: BatchSource,
        actor: str,
        reason: str,
    ) -> BatchResult:
        """Assign ``devices`` (each with its whole group; a group's name stands for its members) to
        ``batch_id``. All or none: a device holding another batch refuses the whole request."""
        request = {"devices": list(devices) if _is_texts(devices) else devices, "batch_id": batch_id,
                   "coi_id": coi_id, "product": product, "step": step}  # fmt: skip
        try:
            _attribution(actor, reason)
            _ident("batch_id", batch_id)
            for key, value in (("coi_id", coi_id), ("product", product), ("step", step)):
                if value is not None:
                    _ident(key, value)
            targets = self._targets(devices)
            fresh: list[str] = []
            for device in targets:
                held = self.current(device)
                if held is None:
                    fresh.append(device)
                elif held.batch_id != batch_id:
                    raise _Refused(
                        RefusalReason.ALREADY_ASSIGNED,
                        f"device {device!r} holds batch {held.batch_id!r} ({held.ref}): end it first",
                    )
                elif (held.coi_id, held.product) != (coi_id, product) or (
                    step is not None and held.step != step
                ):
                    raise _Refused(
                        RefusalReason.ALREADY_ASSIGNED,
                        f"device {device!r} holds batch {batch_id!r} with other identifiers "
                        f"(coi_id {held.coi_id!r}, product {held.product!r}, step {held.step!r})",
                    )
        except _Refused as exc:
            return self._refuse("batch_start", exc.refusal, source, actor, request)
        if not fresh:  # the same start again (a command delivered twice): it holds already
            return BatchResult(tuple(c for d in targets if (c := self.current(d)) is not None))
        ts = self._clock()
        contexts = []
        for device in targets:
            if device not in fresh:
                continue
            n = self._counts.get(device, {}).get(batch_id, 0) + 1
            ctx = BatchContext(
                batch_id=batch_id,
                ref=make_ref(batch_id, n),
                phase=BatchPhase.START,
                coi_id=coi_id,
                product=product,
                step=step,
                group=_group(targets),
                source=source,
                actor=actor.strip(),
                reason=reason.strip(),
                ts_ns=ts,
            )
            contexts.append(self._apply(device, ctx, "batch_start"))
        return BatchResult(tuple(contexts), changed=True)

    def step(self, device: str, step: str, *, source: BatchSource, actor: str, reason: str) -> BatchResult:
        """The batch ``device`` holds (and its whole group with it) enters procedure step ``step``:
        a new ref of the same batch."""
        request = {"device": device, "step": step}
        try:
            _attribution(actor, reason)
            _ident("step", step)
            held = self._held_group(device)
        except _Refused as exc:
            return self._refuse("batch_step", exc.refusal, source, actor, request)
        if all(ctx.step == step for _, ctx in held):
            return BatchResult(tuple(ctx for _, ctx in held))
        ts = self._clock()
        contexts = tuple(
            self._apply(
                member, self._next(ctx, BatchPhase.STEP, step, source, actor, reason, ts), "batch_step"
            )
            for member, ctx in held
        )
        return BatchResult(contexts, changed=True)

    def end(self, device: str, *, source: BatchSource, actor: str, reason: str) -> BatchResult:
        """Release the batch ``device`` (and its whole group) holds: records from now on carry null."""
        request = {"device": device}
        try:
            _attribution(actor, reason)
            held = self._held_group(device)
        except _Refused as exc:
            return self._refuse("batch_end", exc.refusal, source, actor, request)
        ts = self._clock()
        contexts = tuple(
            self._apply(
                member, self._next(ctx, BatchPhase.END, ctx.step, source, actor, reason, ts), "batch_end"
            )
            for member, ctx in held
        )
        return BatchResult(contexts, changed=True)

    def conflict(self, device: str, *, source: BatchSource, claimed: Mapping[str, Any], detail: str) -> None:
        """A source says something else than the assignment (the device reports another batch than
        the MES assigned): recorded as a ``batch_conflict`` event in the device's stream and audited;
        the assignment is not changed, a person decides."""
        held = self.current(device)
        known = device in self._devices
        data = {
            "source": str(source),
            "claimed": _jsonable(claimed),
            "current": None if held is None else held.data(),
            "detail": detail,
            **({} if known else {"device": device}),
        }
        why = detail.strip() or f"{source} claims {dict(claimed)!r} for {device}"
        log.warning("batch conflict on %s from %s: %s", device, source, why)
        owner = device if known else AGENT_DEVICE
        self._submit(Event(owner, CONFLICT_KIND, Severity.WARNING, data, ts_ns=self._clock()))
        self._auditor.record(
            CONFLICT_KIND,
            held.batch_id if held is not None else "batch",
            device=device,
            old=None if held is None else held.data(),
            new=data["claimed"],
            reason=why,
            extra={"source": str(source)},
            severity=Severity.WARNING,
        )

    # ------------------------------------------------------------------ inside

    def _targets(self, devices: Sequence[str]) -> list[str]:
        """The requested devices with their groups, in order, once each."""
        if not _is_texts(devices) or not devices:
            raise _Refused(RefusalReason.INVALID, "devices must be a non-empty list of device ids")
        out: list[str] = []
        for name in devices:
            if name in self._devices:
                members = self._group_of.get(name, (name,))
            elif name in self._groups:
                members = self._groups[name]
            else:
                raise _Refused(RefusalReason.UNKNOWN_DEVICE, f"device {name!r} is not configured")
            for member in members:
                if member not in self._devices:
                    raise _Refused(
                        RefusalReason.UNKNOWN_DEVICE,
                        f"device {member!r} (group of {name!r}) is not configured",
                    )
                if member not in out:
                    out.append(member)
        return out

    def _held_group(self, device: str) -> list[tuple[str, BatchContext]]:
        """``device`` and the devices its batch was started with, each with its context: a step or
        an end applies to them all, as the start did."""
        if not isinstance(device, str) or device not in self._devices:
            raise _Refused(RefusalReason.UNKNOWN_DEVICE, f"device {device!r} is not configured")
        ctx = self.current(device)
        if ctx is None:
            raise _Refused(RefusalReason.NOT_ASSIGNED, f"device {device!r} holds no batch")
        held: list[tuple[str, BatchContext]] = []
        for member in ctx.group if device in ctx.group else (device,):
            other = self.current(member)
            if other is not None and other.batch_id == ctx.batch_id:
                held.append((member, other))  # (a member reassigned since stays as it is)
        return held

    def _next(
        self,
        ctx: BatchContext,
        phase: BatchPhase,
        step: str | None,
        source: BatchSource,
        actor: str,
        reason: str,
        ts: int,
    ) -> BatchContext:
        return replace(
            ctx,
            ref=make_ref(ctx.batch_id, ctx.n + 1),
            phase=phase,
            step=step,
            source=source,
            actor=actor.strip(),
            reason=reason.strip(),
            ts_ns=ts,
        )

    def _apply(self, device: str, ctx: BatchContext, action: str) -> BatchContext:
        """Hold ``ctx`` from its time on, then commit it (event and state in one transaction) and
        audit it. The history moves first: a record acquired from now on is stamped with it."""
        old = self._last.get(device)
        counts = dict(self._counts.get(device, {}))
        counts.pop(ctx.batch_id, None)
        counts[ctx.batch_id] = ctx.n
        while len(counts) > COUNTS_MAX:
            counts.pop(next(iter(counts)))
        history = self._history.get(device, _History()).add(ctx.ts_ns, ctx.ref if ctx.held else None)
        self._last[device], self._history[device], self._counts[device] = ctx, history, counts
        state = {f"{STATE_PREFIX}{device}": _state_text(ctx, history, counts)}
        self._submit(
            Event(device, BatchContext.KIND, Severity.INFO, ctx.data(), ts_ns=ctx.ts_ns, state=state)
        )
        self._auditor.record(
            action,
            ctx.batch_id,
            actor=ctx.actor,
            reason=ctx.reason,
            device=device,
            old=None if old is None or not old.held else old.data(),
            new=ctx.data(),
            extra={"source": str(ctx.source)},
        )
        log.info("%s: %s %s (%s) by %s: %s", device, action, ctx.batch_id, ctx.ref, ctx.actor, ctx.reason)
        return ctx

    def _refuse(
        self, action: str, refusal: BatchRefusal, source: BatchSource, actor: Any, request: Mapping[str, Any]
    ) -> BatchResult:
        """Audit a refusal (by the agent, naming who asked) and return it."""
        asked_by = actor.strip() if isinstance(actor, str) and actor.strip() else None
        log.warning("%s from %s refused (%s): %s", action, source, refusal.reason, refusal.detail)
        device = request.get("device")
        self._auditor.record(
            "batch_refused",
            action,
            device=device if isinstance(device, str) and device in self._devices else AGENT_DEVICE,
            new=_jsonable(request),
            reason=refusal.detail,
            extra={"refusal": str(refusal.reason), "source": str(source), "requested_by": asked_by},
            severity=Severity.WARNING,
        )
        return BatchResult(refusal=refusal)


def _is_texts(values: Any) -> bool:
    return isinstance(values, list | tuple) and all(isinstance(v, str) for v in values)


def _group(targets: Sequence[str]) -> tuple[str, ...]:
    return tuple(targets) if len(targets) > 1 else ()


def _attribution(actor: Any, reason: Any) -> None:
    if not isinstance(actor, str) or not actor.strip():
        raise _Refused(RefusalReason.MISSING_ACTOR, "an actor (who asks) is required")
    if not isinstance(reason, str) or not reason.strip():
        raise _Refused(RefusalReason.MISSING_REASON, "a reason (why) is required")


def _ident(key: str, value: Any) -> None:
    """An identifier as it will be published and reported: text, not blank, short, printable."""
    if not isinstance(value, str):
        raise _Refused(RefusalReason.INVALID, f"{key} must be text, not {type(value).__name__}")
    if not value.strip() or value != value.strip():
        raise _Refused(RefusalReason.INVALID, f"{key} {value!r} is blank or has surrounding spaces")
    if len(value) > TEXT_MAX:
        raise _Refused(RefusalReason.INVALID, f"{key} is longer than {TEXT_MAX} characters")
    if not value.isprintable():
        raise _Refused(RefusalReason.INVALID, f"{key} {value!r} holds control characters")


def _jsonable(value: Any) -> Any:
    """A request as the audit record keeps it: JSON values as they are, anything else as its text."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return repr(value)[:TEXT_MAX]


def _state_text(last: BatchContext, history: _History, counts: Mapping[str, int]) -> str:
    return json.dumps(
        {
            "last": last.data(),
            "history": [list(h) for h in zip(history.times, history.refs, strict=True)],
            "counts": dict(counts),
        },
        separators=(",", ":"),
    )


def _parse_state(text: str) -> tuple[BatchContext, _History, dict[str, int]]:
    """A device's stored batch state; ValueError saying what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    last = BatchContext.from_data(doc.get("last"))
    entries = doc.get("history")
    if not isinstance(entries, list) or not all(
        isinstance(e, list) and len(e) == 2 and type(e[0]) is int and (e[1] is None or isinstance(e[1], str))
        for e in entries
    ):
        raise ValueError("history must be a list of [ts_ns, ref or null]")
    history = _History()
    for ts, ref in entries[-HISTORY_MAX:]:
        history = history.add(ts, ref)
    counts = doc.get("counts")
    if not isinstance(counts, dict) or not all(type(n) is int and n > 0 for n in counts.values()):
        raise ValueError("counts must map batch ids to positive integers")
    counts = dict(counts)
    counts[last.batch_id] = max(counts.get(last.batch_id, 0), last.n)
    return last, history, counts
