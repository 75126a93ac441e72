"""Threshold and persistence from short, autocorrelated normal data (issue 16).

Why not the held-out rule alone: with a few hundred rows, a model fitted on part of the data
and checked on a small held-out part sets its threshold from scores it has (nearly) seen,
and the handful of held-out windows say little about the tail. The threshold then sits far
too low and a real plant alarms on half its normal rows. Here:

* **Blocked cross-validation.** Each series is cut into :data:`FOLDS` contiguous time
  blocks; for each block a model is fitted on the rest, minus a guard of one window on each
  side (no fitted window shares a slot with a scored one, so autocorrelation cannot leak),
  and scores the block. Every training window thus gets a score from a model that never saw
  it: the scores a new day of normal operation would get. The shipped model is then fitted
  on all the data, which makes it, if anything, a little quieter than the fold models.
* **The target is the share of normal windows spent in alarm**, measured through the
  agent's own hysteresis (:class:`~agent.transforms.debounce.Debounce`, clear ratio
  included) on those out-of-sample scores, because that is what an operator sees and what
  row-level benchmarks count.
* **A tail model where the data run out.** When the target asks for fewer than
  :data:`MIN_ALARMED` alarmed windows, the threshold is extrapolated with a generalised
  Pareto fit to the upper tail of the alarm statistic (the smallest of ``raise_after``
  consecutive scores, which is what must exceed the threshold to raise); never below the
  empirical threshold, however few windows that rests on.
* **Persistence from the data** (:func:`choose_persistence`): ``raise_after`` is 2 when the
  normal score is nearly uncorrelated from one window to the next (spikes, filtered by
  waiting), else 1; ``clear_after`` is twice ``raise_after``. The threshold is calibrated
  for the persistence used.
* **A weekly cap** on alarm starts (the agent's acceptance figure, false alarms per device-week)
  once the data cover a day (:data:`WEEKLY_MIN_SPAN`): on long records the share target alone
  would allow several alarms a day.
* **A state seen once is warned about** (:func:`block_contrast`): cross-validation scores
  it as new, as it is, and the threshold must then cover it.
* **Too little data is refused**, with the rule in the message (:func:`check_length`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.transforms.anomaly.manifest import ModelError
from agent.transforms.debounce import Debounce

log = logging.getLogger(__name__)

FOLDS = 5
"""Time blocks per series for the cross-validation."""
DEFAULT_FALSE_ALARM_RATE = 0.01
"""Default target: 1 % of normal windows in alarm (about 15 min a day)."""
DEFAULT_FALSE_ALARMS_PER_WEEK = 0.2
"""Default cap on alarm starts per device-week (the acceptance limit is 1)."""
WEEKLY_MIN_SPAN = 86400.0
"""Training data must cover this many seconds (a day) before the weekly cap applies by default."""
MIN_ALARMED = 20
"""Below this many alarmed out-of-sample windows at the target, the tail model extrapolates."""
TAIL_FRACTION = 0.1
"""Upper share of the alarm statistic the tail model is fitted to (at least ``MIN_ALARMED`` points)."""
SPIKY_AUTOCORR = 0.5
"""Below this lag-1 autocorrelation of the normal score, ``raise_after`` is 2 (:func:`choose_persistence`)."""
MIN_ROWS_PER_FEATURE = 2
"""Refuse below this many training slots per window feature (3 per signal): a covariance of
F features from fewer than 2F rows is mostly noise, and so is any threshold on it."""
WARN_ROWS_PER_FEATURE = 10
"""Warn below this many slots per feature: usable, but expect a coarse model."""
WINDOW_RANGE = (5, 30)
"""Bounds of the default window (slots)."""
WINDOW_DIVISOR = 80
"""The default window is the training slots divided by this (30 from 2400 slots on)."""
BLOCK_CONTRAST_WARN = 5.0
"""Warn when one block's median out-of-sample score is this many times the blocks' median."""
MIN_BLOCK_WINDOWS = 10
"""A fold's held-out block must yield at least this many windows (window + this - 1 slots)."""


@dataclass(frozen=True)
class Calibration:
    """The calibrated decision settings and how they were found (recorded in the manifest)."""

    threshold: float
    raise_after: int
    clear_after: int
    target: float
    """Share of normal windows in alarm aimed at."""
    expected: float
    """Share in alarm at ``threshold`` on the out-of-sample scores (may be 0 when extrapolated)."""
    tail: str
    """``empirical`` or ``gpd`` (extrapolated)."""
    windows: int
    """Out-of-sample windows the calibration saw."""
    gpd_shape: float = math.nan
    gpd_scale: float = math.nan

    def record(self) -> dict[str, float | int | str]:
        """Flat fields for the manifest's ``validation`` (prefix ``calibration_``)."""
        out: dict[str, float | int | str] = {
            "calibration": "blocked-cv",
            "calibration_folds": FOLDS,
            "calibration_target_false_alarm_rate": self.target,
            "calibration_expected_false_alarm_rate": round(self.expected, 5),
            "calibration_tail": self.tail,
            "calibration_oos_windows": self.windows,
            "calibration_raise_after_rule": f"2 if score lag-1 autocorrelation < {SPIKY_AUTOCORR}, else 1",
        }
        if self.tail == "gpd":
            out["calibration_gpd_shape"] = round(self.gpd_shape, 4)
            out["calibration_gpd_scale"] = round(self.gpd_scale, 6)
        return out


