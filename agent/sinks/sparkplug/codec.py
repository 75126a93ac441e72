"""Sparkplug B 3.0 payloads: what the edge node's messages carry, apart from when they are sent
(the session: bdSeq, seq, births, host state, commands).

A committed JSON segment stays the record (the buffer keeps it, the integrity chain hashes it);
Sparkplug payloads are translated from it at send time, because their ``seq`` and aliases belong
to one MQTT session. Every data payload made from a segment carries the ``Integrity/segment``
metric naming that segment and its hash, so a verifier can tie each Sparkplug message back to the
chained record it came from.

Each data payload also carries ``Batch/ref``, the batch context its readings were acquired in
(the block's ``batch``), null when there was none: Sparkplug metrics are states a host keeps until
they change, so the end of a batch must be said, not left out.

Readings keep what the JSON segment says about them: a value that is not good carries the
``Quality`` property (the specification's codes: 0 bad, 500 stale, which is the nearest it has to
uncertain) and a ``QualityReason``; a value whose Python type does not fit the metric's declared
datatype is sent null with quality bad and reason ``type_mismatch`` (the segment still has it),
never an exception that would stall the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from agent.core.chain import stream_of
from agent.core.records import dumps
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug.generated import sparkplug_b_pb2 as pb

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_FLOAT32_MAX = 3.4028234663852886e38


class DataType(IntEnum):
    """Sparkplug B datatype codes (``Metric.datatype``, ``PropertyValue.type``): the scalar ones this
    codec writes and reads. Other codes (DataSet, Template, arrays) decode with their raw number."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    BYTES = 17
    FILE = 18


_INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT8: (-(1 << 7), (1 << 7) - 1),
    DataType.INT16: (-(1 << 15), (1 << 15) - 1),
    DataType.INT32: (-(1 << 31), (1 << 31) - 1),
    DataType.INT64: (-(1 << 63), (1 << 63) - 1),
    DataType.UINT8: (0, (1 << 8) - 1),
    DataType.UINT16: (0, (1 << 16) - 1),
    DataType.UINT32: (0, _MASK32),
    DataType.UINT64: (0, _MASK64),
    DataType.DATETIME: (0, _MASK64),
}
# The specification's placement: small integers in int_value, the rest in long_value, each as the
# two's complement bit pattern of the signed value.
_IN_INT_VALUE = frozenset({DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16})
_SIGNED = frozenset({DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64})
_TEXT_TYPES = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})
_BYTES_TYPES = frozenset({DataType.BYTES, DataType.FILE})

KIND_TYPES: Mapping[str, DataType] = {
    "float": DataType.DOUBLE,
    "int": DataType.INT64,
    "bool": DataType.BOOLEAN,
    "string": DataType.STRING,
}
"""``TagInfo.kind`` -> the datatype its metric is declared with."""

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
EVENTS = "Events/event"
AUDIT = "Audit/record"
INTEGRITY = "Integrity/segment"
BATCH = "Batch/ref"

QUALITY = "Quality"
QUALITY_REASON = "QualityReason"
ENG_UNIT = "engUnit"

QUALITY_CODES: Mapping[str, int] = {"good": 192, "uncertain": 500, "bad": 0}
"""Reading quality -> the ``Quality`` property. Sparkplug 3.0 admits only 0 (bad), 192 (good) and
500 (stale) (tck-id-payloads-propertyset-quality-value-value); it has no "uncertain", so an
uncertain reading (value kept, not to be trusted for release) is sent as stale, the not-good code
that keeps the value usable, and its ``QualityReason`` says why."""

TYPE_MISMATCH = "type_mismatch"
"""``QualityReason`` of a value whose type does not fit the metric's declared datatype."""


class SparkplugDecodeError(ValueError):
    """Bytes that are not a Sparkplug B payload this codec can read (the message says what)."""


