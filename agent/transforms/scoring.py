"""The one windowing -> scoring -> hysteresis path, shared by the agent
(:mod:`agent.transforms.inference`) and by ``models evaluate|score``, so offline metrics describe
exactly what the agent does.

Samples are resampled onto the model's period: a *slot* is the mean of the good
samples in one period (missing when there are none). A window is the last ``W`` slots.
Incomplete-window policy: a window is scored only when at least ``min_completeness``
of its (slot, signal) cells hold data; gaps are then filled forward (leading gaps with
the training mean). Unscored windows neither raise nor clear an alarm, and the state
shows ``incomplete`` so nobody mistakes silence for health. After start, or after a gap
longer than a window, the track is ``warming_up`` until a full window has elapsed.

Operating envelope (``Manifest.envelope``): a window is scored only when each of its slots
lies inside the envelope (an unknown envelope signal counts as outside), so a model is
never asked about a state it was not built for; the state is then ``out_of_envelope``,
which, like an incomplete window, neither raises nor clears an alarm.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.transforms.manifest import EnvelopeCondition, Manifest, ModelError, verify

CHUNK = 4096
"""Windows per ``session.run`` offline (bounds memory on long histories)."""
TOP_SIGNALS = 3
"""Contributing signals listed in an anomaly event."""

State = Literal["warming_up", "ok", "incomplete", "out_of_envelope", "alarm"]


class LoadedModel:
    """A verified manifest and one onnxruntime session for it (shared by all its bindings)."""

    def __init__(self, manifest_path: Path) -> None:
        self.manifest_path = manifest_path
        self.manifest: Manifest
        self.manifest, self.onnx_path, data = verify(manifest_path)
        # Imported here, not at module level: an agent without models never pays for
        # onnxruntime's memory (tens of MB on a small gateway).
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ModelError(
                f"model {self.manifest.id}: onnxruntime cannot load {self.onnx_path}: {exc}"
            ) from None
        shape = self.session.get_inputs()[0].shape
        m = self.manifest
        if shape[1:] != [m.window, len(m.signals)]:
            raise ModelError(
                f"model {m.id}: graph input is {shape}, "
                f"manifest says window {m.window} x {len(m.signals)} signals"
            )
        self.mean = np.array([s.mean for s in m.signals], dtype=np.float64)

    @property
    def ident(self) -> dict[str, str]:
        """What every decision carries: which exact model made it."""
        m = self.manifest
        return {"id": m.id, "version": m.version, "sha256": m.sha256}

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[N]`` and per-signal contributions ``[N, S]`` of float32 windows ``[N, W, S]``."""
        if len(windows) == 0:
            return np.zeros(0, np.float32), np.zeros((0, len(self.mean)), np.float32)
        scores, contribs = [], []
        for i in range(0, len(windows), CHUNK):
            s, c = self.session.run(["score", "contrib"], {"window": windows[i : i + CHUNK]})
            scores.append(s)
            contribs.append(c)
        return np.concatenate(scores), np.concatenate(contribs)


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


class Debounce:
    """Raise after ``raise_after`` consecutive "over" observations, clear after
    ``clear_after`` consecutive "under" ones; anything else keeps the state.
    Used by the anomaly alarms and by the limit rules alike."""

    def __init__(self, raise_after: int, clear_after: int) -> None:
        self.raise_after = raise_after
        self.clear_after = clear_after
        self.active = False
        self.run = 0

    def update(self, over: bool) -> bool | None:
        """True when this observation raises, False when it clears, None otherwise."""
        if over != self.active:
            self.run += 1
            if self.run >= (self.raise_after if over else self.clear_after):
                self.active = over
                self.run = 0
                return over
        else:
            self.run = 0
        return None


