"""Evaluation plots and the HTML evaluation report (``models evaluate --plots|--report``).

The report is what a reviewer signs a model off on, so it shows the evidence, not only the
figures: each device's signals with the labelled faults and the detected alarms over them, the
score against the threshold, the per-signal contributions of the worst alarms, and the
confusion counts :func:`agent.modeltools.evaluate.evaluate` computed (event level and row
level). One folder holds ``report.html`` and its PNGs side by side, so it can be archived with
the model or opened offline as it is: no script, no external URL.

Plotting needs matplotlib (the ``train`` extra); without it the command says what to install.
Every value that comes from data (device ids, signal names, units, fault kinds) is escaped in
the HTML and never used as a file name.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from agent.modeltools.evaluate import DeviceResult
from agent.transforms.anomaly.manifest import ModelError, approval_summary
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.track import Settings, Track
from cleanroom_common.plotting import agg_pyplot

EXTRA = "pip install 'cleanroom-edge[train]'"
WORST_EVENTS = 5
"""Alarms whose contributions the report plots (the highest peak scores)."""
MAX_POINTS = 2000
"""Points per plotted line: longer series are drawn as per-bucket min/max bands, so a spike
stays visible and a 10-day run still renders in a second."""
CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:2em;color:#111;max-width:75em}
h1{font-size:20px}h2{font-size:15px;margin-top:1.6em;border-bottom:1px solid #999}h3{font-size:13px}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}
th{background:#eee}img{max-width:100%}
"""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on a CI machine), or a
    :class:`ModelError` that names the extra to install."""
    try:
        return agg_pyplot()
    except ImportError:
        raise ModelError(f"plots and reports need matplotlib (the 'train' extra): {EXTRA}") from None


def require_matplotlib() -> None:
    """Fail before minutes of scoring, not after them, when the report could not be drawn."""
    pyplot()


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    ongoing: bool = False
    """An alarm still active when the data end (``end`` is the last window)."""


@dataclass(frozen=True)
class WorstEvent:
    """One alarm, with every signal's contribution in its peak window (largest first)."""

    device: str
    start: float
    end: float | None
    """None: still active when the data end."""
    peak_ts: float
    peak_score: float
    contributions: list[tuple[str, float]]


def alarm_intervals(r: DeviceResult) -> list[Interval]:
    """Detected intervals from the alarm transitions; one still active runs to the data's end."""
    out, start = [], None
    for t in r.result.transitions:
        if t.phase == "start":
            start = t.ts
        elif start is not None:
            out.append(Interval(start, t.ts))
            start = None
    if start is not None:
        out.append(Interval(start, float(r.result.ts[-1]), ongoing=True))
    return out


def peak_contributions(model: LoadedModel, r: DeviceResult, peak_ts: float) -> list[tuple[str, float]]:
    """Every signal's contribution in the window ending at ``peak_ts``, rescored through the
    agent's own path on just the rows that window covers (events keep only their top signals)."""
    m = model.manifest
    span = (m.window + 2) * m.period
    rows = (r.data.ts > peak_ts - span) & (r.data.ts <= peak_ts)
    track = Track(model, Settings.of(m), drift=False)
    readies = [track.feed(r.data.ts[rows], r.data.values[rows]), track.flush()]
    for ready in readies:
        ends = [(i + 1) * m.period for i, s in zip(ready.ids, ready.scored, strict=True) if s]
        if not ends:
            continue
        _, contribs = model.score(ready.windows)
        j = int(np.argmin(np.abs(np.array(ends) - peak_ts)))
        if math.isclose(ends[j], peak_ts):
            pairs = zip(m.signal_names, contribs[j].tolist(), strict=True)
            return sorted(((n, float(c)) for n, c in pairs), key=lambda p: -p[1])
    return []


def worst_events(model: LoadedModel, results: list[DeviceResult], n: int = WORST_EVENTS) -> list[WorstEvent]:
    """The ``n`` alarms with the highest peak score, over every device."""
    found: list[tuple[float, float, DeviceResult, Interval]] = []
    for r in results:
        for iv in alarm_intervals(r):
            inside = (r.result.ts >= iv.start) & (r.result.ts <= iv.end)
            scores = np.where(inside, r.result.scores, -np.inf)
            if not np.isfinite(scores).any():
                continue
            k = int(np.nanargmax(scores))
            found.append((float(scores[k]), float(r.result.ts[k]), r, iv))
    found.sort(key=lambda f: -f[0])
    out = []
    for score, ts, r, iv in found[:n]:
        contributions = peak_contributions(model, r, ts)
        out.append(WorstEvent(r.device, iv.start, None if iv.ongoing else iv.end, ts, score, contributions))
    return out