class SparkplugEncodeError(ValueError):
    """A segment document whose shape does not allow encoding it (the message says where)."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric as its birth declares it. ``alias`` is unique across the edge node's whole metric
    set, node and devices together (tck-id-payloads-alias-uniqueness)."""

    name: str
    alias: int
    datatype: DataType
    unit: str | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class Last:
    """The last value sent for a metric, which the next DBIRTH declares."""

    value: Any
    ts_ms: int
    quality: str = "good"
    reason: str | None = None


@dataclass(slots=True)
class Encoded:
    """The payloads made from one segment, in segment order, each with its seq already taken."""

    payloads: list[bytes] = field(default_factory=list)
    skipped: int = 0
    """Readings of tags the specs do not declare (the device's profile changed since the birth):
    left out of these payloads; the segment still carries them."""
    last: dict[str, Last] = field(default_factory=dict)
    """Per metric name, the last reading in these payloads."""


@dataclass(frozen=True, slots=True)
class DecodedMetric:
    """One metric as received. ``datatype`` is the raw code (a :class:`DataType` when known);
    ``value`` is None when the metric is null, has no value, or has a type this codec does not read
    (DataSet, Template, arrays)."""

    name: str | None
    alias: int | None
    datatype: int | None
    value: Any
    timestamp: int | None
    is_historical: bool
    is_transient: bool
    is_null: bool
    properties: dict[str, Any]
    description: str | None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A received payload."""

    timestamp: int | None
    seq: int | None
    metrics: list[DecodedMetric]
    uuid: str | None = None


NODE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(BDSEQ, 1, DataType.INT64),
    MetricSpec(REBIRTH, 2, DataType.BOOLEAN),
    MetricSpec(EVENTS, 3, DataType.STRING, description="An agent event: its JSON body as in the segment"),
    MetricSpec(AUDIT, 4, DataType.STRING, description="An audit record: its JSON body as in the segment"),
    MetricSpec(INTEGRITY, 5, DataType.STRING, description="The chained segment this message carries"),
)


BATCH_DESCRIPTION = "The batch context (ref) the readings were acquired in; null: no batch"

_RESERVED = frozenset(spec.name for spec in NODE_METRICS) | {BATCH}
"""Names no tag may have: a metric name must mean one metric, wherever it is read."""


def node_metrics() -> list[MetricSpec]:
    """The edge node's own metrics (NBIRTH, NDATA), aliases 1 to 5."""
    return list(NODE_METRICS)


def device_metrics(tags: Sequence[TagInfo], *, first_alias: int) -> list[MetricSpec]:
    """A device's metrics: its tags in profile order, then ``Events/event``, ``Integrity/segment``
    and ``Batch/ref``, aliased from ``first_alias`` on. Raises ValueError for a tag name that
    appears twice or is one of the node's metric names."""
    specs: list[MetricSpec] = []
    seen: set[str] = set()
    for tag in tags:
        if tag.name in _RESERVED:
            raise ValueError(f"tag {tag.name!r} has a name reserved for the agent's own metrics")
        if tag.name in seen:
            raise ValueError(f"tag {tag.name!r} is declared twice")
        seen.add(tag.name)
        datatype = KIND_TYPES.get(tag.kind)
        if datatype is None:
            raise ValueError(f"tag {tag.name!r}: kind {tag.kind!r} is not one of {sorted(KIND_TYPES)}")
        specs.append(MetricSpec(tag.name, first_alias + len(specs), datatype, tag.unit, tag.description))
    specs.append(
        MetricSpec(EVENTS, first_alias + len(specs), DataType.STRING, description=NODE_METRICS[2].description)
    )
    specs.append(
        MetricSpec(
            INTEGRITY, first_alias + len(specs), DataType.STRING, description=NODE_METRICS[4].description
        )
    )
    specs.append(MetricSpec(BATCH, first_alias + len(specs), DataType.STRING, description=BATCH_DESCRIPTION))
    return specs


