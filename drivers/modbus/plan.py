"""Read plans: a poll group's tags compiled once into the fewest read requests and the
vectorised decoders of their replies.

Per data type and word order an index array says where each value sits in the group's
register image, so a poll is "N requests, one gather per type, one ``view``" (see
:mod:`cleanroom_common.codec`).

A plan depends on nothing but its tags and the connection's :class:`PlanSettings`, and nothing
changes it once built (frozen, tuples, read-only arrays), so the devices of one profile that
agree on those settings read by one plan (:func:`shared_plan`): ten devices of a 10,000-tag
profile hold one plan, not ten.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.core.precision import shortest_float32
from agent.core.records import Quality, Reason, Value
from cleanroom_common.codec import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    CodecError,
    DataType,
    WordOrder,
    decode,
    decode_many,
    flag,
    register_count,
    swaps_bytes,
)
from cleanroom_common.modbus import BIT_TABLES, TABLES, AddressError, Table
from drivers.modbus.config import Connection, Tag


def coalesce(spans: Sequence[tuple[int, int]], max_count: int, max_gap: int) -> list[tuple[int, int]]:
    """Merge ``(start, width)`` spans of one table into the fewest ``(start, count)`` reads.

    A read covers whole spans only (a multi-register value is never split), is at most
    ``max_count`` long and never bridges more than ``max_gap`` unused registers. Greedy
    in address order is optimal here: any valid read covers a run of consecutive spans,
    and extending the current read as far as possible never leaves more for later.
    """
    reads: list[tuple[int, int]] = []
    start = end = -1  # current read covers [start, end)
    for s, w in sorted(spans):
        if w > max_count:
            raise ValueError(
                f"a value of {w} registers at {s} exceeds the {max_count}-register request limit"
            )
        if start >= 0 and s - end <= max_gap and max(end, s + w) - start <= max_count:
            end = max(end, s + w)
            continue
        if start >= 0:
            reads.append((start, end - start))
        start, end = s, s + w
    if start >= 0:
        reads.append((start, end - start))
    return reads


@dataclass(frozen=True, slots=True)
class Read:
    """One request: ``count`` registers or bits of ``table`` from PDU address ``start``."""

    table: Table
    start: int
    count: int
    offset: int
    """Position of the read's first register/bit in the group's register or bit image."""
    tags: tuple[int, ...]
    """Indices (in the plan) of the tags this read carries."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A tag list compiled into reads and decoders; never changed once built (devices share it)."""

    reads: tuple[Read, ...]
    n_regs: int
    n_bits: int
    numeric: tuple[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], DataType, WordOrder], ...]
    """(tag indices, register positions, type, order): one vectorised decode each; read-only arrays."""
    flags: tuple[tuple[int, int | None, bool], ...]
    """(tag index, bit or None for a whole register read as a bool, whether the register's bytes
    are swapped) of each bit field of a register: a status word's flags, decoded from plain ints."""
    flag_pos: npt.NDArray[np.intp]
    """Image position of each of :attr:`flags`, in turn: one gather for all of them."""
    other: tuple[tuple[int, Tag, int], ...]
    """(tag index, tag, image position) of coils, discrete inputs and strings."""
    n_tags: int
    fast: npt.DTypeLike | None
    """Result dtype when the whole group decodes as one numeric array, else ``None``."""
    slots: tuple[tuple[bool, int, int], ...]
    """(in the bit image, image position, width) of each tag: where its raw words are."""


@dataclass(frozen=True, slots=True)
class PlanSettings:
    """The connection settings a plan depends on, and the only ones :func:`build_plan` reads:
    two devices of one profile that agree on them can share its plans."""

    address_base: int | None
    one_request_per_tag: bool
    max_registers_per_request: int
    max_bits_per_request: int
    max_gap: int

    @classmethod
    def of(cls, conn: Connection) -> PlanSettings:
        return cls(
            conn.address_base,
            conn.one_request_per_tag,
            conn.max_registers_per_request,
            conn.max_bits_per_request,
            conn.max_gap,
        )


def _readonly(values: list[int]) -> npt.NDArray[np.intp]:
    array = np.array(values, dtype=np.intp)
    array.flags.writeable = False
    return array


