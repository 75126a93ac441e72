"""LBNL air-handling-unit fault data through ``models train`` / ``models score`` with defaults.

    python -m models.eval.datasets.lbnl_ahu --data /work/shared/datasets/lbnl_ahu_fdd [--method pca ...]

Protocol (fixed before looking at results; the labels are per day and no published baseline
exists): per unit file, the normal days in date order are split alternately, the 1st, 3rd, ...
for training (one CSV, gaps between the days as recorded) and the 2nd, 4th, ... held out; every
faulted day is a test day. Row level: every row of a faulted day counts as faulty. Day level: a
day is flagged when more than :data:`DAY_SHARE` of its rows are in alarm. A unit with a single
normal day trains on it and has no false-alarm figure. Each variant (``before``: the calibration
before issue 16, as explicit flags; ``after``: today's defaults) is trained and scored in the same
run. Writes ``models/eval/lbnl_ahu/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a plain script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from agent.transforms.anomaly.model import LoadedModel
from models.eval.datasets.common import (
    METHODS,
    Counts,
    pct,
    row_alarms,
    scratch,
    train,
    write_csv,
    write_results,
)

LABEL = "Fault Detection Ground Truth"
UNITS = ("SZCAV", "SZVAV", "MZVAV-2-1", "MZVAV-2-2")
DAY_SHARE = 0.05
VARIANTS: dict[str, list[str]] = {
    "before": ["--calibration", "holdout", "--window", "30", "--raise-after", "3", "--clear-after", "6"],
    "after": [],
}
HERE = Path(__file__).resolve().parents[1] / "lbnl_ahu"


def load(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(unix seconds, values, signal names, faulty per row); columns empty in most rows dropped."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    head = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    ts = np.array([datetime.strptime(r[0], "%m/%d/%Y %H:%M").replace(tzinfo=UTC).timestamp() for r in body])
    li = head.index(LABEL)
    cols = [i for i in range(1, len(head)) if i != li]
    vals = np.array([[_number(r[i]) for i in cols] for r in body])
    keep = np.mean(np.isnan(vals), axis=0) < 0.5
    faulty = np.array([r[li].strip() == "1" for r in body])
    names = [head[i].removeprefix("AHU: ").strip() for i, k in zip(cols, keep, strict=True) if k]
    return ts, vals[:, keep], names, faulty


def _number(cell: str) -> float:
    """A cell's value; empty and spreadsheet errors (``#VALUE!``) are missing."""
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def run(data: Path, methods: list[str], variants: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"day_share": DAY_SHARE, "units": {}}
    with scratch() as tmp:
        folder = Path(tmp)
        for unit in UNITS:
            ts, vals, names, faulty = load(data / f"{unit}.csv")
            day = np.floor(ts / 86400).astype(np.int64)
            days = sorted(set(day.tolist()))
            normal = [d for d in days if not faulty[day == d].any()]
            train_days = normal[::2]
            test_days = [d for d in days if d not in train_days]
            tr = np.isin(day, train_days)
            csv_path = folder / f"{unit}.csv"
            write_csv(csv_path, ts[tr], vals[tr], [n.replace(",", " ") for n in names])
            unit_out: dict[str, Any] = {
                "signals": len(names),
                "train_days": len(train_days),
                "held_out_normal_days": len(normal) - len(train_days),
                "faulted_days": len(days) - len(normal),
                "runs": {},
            }
            for method in methods:
                for variant in variants:
                    out = folder / f"{unit}-{method}-{variant}"
                    try:
                        manifest = train([csv_path], out, method, *VARIANTS[variant])
                    except SystemExit as exc:
                        unit_out["runs"][f"{method}/{variant}"] = {"error": str(exc)}
                        continue
                    model = LoadedModel(manifest)
                    unit_out["runs"][f"{method}/{variant}"] = score(model, ts, vals, day, faulty, test_days)
            results["units"][unit] = unit_out
    return results


def score(
    model: LoadedModel, ts: np.ndarray, vals: np.ndarray, day: np.ndarray, faulty: np.ndarray, days: list[int]
) -> dict[str, Any]:
    counts = Counts()
    day_counts = Counts()
    for d in days:
        sel = day == d
        alarm = row_alarms(model, ts[sel], vals[sel])
        counts.add(alarm, faulty[sel])
        day_counts.add(np.array([alarm.mean() > DAY_SHARE]), np.array([faulty[sel].any()]))
    m = model.manifest
    return {
        **counts.metrics(),
        "days": {
            "flagged_faulted": day_counts.tp,
            "missed_faulted": day_counts.fn,
            "flagged_normal": day_counts.fp,
            "quiet_normal": day_counts.tn,
        },
        "threshold": m.threshold,
        "raise_after": m.hysteresis.raise_after,
        "clear_after": m.hysteresis.clear_after,
        "calibration": {k: v for k, v in m.validation.items() if k.startswith("cal")},
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "# LBNL AHU fault data: `models train` / `models score` with defaults",
        "",
        "Row-level figures in %; days: faulted days flagged / faulted days, normal days flagged / "
        f"held-out normal days (a day is flagged above {DAY_SHARE:.0%} of its rows in alarm). Written by "
        "`python -m models.eval.datasets.lbnl_ahu`; no published baseline exists for this data.",
        "",
        "| unit | run | F1 | false alarms | missed alarms | faulted days flagged | normal days flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for unit, u in results["units"].items():
        for run_name, r in u["runs"].items():
            if "error" in r:
                lines.append(f"| {unit} | `{run_name}` | refused: {r['error']} | | | | |")
                continue
            d = r["days"]
            faulted = f"{d['flagged_faulted']}/{d['flagged_faulted'] + d['missed_faulted']}"
            normal = f"{d['flagged_normal']}/{d['flagged_normal'] + d['quiet_normal']}"
            lines.append(
                f"| {unit} | `{run_name}` | {pct(r['f1'])} | {pct(r['false_alarm_rate'])} | "
                f"{pct(r['missed_alarm_rate'])} | {faulted} | {normal} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with SZCAV.csv, SZVAV.csv, MZVAV-2-*.csv")
    p.add_argument("--method", action="append", help=f"method(s) to evaluate (default: {', '.join(METHODS)})")
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    results = run(args.data, args.method or list(METHODS), args.variant or list(VARIANTS))
    write_results(args.out, results, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