def catalog_metrics(catalog: Mapping[str, Sequence[TagInfo]]) -> dict[str, list[MetricSpec]]:
    """Every device's metrics, aliased after the node's and after each other in catalog order, so no
    two metrics of the edge node share an alias. Raises ValueError naming the device of a bad tag."""
    out: dict[str, list[MetricSpec]] = {}
    next_alias = len(NODE_METRICS) + 1
    for device, tags in catalog.items():
        try:
            specs = device_metrics(tags, first_alias=next_alias)
        except ValueError as exc:
            raise ValueError(f"device {device!r}: {exc}") from None
        out[device] = specs
        next_alias += len(specs)
    return out


def segment_ref(stream: str, i: int, hash_: str) -> str:
    """The ``Integrity/segment`` value: which chained segment a message carries, as JSON text."""
    return dumps({"stream": stream, "i": i, "hash": hash_})


# --- encoding ------------------------------------------------------------------------------------


def _fits(datatype: DataType, value: Any) -> bool:
    """Whether ``value`` can be sent as ``datatype`` without changing what it says."""
    if datatype in _INT_RANGES:
        lo, hi = _INT_RANGES[datatype]
        return type(value) is int and lo <= value <= hi
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        if type(value) not in (int, float):
            return False
        try:
            number = float(value)
        except OverflowError:  # an int beyond any double
            return False
        return math.isfinite(number) and (datatype is DataType.DOUBLE or abs(number) <= _FLOAT32_MAX)
    if datatype is DataType.BOOLEAN:
        return type(value) is bool
    if datatype in _TEXT_TYPES:
        return type(value) is str
    if datatype in _BYTES_TYPES:
        return type(value) is bytes
    return False


def _put(target: Any, datatype: DataType, value: Any) -> None:
    """Set a Metric's or PropertyValue's value field; the caller checked :func:`_fits`."""
    if datatype in _IN_INT_VALUE:
        target.int_value = value & _MASK32
    elif datatype in _INT_RANGES:
        target.long_value = value & _MASK64
    elif datatype is DataType.FLOAT:
        target.float_value = float(value)
    elif datatype is DataType.DOUBLE:
        target.double_value = float(value)
    elif datatype is DataType.BOOLEAN:
        target.boolean_value = value
    elif datatype in _TEXT_TYPES:
        target.string_value = value
    else:
        target.bytes_value = value


def _property(props: Any, key: str, datatype: DataType, value: Any) -> None:
    props.keys.append(key)
    pv = props.values.add()
    pv.type = datatype
    _put(pv, datatype, value)


def _metric(
    payload: pb.Payload,
    spec: MetricSpec,
    *,
    value: Any,
    ts_ms: int,
    named: bool,
    historical: bool = False,
    quality: str = "good",
    reason: str | None = None,
) -> Last:
    """Append one metric; returns what it says. A value that does not fit the datatype goes null
    with quality bad."""
    m = payload.metrics.add()
    if named:
        m.name = spec.name
    m.alias = spec.alias
    m.timestamp = ts_ms
    m.datatype = spec.datatype
    if historical:
        m.is_historical = True
    if value is not None and not _fits(spec.datatype, value):
        value, quality, reason = None, "bad", TYPE_MISMATCH
    if value is None:
        m.is_null = True
    else:
        _put(m, spec.datatype, value)
    if named and spec.unit:
        _property(m.properties, ENG_UNIT, DataType.STRING, spec.unit)
    if quality != "good":
        _property(m.properties, QUALITY, DataType.INT32, QUALITY_CODES.get(quality, QUALITY_CODES["bad"]))
        if reason is not None:
            _property(m.properties, QUALITY_REASON, DataType.STRING, str(reason))
    if named and spec.description:
        m.metadata.description = spec.description
    return Last(value, ts_ms, quality, reason)


def _check_u8(name: str, n: int) -> None:
    if not 0 <= n <= 255:
        raise ValueError(f"{name} must be 0..255, got {n}")