def block_contrast(folds: Sequence[Sequence[np.ndarray]]) -> float:
    """How unlike the rest the most unusual time block is: its median out-of-sample score over
    the median of the blocks' medians. Large (over :data:`BLOCK_CONTRAST_WARN`) means the
    training data hold a state only once (a winter day among summer ones, a start-up): its
    block scores high because no fold model saw it, and the threshold, which must cover it,
    blinds the model. That is warned about; the cure is data with each state more than once."""
    medians = [float(np.median(np.concatenate(f))) for f in folds if f and sum(len(s) for s in f)]
    if not medians:
        return 1.0
    typical = float(np.median(medians))
    contrast = max(medians) / typical if typical > 0 else 1.0
    if contrast > BLOCK_CONTRAST_WARN:
        log.warning(
            "one time block of the training data scores %.3g x the others (median): a state seen "
            "only once cannot be learnt, and the threshold, set to stay quiet on it, will miss smaller "
            "faults; train on data that show each operating state more than once",
            contrast,
        )
    return contrast


def default_window(slots: int) -> int:
    """Slots per window when none is given: 1/:data:`WINDOW_DIVISOR` of the data, within
    :data:`WINDOW_RANGE`. A long window over a short record leaves only a dozen independent
    windows to learn from, and the threshold then varies several-fold with the draw."""
    lo, hi = WINDOW_RANGE
    return int(min(hi, max(lo, slots // WINDOW_DIVISOR)))


def check_length(slots: int, n_signals: int, window: int) -> None:
    """Refuse (:class:`ModelError`) or warn when ``slots`` training slots are too few."""
    features = 3 * n_signals
    block = window + MIN_BLOCK_WINDOWS - 1
    need = max(MIN_ROWS_PER_FEATURE * features, FOLDS * block)
    if slots < need:
        raise ModelError(
            f"training data too short: {slots} slots for {n_signals} signals and a window of {window}. "
            f"The model estimates how {features} window features (3 per signal) vary together, which "
            f"needs at least {MIN_ROWS_PER_FEATURE} slots per feature ({MIN_ROWS_PER_FEATURE * features}); "
            f"the calibration scores {FOLDS} time blocks of at least {MIN_BLOCK_WINDOWS} windows each "
            f"({FOLDS} x {block} slots). Need {need}: give more normal data, fewer "
            "signals (--signals) or a shorter --window"
        )
    if slots < WARN_ROWS_PER_FEATURE * features:
        log.warning(
            "short training data: %d slots for %d window features (3 per signal; %d or more is "
            "comfortable): thresholds are calibrated out of sample, but expect a coarse model",
            slots,
            features,
            WARN_ROWS_PER_FEATURE * features,
        )


def fold_masks(ts: np.ndarray, period: float, window: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, held-out rows) per fold: contiguous time blocks of equally many slots with
    data (a series with gaps, days from different seasons, still gets equal blocks), the fit
    rows kept one window (plus a slot) away from the held-out block on each side."""
    slot = np.floor(ts / period)
    filled = np.unique(slot)
    cut = (len(filled) * np.arange(1, FOLDS)) // FOLDS
    edges = np.concatenate([[filled[0]], filled[cut], [filled[-1] + 1]])
    guard = window + 1
    out = []
    for k in range(FOLDS):
        held = (slot >= edges[k]) & (slot < edges[k + 1])
        near = (slot >= edges[k] - guard) & (slot < edges[k + 1] + guard)
        out.append((~near, held))
    return out


def alarm_fraction(
    series: Sequence[np.ndarray], threshold: float, raise_after: int, clear_after: int, clear_ratio: float
) -> float:
    """Share of windows in alarm, decided as the agent decides (:class:`Debounce`, clear ratio)."""
    total = on = 0
    clear = threshold * clear_ratio
    for s in series:
        db = Debounce(raise_after, clear_after)
        for x in s.tolist():
            db.update(x > (clear if db.active else threshold))
            on += db.active
        total += len(s)
    return on / total if total else 0.0


def _threshold_for(fraction: Callable[[float], float], lo: float, hi: float, rate: float) -> float:
    """Smallest threshold (to 1e-4 relative) whose alarm fraction is at most ``rate``."""
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if fraction(mid) > rate:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-4 * max(abs(hi), 1e-9):
            break
    return hi


def alarm_statistic(series: Sequence[np.ndarray], raise_after: int) -> np.ndarray:
    """The smallest of ``raise_after`` consecutive scores, per position, within each series."""
    parts = [
        np.lib.stride_tricks.sliding_window_view(s, raise_after).min(axis=1)
        for s in series
        if len(s) >= raise_after
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def gpd_fit(excess: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (shape, scale) by the method of moments, the shape held to
    [-0.5, 0.45] (a few dozen points cannot say more, and the variance must exist)."""
    m = float(excess.mean())
    v = max(float(excess.var()), 1e-12)
    shape = float(np.clip(0.5 * (1 - m * m / v), -0.5, 0.45))
    return shape, max(m * (1 - shape), 1e-12)


def gpd_quantile(u: float, p_u: float, shape: float, scale: float, p: float) -> float:
    """The level exceeded with probability ``p`` given ``P(x > u) = p_u`` and a GPD above ``u``."""
    if abs(shape) < 1e-6:
        return u + scale * math.log(p_u / p)
    return u + scale / shape * (math.pow(p / p_u, -shape) - 1)


def calibrate_fixed(
    series: Sequence[np.ndarray], raise_after: int, clear_after: int, clear_ratio: float, target: float
) -> Calibration:
    """Threshold for ``target`` at given persistence, from out-of-sample score ``series``."""
    series = [np.asarray(s, dtype=np.float64)[~np.isnan(s)] for s in series]
    n = sum(len(s) for s in series)
    if n < MIN_ALARMED * 5:
        raise ModelError(f"too few out-of-sample windows to calibrate ({n}; need {MIN_ALARMED * 5})")
    allv = np.concatenate(series)
    lo, hi = float(allv.min()), float(allv.max()) * 1.0001 + 1e-9

    def fraction(t: float) -> float:
        return alarm_fraction(series, t, raise_after, clear_after, clear_ratio)

    if target * n >= MIN_ALARMED:
        thr = _threshold_for(fraction, lo, hi, target)
        return Calibration(thr, raise_after, clear_after, target, fraction(thr), "empirical", n)
    # anchor where the data still resolve the alarm fraction, then extrapolate the tail
    anchor_rate = MIN_ALARMED / n
    t0 = _threshold_for(fraction, lo, hi, anchor_rate)
    f0 = fraction(t0)
    a = alarm_statistic(series, raise_after)
    p0 = float(np.mean(a > t0))
    if f0 <= 0 or p0 <= 0:
        return Calibration(hi, raise_after, clear_after, target, 0.0, "empirical", n)
    p_target = target * p0 / f0  # alarm time per raise is taken as at the anchor
    tail_share = max(TAIL_FRACTION, min(0.5, 2 * p0), MIN_ALARMED / len(a))
    u = float(np.quantile(a, 1 - tail_share))
    p_u = float(np.mean(a > u))
    excess = a[a > u] - u
    shape, scale = gpd_fit(excess)
    # never below the empirical threshold for the target, however few windows it rests on
    thr = max(
        _threshold_for(fraction, lo, hi, target), gpd_quantile(u, p_u, shape, scale, min(p_target, p_u))
    )
    return Calibration(thr, raise_after, clear_after, target, fraction(thr), "gpd", n, shape, scale)


def calibrate(
    series: Sequence[np.ndarray],
    target: float,
    clear_ratio: float,
    raise_after: int | None = None,
    clear_after: int | None = None,
) -> Calibration:
    """Threshold (and, where not given, persistence) for ``target`` from out-of-sample scores."""
    if not 0 < target < 0.5:
        raise ModelError(
            f"false-alarm rate target {target:g} must lie between 0 and 0.5 (a share of windows)"
        )

    if raise_after is None:
        raise_after = choose_persistence(series)
    clear = clear_after if clear_after is not None else 2 * raise_after
    return calibrate_fixed(series, raise_after, clear, clear_ratio, target)


def choose_persistence(series: Sequence[np.ndarray]) -> int:
    """``raise_after`` from the autocorrelation of the normal score: when consecutive scores
    are nearly independent (lag-1 autocorrelation under :data:`SPIKY_AUTOCORR`), normal
    excursions are single-window spikes that waiting for a second window filters; when they
    are correlated (the usual case: consecutive windows share all but one slot), excursions
    last several windows, waiting filters nothing and only delays detection. A fixed rule,
    not a search over thresholds: on a few hundred rows such a search picks noise, and the
    threshold it picks is then too low."""
    pairs = [(s[:-1], s[1:]) for s in series if len(s) > 2]
    if not pairs:
        return 1
    x = np.concatenate([a for a, _ in pairs])
    y = np.concatenate([b for _, b in pairs])
    if float(np.std(x)) == 0 or float(np.std(y)) == 0:
        return 1
    return 2 if float(np.corrcoef(x, y)[0, 1]) < SPIKY_AUTOCORR else 1
