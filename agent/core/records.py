"""The record model: what flows from drivers through the buffer to the sinks.

Readings travel in *blocks*: all readings of one poll of one group of one device,
stored column-wise. A block is one object per poll rather than one per reading, so
the hot path (decode, commit, publish) costs per poll, not per tag. Every reading in
a block still has its own sequence number: ``seq_first + index``, assigned by the
buffer when the block is submitted (acquisition), so a reading the disk refuses still owns its seq
and giving it up leaves a gap a ``data_loss`` event explains; a consumer de-duplicates by
``(agent, seq)`` and sees gaps.

The canonical body (``Block.body()`` / ``Event.body()``) is what the buffer stores and
what the JSON payload encoder splices into MQTT payloads unchanged; hashing the stored
bytes later (integrity chain) therefore hashes exactly what was forwarded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

Scalar = float | int | bool | str | None
Value = Scalar | list[Scalar]
"""A reading: a scalar, or the elements of an array variable read as one value (OPC UA
``array: {mode: value}``)."""

AGENT_DEVICE = "agent"
"""The device id of agent-level events (audit records, and their loss): not a device's, the agent's own."""


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reason(StrEnum):
    """Vocabulary of quality reasons shared by all drivers (a driver may add
    protocol-specific ones, e.g. a Modbus exception name or an OPC UA status name)."""

    TIMEOUT = "timeout"
    COMM_ERROR = "comm_error"
    DECODE_ERROR = "decode_error"
    OUT_OF_RANGE = "out_of_range"
    NOT_CONNECTED = "not_connected"
    DEVICE_STATUS = "device_status"
    OVERRUN = "overrun"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ALARM = "alarm"


def now_ns() -> int:
    """Acquisition time: UTC wall clock in nanoseconds."""
    return time.time_ns()


def _compact_encoder() -> Callable[[Any], str]:
    """``JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
    check_circular=False).encode``, byte for byte, with its C encoder built once: ``encode`` builds
    a new one for every call, which cost about as much as encoding a poll's values (every block is
    encoded at commit, and every payload built from it)."""
    encoder = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
    )
    if c_make_encoder is None:  # a Python without json's C accelerator
        return encoder.encode
    chunks = c_make_encoder(None, encoder.default, encode_basestring, None, ":", ",", False, False, False)

    def encode(obj: Any) -> str:
        if isinstance(obj, str):
            return encode_basestring(obj)
        return "".join(chunks(obj, 0))

    return encode


_dumps = _compact_encoder()


def dumps(obj: Any) -> str:
    """Compact, strict JSON (NaN/inf are not JSON: callers must map them to bad quality)."""
    return _dumps(obj)


_COLUMN_TEXT: dict[int, tuple[tuple[Any, ...], str]] = {}
_COLUMN_TEXT_MAX = 8192


def _column_text(column: Sequence[Any]) -> str:
    """A block's tags or units as JSON. A poll group hands over the same tuples at every poll, so
    their text is kept (by identity: a tuple cannot change) instead of re-encoding them for every
    block; at 100k readings/s this was most of the commit's JSON work. Other sequences (a list, a
    driver's own) are encoded each time."""
    if type(column) is not tuple:
        return _dumps(list(column))
    hit = _COLUMN_TEXT.get(id(column))
    if hit is not None and hit[0] is column:
        return hit[1]
    text = _dumps(column)
    if len(_COLUMN_TEXT) >= _COLUMN_TEXT_MAX:  # groups come and go with reloads: bound it
        _COLUMN_TEXT.clear()
    _COLUMN_TEXT[id(column)] = (column, text)
    return text


