"""Ground truth: run a scenario with no protocols, as fast as the models go, to CSV + labels.

Output (one directory per run):

* ``<device>.csv`` per device. Bioreactors and incubators: one row every ``period_s``
  of simulated time; particle counters: one row per stored sample record. First
  column ``timestamp`` = simulated Unix seconds (UTC); then every signal, then every
  status bit as 0/1. Numbers are written with 10 significant digits, so equal inputs
  give byte-identical files.
* ``labels.csv``: ``kind,device,start,end`` for every fault occurrence, Unix seconds,
  clipped to the run.

The models step at their own internal step (1 s by default) whatever ``period_s`` is;
``period_s`` only sets how often a row is written.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from simulators.process.base import ProcessModel
from simulators.process.particle_counter import ParticleCounter, SampleRecord
from simulators.process.scenario import Scenario, load_scenario

RECORD_FIELDS = (
    "timestamp_s",
    "index",
    "sample_time_s",
    "volume_l",
    "flow_lpm",
    "laser_ok",
    "flow_ok",
    "overflow",
    "service",
    "threshold_high",
)


def _fmt(v: float | int | bool) -> str:
    if isinstance(v, bool | int):
        return str(int(v))
    return f"{v:.10g}"


def _sampled_rows(model: ProcessModel, t0: float, hours: float, period_s: float) -> Iterator[list[str]]:
    n = round(hours * 3600.0 / period_s)
    for k in range(n + 1):
        t = t0 + k * period_s
        model.advance(t)
        row = [_fmt(t)]
        row += [_fmt(v) for v in model.signals().values()]
        row += [_fmt(v) for v in model.status().values()]
        yield row


def _record_rows(model: ParticleCounter, t0: float, hours: float) -> Iterator[list[str]]:
    """Drain the rotating buffer in chunks shorter than it, so no record is lost on long runs."""
    p = model.params
    chunk = 0.5 * p.buffer_size * (p.sample + p.hold)
    end = t0 + hours * 3600.0
    last = -1
    t = t0
    while t < end:
        t = min(end, t + chunk)
        model.advance(t)
        for r in model.records_since(last):
            last = r.index
            yield _record_row(r)


def _record_row(r: SampleRecord) -> list[str]:
    row = [_fmt(r.sim_end_s)] + [_fmt(getattr(r, f)) for f in RECORD_FIELDS]
    row += [_fmt(c) for c in r.counts]
    row += [_fmt(r.temperature_c), _fmt(r.rh_pct)]
    return row


def _header(model: ProcessModel) -> list[str]:
    if isinstance(model, ParticleCounter):
        counts = [f"count_{k}" for k in model.channel_keys]
        return ["timestamp", "device_timestamp", *RECORD_FIELDS[1:], *counts, "temperature_c", "rh_pct"]
    return ["timestamp", *model.signals(), *model.status()]


def generate(
    scenario: str | Path | Scenario,
    hours: float,
    seed: int,
    out_dir: str | Path,
    period_s: float = 60.0,
) -> list[Path]:
    """Write ``<device>.csv`` for every device and ``labels.csv``; return the paths written.

    Bad input (unreadable scenario, non-positive hours or period) raises ``ValueError``.
    """
    scn = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    if hours <= 0:
        raise ValueError("hours must be positive")
    if period_s <= 0:
        raise ValueError("period_s must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = scn.start
    written = []
    for device_id, model in scn.build(seed=seed, start_time_s=t0).items():
        path = out / f"{device_id}.csv"
        rows = (
            _record_rows(model, t0, hours)
            if isinstance(model, ParticleCounter)
            else _sampled_rows(model, t0, hours, period_s)
        )
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(_header(model))
            w.writerows(rows)
        written.append(path)
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["kind", "device", "start", "end"])
        for lab in scn.labels(start_time_s=t0, end_s=t0 + hours * 3600.0):
            w.writerow([lab.kind, lab.device, _fmt(lab.start), _fmt(lab.end)])
    written.append(labels_path)
    return written
