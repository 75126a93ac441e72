"""How a record becomes part of a segment: its canonical JSON body, made storable when a driver
handed over values that are not JSON, or a ``data_loss`` event standing in for it when even that
fails; and the stored rows as the forwarder (:class:`StoredSegment`) and export
(:class:`StoredRecord`) see them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core.chain import Kind
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event, Quality, Reason, Scalar, Value, dumps

log = logging.getLogger("cleanroom.buffer")

SEGMENT_VIEW = (
    "id, stream, i, device, kind, n_readings, n_records, seq_first, seq_last, first_ts, last_ts, "
    "payload, hash"
)
"""The columns of :class:`StoredSegment`, in its order."""


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """One stored segment: ``payload`` is exactly what is published (and hashed to ``hash``)."""

    id: int
    stream: str
    i: int
    device: str
    kind: str
    n_readings: int
    n_records: int
    seq_first: int
    seq_last: int
    first_ts: int
    last_ts: int
    payload: bytes
    hash: str


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One committed record, read back out of its segment (``id`` is the segment's: the records of
    one segment share it); ``body`` is the canonical JSON text, as committed."""

    id: int
    kind: Literal["data", "event"]
    device: str
    seq_first: int
    n: int
    acq_ts_ns: int
    body: str


@dataclass
class CommitResult:
    """What one commit did: the events it added itself (``data_loss``) and the state it stored."""

    events: list[Event] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    readings: int = 0
    unencodable: int = 0
    delivered_readings: int = 0
    """Readings newly marked delivered by the commit (the acknowledgements it carried)."""


def _plain(v: Any) -> Value | ValueError:
    """A reading as a JSON value, or the reason it cannot be one. numpy scalars (``float32``,
    ``int64``: not JSON) become their Python value."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, list):  # an array read as one value: plain only if every element is
        items: list[Scalar] = []
        for x in v:
            plain = _plain(x)
            if isinstance(plain, list):
                return ValueError("nested array")
            if isinstance(plain, ValueError):
                return plain
            items.append(plain)
        return items
    item = getattr(v, "item", None)
    if not isinstance(v, float) and callable(item):
        v = item()
    if isinstance(v, float):
        return v if math.isfinite(v) else ValueError("not finite")
    if isinstance(v, bool | int | str):
        return v
    return ValueError(f"{type(v).__name__} is not a reading value")


def _sanitize(block: Block) -> None:
    """A driver should hand over JSON values only (NaN/inf as bad quality); make it so here rather
    than lose, or stall, the whole group commit because of one value."""
    n = len(block.values)
    quality = list(block.quality) if block.quality is not None else [Quality.GOOD] * n
    reasons: list[str | None] = list(block.reasons) if block.reasons is not None else [None] * n
    for i, v in enumerate(block.values):
        plain = _plain(v)
        if isinstance(plain, ValueError):
            block.values[i] = None
            quality[i] = Quality.BAD
            reasons[i] = str(Reason.DECODE_ERROR)
        else:
            block.values[i] = plain
    block.quality, block.reasons = quality, reasons


def _jsonable(obj: Any) -> Any:
    """Event data as JSON: numpy scalars and arrays to Python, non-finite floats to null, anything
    else unknown to its text (an event must be recorded, even if imperfectly)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, bool | int | float | str):
        return _jsonable(obj.tolist())
    plain = _plain(obj)
    if not isinstance(plain, ValueError):
        return plain
    return None if isinstance(obj, float) else str(obj)


Row = tuple[Kind, str, int, int, int, str]
"""(segment kind, device, seq_first, n, acq_ts_ns, body) of one record to commit; the segment kind
(``data``, ``events``, ``audit``) and the device make its stream."""


def lost_seqs(first: int, n: int) -> tuple[int | None, int | None]:
    """The seq range of a lost row of ``n`` seqs (an empty block owns none)."""
    return (first, first + n - 1) if n else (None, None)


def unencodable_row(
    item: Block | Event, seq: int, n: int, ts: int, exc: Exception, result: CommitResult, loss_seq: int
) -> Row:
    """The ``data_loss`` row (seq ``loss_seq``) standing in for a record that could not be stored
    (seqs ``seq``..)."""
    block = isinstance(item, Block)
    first_seq, last_seq = lost_seqs(seq, n)
    if isinstance(item, Block):
        item.seq_first = None  # never stored: listeners must not see it
        result.unencodable += n
    else:
        item.seq = None
    loss = DataLoss(
        LossReason.UNENCODABLE,
        readings=n if block else 0,
        rows=1,
        events=0 if block else 1,
        first_seq=first_seq,
        last_seq=last_seq,
        first_ts=ts,
        last_ts=ts,
        detail=f"{type(exc).__name__}: {exc}"[:300],
    ).event(item.device, seq=loss_seq)
    loss.batch = item.batch  # the loss stands in for the record: it keeps the record's batch
    result.events.append(loss)
    return ("events", item.device, loss_seq, 1, loss.ts_ns, dumps(loss.body()))


def encode(item: Block | Event) -> str:
    try:
        return item.body_text() if isinstance(item, Block) else dumps(item.body())
    except (TypeError, ValueError):
        pass
    if isinstance(item, Block):
        log.warning("device %s group %s: values that are not JSON were made bad", item.device, item.group)
        _sanitize(item)
    else:
        log.warning("event %s of %s: data that is not JSON was converted", item.kind, item.device)
        item.data = _jsonable(item.data)
    return dumps(item.body())
