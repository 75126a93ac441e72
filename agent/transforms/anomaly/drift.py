"""Input drift: recent slot means against the training baseline of the manifest, so a model
that no longer sees the data it was trained on says so instead of scoring on quietly."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.transforms.anomaly.manifest import Manifest


@dataclass
class DriftChange:
    phase: Literal["start", "end"]
    ts: float
    signals: dict[str, dict[str, float]]
    """Per signal: ``shift_sigma`` and ``psi`` at the time of the change."""


class DriftMonitor:
    """Recent slot means vs the training baseline: mean shift in training σ and PSI.

    The window's sums and bin counts are kept up to date as slots enter and leave the
    ring, so a check costs O(signals x bins), not O(window): a thousand bindings checking
    in the same second stay cheap."""

    CHECK_EVERY = 60
    """Slots between drift evaluations (drift is slow; checking every slot is waste)."""

    def __init__(self, manifest: Manifest) -> None:
        self.m = manifest
        self.rows = max(2, int(manifest.drift.window / manifest.period))
        self._width = n = len(manifest.signals)
        self._ring = [math.nan] * (self.rows * n)
        """Row after row, flat: one list of floats instead of ``rows`` lists, which the garbage
        collector would walk through on every full collection (millions with many bindings)."""
        self._pos = 0
        self._since = 0
        self._edges = [s.bin_edges for s in manifest.signals]
        self._sum = [0.0] * n
        self._n = [0] * n
        self._bins = [[0] * len(s.bin_fractions) for s in manifest.signals]
        self.active = False
        self.last: dict[str, dict[str, float]] = {}

    def _put(self, row: list[float]) -> None:
        at = self._pos * self._width
        old = self._ring[at : at + self._width]
        self._ring[at : at + self._width] = row
        self._pos = (self._pos + 1) % self.rows
        for j, edges in enumerate(self._edges):
            x, y = old[j], row[j]
            if not math.isnan(x):
                self._sum[j] -= x
                self._n[j] -= 1
                self._bins[j][bisect.bisect_right(edges, x)] -= 1
            if not math.isnan(y):
                self._sum[j] += y
                self._n[j] += 1
                self._bins[j][bisect.bisect_right(edges, y)] += 1

    def add(self, ids: np.ndarray | list[int], means: np.ndarray | list[list[float]]) -> DriftChange | None:
        """Take newly closed slots: arrays, or the lists of the agent's per-tick path."""
        if len(ids) == 0:
            return None
        recent = means[-self.rows :]
        for row in recent.tolist() if isinstance(recent, np.ndarray) else recent:
            self._put(row)
        self._since += len(ids)
        if self._since < self.CHECK_EVERY:
            return None
        self._since = 0
        stats = self.measure()
        if stats is None:
            return None
        self.last = stats
        b = self.m.drift
        out = {k: v for k, v in stats.items() if v["shift_sigma"] > b.mean_shift_sigma or v["psi"] > b.psi}
        ts = float((ids[-1] + 1) * self.m.period)
        if bool(out) != self.active:
            self.active = bool(out)
            return DriftChange("start" if out else "end", ts, out or stats)
        return None

    def measure(self) -> dict[str, dict[str, float]] | None:
        """Per-signal drift statistics, or None while the window is too empty to judge."""
        out: dict[str, dict[str, float]] = {}
        for j, spec in enumerate(self.m.signals):
            n = self._n[j]
            if n < self.m.drift.min_fill * self.rows:
                return None
            shift = abs(self._sum[j] / n - spec.mean) / spec.std
            out[spec.name] = {
                "shift_sigma": round(shift, 3),
                "psi": round(psi(np.array(self._bins[j]) / n, spec.bin_fractions), 4),
            }
        return out


def psi(actual: np.ndarray, expected: list[float]) -> float:
    """Population stability index of observed bin fractions against the training ones."""
    a = np.clip(actual, 1e-4, None)
    e = np.clip(np.asarray(expected), 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))
