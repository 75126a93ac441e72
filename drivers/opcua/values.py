"""OPC UA DataValues as the agent's readings: value, quality, reason and source time.

Quality. Good status → good; ``Uncertain*`` → uncertain, value kept, the status name as
reason; ``Bad*`` → bad, value dropped, the status name as reason (named without the info
bits, so ``BadSensorFailure`` with an overflow bit is still ``BadSensorFailure``). A value the
server sent with a bad status, or one that cannot be a reading, stays in the block's ``raw``
when the device records raw values: that is the original a reviewer looks for. Each
reading keeps the server's SourceTimestamp (ServerTimestamp where the device gave none) as
``source_ts_ns``; the acquisition time is the agent's clock.

Odd values. A server is a device like any other and may send anything its stack can
encode: NaN, an Int64 beyond what a double holds, an array, a structure, a timestamp in
the year 9999. Whatever cannot be a reading becomes a bad one saying why (the value is
never forced into another type); nothing raises. Integers stay exact within Int64/UInt64
(the wire's widest); a source time that does not fit the buffer's 64-bit nanoseconds
(before 1970, after 2262) is dropped, and the reading keeps its acquisition time.

Arrays. A tag with ``array:`` reads a one-dimensional array variable: as one reading holding
the whole array (``value``) or as one reading per element (``expand``, each element a tag of
its own). An array of another length than the profile says is a bad reading
(``array_length``), as is an element that cannot be a reading (``array_element``): a device
that changed its channel count must not shift values onto the wrong channel names.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from agent.core.driver import DriverStats, PollGroup, TagBase, identity_text
from agent.core.precision import shortest_float32_one
from agent.core.records import Block, Quality, Reason, Scalar, Value
from drivers.opcua.config import ArraySpec, Tag

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
"""Int64 and UInt64, the widest integers OPC UA encodes."""
_TS_MAX_NS = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS_CODE_MASK = 0xFFFF0000
"""Severity, sub-code and structure-changed bits: the part of a StatusCode that has a name."""
UNSUPPORTED = "unsupported_type"
ARRAY_LENGTH = "array_length"
"""Reason of an array tag whose node sent no array, or one of another length than the profile's."""
ARRAY_ELEMENT = "array_element"
"""Reason of an array tag whose element cannot be a reading (a structure, NaN, an Int64 too wide)."""


def ts_ns(dt: Any) -> int | None:
    if not isinstance(dt, datetime):
        return None
    try:
        aware = dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
        delta = aware - _EPOCH
    except (OverflowError, ValueError):
        return None
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    return ns if 0 <= ns <= _TS_MAX_NS else None


def _scalar(v: Any) -> tuple[Scalar, str | None]:
    """An OPC UA variant value as a payload value, or the reason it cannot be one."""
    if v is None or isinstance(v, bool):
        return v, None
    if isinstance(v, str):
        return (v, None) if _encodable(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, int):
        return (int(v), None) if _INT_MIN <= v <= _INT_MAX else (None, Reason.OUT_OF_RANGE)
    if isinstance(v, float):
        return (float(v), None) if math.isfinite(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, datetime):
        return v.isoformat(), None
    if isinstance(v, ua.LocalizedText):
        return _scalar(v.Text) if v.Text is None or isinstance(v.Text, str) else (None, UNSUPPORTED)
    return None, UNSUPPORTED


def _encodable(s: str) -> bool:
    """A string with lone surrogates cannot be stored or published as UTF-8."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def status_name(code: int) -> str:
    """The status code's name, info bits aside."""
    return ua.StatusCode(ua.UInt32(code & _STATUS_CODE_MASK)).name


