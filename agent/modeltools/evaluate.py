"""Event-level evaluation of a frozen model on labelled data, through the agent's own
scoring path (:func:`agent.transforms.anomaly.offline.run_offline`).

Definitions (fixed before testing, Annex 22 draft):

* a fault is *detected* when an alarm starts inside its window ``[start, end]``;
  detection delay = that alarm's start - fault start;
* an alarm starting inside any fault window is a true alarm; one starting within
  ``grace`` after a fault ended is a *late* alarm (the process is still recovering:
  counted separately, neither true nor false); any other alarm is a false alarm;
* precision = true / (true + false) alarms, recall = detected / faults, F1 their
  harmonic mean; false alarms are also given per device-week;
* two rule-based baselines: the first sample outside the model's training normal
  range (0.1-99.9 %) inside the fault window (a strict limit at the edge of normal
  data), and, given a limits file, the first excursion the agent's own
  :class:`~agent.transforms.limits.LimitMonitor` raises with those GMP alert/action limits;
* row level, one row per scored window (one per resampling period; windows not scored, such
  as incomplete ones, are not rows): a row is *inside a fault* when its window ends inside a
  fault window, *in grace* when it ends within ``grace`` after one (not counted), else
  *normal*; an alarmed row inside a fault is a true positive, an alarmed normal row a false
  positive; false-alarm rate = false positives / normal rows, missed-alarm rate = false
  negatives / rows inside a fault (the figures the process-monitoring literature quotes);
* the delay comparison with the rules is paired: over the faults a rule limit caught,
  the model's median delay against the rules' median delay on those same faults (a
  fault the model missed counts as never detected, so it cannot flatter the model).

Communication faults (``comm_*``) change no process value and are excluded: they
surface as bad-quality readings, not anomalies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.core.records import Event, Quality, Value
from agent.core.stats import percentile
from agent.modeltools.csvdata import Dataset, FaultLabel
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.offline import OfflineResult, run_offline
from agent.transforms.anomaly.track import Settings
from agent.transforms.limits import LimitsConfig

WEEK = 7 * 86400.0


@dataclass
class DeviceResult:
    device: str
    result: OfflineResult
    faults: list[FaultLabel]
    data: Dataset


def _pct(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 1)


def _median_or_missed(values: list[float]) -> float | str | None:
    """Median delay where a miss is an infinite delay; "missed" when the median is a miss."""
    med = percentile(values, 0.5)
    if med is None:
        return None
    return "missed" if math.isinf(med) else round(med, 1)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _count_rows(rows: dict[str, int], result: OfflineResult, faults: list[FaultLabel], grace: float) -> None:
    """Adds the row-level confusion counts of one device (see the module docstring)."""
    scored = ~np.isnan(result.scores)
    ts, alarm = result.ts[scored], result.alarm[scored]
    inside = np.zeros(len(ts), bool)
    late = np.zeros(len(ts), bool)
    for f in faults:
        inside |= (ts >= f.start) & (ts <= f.end)
        late |= (ts > f.end) & (ts <= f.end + grace)
    late &= ~inside
    normal = ~inside & ~late
    rows["scored"] += len(ts)
    rows["grace"] += int(late.sum())
    rows["true_positive"] += int((alarm & inside).sum())
    rows["false_negative"] += int((~alarm & inside).sum())
    rows["false_positive"] += int((alarm & normal).sum())
    rows["true_negative"] += int((~alarm & normal).sum())


def first_limit_crossing(model: LoadedModel, data: Dataset, fault: FaultLabel) -> float | None:
    m = model.manifest
    lo = np.array([s.normal_low for s in m.signals])
    hi = np.array([s.normal_high for s in m.signals])
    inside = (data.ts >= fault.start) & (data.ts <= fault.end)
    vals = data.values[inside, : len(m.signals)]  # the model's inputs, not its envelope signals
    with np.errstate(invalid="ignore"):
        out = ((vals < lo) | (vals > hi)).any(axis=1)
    hits = np.flatnonzero(out)
    return float(data.ts[inside][hits[0]] - fault.start) if len(hits) else None


def limit_excursions(limits: LimitsConfig, device: str, data: Dataset) -> list[float]:
    """Start times of the excursions the agent's :class:`~agent.transforms.limits.LimitMonitor`
    raises on this series (the rule-based baseline), fed as the agent would feed it."""
    from agent.buffer.audit import Auditor
    from agent.core.driver import ProfileBase, TagBase
    from agent.core.records import Block
    from agent.transforms.limits import LimitMonitor

    profile = ProfileBase(profile="eval", protocol="csv", tags=[TagBase(name=s) for s in data.signals])
    # one limits file serves every evaluated device: particle rules apply to the device at hand
    limits = limits.model_copy(
        update={"particles": [p.model_copy(update={"device": device}) for p in limits.particles]}
    )
    starts: list[float] = []

    def collect(e: Event) -> None:
        if e.kind == "excursion" and e.data["phase"] == "start":
            starts.append(e.data["detected_ts"] / 1e9)  # when the rule could say so, not when the run began

    monitor = LimitMonitor(limits, {device: profile}, collect, Auditor(lambda e: None, "evaluate"))
    monitor._started = True
    units = [None] * len(data.signals)
    for ts, row in zip(data.ts, data.values.tolist(), strict=True):
        values: list[Value] = [None if math.isnan(v) else v for v in row]
        quality = None if None not in values else [Quality.BAD if v is None else Quality.GOOD for v in values]
        block = Block(device, "eval", int(ts * 1e9), data.signals, units, values, quality)
        monitor.on_committed([block], [])
    return starts


def evaluate(
    model: LoadedModel,
    data: dict[str, Dataset],
    labels: list[FaultLabel],
    *,
    grace: float = 1800.0,
    settings: Settings | None = None,
    limits: LimitsConfig | None = None,
    limit_data: dict[str, Dataset] | None = None,
) -> tuple[dict[str, Any], list[DeviceResult]]:
    """Metrics (see the module docstring). With ``limits`` (and ``limit_data``: every
    column of each device), the baseline also includes the first excursion of the
    configured rule-based limits inside each fault window."""
    settings = settings or Settings.of(model.manifest)
    per_device: list[DeviceResult] = []
    delays: list[float] = []
    baseline: list[float] = []
    rules: list[float] = []
    paired: list[tuple[float, float]] = []
    n_rules = 0
    per_kind: dict[str, dict[str, Any]] = {}
    n_true = n_false = n_late = n_faults = n_detected = 0
    rows = dict.fromkeys(
        ("scored", "grace", "true_positive", "false_positive", "false_negative", "true_negative"), 0
    )
    span = 0.0
    for device, ds in sorted(data.items()):
        faults = [f for f in labels if f.device == device and not f.kind.startswith("comm_")]
        result = run_offline(model, settings, ds.ts, ds.values)
        per_device.append(DeviceResult(device, result, faults, ds))
        span += float(ds.ts[-1] - ds.ts[0]) if len(ds.ts) else 0.0
        excursions = limit_excursions(limits, device, (limit_data or data)[device]) if limits else []
        starts = [t.ts for t in result.transitions if t.phase == "start"]
        _count_rows(rows, result, faults, grace)
        for s in starts:
            if any(f.start <= s <= f.end for f in faults):
                n_true += 1
            elif any(f.end < s <= f.end + grace for f in faults):
                n_late += 1
            else:
                n_false += 1
        for f in faults:
            n_faults += 1
            kind = per_kind.setdefault(f.kind, {"faults": 0, "detected": 0, "delays": [], "rule_delays": []})
            kind["faults"] += 1
            hit = next((s for s in starts if f.start <= s <= f.end), None)
            if hit is not None:
                n_detected += 1
                kind["detected"] += 1
                delays.append(hit - f.start)
                kind["delays"].append(hit - f.start)
            crossing = first_limit_crossing(model, ds, f)
            if crossing is not None:
                baseline.append(crossing)
            rule_hit = next((x for x in excursions if f.start <= x <= f.end), None)
            if rule_hit is not None:
                rules.append(rule_hit - f.start)
                kind["rule_delays"].append(rule_hit - f.start)
            if rule_hit is not None:
                paired.append((math.inf if hit is None else hit - f.start, rule_hit - f.start))
            if hit is not None and rule_hit is not None and hit < rule_hit:
                n_rules += 1
    precision = n_true / (n_true + n_false) if n_true + n_false else None
    recall = n_detected / n_faults if n_faults else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else None
    )
    metrics: dict[str, Any] = {
        "model": model.ident,
        "settings": {
            "threshold": settings.threshold,
            "raise_after": settings.raise_after,
            "clear_after": settings.clear_after,
        },
        "devices": len(data),
        "device_days": round(span / 86400, 3),
        "faults": n_faults,
        "detected": n_detected,
        "alarms": n_true + n_false + n_late,
        "true_alarms": n_true,
        "false_alarms": n_false,
        "late_alarms": n_late,
        "grace_s": grace,
        "precision": None if precision is None else round(precision, 4),
        "recall": None if recall is None else round(recall, 4),
        "f1": None if f1 is None else round(f1, 4),
        "false_alarms_per_device_week": round(n_false / (span / WEEK), 3) if span else None,
        "delay_median_s": _pct(delays, 0.5),
        "delay_p90_s": _pct(delays, 0.9),
        "baseline_limit_delay_median_s": _pct(baseline, 0.5),
        "baseline_limit_detected": len(baseline),
        "rule_limits_detected": len(rules) if limits else None,
        "rule_limits_delay_median_s": _pct(rules, 0.5),
        "model_earlier_than_rules": n_rules if limits else None,
        "paired_faults": len(paired) if limits else None,
        "paired_model_delay_median_s": _median_or_missed([m for m, _ in paired]),
        "paired_rule_delay_median_s": _pct([r for _, r in paired], 0.5),
        "rows": rows,
        "row_false_alarm_rate": _ratio(
            rows["false_positive"], rows["false_positive"] + rows["true_negative"]
        ),
        "row_missed_alarm_rate": _ratio(
            rows["false_negative"], rows["false_negative"] + rows["true_positive"]
        ),
        "per_kind": {
            k: {
                "faults": v["faults"],
                "detected": v["detected"],
                "delay_median_s": _pct(v["delays"], 0.5),
                "rule_limits_detected": len(v["rule_delays"]) if limits else None,
                "rule_limits_delay_median_s": _pct(v["rule_delays"], 0.5),
            }
            for k, v in sorted(per_kind.items())
        },
    }
    return metrics, per_device
