"""``cleanroom-agent models train|evaluate|score|verify|approve``: model governance from the shell.

Bad input (missing file, wrong column, altered model) is one clear line on stderr and
exit code 2; ``verify`` exits 1 when any model does not match its manifest. ``evaluate --record``
changes a model's validation evidence, so it requires ``--actor`` and ``--reason``, which the
manifest keeps beside the metrics (and it voids an approval: the evidence approved is not the
evidence any more). ``approve`` releases a model for alarming, with ``--actor`` and ``--reason``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.buffer.audit import AttributionMissing, add_attribution_args, attribution_of
from agent.modeltools.calibrate import DEFAULT_FALSE_ALARM_RATE
from agent.modeltools.csvdata import Dataset, FaultLabel, in_windows, iso, load_csv, load_labels, parse_time
from agent.transforms.anomaly.manifest import (
    ModelError,
    approval_summary,
    approve,
    parse_condition,
    read_manifest,
    write_manifest,
)
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.offline import run_offline
from agent.transforms.anomaly.track import Settings
from agent.transforms.limits import LimitsConfig
from cleanroom_common.fields import parse_duration
from cleanroom_common.yamlfile import YamlError, read_yaml


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="train, evaluate, score and verify anomaly models")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="fit a model on normal data and freeze it (ONNX + manifest)")
    _data_args(t)
    t.add_argument("--buffer", type=Path, help="train from the agent's buffer database instead of CSV")
    t.add_argument("--device", help="device id to read from --buffer")
    t.add_argument("--since", help="first time to read from --buffer (ISO 8601 or unix s)")
    t.add_argument("--until", help="last time to read from --buffer (ISO 8601 or unix s)")
    t.add_argument(
        "--method",
        choices=["pca", "iforest", "autoencoder"],
        default="pca",
        help="PCA T²+Q (default), isolation forest, or a dense autoencoder (reconstruction error)",
    )
    t.add_argument("--trees", type=int, default=100, help="isolation forest: number of trees")
    t.add_argument("--out", type=Path, required=True, help="folder for <id>.onnx and <id>.model.yaml")
    t.add_argument("--id", dest="model_id", help="model id (default: <device kind>-<method>)")
    t.add_argument("--version", default="1.0.0")
    t.add_argument("--device-kind", default="generic")
    t.add_argument("--intended-use", help="intended use statement for the manifest")
    t.add_argument("--period", type=parse_duration, help="resampling period (default: median sample spacing)")
    t.add_argument(
        "--window",
        type=int,
        default=0,
        help="slots per window (default: 1/80 of the training slots, 5 to 30)",
    )
    t.add_argument(
        "--calibration",
        choices=["cv", "holdout"],
        default="cv",
        help="cv (default): blocked cross-validation over all the data, holds on a few hundred rows; "
        "holdout: the rule before issue 16 (held-out time blocks), for rebuilding older models",
    )
    t.add_argument(
        "--false-alarm-rate",
        type=float,
        default=DEFAULT_FALSE_ALARM_RATE,
        help="cv: target share of normal windows in alarm (default %(default)g)",
    )
    t.add_argument(
        "--raise-after", type=int, help="windows over the threshold that raise (default: cv from the data, 3)"
    )
    t.add_argument(
        "--clear-after", type=int, help="windows under it that clear (default: cv 2 x raise-after, 6)"
    )
    t.add_argument("--holdout", type=float, default=0.3, help="holdout: fraction held out for calibration")
    t.add_argument("--margin", type=float, help="threshold safety factor (default: cv 1.0, holdout 1.1)")
    t.add_argument(
        "--false-alarms-per-week",
        type=float,
        help="alarm starts per device-week, a cap beside --false-alarm-rate (default 0.2; cv: only once the "
        "data cover a day)",
    )
    t.add_argument(
        "--exclude-after", type=parse_duration, default=7200.0, help="recovery time dropped after faults"
    )
    t.add_argument(
        "--skip-start", type=parse_duration, default=0.0, help="start-up transient to drop per series"
    )
    t.add_argument(
        "--envelope",
        action="append",
        default=[],
        metavar="COND",
        help="operating state the model is for, e.g. 'culture_day>=0.125' (repeatable; "
        "SIGNAL>=MIN, SIGNAL<=MAX or MIN<=SIGNAL<=MAX): trained and scored only inside it",
    )
    t.add_argument("--units", default="", help="signal=unit,... for the manifest")
    t.add_argument("--notes", default="", help="provenance notes (scenario, seeds)")
    t.add_argument("--source", help="how the manifest names the training data (default: the file paths)")
    t.set_defaults(func=_guard(cmd_train))

    e = sub.add_parser("evaluate", help="event-level metrics on labelled data, plots, an HTML report")
    e.add_argument("--model", type=Path, required=True, help="manifest (*.model.yaml)")
    _data_args(e)
    e.add_argument("--grace", type=parse_duration, default=1800.0, help="recovery time after a fault")
    e.add_argument("--plots", type=Path, help="folder for one PNG per device (score and threshold)")
    e.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="folder for an HTML report (report.html) with its PNG plots: signals, score, contributions",
    )
    e.add_argument("--record", action="store_true", help="write the metrics into the manifest's validation")
    e.add_argument("--source", help="how --record names the evaluation data (default: the folders)")
    e.add_argument(
        "--limits", type=Path, help="YAML limits section (as in the agent config) for the rule baseline"
    )
    add_attribution_args(e, required=False)
    e.set_defaults(func=_guard(cmd_evaluate))

    s = sub.add_parser("score", help="score a CSV: timestamp, score, alarm, top_signal")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--csv", type=Path, required=True)
    s.add_argument("--sep")
    s.add_argument("--time-column")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=_guard(cmd_score))

    v = sub.add_parser("verify", help="check every model's file against its manifest hash")
    v.add_argument("paths", type=Path, nargs="+", help="manifests or folders of them")
    v.set_defaults(func=_guard(cmd_verify))

    a = sub.add_parser(
        "approve", help="release a model for alarming (unapproved models run in shadow mode only)"
    )
    a.add_argument("--model", type=Path, required=True, help="manifest (*.model.yaml)")
    add_attribution_args(a)
    a.set_defaults(func=_guard(cmd_approve))


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", type=Path, action="append", default=[], help="CSV file (repeatable)")
    p.add_argument("--data", type=Path, action="append", default=[], help="folder of per-device CSVs")
    p.add_argument("--match", default="*.csv", help="file pattern inside --data folders")
    p.add_argument("--labels", type=Path, action="append", default=[], help="kind,device,start,end files")
    p.add_argument("--sep", help="delimiter (default: sniffed)")
    p.add_argument("--time-column", help="timestamp column (default: timestamp/time/... or the first)")
    p.add_argument("--signals", help="comma-separated signal columns (default: all numeric)")
    p.add_argument("--label-column", help="column marking abnormal rows (excluded from training)")


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ModelError, AttributionMissing) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _inputs(
    args: argparse.Namespace, signals: list[str] | None
) -> tuple[dict[str, Dataset], list[FaultLabel]]:
    """Device id (file stem) -> data, and the fault labels (``labels.csv`` of --data folders)."""
    files = [(f, True) for f in args.csv]
    labels_files = list(args.labels)
    for folder in args.data:
        if not folder.is_dir():
            raise ModelError(f"{folder}: not a folder")
        files += [(f, False) for f in sorted(folder.glob(args.match)) if f.name != "labels.csv"]
        if (folder / "labels.csv").is_file() and folder / "labels.csv" not in labels_files:
            labels_files.append(folder / "labels.csv")
    if not files:
        raise ModelError("no data: give --csv FILE or --data FOLDER")
    data: dict[str, Dataset] = {}
    for f, explicit in files:
        if signals is not None and not explicit:
            header = f.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
            if not all(s in header for s in signals):
                continue  # another device kind's file in a shared folder
        data[f.stem] = load_csv(
            f, sep=args.sep, time_column=args.time_column, signals=signals, label_column=args.label_column
        )
    if not data:
        raise ModelError(
            f"no file in {', '.join(map(str, args.data))} has the signals {', '.join(signals or [])}"
        )
    labels = [lab for f in labels_files for lab in load_labels(f)]
    return data, labels


def cmd_train(args: argparse.Namespace) -> int:
    from agent.modeltools.train import TrainOptions, train

    envelope = [parse_condition(c) for c in args.envelope]
    env_names = list(dict.fromkeys(c.signal for c in envelope))
    signals = args.signals.split(",") if args.signals else None
    if signals is not None:
        signals = [s for s in signals if s not in env_names] + env_names
    labels: list[FaultLabel] = []
    if args.buffer is not None:
        if not args.device:
            raise ModelError("--buffer needs --device")
        datasets = [_from_buffer(args.buffer, args.device, args.since, args.until, signals)]
    else:
        data, labels = _inputs(args, signals)
        datasets = list(data.values())
    datasets = [_envelope_last(ds, env_names) for ds in datasets]
    kept, excluded = [], 0
    for ds in datasets:
        device = Path(ds.source).stem
        mask = ds.abnormal | in_windows(ds.ts, [f for f in labels if f.device == device], args.exclude_after)
        excluded += int(mask.sum())
        kept.append(ds.select(~mask))
    units = dict(u.split("=", 1) for u in args.units.split(",") if "=" in u)
    opts = TrainOptions(
        model_id=args.model_id or f"{args.device_kind}-{args.method}",
        method=args.method,
        version=args.version,
        device_kind=args.device_kind,
        period=args.period,
        window=args.window,
        raise_after=args.raise_after,
        clear_after=args.clear_after,
        calibration=args.calibration,
        false_alarm_rate=args.false_alarm_rate,
        holdout=args.holdout,
        margin=args.margin,
        false_alarms_per_week=args.false_alarms_per_week,
        units=units,
        notes=args.notes,
        skip_start=args.skip_start,
        envelope=envelope,
        source=args.source,
        trees=args.trees,
        **({"intended_use": args.intended_use} if args.intended_use else {}),
    )
    path = train(kept, opts, args.out, excluded_rows=excluded)
    m = read_manifest(path)
    print(f"model {m.id} {m.version} sha256 {m.sha256}")
    print(f"written {path} and {path.parent / m.file}")
    print(json.dumps({"threshold": m.threshold, **m.validation}, indent=1))
    return 0


def _envelope_last(ds: Dataset, env_names: list[str]) -> Dataset:
    """The columns reordered as a model needs them: its inputs, then the envelope signals."""
    if missing := [n for n in env_names if n not in ds.signals]:
        raise ModelError(f"{ds.source}: no column {', '.join(missing)} for the envelope")
    order = [n for n in ds.signals if n not in env_names] + env_names
    idx = [ds.signals.index(n) for n in order]
    return Dataset(ds.ts, ds.values[:, idx], order, ds.abnormal, ds.source, ds.sha256)


def _from_buffer(
    db: Path, device: str, since: str | None, until: str | None, signals: list[str] | None
) -> Dataset:
    """The device's committed readings, one row per block (only good readings)."""
    from agent.buffer.config import BufferConfig
    from agent.buffer.store import Buffer

    if not db.is_file():
        raise ModelError(f"{db}: no buffer database")
    buf = Buffer(BufferConfig(path=db), agent_id=None)  # a tool: reads whichever agent owns it
    try:
        buf.open(readonly=True)
        since_ns = None if since is None else int(parse_time(since) * 1e9)
        until_ns = None if until is None else int(parse_time(until) * 1e9)
        rows: list[tuple[float, dict[str, float]]] = []
        digest = hashlib.sha256()  # the training data's identity (Provenance.data_sha256)
        for rec in buf.records(device=device, since_ns=since_ns, until_ns=until_ns):
            digest.update(rec.body.encode("utf-8") + b"\n")
            body = json.loads(rec.body)
            quality = body.get("quality")
            src = body.get("src_ts")
            ts = (src if isinstance(src, int) else body["ts"]) / 1e9
            vals = {
                t: float(v)
                for i, (t, v) in enumerate(zip(body["tags"], body["values"], strict=True))
                if isinstance(v, int | float) and (quality is None or quality[i] == "good")
            }
            rows.append((ts, vals))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{db}: cannot read the buffer: {exc}") from None
    finally:
        buf.close()
    if not rows:
        raise ModelError(f"{db}: no readings of device {device!r} in that time range")
    names = signals or sorted({t for _, v in rows for t in v})
    values = np.array([[v.get(n, np.nan) for n in names] for _, v in rows])
    ts_arr = np.array([t for t, _ in rows])
    order = np.argsort(ts_arr, kind="stable")
    abnormal = np.zeros(len(rows), bool)
    return Dataset(ts_arr[order], values[order], names, abnormal, f"{db}#{device}", digest.hexdigest())