def nbirth(*, bd_seq: int, seq: int, ts_ms: int, specs: Sequence[MetricSpec]) -> bytes:
    """The NBIRTH: every node metric named and aliased; ``bdSeq`` the session's, ``Node
    Control/Rebirth`` false, the others null (an old event repeated in a birth would read as new)."""
    _check_u8("bdSeq", bd_seq)
    _check_u8("seq", seq)
    payload = pb.Payload(timestamp=ts_ms, seq=seq)
    for spec in specs:
        value: Any = bd_seq if spec.name == BDSEQ else False if spec.name == REBIRTH else None
        _metric(payload, spec, value=value, ts_ms=ts_ms, named=True)
    return payload.SerializeToString()  # type: ignore[no-any-return]


def ndeath(*, bd_seq: int, ts_ms: int) -> bytes:
    """The NDEATH (the connection's will): only ``bdSeq``, by name, and no seq (the specification's
    form: a host matches it to the NBIRTH of the same bdSeq)."""
    _check_u8("bdSeq", bd_seq)
    payload = pb.Payload(timestamp=ts_ms)
    m = payload.metrics.add()
    m.name = BDSEQ
    m.timestamp = ts_ms
    m.datatype = DataType.INT64
    m.long_value = bd_seq
    return payload.SerializeToString()  # type: ignore[no-any-return]


def dbirth(*, seq: int, ts_ms: int, specs: Sequence[MetricSpec], last: Mapping[str, Last]) -> bytes:
    """A DBIRTH: every metric of the device named, aliased, typed, with its unit (``engUnit``) and
    description (metadata), and its last value sent (null when none was, and always for the event
    and integrity metrics, which are messages rather than states)."""
    _check_u8("seq", seq)
    payload = pb.Payload(timestamp=ts_ms, seq=seq)
    for spec in specs:
        known = last.get(spec.name)
        if known is None or spec.name in (EVENTS, INTEGRITY):
            _metric(payload, spec, value=None, ts_ms=ts_ms, named=True)
        else:
            _metric(
                payload,
                spec,
                value=known.value,
                ts_ms=known.ts_ms,
                named=True,
                quality=known.quality,
                reason=known.reason,
            )
    return payload.SerializeToString()  # type: ignore[no-any-return]


def ddeath(*, seq: int, ts_ms: int) -> bytes:
    """A DDEATH: no metrics, the device's values are stale from now on."""
    _check_u8("seq", seq)
    return pb.Payload(timestamp=ts_ms, seq=seq).SerializeToString()  # type: ignore[no-any-return]


def _column(block: Mapping[str, Any], key: str, n: int, where: str) -> list[Any] | None:
    col = block.get(key)
    if col is None:
        return None
    if not isinstance(col, list) or len(col) != n:
        raise SparkplugEncodeError(f"{where}: {key} is not a list of {n} entries")
    return col


