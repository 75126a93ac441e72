"""A counter record as one block of readings, with the quality its status bits imply.

Status bits become quality of the count tags: Laser_OK = 0 → bad (``laser_fault``:
counts are not trustworthy); Flow_OK = 0 → concentrations bad and raw counts uncertain
(``flow_fault``: the volume is wrong, the count is not); Sample_Valid = 0 → uncertain
(``sample_invalid``). A record older than the watermark (the device clock was set back)
is flagged ``uncertain`` (``timestamp_before_watermark``), never dropped. The record's
own end-of-sample time is ``source_ts_ns``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from agent.core.driver import PollGroup
from agent.core.records import Block, Quality, Reason, Value
from cleanroom_common.serial_counter import M3_PER_UNIT, CounterRecord
from drivers.serial_counter.config import Tag


def record_block(
    group: PollGroup,
    record: CounterRecord,
    out_of_order: bool,
    state: dict[str, str],
    text: str | None = None,
) -> Block:
    """The group's tags from one record; ``state`` is the watermark committed with it. With the
    record's ``text`` (the device's ``record_raw``), the block also keeps what the record said
    for each tag (see :func:`raw_fields`)."""
    n = len(group.tags)
    values: list[float | int | None] = [None] * n
    quality = [Quality.GOOD] * n
    reasons: list[str | None] = [None] * n
    sizes = {round(s, 6): c for s, c in record.channels}
    for i, spec in enumerate(group.tag_specs):
        q, why, value = _tag_value(cast(Tag, spec), record, sizes)
        if out_of_order and q is Quality.GOOD:
            q, why = Quality.UNCERTAIN, "timestamp_before_watermark"
        values[i], quality[i], reasons[i] = value, q, why
    return group.finish(
        values,
        quality=quality,
        reasons=reasons,
        source_ts_ns=record.ts_ns,
        state=state,
        device_raw=None if text is None else raw_fields(group, record, text),
    )


_FIELD_AT = {
    "laser_ok": 4,
    "laser_fault": 4,
    "flow_ok": 5,
    "flow_fault": 5,
    "sample_valid": 6,
    "sample_time": 7,
}
"""Position of a tag's field in the record's CSV (docs/simulators.md, "Record format")."""


def raw_fields(group: PollGroup, record: CounterRecord, text: str) -> list[Value]:
    """Each tag's value as the record gives it: a channel's count (whatever the tag makes of
    it, e.g. a concentration), a status flag's or the sample time's field text, the volume's
    field text with its unit (``28.3 L``: the number alone would not say in what)."""
    fields = text.split(",")  # parse_record accepted this text: every field is there
    sizes = {round(s, 6): c for s, c in record.channels}
    out: list[Value] = []
    for spec in group.tag_specs:
        tag = cast(Tag, spec)
        if tag.field == "count":
            assert tag.size_um is not None
            out.append(sizes.get(round(tag.size_um, 6)))
        elif tag.field == "volume":
            out.append(f"{fields[8]} {fields[9]}")
        else:
            out.append(fields[_FIELD_AT[tag.field]])
    return out


def _tag_value(
    tag: Tag, record: CounterRecord, sizes: Mapping[float, int]
) -> tuple[Quality, str | None, float | int | None]:
    """One tag's value from a record, with the quality the record's status bits imply."""
    if tag.field in ("laser_ok", "laser_fault"):
        return Quality.GOOD, None, int(record.laser_ok == (tag.field == "laser_ok"))
    if tag.field in ("flow_ok", "flow_fault"):
        return Quality.GOOD, None, int(record.flow_ok == (tag.field == "flow_ok"))
    if tag.field == "sample_valid":
        return Quality.GOOD, None, int(record.sample_valid)
    if tag.field == "sample_time":
        return Quality.GOOD, None, record.sample_time_s
    if tag.field == "volume":
        q = Quality.GOOD if record.flow_ok else Quality.UNCERTAIN
        return q, None if record.flow_ok else "flow_fault", record.volume_m3 * 1000.0
    assert tag.size_um is not None
    count = sizes.get(round(tag.size_um, 6))
    if count is None:
        return Quality.BAD, "no_such_channel", None
    value: float | int = count
    if tag.per != "sample":
        if record.volume_m3 <= 0:
            return Quality.BAD, Reason.DECODE_ERROR, None
        value = count / (record.volume_m3 if tag.per == "m3" else record.volume_m3 / M3_PER_UNIT["ft3"])
    if not record.laser_ok:
        return Quality.BAD, "laser_fault", None
    if not record.flow_ok:
        return (
            (Quality.UNCERTAIN, "flow_fault", value)
            if tag.per == "sample"
            else (Quality.BAD, "flow_fault", None)
        )
    if not record.sample_valid:
        return Quality.UNCERTAIN, "sample_invalid", value
    return Quality.GOOD, None, value
