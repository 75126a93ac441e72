"""Shared parts of the dataset evaluations: train through ``cleanroom-agent models train``
(the CLI, so its defaults are what is measured), score through the agent's own offline path
(what ``models score`` runs) and row-level metrics.

Row-level, like the public benchmarks: a row is alarmed when the agent's alarm state is on
in the slot holding it; rows the model has not scored yet (the first window of a series)
count as not alarmed, as the agent would have raised nothing there.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.cli import main as agent_main
from agent.modeltools.csvdata import iso
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.offline import run_offline
from agent.transforms.anomaly.track import Settings

METHODS = ("pca", "iforest", "autoencoder")
"""Methods evaluated by default (any ``models train --method`` works with ``--method``)."""


@dataclass
class Counts:
    """Confusion counts of alarmed rows against labelled rows."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, alarm: np.ndarray, faulty: np.ndarray) -> None:
        self.tp += int(np.sum(alarm & faulty))
        self.fp += int(np.sum(alarm & ~faulty))
        self.fn += int(np.sum(~alarm & faulty))
        self.tn += int(np.sum(~alarm & ~faulty))

    def metrics(self) -> dict[str, float | None]:
        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        f1 = ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        return {
            "f1": f1,
            "false_alarm_rate": ratio(self.fp, self.fp + self.tn),
            "missed_alarm_rate": ratio(self.fn, self.fn + self.tp),
        }


def write_csv(path: Path, ts: np.ndarray, values: np.ndarray, names: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *names])
        for t, row in zip(ts.tolist(), values.tolist(), strict=True):
            w.writerow([iso(t), *("" if np.isnan(v) else repr(v) for v in row)])


def train(csvs: list[Path], out: Path, method: str, *extra: str) -> Path:
    """``cleanroom-agent models train`` with its defaults (plus ``extra`` flags): the manifest path."""
    args = ["--log-level", "WARNING", "models", "train", "--method", method, "--id", f"eval-{method}"]
    for c in csvs:
        args += ["--csv", str(c)]
    args += ["--out", str(out), *extra]
    code = agent_main(args)
    if code != 0:
        raise SystemExit(f"models train failed ({code}): {' '.join(args)}")
    return out / f"eval-{method}.model.yaml"


def row_alarms(model: LoadedModel, ts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Alarm state per row through the agent's scoring path (``models score``)."""
    r = run_offline(model, Settings.of(model.manifest), ts, values)
    period = model.manifest.period
    slot = np.floor(ts / period).astype(np.int64)
    win_slot = np.round(r.ts / period).astype(np.int64) - 1
    on = dict(zip(win_slot.tolist(), r.alarm.tolist(), strict=True))
    return np.array([on.get(s, False) for s in slot.tolist()], dtype=bool)


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="cleanroom-eval-")


def write_results(folder: Path, results: dict[str, Any], table: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "results.md").write_text(table)
    print(table, file=sys.stdout)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"
