"""Device-declared batches: a device whose profile names its batch tags (``batch:`` in the profile,
:class:`~agent.core.driver.BatchTags`) says itself which batch it runs, and the agent follows it.

A buffer listener, like the trend: it reads what was committed, so the assignment follows what
will be delivered, never a reading the buffer did not take. It acts on a *change* of what the
device reports: a new batch id starts the device's batch (source ``device``), a new step steps
it, an empty id (or ``0``) ends a batch the device itself started. Where the batch was assigned
by a person or the MES (CLI, MQTT), a device saying otherwise (another batch, or none) is
recorded as a ``batch_conflict`` once per disagreement, and the assignment is left as it is: a
person decides. A bad-quality reading of the batch id says nothing and changes nothing.

Known limit: what the device reported is remembered in memory only, so an operator's ``batch
end`` of a device-started batch, followed by an agent restart while the device still reports
that batch, starts it again from the device (the ``batch_context`` event says so, source
``device``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.app.batches import BatchRegistry
from agent.core.batch import BatchSource
from agent.core.driver import BatchTags, identity_text
from agent.core.records import Block, Event, Quality

log = logging.getLogger("cleanroom.batch")

FIELDS = ("batch_id", "step", "product", "coi_id")


@dataclass(frozen=True, slots=True)
class Reported:
    """What a device reports about its batch: ``batch_id`` None for "no batch"."""

    batch_id: str | None
    step: str | None = None
    product: str | None = None
    coi_id: str | None = None


def batch_text(value: object) -> str | None:
    """A reported value as an identifier: text or a whole number, ``None`` for "nothing" (empty,
    ``0``, or a value that cannot be an identifier). A float that is a whole number (a register
    scaled by 1.0) is that number."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value == 0 and not isinstance(value, bool):
        return None
    return identity_text(value)


class DeviceBatches:
    """:meth:`on_committed` is a buffer listener; it calls the registry with source ``device``."""

    def __init__(self, registry: BatchRegistry, declared: dict[str, BatchTags]) -> None:
        """``declared``: each device's batch tags (devices whose profile has ``batch:``)."""
        self.registry = registry
        self.declared = declared
        self._fields: dict[str, dict[str, str | None]] = {d: {} for d in declared}
        """Per device, the last good value of each batch tag (a field is missing until read)."""
        self._where: dict[tuple[str, str], tuple[Sequence[str], list[tuple[str, int]]]] = {}
        """Per device and group: the group's tag tuple and where the batch tags are in it, found
        once per tuple (a group hands over the same tuple at every poll)."""
        self._seen: dict[str, tuple[Reported, str | None]] = {}
        """Per device, what it reported and the ref it held when last looked at."""
        self.conflicts = 0

    def configure(self, declared: dict[str, BatchTags]) -> None:
        """The devices that declare batch tags after a reload: what a device still declaring them
        reported is kept, so a reload is no change of what it reports."""
        self.declared = declared
        self._fields = {d: self._fields.get(d, {}) for d in declared}
        self._where.clear()
        self._seen = {d: seen for d, seen in self._seen.items() if d in declared}

    def on_committed(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        touched: set[str] = set()
        for block in blocks:
            tags = self.declared.get(block.device)
            if tags is not None and self._take(block, tags):
                touched.add(block.device)
        for device in touched:
            self._follow(device)

    def _take(self, block: Block, tags: BatchTags) -> bool:
        """Note the batch tags' good values in ``block``; whether it carried any."""
        key = (block.device, block.group)
        where = self._where.get(key)
        if where is None or where[0] is not block.tags:
            named = dict(zip(FIELDS, (tags.batch_id, tags.step, tags.product, tags.coi_id), strict=True))
            position = {tag: i for i, tag in enumerate(block.tags)}
            found = [
                (name, position[tag]) for name, tag in named.items() if tag is not None and tag in position
            ]
            where = self._where[key] = (block.tags, found)
        fields = self._fields[block.device]
        took = False
        for name, i in where[1]:
            if i < len(block.values) and block.quality_of(i) is not Quality.BAD:
                fields[name] = batch_text(block.values[i])
                took = True
        return took

    def _follow(self, device: str) -> None:
        fields = self._fields[device]
        if "batch_id" not in fields:  # nothing said about the batch itself yet: nothing to follow
            return
        reported = Reported(
            fields.get("batch_id"), fields.get("step"), fields.get("product"), fields.get("coi_id")
        )
        held = self.registry.current(device)
        ref = held.ref if held is not None else None
        seen = self._seen.get(device)
        if seen is not None and seen == (reported, ref):
            return
        if seen is None or seen[0] != reported:
            self._act(device, reported)
        else:
            self._check(device, reported)  # the assignment changed under a report that did not
        held = self.registry.current(device)
        self._seen[device] = (reported, held.ref if held is not None else None)

    def _act(self, device: str, reported: Reported) -> None:
        """The device reports something new."""
        held = self.registry.current(device)
        who: dict[str, Any] = {"source": BatchSource.DEVICE, "actor": f"device:{device}"}
        if reported.batch_id is None:
            if held is None:
                return
            if held.source is BatchSource.DEVICE:
                self.registry.end(device, reason="the device reports no batch", **who)
            else:
                self._conflict(
                    device,
                    reported,
                    f"the device reports no batch, but holds {held.batch_id!r} assigned by {held.source}",
                )
            return
        if held is None:
            self.registry.start(
                [device],
                reported.batch_id,
                coi_id=reported.coi_id,
                product=reported.product,
                step=reported.step,
                reason=f"the device reports batch {reported.batch_id!r}",
                **who,
            )
            return
        if held.batch_id != reported.batch_id:
            if held.source is BatchSource.DEVICE:  # the device went on to its next batch
                self.registry.end(device, reason=f"the device reports batch {reported.batch_id!r} now", **who)
                self._act(device, reported)
            else:
                self._conflict(
                    device,
                    reported,
                    f"the device reports batch {reported.batch_id!r}, but holds "
                    f"{held.batch_id!r} assigned by {held.source}",
                )
            return
        if reported.step is not None and reported.step != held.step:
            self.registry.step(
                device, reported.step, reason=f"the device reports step {reported.step!r}", **who
            )

    def _check(self, device: str, reported: Reported) -> None:
        """A person or the MES changed the assignment while the device went on reporting the same:
        a disagreement is recorded, nothing is changed."""
        held = self.registry.current(device)
        if reported.batch_id is None and held is not None and held.source is not BatchSource.DEVICE:
            self._conflict(
                device,
                reported,
                f"{held.source} assigned batch {held.batch_id!r}, but the device reports no batch",
            )
        elif reported.batch_id is not None and (held is None or held.batch_id != reported.batch_id):
            what = "ended its batch" if held is None else f"assigned batch {held.batch_id!r}"
            self._conflict(
                device, reported, f"the assignment {what}, but the device reports batch {reported.batch_id!r}"
            )

    def _conflict(self, device: str, reported: Reported, detail: str) -> None:
        self.conflicts += 1
        claimed = {k: getattr(reported, k) for k in FIELDS}
        self.registry.conflict(device, source=BatchSource.DEVICE, claimed=claimed, detail=detail)


def declared_batches(devices: Iterable[tuple[str, BatchTags | None]]) -> dict[str, BatchTags]:
    """The devices that declare batch tags, by id."""
    return {device: tags for device, tags in devices if tags is not None}
