"""Reference-sample checks: an offline sample (the lab's pH, dissolved oxygen, viable cell density)
against the online probe at the sample's time.

A probe that drifts keeps reading smoothly, so neither a limit on its value nor a model trained on
it sees anything wrong; the lab sample, measured apart, does. The comparison takes the committed
reading of the tag nearest the sample time (good quality only: a bad reading is no evidence) within
a window, and says ``difference = online - offline`` against the profile's ``reference_limits``.
No reading within the window is said too (``online`` null), never replaced by one from another time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.buffer.rows import StoredRecord
from agent.core.records import Event, Severity

KIND = "reference_sample"
"""The event kind every reference sample is committed as."""


@dataclass(frozen=True, slots=True)
class Online:
    """The committed reading a sample was compared with."""

    value: float
    ts: int
    seq: int
    unit: str | None


@dataclass(frozen=True, slots=True)
class Sample:
    """One offline reference sample, as entered (the fields of its ``reference_sample`` event)."""

    device: str
    tag: str
    value: float
    unit: str | None
    at_ns: int
    actor: str
    reason: str
    sample_id: str | None = None
    source: str = "cli"


def nearest(records: Iterable[StoredRecord], tag: str, at_ns: int, window_ns: int) -> Online | None:
    """The good reading of ``tag`` in ``records`` (stored data records) nearest ``at_ns`` within
    ± ``window_ns``; the earlier one on a tie (it was known when the sample was drawn)."""
    best: tuple[int, int, Online] | None = None
    for rec in records:
        body = json.loads(rec.body)
        tags = body.get("tags") or []
        if tag not in tags:
            continue
        i = tags.index(tag)
        quality = body.get("quality")
        if quality is not None and quality[i] != "good":
            continue
        value = body["values"][i]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        src = body.get("src_ts")
        ts = (
            src[i]
            if isinstance(src, list) and src[i] is not None
            else src
            if isinstance(src, int)
            else rec.acq_ts_ns
        )
        distance = abs(ts - at_ns)
        if distance > window_ns:
            continue
        key = (distance, ts)
        if best is None or key < best[:2]:
            units = body.get("units") or []
            best = (
                distance,
                ts,
                Online(float(value), ts, body["seq"] + i, units[i] if i < len(units) else None),
            )
    return None if best is None else best[2]


def event(sample: Sample, online: Online | None, limit: float | None, window_ns: int) -> Event:
    """The ``reference_sample`` event of ``sample``: alarm when the difference exceeds ``limit``,
    warning when no online reading was found to compare with, info otherwise."""
    difference = None if online is None else online.value - sample.value
    within = None if difference is None or limit is None else abs(difference) <= limit
    if within is False:
        severity = Severity.ALARM
    elif online is None:
        severity = Severity.WARNING
    else:
        severity = Severity.INFO
    data: dict[str, Any] = {
        "tag": sample.tag,
        "offline": sample.value,
        "unit": sample.unit,
        "sample_ts": sample.at_ns,
        "online": None if online is None else online.value,
        "online_unit": None if online is None else online.unit,
        "online_ts": None if online is None else online.ts,
        "online_seq": None if online is None else online.seq,
        "difference": difference,
        "limit": limit,
        "within": within,
        "window_s": window_ns / 1e9,
        "sample_id": sample.sample_id,
        "source": sample.source,
        "actor": sample.actor,
        "reason": sample.reason,
    }
    return Event(sample.device, KIND, severity, data)