@dataclass(slots=True)
class Block:
    """Readings of one poll (or one device record) of one group of one device.

    ``quality``/``reasons`` are ``None`` when every reading is good: the common case
    costs nothing. ``source_ts_ns`` is one timestamp for the whole block (a device
    record's own time), one per reading, or ``None`` where the device gives none.
    ``state`` is driver state (e.g. a counter's record watermark) that the buffer
    commits in the same transaction as the block, so a restart resumes exactly after
    the last committed record.
    """

    device: str
    group: str
    acq_ts_ns: int
    tags: Sequence[str]
    units: Sequence[str | None]
    values: list[Value]
    quality: list[Quality] | None = None
    reasons: list[str | None] | None = None
    source_ts_ns: int | list[int | None] | None = None
    state: dict[str, str] | None = None
    seq_first: int | None = None
    events: list[Event] | None = None
    """Events the driver detected while reading this block (e.g. records lost at a
    counter whose buffer wrapped), committed with it; not part of the block's body."""
    raw: list[Value | list[int]] | None = None
    """The values as the device sent them, one per reading (register words: an int, or a
    list for a value spanning several registers; a node's value before scale and offset; a
    record's field text), null where nothing was received; ``None`` unless the device's
    ``record_raw`` is on."""
    batch: str | None = None
    """The ``ref`` of the batch context the device held at ``acq_ts_ns`` (:mod:`agent.core.batch`),
    None for none; stamped by the buffer at submit, always in the body (``null`` says "no batch")."""

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def bad(
        cls,
        device: str,
        group: str,
        tags: Sequence[str],
        units: Sequence[str | None],
        reason: str,
        acq_ts_ns: int | None = None,
    ) -> Block:
        """A failed poll: every tag present, value null, quality bad, so the gap is visible."""
        n = len(tags)
        return cls(
            device=device,
            group=group,
            acq_ts_ns=now_ns() if acq_ts_ns is None else acq_ts_ns,
            tags=tags,
            units=units,
            values=[None] * n,
            quality=[Quality.BAD] * n,
            reasons=[reason] * n,
        )

    def quality_of(self, i: int) -> Quality:
        return Quality.GOOD if self.quality is None else self.quality[i]

    def body(self) -> dict[str, Any]:
        """Canonical JSON-able form; see docs/payloads.md ("block")."""
        if self.seq_first is None:
            raise ValueError("block has no sequence number: submit it to the buffer first")
        out: dict[str, Any] = {
            "seq": self.seq_first,
            "n": len(self.values),
            "group": self.group,
            "ts": self.acq_ts_ns,
            "tags": list(self.tags),
            "units": list(self.units),
            "values": self.values,
        }
        if self.raw is not None:
            out["raw"] = self.raw
        if self.quality is not None:
            out["quality"] = [str(q) for q in self.quality]
            out["reasons"] = self.reasons
        if self.source_ts_ns is not None:
            out["src_ts"] = self.source_ts_ns
        out["batch"] = self.batch
        return out

    def body_text(self) -> str:
        """``dumps(self.body())``, byte for byte, without re-encoding the tags and units columns
        (:func:`_column_text`). Raises like ``body()`` and ``dumps`` (a value that is not JSON)."""
        if self.seq_first is None:
            raise ValueError("block has no sequence number: submit it to the buffer first")
        text = (
            f'{{"seq":{self.seq_first},"n":{len(self.values)},"group":{_dumps(self.group)},'
            f'"ts":{self.acq_ts_ns},"tags":{_column_text(self.tags)},"units":{_column_text(self.units)},'
            f'"values":{_dumps(self.values)}'
        )
        if self.raw is not None:
            text += f',"raw":{_dumps(self.raw)}'
        if self.quality is not None:
            text += f',"quality":{_dumps(self.quality)},"reasons":{_dumps(self.reasons)}'
        if self.source_ts_ns is not None:
            text += f',"src_ts":{_dumps(self.source_ts_ns)}'
        return text + (',"batch":null}' if self.batch is None else f',"batch":{_dumps(self.batch)}}}')


@dataclass(slots=True)
class Event:
    """Something that happened, as opposed to a measured value: data loss, gap,
    device state change, limit excursion, anomaly, drift, audit record.

    ``device`` is a device id, or :data:`AGENT_DEVICE` for agent-level events.
    """

    device: str
    kind: str
    severity: Severity = Severity.INFO
    data: dict[str, Any] = field(default_factory=dict)
    ts_ns: int = field(default_factory=now_ns)
    seq: int | None = None
    state: dict[str, str] | None = None
    """Agent state committed in the same transaction as the event (not part of the body):
    e.g. the config hash an ``agent_start`` audit record reports, so the next start can
    tell whether the configuration changed."""
    batch: str | None = None
    """The ``ref`` of the batch context its device held at ``ts_ns`` (as for :attr:`Block.batch`)."""

    def body(self) -> dict[str, Any]:
        """Canonical JSON-able form; see docs/payloads.md ("event")."""
        if self.seq is None:
            raise ValueError("event has no sequence number: submit it to the buffer first")
        return {
            "seq": self.seq,
            "ts": self.ts_ns,
            "kind": self.kind,
            "severity": str(self.severity),
            "data": self.data,
            "batch": self.batch,
        }