def data_from_segment(
    doc: Mapping[str, Any],
    *,
    specs: Sequence[MetricSpec],
    seq_for: Callable[[], int],
    segment_ref: str,
    historical: bool,
    ts_ms: int,
) -> Encoded:
    """The DDATA/NDATA payloads of one committed segment (its parsed JSON document): one per data
    block (its readings, at the block's acquisition time) or per event (``Events/event``, or
    ``Audit/record`` for the audit trail, whose value is the event's JSON body as in the segment),
    each with ``Integrity/segment`` = ``segment_ref``. ``historical`` marks every metric as delivered
    late. Metrics go by alias alone. ``seq_for`` is called once per payload, after the whole segment
    was encoded, so a segment that cannot be encoded (:class:`SparkplugEncodeError`) takes no seq."""
    by_name = {spec.name: spec for spec in specs}
    integrity = by_name.get(INTEGRITY)
    if integrity is None:
        raise ValueError(f"the metric specs have no {INTEGRITY!r}")
    out = Encoded()
    built: list[pb.Payload] = []
    if "blocks" in doc:
        blocks = doc["blocks"]
        if not isinstance(blocks, list):
            raise SparkplugEncodeError("blocks is not a list")
        for b, block in enumerate(blocks):
            where = f"block {b}"
            if not isinstance(block, dict):
                raise SparkplugEncodeError(f"{where} is not an object")
            tags = block.get("tags")
            ts = block.get("ts")
            if not isinstance(tags, list) or type(ts) is not int:
                raise SparkplugEncodeError(f"{where}: tags or ts missing")
            n = len(tags)
            values = _column(block, "values", n, where) or [None] * n
            qualities = _column(block, "quality", n, where)
            reasons = _column(block, "reasons", n, where)
            block_ms = ts // 1_000_000
            payload = pb.Payload(timestamp=ts_ms)
            for i, tag in enumerate(tags):
                spec = by_name.get(tag) if isinstance(tag, str) and tag not in _RESERVED else None
                if spec is None:
                    out.skipped += 1
                    continue
                out.last[spec.name] = _metric(
                    payload,
                    spec,
                    value=values[i],
                    ts_ms=block_ms,
                    named=False,
                    historical=historical,
                    quality=str(qualities[i]) if qualities is not None else "good",
                    reason=reasons[i] if reasons is not None else None,
                )
            if "batch" in block and (batch := by_name.get(BATCH)) is not None:  # (older segments: unknown)
                ref = block["batch"]
                if ref is not None and not isinstance(ref, str):
                    raise SparkplugEncodeError(f"{where}: batch is not a string or null")
                out.last[BATCH] = _metric(
                    payload, batch, value=ref, ts_ms=block_ms, named=False, historical=historical
                )
            _metric(payload, integrity, value=segment_ref, ts_ms=block_ms, named=False, historical=historical)
            built.append(payload)
    elif "events" in doc:
        events = doc["events"]
        if not isinstance(events, list):
            raise SparkplugEncodeError("events is not a list")
        chain = doc.get("chain")
        audit = isinstance(chain, dict) and chain.get("stream") == stream_of("", "audit")
        carrier = by_name.get(AUDIT if audit else EVENTS)
        if carrier is None:
            raise ValueError(f"the metric specs have no {AUDIT if audit else EVENTS!r}")
        for e, event in enumerate(events):
            if not isinstance(event, dict) or type(event.get("ts")) is not int:
                raise SparkplugEncodeError(f"event {e} is not an object with an integer ts")
            event_ms = event["ts"] // 1_000_000
            payload = pb.Payload(timestamp=ts_ms)
            _metric(payload, carrier, value=dumps(event), ts_ms=event_ms, named=False, historical=historical)
            _metric(payload, integrity, value=segment_ref, ts_ms=event_ms, named=False, historical=historical)
            built.append(payload)
    else:
        raise SparkplugEncodeError("the segment has neither blocks nor events")
    for payload in built:
        seq = seq_for()
        _check_u8("seq", seq)
        payload.seq = seq
        out.payloads.append(payload.SerializeToString())
    return out


# --- decoding ------------------------------------------------------------------------------------


def _signed(bits: int, width: int) -> int:
    return bits - (1 << width) if bits >> (width - 1) else bits


_FIELD_OF: dict[int, str] = {
    **{t: "int_value" for t in _IN_INT_VALUE},
    **{t: "long_value" for t in _INT_RANGES if t not in _IN_INT_VALUE},
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    **{t: "string_value" for t in _TEXT_TYPES},
    **{t: "bytes_value" for t in _BYTES_TYPES},
}
"""Datatype -> the value field the specification puts it in."""


def _text(raw: Any, where: str) -> str:
    """A proto2 string as received: the runtime hands over bytes that are not UTF-8 unchanged."""
    if not isinstance(raw, str):
        raise SparkplugDecodeError(f"{where}: a string that is not UTF-8")
    return raw


def _value_of(source: Any, datatype: int | None, where: str) -> Any:
    """The Python value of a Metric's or PropertyValue's value field, read as ``datatype`` says;
    None for the types this agent does not read (DataSet, Template, property sets, arrays)."""
    which = source.WhichOneof("value")
    if which is None or datatype is None or datatype not in _FIELD_OF:
        return None
    expected = _FIELD_OF[datatype]
    if which != expected:
        raise SparkplugDecodeError(f"{where}: datatype {DataType(datatype).name} but the value is in {which}")
    raw = getattr(source, which)
    if which == "string_value":
        return _text(raw, where)
    if datatype in _SIGNED:
        return _signed(raw, 64 if datatype == DataType.INT64 else 32)
    return raw