def build_plan(tags: Sequence[Tag], conn: Connection | PlanSettings) -> Plan:
    """Compile a tag list into reads (coalesced within the device's limits) and decoders,
    once at start-up, so that a poll only gathers and views."""
    conn = conn if isinstance(conn, PlanSettings) else PlanSettings.of(conn)
    located: list[tuple[Table, int, int]] = []
    for tag in tags:
        try:
            table, pdu = tag.locate(conn.address_base)
        except AddressError as exc:
            raise ValueError(f"tag {tag.name!r}: {exc}") from None
        dtype = tag.data_type
        width = 1 if dtype is DataType.BOOL else register_count(dtype, tag.length)
        located.append((table, pdu, width))
    reads: list[Read] = []
    image = {"reg": 0, "bit": 0}
    position: dict[int, int] = {}
    for table in TABLES:
        members = [i for i, loc in enumerate(located) if loc[0] == table]
        if not members:
            continue
        bits = table in BIT_TABLES
        limit = conn.max_bits_per_request if bits else conn.max_registers_per_request
        spans = [(located[i][1], located[i][2]) for i in members]
        chunks = sorted(set(spans)) if conn.one_request_per_tag else coalesce(spans, limit, conn.max_gap)
        kind = "bit" if bits else "reg"
        for start, count in chunks:
            mine = tuple(
                i
                for i in members
                if start <= located[i][1] and located[i][1] + located[i][2] <= start + count
            )
            reads.append(Read(table, start, count, image[kind], mine))
            for i in mine:
                position.setdefault(i, image[kind] + located[i][1] - start)
            image[kind] += count
    numeric: dict[tuple[DataType, WordOrder], tuple[list[int], list[int]]] = {}
    flags: list[tuple[int, int | None, bool]] = []
    flag_pos: list[int] = []
    other: list[tuple[int, Tag, int]] = []
    for i, tag in enumerate(tags):
        dtype = tag.data_type
        if dtype in INTEGER_TYPES or dtype in FLOAT_TYPES:
            idx, pos = numeric.setdefault((dtype, tag.word_order), ([], []))
            idx.append(i)
            pos.append(position[i])
        elif located[i][0] not in BIT_TABLES and (tag.bit is not None or dtype is DataType.BOOL):
            flags.append((i, tag.bit, swaps_bytes(tag.word_order)))
            flag_pos.append(position[i])
        else:
            other.append((i, tag, position[i]))
    types = {dtype for dtype, _ in numeric}
    fast: npt.DTypeLike | None = None
    if not other and not flags and types:
        if types <= INTEGER_TYPES - {DataType.UINT64}:
            fast = np.int64
        elif not types & INTEGER_TYPES:
            fast = np.float64
    return Plan(
        reads=tuple(reads),
        n_regs=image["reg"],
        n_bits=image["bit"],
        numeric=tuple(
            (_readonly(idx), _readonly(pos), dt, order) for (dt, order), (idx, pos) in numeric.items()
        ),
        flags=tuple(flags),
        flag_pos=_readonly(flag_pos),
        other=tuple(other),
        n_tags=len(tags),
        fast=fast,
        slots=tuple((table in BIT_TABLES, position[i], width) for i, (table, _, width) in enumerate(located)),
    )


_Entry = tuple[tuple[Tag, ...], Plan]


class _SharedPlans:
    """Plans by the profile object they were compiled from (its identity: a reload validates the
    profile anew, so a changed profile never meets an old plan), by a name within the profile (a
    poll group, the identity tags) and by :class:`PlanSettings`. A profile's plans go when the
    profile does (a weak reference), so a long-running agent that reloads keeps no stale plans."""

    def __init__(self) -> None:
        self._by_profile: dict[int, tuple[weakref.ref[object], dict[tuple[str, PlanSettings], _Entry]]] = {}

    def get(self, profile: object, name: str, tags: Sequence[Tag], conn: Connection) -> Plan:
        key = id(profile)
        held = self._by_profile.get(key)
        if held is None or held[0]() is not profile:
            held = self._by_profile[key] = (weakref.ref(profile, self._forget(key)), {})
        plans = held[1]
        settings = PlanSettings.of(conn)
        entry = plans.get((name, settings))
        # The same tag objects in the same order, not merely the same name: a caller that groups
        # a profile's tags differently gets its own plan.
        if entry is None or not _same(entry[0], tags):
            entry = plans[(name, settings)] = (tuple(tags), build_plan(tags, settings))
        return entry[1]

    def _forget(self, key: int) -> Callable[[weakref.ref[object]], None]:
        def drop(ref: weakref.ref[object]) -> None:
            held = self._by_profile.get(key)
            if held is not None and held[0] is ref:
                del self._by_profile[key]

        return drop

    def __len__(self) -> int:
        return len(self._by_profile)