class SlotAccumulator:
    """Means of good samples per period slot; the open (newest) slot carries over between calls.

    Slot ``k`` covers ``(k·P, (k+1)·P]``: a sample stamped at the end of an interval (a
    particle counter's record, stamped at sample end) belongs to the interval it
    describes, and a sample exactly on the boundary closes its slot at once instead of
    waiting a whole period for the next sample.
    """

    def __init__(self, period: float, n_signals: int) -> None:
        self.period = period
        self.n = n_signals
        self.open_id: int | None = None
        self.closed_upto = np.iinfo(np.int64).min
        self._sum = [0.0] * n_signals
        self._count = [0.0] * n_signals
        self.late = 0
        """Samples older than the open slot (out of order): dropped and counted, because
        slots leave in time order (a slot before the open one could never be emitted in
        order)."""

    SMALL = 4
    """Batches up to this size (the agent's per-commit case) take the scalar path, which
    costs microseconds where the vectorised one costs tens of them."""

    def add(self, ts: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add samples (``ts`` seconds ``[n]``, ``vals`` ``[n, S]`` with NaN = bad/missing);
        return the slots this closed: ids ``[k]`` and means ``[k, S]`` (NaN = no data)."""
        if len(ts) <= self.SMALL:
            closed, means = self.add_rows(ts.tolist(), vals.tolist())
            return np.array(closed, dtype=np.int64), np.array(means, dtype=np.float64).reshape(-1, self.n)
        ids = np.ceil(ts / self.period).astype(np.int64) - 1
        keep = ids > (self.closed_upto if self.open_id is None else self.open_id - 1)
        if not keep.all():
            self.late += int((~keep).sum())
            ids, vals, ts = ids[keep], vals[keep], ts[keep]
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.n))
        uniq, inv = np.unique(ids, return_inverse=True)
        valid = ~np.isnan(vals)
        filled = np.where(valid, vals, 0.0)
        k = len(uniq)
        sums = np.empty((k, self.n))
        counts = np.empty((k, self.n))
        for s in range(self.n):
            sums[:, s] = np.bincount(inv, weights=filled[:, s], minlength=k)
            counts[:, s] = np.bincount(inv, weights=valid[:, s], minlength=k)
        if self.open_id is not None and uniq[0] == self.open_id:
            sums[0] += self._sum
            counts[0] += self._count
        elif self.open_id is not None:
            uniq = np.concatenate([[self.open_id], uniq])
            sums = np.vstack([self._sum, sums])
            counts = np.vstack([self._count, counts])
        if float(ts.max()) >= (uniq[-1] + 1) * self.period:  # the newest slot's end is reached
            self.open_id, self._sum, self._count = None, [0.0] * self.n, [0.0] * self.n
            self.closed_upto = int(uniq[-1])
            return uniq, _means(sums, counts)
        self.open_id, self._sum, self._count = int(uniq[-1]), sums[-1].tolist(), counts[-1].tolist()
        if len(uniq) > 1:
            self.closed_upto = int(uniq[-2])
        return uniq[:-1], _means(sums[:-1], counts[:-1])

    def add_rows(self, ts: list[float], rows: list[list[float]]) -> tuple[list[int], list[list[float]]]:
        """The scalar path of :meth:`add` in plain floats and lists, one sample at a time: the
        agent hands over a commit's few samples as lists and keeps the closed slots as lists."""
        closed_ids: list[int] = []
        closed_means: list[list[float]] = []
        p, isnan = self.period, math.isnan
        sums, counts = self._sum, self._count
        for t, row in zip(ts, rows, strict=True):
            sid = math.ceil(t / p) - 1
            if sid <= self.closed_upto or (self.open_id is not None and sid < self.open_id):
                self.late += 1
                continue
            if self.open_id is not None and sid != self.open_id:
                closed_ids.append(self.open_id)
                closed_means.append([a / b if b else math.nan for a, b in zip(sums, counts, strict=True)])
                self.closed_upto, self.open_id = self.open_id, None
            if self.open_id is None and t >= (sid + 1) * p:
                # alone in its slot (stamped on the slot's end: the agent's usual sample), so its
                # mean is itself, exactly as the sum below would give: (0.0 + x) / 1.0 == 0.0 + x
                closed_ids.append(sid)
                closed_means.append([math.nan if isnan(x) else 0.0 + x for x in row])
                self.closed_upto = sid
                continue
            if self.open_id is None:
                self.open_id, sums, counts = sid, [0.0] * self.n, [0.0] * self.n
            for j, x in enumerate(row):
                if not isnan(x):
                    sums[j] += x
                    counts[j] += 1.0
            if t >= (sid + 1) * p:
                closed_ids.append(sid)
                closed_means.append([a / b if b else math.nan for a, b in zip(sums, counts, strict=True)])
                self.closed_upto, self.open_id = sid, None
        self._sum, self._count = sums, counts
        return closed_ids, closed_means

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """Close the open slot (end of an offline series)."""
        if self.open_id is None:
            return np.zeros(0, np.int64), np.zeros((0, self.n))
        ids, means = np.array([self.open_id]), _means(np.array([self._sum]), np.array([self._count]))
        self.closed_upto = self.open_id
        self.open_id = None
        return ids, means


def _means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    return out


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


class Windower:
    """Keeps the last ``W`` slots and turns newly closed slots into windows.

    The slots live in a ring of ``2W`` rows where each slot is written twice (row ``i``
    and ``i + W``), so the last ``W`` slots are always one contiguous view: the next
    slot costs two row writes, not a new window array."""

    def __init__(self, window: int, fill: np.ndarray, min_completeness: float) -> None:
        self.w = window
        self.fill = fill
        self.min_completeness = min_completeness
        self.n = len(fill)
        self._ring = np.full((2 * window, self.n), np.nan)
        self._pos = 0
        """Ring row of the oldest of the last ``W`` slots; the next slot replaces it."""
        self._gaps = [self.n] * window
        """Missing cells per ring slot (row ``i`` and ``i + W`` share an entry)."""
        self._last: int | None = None
        self._first = 0
        self._none = np.zeros((0, window, self.n), np.float32)
        """The empty result (nothing to score), shared: it holds no data to change."""

    def push(
        self, ids: np.ndarray, means: np.ndarray, eligible: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(completeness ``[k]``, warm ``[k]``, scored mask ``[k]``, float32 windows ``[j, W, S]``);
        ``eligible`` (default: all) masks windows that may be scored at all (the envelope)."""
        k = len(ids)
        if k == 0:
            return np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), self._none
        if k == 1 and self._last is not None and ids[0] == self._last + 1:
            one = self._push_next(
                int(ids[0]), means[0].tolist(), True if eligible is None else bool(eligible[0])
            )
            return np.array([one[0]]), np.array([one[1]]), np.array([one[2]]), one[3]
        if self._last is None or ids[0] - self._last > self.w:
            self._ring[:] = np.nan  # start, or a gap longer than a window: warm up again
            self._gaps = [self.n] * self.w
            self._last = int(ids[0]) - 1
            self._first = int(ids[0])
        # warm-up restarts at every gap longer than a window, wherever it falls in the batch
        prev = np.concatenate([[self._last], ids[:-1]])
        restart = np.where(ids - prev > self.w, ids, np.int64(self._first))
        first = np.maximum.accumulate(restart)
        span = int(ids[-1]) - self._last
        rows = np.full((span, self.n), np.nan)
        rows[ids - self._last - 1] = means
        full = np.vstack([self._ring[self._pos + 1 : self._pos + self.w], rows])  # the last W - 1 slots too
        pos = ids - self._last - 1 + (self.w - 1)  # row of each closed slot in `full`
        windows = np.lib.stride_tricks.sliding_window_view(full, self.w, axis=0)[pos - self.w + 1]
        windows = windows.transpose(0, 2, 1)  # [k, W, S]
        missing = np.isnan(windows)
        completeness = 1.0 - missing.mean(axis=(1, 2))
        warm = ids - first + 1 >= self.w
        scored = warm & (completeness >= self.min_completeness)
        if eligible is not None:
            scored &= eligible
        out = _fill(windows[scored], missing[scored], self.fill)
        recent = full[-self.w :]
        self._ring[: self.w] = recent
        self._ring[self.w :] = recent
        self._pos = 0
        self._gaps = np.isnan(recent).sum(axis=1).tolist()
        self._last = int(ids[-1])
        self._first = int(first[-1])
        return completeness, warm, scored, out

    def push_rows(
        self, ids: list[int], means: list[list[float]], eligible: list[bool] | None = None
    ) -> tuple[list[float], list[bool], list[bool], np.ndarray]:
        """:meth:`push` for the agent's lists: exactly the next slot takes the ring's fast path."""
        if len(ids) == 1 and self._last is not None and ids[0] == self._last + 1:
            ok = True if eligible is None else eligible[0]
            completeness, warm, scored, window = self._push_next(ids[0], means[0], ok)
            return [completeness], [warm], [scored], window
        c, w, s, windows = self.push(
            np.array(ids, dtype=np.int64),
            np.array(means, dtype=np.float64).reshape(len(ids), self.n),
            None if eligible is None else np.array(eligible, dtype=bool),
        )
        return c.tolist(), w.tolist(), s.tolist(), windows

    def _push_next(self, sid: int, row: list[float], eligible: bool) -> tuple[float, bool, bool, np.ndarray]:
        """The agent's usual case, exactly the next slot: same result as the general path, in O(S)
        plus one float32 copy of the window when it is scored."""
        p, w = self._pos, self.w
        self._ring[p] = row
        self._ring[p + w] = self._ring[p]
        self._gaps[p] = sum(map(math.isnan, row))
        self._pos = (p + 1) % w
        self._last = sid
        window = self._ring[p + 1 : p + 1 + w]
        missing = sum(self._gaps)
        completeness = 1.0 - missing / (w * self.n)
        warm = sid - self._first + 1 >= w
        scored = eligible and warm and completeness >= self.min_completeness
        if not scored:
            return completeness, warm, scored, self._none
        if missing:
            return completeness, warm, scored, _fill(window[None], np.isnan(window)[None], self.fill)
        return completeness, warm, scored, window[None].astype(np.float32)


def _fill(windows: np.ndarray, missing: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Forward-fill gaps along the window; leading gaps get the training mean."""
    if not missing.any():
        return windows.astype(np.float32)
    w = windows.shape[1]
    idx = np.where(missing, 0, np.arange(w)[None, :, None])
    np.maximum.accumulate(idx, axis=1, out=idx)
    out = np.take_along_axis(windows, idx, axis=1)
    out = np.where(np.isnan(out), fill[None, None, :], out)
    return out.astype(np.float32)


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
    agent only reads the transitions; :func:`run_offline` builds its series arrays once per chunk."""

    transitions: list[Transition]
    alarm: list[bool]
    """Alarm state after each window of the :class:`Ready` (for offline series)."""
    scores: list[float]
    """Score of each window (NaN when not scored)."""


class Envelope:
    """Which closed slots lie inside a model's operating envelope, and which windows lie
    inside it entirely (the ones that may be scored). Slot rows carry the envelope signals
    after the model's inputs (:attr:`Manifest.data_names`)."""

    def __init__(self, conditions: list[EnvelopeCondition], names: list[str], window: int) -> None:
        self.window = window
        self.conditions = [(names.index(c.signal), c) for c in conditions]
        self._run_from: int | None = None
        """First slot of the current unbroken run of slots inside the envelope."""
        self._run_last: int | None = None

    def check(self, ids: list[int], means: list[list[float]]) -> tuple[list[bool], list[bool]]:
        """(inside, eligible) per slot. A few slots without samples do not break a run (the
        windower's completeness rule judges them); a gap longer than a window does, as it
        restarts the windower's warm-up: the state in between is unknown."""
        inside, eligible = [], []
        for sid, row in zip(ids, means, strict=True):
            ok = all(c.holds(row[j]) for j, c in self.conditions)
            if not ok:
                self._run_from = None
            elif self._run_from is None or self._run_last is None or sid - self._run_last > self.window:
                self._run_from = sid
            self._run_last = sid
            inside.append(ok)
            eligible.append(ok and self._run_from is not None and sid - self._run_from + 1 >= self.window)
        return inside, eligible


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
