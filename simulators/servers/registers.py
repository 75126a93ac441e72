"""A Modbus register image built from a device profile: the simulator's side of the
contract the agent reads.

The layout is not written down twice: it is derived, tag by tag, from the same profile
YAML (``deploy/profiles/*.yaml``) that the agent's Modbus driver loads, every address is
resolved by the driver's own rule (:mod:`cleanroom_common.modbus`) and every value is
encoded with its codec (:mod:`cleanroom_common.codec`). A tag name is the name of the model value it
shows (a process signal, a status bit, or a device-specific extra such as a particle
counter's record field); a profile naming a value the model does not have is rejected
when the server starts, not discovered as a silent zero on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cleanroom_common.codec import DataType, WordOrder, decode, encode, register_count
from cleanroom_common.modbus import BIT_TABLES, Table, locate


@dataclass(frozen=True, slots=True)
class TagSlot:
    """Where one tag lives and how its engineering value becomes register words."""

    name: str
    table: Table
    start: int
    """0-based PDU address of the first register (or coil)."""
    type: DataType
    word_order: WordOrder
    scale: float
    offset: float
    bit: int | None
    length: int | None = None
    """Characters of a ``string`` tag."""

    @property
    def width(self) -> int:
        if self.bit is not None or self.table in BIT_TABLES:
            return 1
        return register_count(self.type, self.length)

    def words(self, value: float | bool | str) -> list[int]:
        if isinstance(value, str):
            return encode(value, self.type, self.word_order, length=self.length)
        raw = (float(value) - self.offset) / self.scale
        if self.type.startswith(("int", "uint")):
            raw = _clip_int(self.type, raw)
        return encode(raw, self.type, self.word_order)

    def value_of(self, words: list[int]) -> float:
        """Engineering value of written registers (the inverse of :meth:`words`)."""
        raw = decode(words, self.type, self.word_order)
        if isinstance(raw, str):
            raise ValueError(f"{self.name} is text, not a number")
        return float(raw) * self.scale + self.offset


_INT_LIMITS = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def _clip_int(type_: str, raw: float) -> int:
    """Saturate like a real transmitter at the ends of its register range."""
    lo, hi = _INT_LIMITS[type_]
    if not math.isfinite(raw):
        return hi if raw > 0 else lo
    return int(min(max(round(raw), lo), hi))


def slots_of(profile: Mapping[str, Any], groups: Iterable[str] | None = None) -> list[TagSlot]:
    """The tag slots of a Modbus profile (optionally only some poll groups), with the
    profile-level ``defaults`` applied the way the driver applies them."""
    defaults = profile.get("defaults") or {}
    wanted = set(groups) if groups is not None else None
    out: list[TagSlot] = []
    for tag in profile["tags"]:
        if wanted is not None and tag.get("group", "default") not in wanted:
            continue
        t = {**defaults, **tag}
        table, start = locate(
            int(t["address"]),
            t.get("table"),
            vendor_notation=t.get("vendor_notation", True),
            address_base=t.get("address_base", 1),
        )
        bit = t.get("bit")
        out.append(
            TagSlot(
                name=t["name"],
                table=table,
                start=start,
                type=DataType("uint16" if bit is not None else t.get("type", "uint16")),
                word_order=WordOrder(t.get("word_order", "ABCD")),
                scale=float(t.get("scale", 1.0)),
                offset=float(t.get("offset", 0.0)),
                bit=bit,
                length=t.get("length"),
            )
        )
    return out


class RegisterImage:
    """The four Modbus tables of one unit, as arrays, filled from named values.

    Reads are allowed anywhere between the lowest and highest defined address of a table
    (a gap reads as 0, as on most devices, so a driver may coalesce across small gaps);
    outside that span the request is an illegal-address error.
    """

    def __init__(self, slots: list[TagSlot]) -> None:
        self.slots = slots
        spans: dict[Table, tuple[int, int]] = {}
        for s in slots:
            lo, hi = spans.get(s.table, (s.start, s.start + s.width))
            spans[s.table] = (min(lo, s.start), max(hi, s.start + s.width))
        self.spans = spans
        self.tables = {t: np.zeros(hi, dtype=np.uint16) for t, (_, hi) in spans.items()}

    def extend(self, table: Table, end: int) -> None:
        """Make registers up to ``end`` (exclusive) addressable, e.g. write-only command registers."""
        lo, hi = self.spans.get(table, (0, 0))
        if end > hi:
            self.spans[table] = (lo, end)
            grown = np.zeros(end, dtype=np.uint16)
            if table in self.tables:
                grown[:hi] = self.tables[table]
            self.tables[table] = grown

    def fill(self, values: Mapping[str, float | bool | str]) -> None:
        """Encode every slot from ``values`` (keyed by tag name)."""
        status_words: dict[tuple[Table, int], tuple[int, WordOrder]] = {}
        for s in self.slots:
            arr = self.tables[s.table]
            v = values[s.name]
            if s.table in BIT_TABLES:
                arr[s.start] = 1 if v else 0
            elif s.bit is not None:
                word, _ = status_words.get((s.table, s.start), (0, s.word_order))
                status_words[(s.table, s.start)] = (word | (1 << s.bit) if v else word, s.word_order)
            else:
                arr[s.start : s.start + s.width] = s.words(v)
        for (table, start), (word, order) in status_words.items():
            self.tables[table][start] = encode(word, DataType.UINT16, order)[0]

    def names(self) -> set[str]:
        return {s.name for s in self.slots}

    def check_values(self, values: Mapping[str, Any], what: str) -> None:
        """Fail at start-up when the profile names values the device does not produce."""
        missing = sorted(self.names() - set(values))
        if missing:
            raise ValueError(f"{what}: profile tags with no simulated value: {', '.join(missing)}")

    def read(self, table: Table, address: int, count: int) -> list[int] | None:
        """Registers (or 0/1 for bits) ``address…address+count-1``; ``None`` if outside the map."""
        span = self.spans.get(table)
        if span is None or count < 1 or address < span[0] or address + count > span[1]:
            return None
        return [int(x) for x in self.tables[table][address : address + count]]