class Converted:
    """Columns of one group's (or subset's) readings, filled from DataValues: the readings and,
    apart from them, what the server sent (``raw``), which a bad status or an unusable value
    does not erase."""

    __slots__ = ("quality", "raw", "reasons", "src", "values")

    def __init__(self, n: int) -> None:
        self.values: list[Value] = [None] * n
        self.raw: list[Value] = [None] * n
        self.quality: list[Quality] = [Quality.GOOD] * n
        self.reasons: list[str | None] = [None] * n
        self.src: list[int | None] = [None] * n

    def set(
        self, i: int, dv: ua.DataValue, array: ArraySpec | None = None, element: int | None = None
    ) -> None:
        """Reading ``i`` from a DataValue: a scalar, or with ``array`` the whole array
        (``element`` unset) or one element of it."""
        if not isinstance(dv, ua.DataValue):
            self.bad(i, UNSUPPORTED)
            return
        self.src[i] = ts_ns(dv.SourceTimestamp) or ts_ns(dv.ServerTimestamp)
        variant = dv.Value
        if variant is not None and not isinstance(variant, ua.Variant):
            self.bad(i, UNSUPPORTED)
            return
        sent = variant.Value if variant is not None else None
        value: Value
        if array is None:
            value, why = _scalar(sent)
            self.raw[i] = value if why is None else _original(sent)
        else:
            value, why, self.raw[i] = _array(sent, array.size, element)
        status = dv.StatusCode
        if status is not None:
            code = status.value if isinstance(status, ua.StatusCode) else None
            if not isinstance(code, int) or not 0 <= code <= 0xFFFFFFFF:
                self.bad(i, Reason.DECODE_ERROR)
                return
            if not status.is_good():
                name = status_name(code)
                if status.is_uncertain():
                    self.quality[i], self.reasons[i] = Quality.UNCERTAIN, name
                else:
                    self.bad(i, name)
                    return
        if why is not None:
            self.bad(i, why)
            return
        if variant is not None and variant.VariantType is ua.VariantType.Float and isinstance(value, float):
            value = shortest_float32_one(value)  # 95.1, not the widened float32's 95.0999984741211
        self.values[i] = value

    def set_plain(
        self,
        i: int,
        value: Value,
        raw: Value,
        src: int | None,
        array: ArraySpec | None = None,
        element: int | None = None,
    ) -> None:
        """Reading ``i`` from a value the subscription's decoder already found a good, usable
        scalar (what :meth:`set` makes of such a DataValue, without the DataValue)."""
        self.src[i] = src
        if array is None:
            self.values[i], self.raw[i] = value, raw
            return
        reading, why, self.raw[i] = _array(value, array.size, element)
        if why is not None:
            self.bad(i, why)
        else:
            self.values[i] = reading

    def bad(self, i: int, reason: str) -> None:
        """The reading is bad; what the server sent, if anything, stays in ``raw``."""
        self.quality[i], self.reasons[i], self.values[i] = Quality.BAD, reason, None

    def count_shape_errors(self, stats: DriverStats) -> None:
        """Count the array readings that did not have the profile's shape: a device whose
        channel count changed shows in its error counts, not only in its data."""
        for reason in self.reasons:
            if reason in (ARRAY_LENGTH, ARRAY_ELEMENT):
                stats.error(reason)

    def finish(self, group: PollGroup, acq_ts_ns: int, record_raw: bool = False) -> Block:
        """The block; with ``record_raw`` it also keeps each value as the server sent it, before
        the tag's scale and offset (the payload form of the Variant: a LocalizedText's text, a
        DateTime in ISO 8601), bad readings included."""
        return group.finish(
            self.values,
            acq_ts_ns=acq_ts_ns,
            quality=self.quality,
            reasons=self.reasons,
            source_ts_ns=self.src,
            device_raw=self.raw if record_raw else None,
        )


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
"""A payload is strict JSON (no NaN): a non-finite double the server sent is kept as its name."""


def shape(tag: TagBase) -> tuple[ArraySpec | None, int | None]:
    """How a tag reads its node: (the array spec, the element) or ``(None, None)`` for a scalar."""
    return (tag.array, tag.element) if isinstance(tag, Tag) else (None, None)


def _array(sent: Any, size: int, element: int | None) -> tuple[Value, str | None, Value]:
    """An array variable's value as (reading, reason it cannot be one, raw): the whole array,
    or with ``element`` that element. A null value (a bad status) passes as null."""
    if sent is None:
        return None, None, None
    if not isinstance(sent, list) or len(sent) != size:
        return None, ARRAY_LENGTH, None
    if element is not None:
        value, why = _scalar(sent[element])
        return (value, None, value) if why is None else (None, ARRAY_ELEMENT, _original(sent[element]))
    values: list[Scalar] = []
    for item in sent:
        value, why = _scalar(item)
        if why is not None:
            return None, ARRAY_ELEMENT, None
        values.append(value)
    return values, None, None


def _original(v: Any) -> Value:
    """The raw form of a value that cannot be a reading: a non-finite double by name, an integer
    as it is; ``None`` for what has no payload form (an array, a structure, a string with lone
    surrogates), which the reading's reason names instead."""
    if isinstance(v, float):
        return _NON_FINITE[repr(v)]
    if isinstance(v, int) and not isinstance(v, bool):
        return int(v)
    return None


def identity_value(dv: object) -> str | None:
    """An identity node's value as text (a String, a LocalizedText, an integer), or ``None``
    when the server did not give one that can name an instrument."""
    if not isinstance(dv, ua.DataValue) or not isinstance(dv.Value, ua.Variant):
        return None
    status = dv.StatusCode
    if isinstance(status, ua.StatusCode) and not status.is_good():
        return None
    value, why = _scalar(dv.Value.Value)
    return None if why is not None else identity_text(value)
