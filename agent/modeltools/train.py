"""Fitting models from normal data and freezing them as ONNX + manifest.

Data flow: CSV(s) -> rows labelled abnormal or inside fault windows dropped -> the
agent's own resampling/windowing (:mod:`agent.transforms.anomaly.windows`) -> features computed by the
feature part of the ONNX graph itself -> fit (PCA in numpy, isolation forest in
scikit-learn) -> full graph -> threshold calibrated on normal windows no fitted model saw.

Two calibrations (``TrainOptions.calibration``):

* ``cv`` (the default): blocked cross-validation over all the data, a target share of normal
  windows in alarm, a tail model and persistence chosen from the data
  (:mod:`agent.modeltools.calibrate`); the model itself is fitted on all the data. Holds on
  a few hundred autocorrelated rows.
* ``holdout`` (the rule before issue 16, kept so models trained with it rebuild identically):
  evenly spread time blocks are held out, and the threshold (times ``margin``) is the largest
  of: the smallest threshold at which the fitting data raise no alarm, the same for the
  held-out data, and the threshold whose extrapolated false-alarm rate on the held-out data
  is ``false_alarms_per_week`` (see :func:`tail_threshold`). It needs long, varied data:
  on a few hundred rows it sets thresholds from windows it has nearly seen.

Evaluate on independent data to confirm either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from agent import __version__
from agent.modeltools import autoencoder, calibrate, graph
from agent.modeltools.csvdata import Dataset, iso
from agent.transforms.anomaly.drift import DriftMonitor
from agent.transforms.anomaly.envelope import Envelope
from agent.transforms.anomaly.manifest import (
    DriftBounds,
    EnvelopeCondition,
    Hysteresis,
    Manifest,
    ModelError,
    Provenance,
    SignalSpec,
    sha256_file,
    write_manifest,
)
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.windows import SlotAccumulator, Windower

MAX_FIT_WINDOWS = 20_000
"""Windows used for fitting (strided evenly): more adds time, not information."""
SD_EPS_FRACTION = 0.01
"""Log-σ feature epsilon as a fraction of the signal's median window σ (see graph)."""
HOLDOUT_BLOCKS = 10
"""Each series is cut into this many time blocks; evenly spread ones are held out, so the
held-out data cover every phase of a run (a culture's day 1 differs from its day 10)."""


def _holdout_mask(ts: np.ndarray, fraction: float) -> np.ndarray:
    block = np.minimum(
        ((ts - ts[0]) / max(1e-9, ts[-1] - ts[0]) * HOLDOUT_BLOCKS).astype(int), HOLDOUT_BLOCKS - 1
    )
    chosen = np.array([int((i + 1) * fraction) > int(i * fraction) for i in range(HOLDOUT_BLOCKS)])
    return np.asarray(chosen[block])


@dataclass
class TrainOptions:
    model_id: str
    method: Literal["pca", "iforest", "autoencoder"] = "pca"
    version: str = "1.0.0"
    device_kind: str = "generic"
    intended_use: str = "Advisory anomaly detection for people; not a release or control decision."
    period: float | None = None
    """Seconds per slot; None = median sample spacing."""
    window: int = 0
    """Slots per window; 0: from the data's length (:func:`calibrate.default_window`)."""
    raise_after: int | None = None
    """Windows over the threshold that raise an alarm; None: from the data (``cv``), 3 (``holdout``)."""
    clear_after: int | None = None
    """Windows under it that clear; None: twice ``raise_after`` (``cv``), 6 (``holdout``)."""
    min_completeness: float = 0.8
    calibration: Literal["cv", "holdout"] = "cv"
    """How the threshold is found (see the module docstring)."""
    false_alarm_rate: float = calibrate.DEFAULT_FALSE_ALARM_RATE
    """``cv``: target share of normal windows in alarm."""
    holdout: float = 0.3
    """``holdout``: share of the data held out for the threshold."""
    variance: float = 0.95
    """PCA: fraction of feature variance the retained components explain."""
    margin: float | None = None
    """Threshold safety factor; None: 1.1 (``holdout``), 1.0 (``cv``: already out of sample)."""
    false_alarms_per_week: float | None = None
    """Alarm starts per device-week (the acceptance limit is 1; the default 0.2 leaves room).
    ``holdout``: its target (None: 0.2). ``cv``: a second cap beside ``false_alarm_rate``,
    extrapolated from the out-of-sample scores; None: 0.2 when the training data cover at
    least :data:`calibrate.WEEKLY_MIN_SPAN`, else none (from minutes of data a weekly rate is
    a guess, and the cap would blind the model)."""
    drift_window: float = 21600.0
    seed: int = 0
    trees: int = 100
    """Isolation forest: number of trees."""
    skip_start: float = 0.0
    """Seconds dropped at the start of every series (start-up transients that are not the
    operating state the model is for; state it in the model card). Where a signal tells the
    state (a culture's age, a machine state), prefer ``envelope``: the agent enforces it."""
    envelope: list[EnvelopeCondition] = field(default_factory=list)
    """Operating envelope (see :attr:`Manifest.envelope`): trained on windows inside it only,
    and scored only inside it. The data carry its signals after the model's inputs."""
    units: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    source: str | None = None
    """How the provenance names the data (default: the files' paths; a build from scratch
    files names what they were generated from instead)."""