def _bands(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time, low, high) per bucket of at most ``len(t) / MAX_POINTS`` samples."""
    if len(t) <= MAX_POINTS:
        return t, y, y
    size = math.ceil(len(t) / MAX_POINTS)
    pad = (-len(t)) % size
    tt = np.concatenate([t, np.full(pad, t[-1])]).reshape(-1, size)
    yy = np.concatenate([y, np.full(pad, np.nan)]).reshape(-1, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-gap bucket is NaN, which is right
        return tt[:, 0], np.nanmin(yy, axis=1), np.nanmax(yy, axis=1)


def _shade(ax: Any, t0: float, faults: list[Interval], alarms: list[Interval]) -> None:
    for f in faults:
        ax.axvspan((f.start - t0) / 3600, (f.end - t0) / 3600, color="tab:orange", alpha=0.3, lw=0)
    for a in alarms:
        ax.axvspan((a.start - t0) / 3600, (a.end - t0) / 3600, ymax=0.08, color="tab:red", alpha=0.8, lw=0)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def score_figure(model: LoadedModel, r: DeviceResult, threshold: float, path: Path) -> Path:
    """Score over time against the threshold, faults shaded, detected intervals marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    t0 = float(r.data.ts[0]) if len(r.data.ts) else 0.0
    t, lo, hi = _bands(r.result.ts, r.result.scores)
    hours = (t - t0) / 3600
    ax.fill_between(hours, lo, hi, color="tab:blue", lw=0.6, step="mid")
    ax.plot(hours, hi, lw=0.6, color="tab:blue", label="score")
    ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label="threshold")
    _shade(ax, t0, [Interval(f.start, f.end) for f in r.faults], alarm_intervals(r))
    for f in r.faults:
        ax.text((f.start - t0) / 3600, threshold, f.kind, fontsize=7, rotation=90, va="bottom")
    ax.set_yscale("symlog", linthresh=max(threshold, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("hours")
    m = model.manifest
    ax.set_title(f"{m.id} {m.version} on {r.device}: labelled faults orange, detected alarms red")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, path)


def signals_figure(model: LoadedModel, r: DeviceResult, path: Path) -> Path:
    """One panel per model input over the training normal range, faults and alarms shaded."""
    plt = pyplot()
    specs = model.manifest.signals
    fig, axes = plt.subplots(len(specs), 1, sharex=True, figsize=(11, 0.9 * len(specs) + 0.8), squeeze=False)
    t0 = float(r.data.ts[0]) if len(r.data.ts) else 0.0
    faults, alarms = [Interval(f.start, f.end) for f in r.faults], alarm_intervals(r)
    for k, (ax, spec) in enumerate(zip(axes[:, 0], specs, strict=True)):
        t, lo, hi = _bands(r.data.ts, r.data.values[:, k])
        hours = (t - t0) / 3600
        ax.fill_between(hours, lo, hi, color="tab:blue", lw=0.5, step="mid")
        ax.plot(hours, hi, lw=0.5, color="tab:blue")
        ax.axhspan(spec.normal_low, spec.normal_high, color="tab:green", alpha=0.08, lw=0)
        _shade(ax, t0, faults, alarms)
        label = spec.name if spec.unit is None else f"{spec.name} ({spec.unit})"
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("hours")
    axes[0, 0].set_title(
        f"{r.device}: inputs (training normal range green), labelled faults orange, detected alarms red",
        fontsize=8,
    )
    fig.tight_layout()
    return _save(plt, fig, path)


def contributions_figure(event: WorstEvent, path: Path) -> Path:
    plt = pyplot()
    names = [n for n, _ in event.contributions][::-1]
    values = [c for _, c in event.contributions][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(names) + 1.0))
    ax.barh(names, values, color="tab:purple")
    ax.set_xlabel("contribution to the score at the peak")
    ax.tick_params(labelsize=7)
    ax.set_title(f"{event.device} at {_iso(event.peak_ts)}, peak score {event.peak_score:.4g}", fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def _folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{path}: cannot create the folder: {exc.strerror or exc}") from None


def plot(model: LoadedModel, results: list[DeviceResult], out_dir: Path, threshold: float) -> list[Path]:
    """``--plots``: one score PNG per device, named after the device (the model cards link them)."""
    _folder(out_dir)
    return [score_figure(model, r, threshold, out_dir / f"{r.device}.png") for r in results]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(head: list[str] | None, rows: list[list[Any]]) -> str:
    h = "" if head is None else "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in head) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{h}{body}</table>"


def _img(path: Path, alt: str) -> str:
    return f'<figure><img src="{escape(path.name)}" alt="{escape(alt)}"></figure>'


def write_report(
    model: LoadedModel, metrics: dict[str, Any], results: list[DeviceResult], out_dir: Path
) -> Path:
    """``out_dir/report.html`` and its PNGs; returns the HTML's path."""
    _folder(out_dir)
    m = model.manifest
    threshold = float(metrics["settings"]["threshold"])
    title = f"Evaluation of model {m.id} {m.version}"
    rows = metrics["rows"]
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><h1>{escape(title)}</h1>",
        "<h2>Model</h2>",
        _table(
            None,
            [
                ["manifest", model.manifest_path.name],
                ["method", m.method],
                ["ONNX sha256", m.sha256],
                ["signals", ", ".join(m.signal_names)],
                ["threshold", threshold],
                [
                    "raise after / clear after",
                    f"{metrics['settings']['raise_after']} / {metrics['settings']['clear_after']} windows",
                ],
                [
                    "training data",
                    f"{m.provenance.source} ({m.provenance.start} to {m.provenance.end}, "
                    f"sha256 {m.provenance.data_sha256})",
                ],
                ["approval", approval_summary(m)],
            ],
        ),
        "<h2>Confusion counts</h2>",
        "<h3>Event level: faults and alarms</h3>",
        _table(
            ["", "count"],
            [
                ["faults", metrics["faults"]],
                ["faults detected (an alarm started inside)", metrics["detected"]],
                ["faults missed", metrics["faults"] - metrics["detected"]],
                ["true alarms (started inside a fault)", metrics["true_alarms"]],
                ["false alarms", metrics["false_alarms"]],
                [f"late alarms (within {metrics['grace_s']:g} s after a fault)", metrics["late_alarms"]],
            ],
        ),
        _table(
            ["precision", "recall", "F1", "false alarms per device-week", "delay median (s)"],
            [
                [
                    metrics["precision"],
                    metrics["recall"],
                    metrics["f1"],
                    metrics["false_alarms_per_device_week"],
                    metrics["delay_median_s"],
                ]
            ],
        ),
        "<h3>Row level: scored windows</h3>",
        _table(
            ["", "alarm", "no alarm"],
            [
                ["inside a fault", rows["true_positive"], rows["false_negative"]],
                ["normal", rows["false_positive"], rows["true_negative"]],
            ],
        ),
        _table(
            [
                "scored windows",
                "in a recovery grace period (not counted)",
                "false-alarm rate",
                "missed-alarm rate",
            ],
            [
                [
                    rows["scored"],
                    rows["grace"],
                    metrics["row_false_alarm_rate"],
                    metrics["row_missed_alarm_rate"],
                ]
            ],
        ),
        "<h3>Per fault kind</h3>",
        _table(
            ["fault kind", "faults", "detected", "delay median (s)"],
            [[k, v["faults"], v["detected"], v["delay_median_s"]] for k, v in metrics["per_kind"].items()],
        ),
    ]
    events = worst_events(model, results)
    parts.append(f"<h2>Worst alarms ({len(events)} with the highest peak scores)</h2>")
    if not events:
        parts.append("<p>No alarm was raised.</p>")
    for n, e in enumerate(events, 1):
        end = "active when the data end" if e.end is None else _iso(e.end)
        parts.append(
            f"<h3>{n}. {escape(e.device)}: {escape(_iso(e.start))} to {escape(end)}, "
            f"peak score {e.peak_score:.4g} at {escape(_iso(e.peak_ts))}</h3>"
        )
        if e.contributions:
            parts.append(
                _img(contributions_figure(e, out_dir / f"event-{n}-contributions.png"), "contributions")
            )
            top = [[s, c] for s, c in e.contributions[:5]]
            parts.append(_table(["signal", "contribution"], top))
    parts.append("<h2>Devices</h2>")
    for n, r in enumerate(results, 1):
        faults = [[f.kind, _iso(f.start), _iso(f.end)] for f in r.faults]
        alarms = [[_iso(a.start), _iso(a.end)] for a in alarm_intervals(r)]
        parts += [
            f"<h3>{escape(r.device)} ({escape(Path(r.data.source).name)})</h3>",
            _img(
                score_figure(model, r, threshold, out_dir / f"device-{n}-score.png"), f"score of {r.device}"
            ),
            _img(signals_figure(model, r, out_dir / f"device-{n}-signals.png"), f"signals of {r.device}"),
            _table(["labelled fault", "start", "end"], faults) if faults else "<p>No labelled fault.</p>",
            _table(["detected alarm start", "end"], alarms) if alarms else "<p>No alarm.</p>",
        ]
    parts.append("</body></html>\n")
    path = out_dir / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