def _properties(metric: Any, where: str) -> dict[str, Any]:
    if not metric.HasField("properties"):
        return {}
    props = metric.properties
    if len(props.keys) != len(props.values):
        raise SparkplugDecodeError(
            f"{where}: the property set has {len(props.keys)} keys and {len(props.values)} values"
        )
    out: dict[str, Any] = {}
    for raw_key, pv in zip(props.keys, props.values, strict=True):
        key = _text(raw_key, f"{where}, a property key")
        ptype = pv.type if pv.HasField("type") else None
        out[key] = None if pv.is_null else _value_of(pv, ptype, f"{where}, property {key!r}")
    return out


def decode(payload: bytes) -> Decoded:
    """Read a Sparkplug B payload. Raises :class:`SparkplugDecodeError`, and nothing else, for bytes
    that are not one (not protobuf, a value in the wrong field for its datatype, unequal property
    keys and values)."""
    try:
        return _decode(payload)
    except SparkplugDecodeError:
        raise
    except Exception as exc:  # the runtime's DecodeError, or what its C layer raises (bad UTF-8, depth)
        raise SparkplugDecodeError(f"not a Sparkplug B payload: {exc}") from None


def _decode(payload: bytes) -> Decoded:
    message = pb.Payload()
    message.ParseFromString(payload)
    metrics: list[DecodedMetric] = []
    for k, m in enumerate(message.metrics):
        name = _text(m.name, f"metric {k}: the name") if m.HasField("name") else None
        where = f"metric {k}" + (f" ({name!r})" if name is not None else "")
        datatype = m.datatype if m.HasField("datatype") else None
        is_null = m.is_null
        metrics.append(
            DecodedMetric(
                name=name,
                alias=m.alias if m.HasField("alias") else None,
                datatype=datatype,
                value=None if is_null else _value_of(m, datatype, where),
                timestamp=m.timestamp if m.HasField("timestamp") else None,
                is_historical=m.is_historical,
                is_transient=m.is_transient,
                is_null=is_null,
                properties=_properties(m, where),
                description=_text(m.metadata.description, f"{where}: the description")
                if m.metadata.HasField("description")
                else None,
            )
        )
    return Decoded(
        timestamp=message.timestamp if message.HasField("timestamp") else None,
        seq=message.seq if message.HasField("seq") else None,
        metrics=metrics,
        uuid=_text(message.uuid, "the uuid") if message.HasField("uuid") else None,
    )


# --- commands ------------------------------------------------------------------------------------

_REBIRTH_ALIAS = NODE_METRICS[1].alias


def _is_rebirth(metric: DecodedMetric) -> bool:
    return metric.name == REBIRTH or (metric.name is None and metric.alias == _REBIRTH_ALIAS)


def rebirth_requested(decoded: Decoded) -> bool:
    """Whether an NCMD asks for a rebirth: ``Node Control/Rebirth`` (by name or alias) set true."""
    return any(_is_rebirth(m) and m.value is True for m in decoded.metrics)


def command_writes(decoded: Decoded, specs: Sequence[MetricSpec] = ()) -> list[str]:
    """The metrics an NCMD/DCMD asks to write, other than a rebirth request: what a refusal names.
    Each is its name, or the name its alias has in ``specs``, or ``alias N`` for an alias unknown."""
    names = {spec.alias: spec.name for spec in specs}
    out: list[str] = []
    for m in decoded.metrics:
        if _is_rebirth(m):
            continue
        if m.name is not None:
            out.append(m.name)
        elif m.alias is not None and m.alias in names:
            out.append(names[m.alias])
        else:
            out.append(f"alias {m.alias}" if m.alias is not None else "unnamed metric")
    return out
