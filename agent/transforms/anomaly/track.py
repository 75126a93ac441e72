"""One model on one data stream: windows -> (scores from the caller) -> hysteresis -> alarm
transitions. The agent (:mod:`agent.transforms.inference`) and ``models evaluate|score``
(:mod:`.offline`) both decide through :class:`Track`, so offline metrics describe exactly
what the agent does."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.transforms.anomaly.drift import DriftChange, DriftMonitor
from agent.transforms.anomaly.envelope import Envelope
from agent.transforms.anomaly.manifest import Manifest
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.windows import SlotAccumulator, Windower
from agent.transforms.debounce import Debounce

TOP_SIGNALS = 3
"""Contributing signals listed in an anomaly event."""

State = Literal["warming_up", "ok", "incomplete", "out_of_envelope", "alarm"]


@dataclass(frozen=True)
class Settings:
    """Decision settings: the manifest's, with a binding's overrides applied."""

    threshold: float
    raise_after: int
    clear_after: int
    min_completeness: float
    clear_ratio: float = 0.7

    @classmethod
    def of(cls, manifest: Manifest, **overrides: Any) -> Settings:
        def pick(name: str, default: Any) -> Any:
            value = overrides.get(name)
            return default if value is None else value

        return cls(
            threshold=float(pick("threshold", manifest.threshold)),
            raise_after=int(pick("raise_after", manifest.hysteresis.raise_after)),
            clear_after=int(pick("clear_after", manifest.hysteresis.clear_after)),
            min_completeness=float(pick("min_completeness", manifest.min_completeness)),
            clear_ratio=manifest.hysteresis.clear_ratio,
        )


@dataclass
class Ready:
    """Windows closed by one feed: per closed slot its state inputs, and the windows to score.

    Plain lists, not arrays: the agent closes one slot per binding per tick, and tiny
    arrays cost more to build and read back than the decisions they carry."""

    ids: list[int]
    """Slot id each window ends on."""
    completeness: list[float]
    warm: list[bool]
    scored: list[bool]
    """Which windows are in ``windows``."""
    windows: np.ndarray
    """float32 ``[j, W, S]`` filled windows to score."""
    in_envelope: list[bool]
    """Whether every slot of the window lies inside the model's operating envelope."""
    drift: list[DriftChange] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Transition:
    """An alarm starting or ending on one track."""

    phase: Literal["start", "end"]
    ts: float
    """End time of the window that changed the state (unix seconds)."""
    score: float
    peak_score: float
    started: float
    """When the alarm started (for ``end``: its duration is ``ts - started``)."""
    top: list[dict[str, Any]]
    """Signals contributing most at the peak: signal, contribution, value, normal range, unit."""


@dataclass
class Decision:
    """What :meth:`Track.decide` made of one :class:`Ready`. Lists, like :class:`Ready`: the
    agent only reads the transitions; :func:`.offline.run_offline` builds its series arrays once per chunk."""

    transitions: list[Transition]
    alarm: list[bool]
    """Alarm state after each window of the :class:`Ready` (for offline series)."""
    scores: list[float]
    """Score of each window (NaN when not scored)."""