def signal_specs(values: np.ndarray, names: list[str], units: dict[str, str]) -> list[SignalSpec]:
    specs = []
    for j, name in enumerate(names):
        col = values[:, j]
        col = col[~np.isnan(col)]
        if len(col) < 10:
            raise ModelError(f"signal {name!r} has fewer than 10 good values in the training data")
        mean = float(col.mean())
        std = max(float(col.std()), 1e-6 + 1e-3 * abs(mean))
        edges = np.unique(np.quantile(col, np.linspace(0.1, 0.9, 9)))
        counts = np.bincount(np.searchsorted(edges, col, side="right"), minlength=len(edges) + 1)
        specs.append(
            SignalSpec(
                name=name,
                unit=units.get(name),
                mean=mean,
                std=std,
                normal_low=float(np.quantile(col, 0.001)),
                normal_high=float(np.quantile(col, 0.999)),
                bin_edges=[float(e) for e in edges],
                bin_fractions=[float(c) for c in counts / len(col)],
            )
        )
    return specs


def windows_of(
    ds: Dataset,
    period: float,
    window: int,
    fill: np.ndarray,
    min_completeness: float,
    envelope: Sequence[EnvelopeCondition] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Scorable windows of a series through the agent's windowing: (end slot ids, windows).
    ``ds`` holds the model's inputs, then the envelope signals (:attr:`Manifest.data_names`)."""
    acc = SlotAccumulator(period, len(ds.signals))
    n = len(fill)
    win = Windower(window, fill, min_completeness)
    env = Envelope(list(envelope), ds.signals, window) if envelope else None
    ids_out, wins_out = [], []
    for ids, means in (acc.add(ds.ts, ds.values), acc.flush()):
        eligible = None if env is None else np.array(env.check(ids.tolist(), means.tolist())[1], dtype=bool)
        _, _, scored, wins = win.push(ids, means[:, :n], eligible)
        ids_out.append(ids[scored])
        wins_out.append(wins)
    return np.concatenate(ids_out), np.concatenate(wins_out)


def slot_means(ds: Dataset, period: float) -> tuple[np.ndarray, np.ndarray]:
    acc = SlotAccumulator(period, len(ds.signals))
    a, b = acc.add(ds.ts, ds.values), acc.flush()
    return np.concatenate([a[0], b[0]]), np.vstack([a[1], b[1]])


def _run(model: onnx.ModelProto, windows: np.ndarray, output: str) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return np.concatenate(
        [sess.run([output], {"window": windows[i : i + 4096]})[0] for i in range(0, len(windows), 4096)]
    )


def _stride(windows: np.ndarray, limit: int) -> np.ndarray:
    return windows[:: max(1, len(windows) // limit)]


def no_alarm_threshold(scores: np.ndarray, raise_after: int) -> float:
    """Smallest threshold at which ``raise_after`` consecutive scores never all exceed it."""
    s = scores[~np.isnan(scores)]
    if len(s) < raise_after:
        return float(s.max()) if len(s) else 0.0
    view = np.lib.stride_tricks.sliding_window_view(s, raise_after)
    return float(view.min(axis=1).max())


def tail_threshold(scores: np.ndarray, raise_after: int, windows_per_week: float, per_week: float) -> float:
    """Threshold expected to raise ``per_week`` false alarms per week, extrapolated from the
    tail of held-out normal scores: an exponential fit to the excesses of the alarm
    statistic (the minimum of ``raise_after`` consecutive scores) over its 99th
    percentile, declustered by the share of excesses that start a new run."""
    s = scores[~np.isnan(scores)]
    if len(s) < raise_after + 100:
        return no_alarm_threshold(scores, raise_after)
    r = np.lib.stride_tricks.sliding_window_view(s, raise_after).min(axis=1)
    u = float(np.quantile(r, 0.99))
    above = r > u
    excess = r[above] - u
    if len(excess) < 20:
        return no_alarm_threshold(scores, raise_after)
    runs = int(above[0]) + int(np.sum(above[1:] & ~above[:-1]))
    rate_at_u = runs / len(r)  # alarm starts per window at threshold u
    target = per_week / windows_per_week
    return u + float(excess.mean()) * max(0.0, float(np.log(rate_at_u / target)))


def train(datasets: Sequence[Dataset], opts: TrainOptions, out_dir: Path, excluded_rows: int = 0) -> Path:
    """Fit, freeze and calibrate; returns the manifest path (``out_dir/<id>.model.yaml``)."""
    if not datasets:
        raise ModelError("no training data")
    columns = datasets[0].signals
    for ds in datasets[1:]:
        if ds.signals != columns:
            raise ModelError(f"{ds.source}: signals {ds.signals} differ from {columns}")
    env_names = list(dict.fromkeys(c.signal for c in opts.envelope))
    if env_names and columns[-len(env_names) :] != env_names:
        raise ModelError(
            f"the data lack the envelope signal(s) {', '.join(env_names)} (after the model's inputs)"
        )
    names = columns[: len(columns) - len(env_names)]
    if not names:
        raise ModelError("no model input signals besides the envelope signals")
    period = opts.period or float(np.median(np.concatenate([np.diff(ds.ts) for ds in datasets])))
    if not period > 0:
        raise ModelError("cannot infer the sampling period (timestamps repeat); give --period")
    if opts.skip_start > 0:
        datasets = [ds.select(ds.ts >= ds.ts[0] + opts.skip_start) for ds in datasets]
    slots = sum(len(np.unique(np.floor(d.ts / period))) for d in datasets)
    if not opts.window:
        opts = replace(opts, window=calibrate.default_window(slots))
    cv = opts.calibration == "cv"
    fit_parts, hold_parts = list(datasets), list(datasets)
    if not cv:
        masks = [_holdout_mask(ds.ts, opts.holdout) for ds in datasets]
        fit_parts = [ds.select(~held) for ds, held in zip(datasets, masks, strict=True)]
        hold_parts = [ds.select(held) for ds, held in zip(datasets, masks, strict=True)]
    specs = signal_specs(
        np.vstack([_inside(d, opts.envelope, len(names)).values for d in fit_parts]), names, opts.units
    )
    mean = np.array([s.mean for s in specs])
    std = np.array([s.std for s in specs])

    def wins(parts: list[Dataset]) -> np.ndarray:
        got = [
            windows_of(d, period, opts.window, mean, opts.min_completeness, opts.envelope)[1] for d in parts
        ]
        return np.concatenate(got) if got else np.zeros((0, opts.window, len(names)), np.float32)

    fit_w = wins(fit_parts)
    if cv:
        calibrate.check_length(slots, len(names), opts.window)
    hold_w = fit_w if cv else wins(hold_parts)
    if len(fit_w) < 50 or len(hold_w) < 10:
        raise ModelError(
            f"too little complete data: {len(fit_w)} fitting and {len(hold_w)} held-out windows of "
            f"{opts.window} x {period:g} s (need 50 and 10)"
        )
    window_sd = np.nanstd((fit_w[:: max(1, len(fit_w) // MAX_FIT_WINDOWS)] - mean) / std, axis=1)
    sd_eps = SD_EPS_FRACTION * np.median(window_sd, axis=0)
    fmodel = graph.feature_model(mean, std, opts.window, sd_eps)

    def fit(w: np.ndarray) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """The whole graph fitted on windows ``w`` (the feature part shared by every fit)."""
        feats = _run(fmodel, _stride(w, MAX_FIT_WINDOWS), "features").astype(np.float64)
        f_mean = feats.mean(axis=0)
        f_std = np.maximum(feats.std(axis=0), 0.05)
        if opts.method == "pca":
            return _fit_pca(mean, std, sd_eps, opts, feats, f_mean, f_std)
        if opts.method == "autoencoder":
            return autoencoder.fit_model(
                mean, std, sd_eps, opts.window, feats, f_mean, f_std, opts.variance, opts.seed
            )
        return _fit_iforest(mean, std, sd_eps, opts, feats, f_mean, f_std)

    model, info = fit(fit_w)
    week = 7 * 86400 / period
    cal_record: dict[str, float | int | str]
    if cv:
        folds = _out_of_sample(datasets, period, opts, mean, fit)
        series = [s for fold in folds for s in fold]
        cal = calibrate.calibrate(
            series, opts.false_alarm_rate, Hysteresis().clear_ratio, opts.raise_after, opts.clear_after
        )
        raise_after, clear_after = cal.raise_after, cal.clear_after
        hold_scores = np.concatenate(series)
        threshold = (opts.margin or 1.0) * cal.threshold
        cal_record = cal.record()
        cal_record["calibration_block_contrast"] = round(calibrate.block_contrast(folds), 2)
        per_week = opts.false_alarms_per_week
        if per_week is None and slots * period >= calibrate.WEEKLY_MIN_SPAN:
            per_week = calibrate.DEFAULT_FALSE_ALARMS_PER_WEEK
        if per_week is not None:
            cap = (opts.margin or 1.0) * tail_threshold(hold_scores, raise_after, week, per_week)
            cal_record["calibration_false_alarms_per_week"] = per_week
            cal_record["calibration_weekly_cap_binds"] = int(cap > threshold)
            threshold = max(threshold, cap)
    else:
        raise_after, clear_after = opts.raise_after or 3, opts.clear_after or 6
        fit_scores = _run(model, fit_w, "score")
        hold_scores = _run(model, hold_w, "score")
        threshold = (opts.margin or 1.1) * max(
            no_alarm_threshold(fit_scores, raise_after),
            no_alarm_threshold(hold_scores, raise_after),
            tail_threshold(
                hold_scores,
                raise_after,
                week,
                opts.false_alarms_per_week or calibrate.DEFAULT_FALSE_ALARMS_PER_WEEK,
            ),
        )
        cal_record = {"calibration": "holdout"}
    if threshold <= 0:
        threshold = float(np.quantile(hold_scores, 0.999)) + 1e-3

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{opts.model_id}.onnx"
    onnx.save(model, str(onnx_path))
    rows = sum(len(d.ts) for d in datasets)
    start = min(float(d.ts[0]) for d in datasets)
    end = max(float(d.ts[-1]) for d in datasets)
    data_hash = hashlib.sha256("".join(sorted(d.sha256 for d in datasets)).encode()).hexdigest()
    manifest = Manifest(
        id=opts.model_id,
        version=opts.version,
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        method=opts.method,
        intended_use=opts.intended_use,
        device_kind=opts.device_kind,
        signals=specs,
        period=period,
        window=opts.window,
        threshold=float(threshold),
        hysteresis=Hysteresis(raise_after=raise_after, clear_after=clear_after),
        min_completeness=opts.min_completeness,
        envelope=opts.envelope,
        drift=DriftBounds(window=opts.drift_window),
        provenance=Provenance(
            source=opts.source or ", ".join(sorted({d.source for d in datasets})),
            start=iso(start),
            end=iso(end),
            rows=rows,
            excluded_rows=excluded_rows,
            data_sha256=data_hash,
            notes=opts.notes,
        ),
        validation={
            "fit_windows": len(fit_w),
            "holdout_windows": len(hold_scores),
            "holdout_max_score": round(float(hold_scores.max()), 4),
            "holdout_p99_score": round(float(np.quantile(hold_scores, 0.99)), 4),
            **info,
            **cal_record,
        },
        tool_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
    inside = [_inside(d, opts.envelope, len(names)) for d in hold_parts]  # cv: all the data
    manifest = manifest.model_copy(update={"drift": _drift_bounds(manifest, inside)})
    path = out_dir / f"{opts.model_id}.model.yaml"
    write_manifest(path, manifest)
    LoadedModel(path)  # the written pair must load exactly as the agent will load it
    return path


def _out_of_sample(
    datasets: Sequence[Dataset],
    period: float,
    opts: TrainOptions,
    fill: np.ndarray,
    fit: Callable[[np.ndarray], tuple[onnx.ModelProto, dict[str, Any]]],
) -> list[list[np.ndarray]]:
    """Scores of every training window from a model fitted without it and without its
    neighbours (:func:`calibrate.fold_masks`): per fold, one score series per data series."""
    masks = [calibrate.fold_masks(ds.ts, period, opts.window) for ds in datasets]
    folds: list[list[np.ndarray]] = []
    for k in range(calibrate.FOLDS):
        fit_w, held_w = [], []
        for ds, m in zip(datasets, masks, strict=True):
            keep, held = m[k]
            fit_w.append(
                windows_of(ds.select(keep), period, opts.window, fill, opts.min_completeness, opts.envelope)[
                    1
                ]
            )
            held_w.append(
                windows_of(ds.select(held), period, opts.window, fill, opts.min_completeness, opts.envelope)[
                    1
                ]
            )
        w = np.concatenate(fit_w)
        if len(w) < 10:
            raise ModelError(
                f"too little complete data for cross-validation: fold {k + 1} of {calibrate.FOLDS} has "
                f"{len(w)} fitting windows"
            )
        model, _ = fit(w)
        folds.append([_run(model, h, "score").astype(np.float64) for h in held_w if len(h)])
    return folds


def _inside(ds: Dataset, envelope: Sequence[EnvelopeCondition], n: int) -> Dataset:
    """The rows inside the envelope, the model's ``n`` inputs only: the training statistics
    (normalisation, normal ranges, drift baseline) describe the state the model is for."""
    mask = np.ones(len(ds.ts), bool)
    for c in envelope:
        col = ds.values[:, ds.signals.index(c.signal)]
        mask &= np.fromiter((c.holds(x) for x in col.tolist()), bool, len(col))
    return Dataset(ds.ts[mask], ds.values[mask, :n], ds.signals[:n], ds.abnormal[mask], ds.source, ds.sha256)


def _drift_bounds(manifest: Manifest, parts: list[Dataset]) -> DriftBounds:
    """Widen the default bounds to what held-out *normal* data reaches (x1.5), so a
    process that legitimately moves through its range (a growing culture) is not drift."""
    shift, psi_max = 0.0, 0.0
    for ds in parts:
        ids, means = slot_means(ds, manifest.period)
        mon = DriftMonitor(manifest)
        step = DriftMonitor.CHECK_EVERY
        for i in range(0, len(ids), step):
            mon.add(ids[i : i + step], means[i : i + step])
            stats = mon.measure()
            if stats:
                shift = max(shift, *(v["shift_sigma"] for v in stats.values()))
                psi_max = max(psi_max, *(v["psi"] for v in stats.values()))
    base = manifest.drift
    return base.model_copy(
        update={
            "mean_shift_sigma": round(max(base.mean_shift_sigma, 1.5 * shift), 3),
            "psi": round(max(base.psi, 1.5 * psi_max), 3),
        }
    )


def _fit_pca(
    mean: np.ndarray,
    std: np.ndarray,
    sd_eps: np.ndarray,
    opts: TrainOptions,
    feats: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    z = (feats - f_mean) / f_std
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    lam = s**2 / max(1, len(z) - 1)
    explained = np.cumsum(lam) / lam.sum()
    k = int(min(np.searchsorted(explained, opts.variance) + 1, z.shape[1] - 1))
    loadings = vt[:k].T
    lam_k = np.maximum(lam[:k], 1e-6)
    t = z @ loadings
    t2 = np.sum(t**2 / lam_k, axis=1)
    q = np.sum((z - t @ loadings.T) ** 2, axis=1)
    t2_ref = max(float(np.quantile(t2, 0.99)), 1e-6)
    q_ref = max(float(np.quantile(q, 0.99)), 1e-6)
    model = graph.pca_model(mean, std, opts.window, sd_eps, f_mean, f_std, loadings, lam_k, t2_ref, q_ref)
    return model, {"components": k, "explained_variance": round(float(explained[k - 1]), 4)}


def _fit_iforest(
    mean: np.ndarray,
    std: np.ndarray,
    sd_eps: np.ndarray,
    opts: TrainOptions,
    feats: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
        from sklearn.ensemble import IsolationForest
    except ImportError as exc:
        raise ModelError(
            f"isolation forest training needs the 'train' extra ({exc.name} missing): "
            "pip install 'cleanroom-edge[train]'"
        ) from None
    forest = IsolationForest(n_estimators=opts.trees, max_samples=256, random_state=opts.seed)
    forest.fit(feats.astype(np.float32))
    converted = convert_sklearn(
        forest,
        initial_types=[("input", FloatTensorType([None, feats.shape[1]]))],
        target_opset={"": graph.OPSET, "ai.onnx.ml": 3},
        model_optim=False,  # its identity-node pruning takes seconds and changes nothing we use
    )
    outputs = [o.name for o in converted.graph.output]
    score_name = next(n for n in outputs if "score" in n)
    model = graph.iforest_model(mean, std, opts.window, sd_eps, f_mean, f_std, converted, "input", score_name)
    return model, {"trees": opts.trees}
