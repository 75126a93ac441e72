"""Batch context: which batch (lot, patient's chain of identity, product, ISA-88 step) a device
held when a record was acquired.

A context is stored once per change, never copied per reading: every change commits one
``batch_context`` event in the device's events stream carrying the whole context and its
``ref``, and every block and event after it names that ``ref`` in its ``batch`` member (``null``:
no batch was assigned at its acquisition time). A reviewer or the MES joins readings to a batch
by ``ref``; ``ref`` is ``{batch_id}#{n}``, ``n`` counting the changes of that batch on that
device from 1 (start), so a step change is a new ref of the same batch. The end is a change too:
it has a ref of its own (``n`` + 1), which no record carries, so every ``batch_context`` event of
a device has a ref of its own and a ref names exactly one context.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

CONFLICT_KIND = "batch_conflict"
"""The event kind of a disagreement between sources (the assignment is left as it was)."""


class BatchPhase(StrEnum):
    START = "start"
    STEP = "step"
    END = "end"


class BatchSource(StrEnum):
    """Who said so: every assignment names its source, and a disagreement between sources is
    recorded (``batch_conflict``), never resolved silently."""

    CLI = "cli"
    MQTT = "mqtt"
    DEVICE = "device"


def make_ref(batch_id: str, n: int) -> str:
    """The ref of a batch's ``n``-th change on a device."""
    return f"{batch_id}#{n}"


def split_ref(ref: str) -> tuple[str, int]:
    """``(batch_id, n)`` of a ref (a batch id may itself hold ``#``: ``n`` is after the last one);
    ValueError for text that is not a ref."""
    batch_id, sep, n = ref.rpartition("#")
    if not sep or not batch_id or not n.isdigit():
        raise ValueError(f"{ref!r} is not a batch ref ({{batch_id}}#{{n}})")
    return batch_id, int(n)


@dataclass(frozen=True, slots=True)
class BatchContext:
    """The batch a device holds, from its start (or last step) on."""

    KIND: ClassVar[str] = "batch_context"

    batch_id: str
    ref: str
    """``{batch_id}#{n}``: what records name in their ``batch`` member."""
    phase: BatchPhase
    coi_id: str | None = None
    """Chain-of-identity id (autologous therapy: the patient's), where there is one."""
    product: str | None = None
    step: str | None = None
    """ISA-88 procedure step, when known."""
    group: tuple[str, ...] = ()
    """Devices assigned together (a bioreactor with its incubator); empty for one device alone."""
    source: BatchSource = BatchSource.CLI
    actor: str = ""
    reason: str = ""
    ts_ns: int = 0
    """When the change applies: records acquired at or after it carry ``ref``."""

    @property
    def held(self) -> bool:
        """Whether the device holds the batch from ``ts_ns`` on (False for an end)."""
        return self.phase is not BatchPhase.END

    @property
    def n(self) -> int:
        """Which change of the batch on the device this is (1: its start)."""
        return split_ref(self.ref)[1]

    def data(self) -> dict[str, Any]:
        """The ``batch_context`` event's ``data`` (docs/payloads.md)."""
        return {
            "ref": self.ref,
            "batch_id": self.batch_id,
            "phase": str(self.phase),
            "coi_id": self.coi_id,
            "product": self.product,
            "step": self.step,
            "group": list(self.group),
            "source": str(self.source),
            "actor": self.actor,
            "reason": self.reason,
            "from_ts": self.ts_ns,
        }

    @classmethod
    def from_data(cls, data: Any) -> BatchContext:
        """The context :meth:`data` describes (a ``batch_context`` event's data, or what the buffer
        state kept across a restart); ValueError naming the member that is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a batch context is a JSON object")

        def text(key: str, optional: bool = False) -> Any:
            value = data.get(key)
            if (value is None and optional) or isinstance(value, str):
                return value
            raise ValueError(
                f"batch context member {key!r} must be {'a string or null' if optional else 'a string'}"
            )

        ref, batch_id = text("ref"), text("batch_id")
        if split_ref(ref)[0] != batch_id:
            raise ValueError(f"batch context ref {ref!r} is not a ref of batch {batch_id!r}")
        group = data.get("group", [])
        if not isinstance(group, list) or not all(isinstance(d, str) for d in group):
            raise ValueError("batch context member 'group' must be a list of device ids")
        ts = data.get("from_ts")
        if type(ts) is not int:
            raise ValueError("batch context member 'from_ts' must be an integer (ns)")
        try:
            phase, source = BatchPhase(str(data.get("phase"))), BatchSource(str(data.get("source")))
        except ValueError as exc:
            raise ValueError(f"batch context: {exc}") from None
        return cls(
            batch_id=batch_id,
            ref=ref,
            phase=phase,
            coi_id=text("coi_id", True),
            product=text("product", True),
            step=text("step", True),
            group=tuple(group),
            source=source,
            actor=text("actor"),
            reason=text("reason"),
            ts_ns=ts,
        )
