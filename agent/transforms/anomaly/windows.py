"""Samples -> period slots -> windows: how the agent and ``models evaluate|score`` see a series.

Samples are resampled onto the model's period: a *slot* is the mean of the good
samples in one period (missing when there are none). A window is the last ``W`` slots.
Incomplete-window policy: a window is scored only when at least ``min_completeness``
of its (slot, signal) cells hold data; gaps are then filled forward (leading gaps with
the training mean). Unscored windows neither raise nor clear an alarm, and the state
shows ``incomplete`` so nobody mistakes silence for health. After start, or after a gap
longer than a window, the track is ``warming_up`` until a full window has elapsed.
"""

from __future__ import annotations

import math

import numpy as np


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