class Track:
    """One model on one data stream: accumulate -> window -> (caller scores) -> decide.

    Split in two so the engine can score windows of many tracks of one model in one
    batched ``session.run``: :meth:`feed` yields windows, :meth:`decide` takes scores.
    """

    def __init__(self, model: LoadedModel, settings: Settings, drift: bool = True) -> None:
        m = model.manifest
        self.model = model
        self.settings = settings
        self.n = len(m.signals)
        names = m.data_names
        self.envelope = Envelope(m.envelope, names, m.window) if m.envelope else None
        self.acc = SlotAccumulator(m.period, len(names))
        self.win = Windower(m.window, model.mean, settings.min_completeness)
        self.drift = DriftMonitor(m) if drift else None
        self.debounce = Debounce(settings.raise_after, settings.clear_after)
        self.state: State = "warming_up"
        self.last_score: float | None = None
        self.last_completeness: float | None = None
        self.last_ts: float | None = None
        self.windows_scored = 0
        self.windows_incomplete = 0
        self.windows_out_of_envelope = 0
        self._peak = 0.0
        self._peak_top: list[dict[str, Any]] = []
        self._started = 0.0

    def feed(self, ts: np.ndarray, vals: np.ndarray) -> Ready:
        """Samples as arrays (``ts`` ``[n]``, ``vals`` ``[n, S + E]``: the model's inputs, then its
        envelope signals, :attr:`Manifest.data_names`); a few take :meth:`feed_rows`."""
        if len(ts) <= SlotAccumulator.SMALL:
            return self.feed_rows(ts.tolist(), vals.tolist())
        return self._ready(*self.acc.add(ts, vals))

    def feed_rows(self, ts: list[float], rows: list[list[float]]) -> Ready:
        """:meth:`feed` for samples as lists (the agent's commits): a few samples stay plain
        floats from the commit to the window, more take the vectorised path like :meth:`feed`."""
        if len(ts) > SlotAccumulator.SMALL:
            vals = np.array(rows, dtype=np.float64).reshape(len(ts), self.acc.n)
            return self._ready(*self.acc.add(np.array(ts, dtype=np.float64), vals))
        ids, means = self.acc.add_rows(ts, rows)
        if self.envelope is None:
            return self._drift(Ready(ids, *self.win.push_rows(ids, means), [True] * len(ids)), ids, means)
        inside, eligible = self.envelope.check(ids, means)
        n = self.n
        model_means = [row[:n] for row in means]
        ready = Ready(ids, *self.win.push_rows(ids, model_means, eligible), eligible)
        kept = [i for i, ok in enumerate(inside) if ok]
        return self._drift(ready, [ids[i] for i in kept], [model_means[i] for i in kept])

    def flush(self) -> Ready:
        return self._ready(*self.acc.flush())

    def _ready(self, ids: np.ndarray, means: np.ndarray) -> Ready:
        id_list = ids.tolist()
        if self.envelope is None:
            completeness, warm, scored, windows = self.win.push(ids, means)
            ready = Ready(
                id_list, completeness.tolist(), warm.tolist(), scored.tolist(), windows, [True] * len(ids)
            )
            return self._drift(ready, ids, means)
        inside, eligible = self.envelope.check(id_list, means.tolist())
        model_means = means[:, : self.n]
        completeness, warm, scored, windows = self.win.push(ids, model_means, np.array(eligible, dtype=bool))
        ready = Ready(id_list, completeness.tolist(), warm.tolist(), scored.tolist(), windows, eligible)
        keep = np.array(inside, dtype=bool)
        return self._drift(ready, ids[keep], model_means[keep])

    def _drift(
        self, ready: Ready, ids: np.ndarray | list[int], means: np.ndarray | list[list[float]]
    ) -> Ready:
        """Drift compares inputs inside the envelope only: the training data lay inside it."""
        if self.drift is not None:
            change = self.drift.add(ids, means)
            if change is not None:
                ready.drift.append(change)
        return ready

    def decide(self, ready: Ready, scores: np.ndarray, contribs: np.ndarray) -> Decision:
        period = self.model.manifest.period
        thr, clear = self.settings.threshold, self.settings.threshold * self.settings.clear_ratio
        score_list = scores.tolist()
        alarm: list[bool] = []
        all_scores: list[float] = []
        transitions: list[Transition] = []
        j = 0
        for sid, completeness, warm, scored, inside in zip(
            ready.ids, ready.completeness, ready.warm, ready.scored, ready.in_envelope, strict=True
        ):
            ts = (sid + 1) * period
            self.last_completeness, self.last_ts = completeness, ts
            if not scored:
                if not inside:
                    self.state = "out_of_envelope"
                    self.windows_out_of_envelope += 1
                else:
                    self.state = "incomplete" if warm else "warming_up"
                    self.windows_incomplete += warm
                alarm.append(self.debounce.active)
                all_scores.append(math.nan)
                continue
            score = score_list[j]
            self.last_score = score
            self.windows_scored += 1
            change = self.debounce.update(score > (clear if self.debounce.active else thr))
            if self.debounce.active and (change or score > self._peak):
                if change:
                    self._started = ts
                self._peak = score
                self._peak_top = self._top(contribs[j], ready.windows[j][-1])
            if change is True:
                transitions.append(Transition("start", ts, score, self._peak, self._started, self._peak_top))
            elif change is False:
                transitions.append(Transition("end", ts, score, self._peak, self._started, self._peak_top))
                self._peak = 0.0
            self.state = "alarm" if self.debounce.active else "ok"
            alarm.append(self.debounce.active)
            all_scores.append(score)
            j += 1
        return Decision(transitions, alarm, all_scores)

    def _top(self, contrib: np.ndarray, last: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for s in np.argsort(contrib)[::-1][:TOP_SIGNALS]:
            spec = self.model.manifest.signals[s]
            out.append(
                {
                    "signal": spec.name,
                    "contribution": round(float(contrib[s]), 4),
                    "value": round(float(last[s]), 6),
                    "normal_range": [spec.normal_low, spec.normal_high],
                    "unit": spec.unit,
                }
            )
        return out
