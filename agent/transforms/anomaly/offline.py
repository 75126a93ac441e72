"""A whole recorded series through the agent's own path, for ``models evaluate|score``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.track import Ready, Settings, Track, Transition


@dataclass
class OfflineResult:
    ts: np.ndarray
    """Window end times (unix seconds)."""
    scores: np.ndarray
    alarm: np.ndarray
    top_signal: np.ndarray
    """Index of the top contributing signal per window (-1 when not scored)."""
    transitions: list[Transition]


def run_offline(model: LoadedModel, settings: Settings, ts: np.ndarray, vals: np.ndarray) -> OfflineResult:
    """Score a whole series through the agent's path, in chunks (bounded memory)."""
    track = Track(model, settings, drift=False)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    transitions: list[Transition] = []
    for ready in _chunks(track, ts, vals):
        scores, contribs = model.score(ready.windows)
        decision = track.decide(ready, scores, contribs)
        transitions += decision.transitions
        top = np.full(len(ready), -1)
        top[np.array(ready.scored, dtype=bool)] = contribs.argmax(axis=1)
        ids = np.array(ready.ids, dtype=np.int64)
        parts.append((ids, np.array(decision.scores, float), np.array(decision.alarm, bool), top))

    def cat(i: int, dtype: Any) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype)

    return OfflineResult(
        ts=(cat(0, np.int64) + 1) * model.manifest.period,
        scores=cat(1, float),
        alarm=cat(2, bool),
        top_signal=cat(3, int),
        transitions=transitions,
    )


def _chunks(track: Track, ts: np.ndarray, vals: np.ndarray, rows: int = 50_000) -> Iterator[Ready]:
    for i in range(0, len(ts), rows):
        yield track.feed(ts[i : i + rows], vals[i : i + rows])
    yield track.flush()