def _same(a: Sequence[Tag], b: Sequence[Tag]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


_SHARED = _SharedPlans()


def shared_plan(profile: object, name: str, tags: Sequence[Tag], conn: Connection) -> Plan:
    """The plan of ``tags`` (named ``name`` within ``profile``) for ``conn``'s settings, built
    once for every device of the profile that agrees on :class:`PlanSettings`."""
    return _SHARED.get(profile, name, tags, conn)


def _decode_numeric(
    regs: npt.NDArray[np.uint16], pos: npt.NDArray[np.intp], dtype: DataType, order: WordOrder
) -> npt.NDArray[Any]:
    """One vectorised decode; float32 values as their shortest decimals (``95.1``, which the
    device meant, not the ``95.0999984741211`` of the widened float32). ``raw`` keeps the words."""
    values = decode_many(regs, pos, dtype, order)
    return shortest_float32(values) if dtype is DataType.FLOAT32 else values


def decode_plan(
    plan: Plan, regs: npt.NDArray[np.uint16], bits: npt.NDArray[np.bool_], failed: dict[int, str]
) -> tuple[list[Value] | npt.NDArray[Any], list[Quality] | None, list[str | None] | None]:
    """Values of every tag of the plan; failed tags (and undecodable ones) are bad."""
    if plan.fast is not None and not failed:
        out = np.empty(plan.n_tags, dtype=plan.fast)
        for idx, pos, dtype, order in plan.numeric:
            out[idx] = _decode_numeric(regs, pos, dtype, order)
        return out, None, None
    values: list[Value] = [None] * plan.n_tags
    quality = [Quality.GOOD] * plan.n_tags
    reasons: list[str | None] = [None] * plan.n_tags
    for idx, pos, dtype, order in plan.numeric:
        for i, v in zip(idx.tolist(), _decode_numeric(regs, pos, dtype, order).tolist(), strict=True):
            values[i] = v
    if plan.flags:
        for (i, bit, swap), word in zip(plan.flags, regs[plan.flag_pos].tolist(), strict=True):
            values[i] = flag(word, bit, swap)
    for i, tag, at in plan.other:
        if i in failed:
            continue
        try:
            if tag.table_and_number()[0] in BIT_TABLES:
                values[i] = bool(bits[at])
            else:
                width = register_count(tag.data_type, tag.length) if tag.bit is None else 1
                values[i] = decode(
                    regs[at : at + width], tag.data_type, tag.word_order, bit=tag.bit, length=tag.length
                )
        except CodecError:
            quality[i], reasons[i] = Quality.BAD, Reason.DECODE_ERROR
    for i, reason in failed.items():
        values[i], quality[i], reasons[i] = None, Quality.BAD, reason
    return values, quality, reasons


def raw_values(plan: Plan, outcome: Outcome) -> list[Value | list[int]]:
    """Each tag's words as the device sent them (``record_raw``): a coil or discrete input as a
    bool, one register as an int, a value spanning several registers as the list of them, a
    bit field as its whole register; ``None`` only for a tag whose read failed (nothing came
    back). A tag that decodes badly keeps its words: they are the original a reviewer needs."""
    out: list[Value | list[int]] = []
    for i, (bit, at, width) in enumerate(plan.slots):
        if i in outcome.failed:
            out.append(None)
        elif bit:
            out.append(bool(outcome.bits[at]))
        elif width == 1:
            out.append(int(outcome.regs[at]))
        else:
            out.append(outcome.regs[at : at + width].tolist())
    return out


@dataclass
class Outcome:
    """What the reads of one plan produced."""

    regs: npt.NDArray[np.uint16]
    bits: npt.NDArray[np.bool_]
    failed: dict[int, str] = field(default_factory=dict)
