"""Tennessee Eastman (Braatz set) through ``models train`` / ``models score`` with defaults.

    python -m models.eval.datasets.tep --data /work/shared/datasets/tep_braatz [--method pca ...]

Protocol (the dataset's usual one): fit on ``d00.dat`` (500 normal rows, 52 signals, one every
3 min); for each test run ``dNN_te.dat`` (960 rows, fault from row 160) the detection rate on
rows 160-959 and the false-alarm rate on rows 0-159, and the false-alarm rate over ``d00_te.dat``.
Each variant (``before``: the calibration the tool had before issue 16, given as explicit flags;
``after``: today's defaults) is trained and scored in the same run. Writes
``models/eval/tep/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import sys
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

PERIOD = 180.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00Z, a multiple of the period: one row per slot
FAULT_ROW = 160
NAMES = [f"xmeas_{i}" for i in range(1, 42)] + [f"xmv_{i}" for i in range(1, 12)]
VARIANTS: dict[str, list[str]] = {
    "before": ["--calibration", "holdout", "--window", "30", "--raise-after", "3", "--clear-after", "6"],
    "after": [],
}
HERE = Path(__file__).resolve().parents[1] / "tep"
PUBLISHED: dict[str, Any] = {
    "source": "not quoted: no per-fault PCA T²/Q figure could be checked against Chiang, Russell & "
    "Braatz (2001) while writing this; compare with its tables by hand",
}


def load(path: Path, transposed: bool = False) -> np.ndarray:
    x = np.loadtxt(path)
    return x.T if transposed else x


def times(n: int) -> np.ndarray:
    return T0 + PERIOD * np.arange(n)


def run(data: Path, methods: list[str], variants: list[str]) -> dict[str, Any]:
    train_x = load(data / "d00.dat", transposed=True)
    tests = {f"d{k:02d}_te": load(data / f"d{k:02d}_te.dat") for k in range(22)}
    results: dict[str, Any] = {"protocol": __doc__.split("\n\n")[2] if __doc__ else "", "runs": {}}
    with scratch() as tmp:
        folder = Path(tmp)
        csv_path = folder / "d00.csv"
        write_csv(csv_path, times(len(train_x)), train_x, NAMES)
        for method in methods:
            for variant in variants:
                out = folder / f"{method}-{variant}"
                model = LoadedModel(train([csv_path], out, method, *VARIANTS[variant]))
                results["runs"][f"{method}/{variant}"] = score(model, tests)
    return results


def score(model: LoadedModel, tests: dict[str, np.ndarray]) -> dict[str, Any]:
    counts = Counts()
    per_fault: dict[str, Any] = {}
    far_rows = far_alarmed = 0
    for name, x in tests.items():
        alarm = row_alarms(model, times(len(x)), x)
        faulty = np.zeros(len(x), bool)
        if name != "d00_te":
            faulty[FAULT_ROW:] = True
            per_fault[name] = {
                "detection_rate": round(float(alarm[FAULT_ROW:].mean()), 4),
                "false_alarm_rate": round(float(alarm[:FAULT_ROW].mean()), 4),
            }
            far_rows += FAULT_ROW
            far_alarmed += int(alarm[:FAULT_ROW].sum())
        else:
            per_fault[name] = {"false_alarm_rate": round(float(alarm.mean()), 4)}
        counts.add(alarm, faulty)
    m = model.manifest
    return {
        **counts.metrics(),
        "false_alarm_rate_rows_0_159": round(far_alarmed / far_rows, 4),
        "false_alarm_rate_d00_te": per_fault["d00_te"]["false_alarm_rate"],
        "threshold": m.threshold,
        "raise_after": m.hysteresis.raise_after,
        "clear_after": m.hysteresis.clear_after,
        "window": m.window,
        "calibration": {k: v for k, v in m.validation.items() if k.startswith("cal")},
        "per_fault": per_fault,
    }


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    keys = list(runs)
    lines = [
        "# Tennessee Eastman (Braatz set): `models train` / `models score` with defaults",
        "",
        "Row-level figures in %. Written by `python -m models.eval.datasets.tep` "
        "(see `results.json` for thresholds and calibration).",
        "",
        "| | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for label, key in (
        ("F1 (all runs)", "f1"),
        ("false-alarm rate, rows 0-159", "false_alarm_rate_rows_0_159"),
        ("false-alarm rate, d00_te", "false_alarm_rate_d00_te"),
        ("missed-alarm rate (rows 160-959)", "missed_alarm_rate"),
    ):
        lines.append(f"| {label} | " + " | ".join(pct(runs[k][key]) for k in keys) + " |")
    lines.append(
        "| raise / clear after | "
        + " | ".join(f"{runs[k]['raise_after']} / {runs[k]['clear_after']}" for k in keys)
        + " |"
    )
    lines += ["", "Detection rate per fault (rows 160-959), %:", ""]
    lines.append("| fault | " + " | ".join(f"`{k}`" for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for k in range(1, 22):
        name = f"d{k:02d}_te"
        lines.append(
            f"| IDV {k} | "
            + " | ".join(pct(runs[r]["per_fault"][name]["detection_rate"]) for r in keys)
            + " |"
        )
    lines += ["", f"Published PCA T²/Q figures: {results['published']['source']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with d00.dat ... d21_te.dat")
    p.add_argument("--method", action="append", help=f"method(s) to evaluate (default: {', '.join(METHODS)})")
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    results = run(args.data, args.method or list(METHODS), args.variant or list(VARIANTS))
    results["published"] = PUBLISHED
    write_results(args.out, results, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