def cmd_evaluate(args: argparse.Namespace) -> int:
    from agent.modeltools.evaluate import evaluate
    from agent.modeltools.report import plot, require_matplotlib, write_report

    who = attribution_of(args, "evaluate --record") if args.record else None  # before minutes of work
    model = LoadedModel(args.model)
    data, labels = _inputs(args, model.manifest.data_names)
    limits, limit_data = None, None
    if args.limits is not None:
        limits = _limits(args.limits)
        limit_data = {
            d: load_csv(Path(ds.source), sep=args.sep, time_column=args.time_column) for d, ds in data.items()
        }
    if args.report is not None or args.plots is not None:
        require_matplotlib()  # before minutes of scoring, not after
    metrics, results = evaluate(model, data, labels, grace=args.grace, limits=limits, limit_data=limit_data)
    if args.plots is not None:
        metrics["plots"] = [str(p) for p in plot(model, results, args.plots, model.manifest.threshold)]
    if args.report is not None:
        metrics["report"] = str(write_report(model, metrics, results, args.report))
    print(json.dumps(metrics, indent=1))
    if who is not None:
        keep = (
            "precision",
            "recall",
            "f1",
            "false_alarms_per_device_week",
            "delay_median_s",
            "delay_p90_s",
            "rule_limits_delay_median_s",
            "model_earlier_than_rules",
        )
        extra = {f"eval_{k}": metrics[k] for k in keep}
        extra.update(
            eval_data=args.source or ", ".join(sorted({str(Path(d.source).parent) for d in data.values()})),
            eval_faults=metrics["faults"],
            eval_device_days=metrics["device_days"],
            eval_baseline_limit_delay_median_s=metrics["baseline_limit_delay_median_s"],
            eval_recorded_by=who.actor,
            eval_recorded_reason=who.reason,
            eval_recorded_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        m = model.manifest
        write_manifest(args.model, m.model_copy(update={"validation": {**m.validation, **extra}}))
        if m.approval is not None:
            print(
                f"note: the approval by {m.approval.actor} at {m.approval.at} no longer holds (the evidence "
                "changed): the model runs in shadow mode until it is approved again",
                file=sys.stderr,
            )
    return 0


def _limits(path: Path) -> LimitsConfig:
    try:
        raw = read_yaml(path).data
        return LimitsConfig.model_validate(raw.get("limits", raw) if isinstance(raw, dict) else raw)
    except (YamlError, ValidationError) as exc:
        raise ModelError(f"{path}: not a limits section: {exc}") from None


def cmd_score(args: argparse.Namespace) -> int:
    model = LoadedModel(args.model)
    names = model.manifest.signal_names
    ds = load_csv(args.csv, sep=args.sep, time_column=args.time_column, signals=model.manifest.data_names)
    r = run_offline(model, Settings.of(model.manifest), ds.ts, ds.values)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "score", "alarm", "top_signal"])
        for ts, score, alarm, top in zip(r.ts, r.scores, r.alarm, r.top_signal, strict=True):
            w.writerow(
                [
                    iso(ts),
                    "" if np.isnan(score) else f"{score:.6g}",
                    int(alarm),
                    names[top] if top >= 0 else "",
                ]
            )
    print(
        f"{len(r.ts)} windows scored into {args.out}; {sum(t.phase == 'start' for t in r.transitions)} alarms"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifests: list[Path] = []
    for p in args.paths:
        manifests += sorted(p.glob("*.model.yaml")) if p.is_dir() else [p]
    if not manifests:
        print("error: no *.model.yaml found", file=sys.stderr)
        return 2
    bad = 0
    for path in manifests:
        try:
            m = LoadedModel(path).manifest  # hash check, and the graph must load as the agent loads it
            print(f"ok       {path}  {m.id} {m.version} sha256 {m.sha256[:16]}…; {approval_summary(m)}")
        except ModelError as exc:
            bad += 1
            print(f"MISMATCH {path}: {exc}")
    return 1 if bad else 0


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve exactly the model at hand: its ONNX file must match the manifest and load as the
    agent loads it, and the approval is bound to the manifest's present content."""
    who = attribution_of(args, "approve")
    m = LoadedModel(args.model).manifest
    before = m.approval
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    approved = approve(m, who.actor, who.reason, at)
    write_manifest(args.model, approved)
    a = approved.approval
    assert a is not None
    print(f"model {m.id} {m.version} approved by {a.actor} at {a.at}")
    print(f"  onnx sha256 {a.sha256}, manifest content sha256 {a.manifest_sha256}")
    if before is not None:
        print(f"  replaces the approval by {before.actor} at {before.at}")
    return 0
