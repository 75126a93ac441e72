"""Reading historian exports: any delimiter (sniffed), a timestamp column (ISO 8601 or
unix seconds/ms/ns), numeric signal columns, an optional abnormal-label column, and
fault-window label files (``kind,device,start,end``)."""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent.transforms.anomaly.manifest import ModelError

TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date_time", "date")
NORMAL_LABELS = {"", "0", "normal", "ok", "false", "no", "good", "none"}


@dataclass
class Dataset:
    """A time series: ``ts`` unix seconds ``[n]``, ``values`` ``[n, S]`` (NaN = missing)."""

    ts: np.ndarray
    values: np.ndarray
    signals: list[str]
    abnormal: np.ndarray
    """Rows labelled abnormal by a label column (all False without one)."""
    source: str
    sha256: str

    def select(self, mask: np.ndarray) -> Dataset:
        return Dataset(
            self.ts[mask], self.values[mask], self.signals, self.abnormal[mask], self.source, self.sha256
        )


@dataclass(frozen=True)
class FaultLabel:
    kind: str
    device: str
    start: float
    end: float


def parse_time(text: str) -> float:
    """Unix seconds from ISO 8601 (naive = UTC) or a number (seconds, or ms/µs/ns by magnitude)."""
    s = text.strip()
    try:
        x = float(s)
    except ValueError:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"cannot read {text!r} as a time (ISO 8601 or unix seconds)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    for scale in (1.0, 1e3, 1e6, 1e9):
        if abs(x) / scale < 1e11:
            return x / scale
    return x / 1e9


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _number(text: str, decimal_comma: bool) -> float:
    s = text.strip()
    if not s:
        return math.nan
    if decimal_comma:
        s = s.replace(",", ".")
    if s.lower() in ("true", "false"):
        return float(s.lower() == "true")
    try:
        return float(s)
    except ValueError:
        return math.nan


def load_csv(
    path: Path,
    *,
    sep: str | None = None,
    time_column: str | None = None,
    signals: list[str] | None = None,
    label_column: str | None = None,
) -> Dataset:
    """Load a CSV; every problem is a :class:`ModelError` naming the file and column."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    text = raw.decode("utf-8-sig", errors="replace")
    if sep is None:
        try:
            sep = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|").delimiter
        except csv.Error:
            sep = ","
    rows = csv.reader(io.StringIO(text), delimiter=sep)
    header = [h.strip() for h in next(rows, [])]
    if not header:
        raise ModelError(f"{path}: empty file")
    lower = [h.lower() for h in header]
    if time_column is None:
        t_idx = next((lower.index(n) for n in TIME_NAMES if n in lower), 0)
    elif time_column in header:
        t_idx = header.index(time_column)
    else:
        raise ModelError(f"{path}: no time column {time_column!r}; columns are {', '.join(header)}")
    l_idx = None
    if label_column is not None:
        if label_column not in header:
            raise ModelError(f"{path}: no label column {label_column!r}; columns are {', '.join(header)}")
        l_idx = header.index(label_column)
    body = [r for r in rows if r and any(c.strip() for c in r)]
    if not body:
        raise ModelError(f"{path}: no data rows")
    decimal_comma = sep != "," and any("," in c for c in body[0] if c)
    if signals is None:
        candidates = [i for i in range(len(header)) if i not in (t_idx, l_idx)]
        sig_idx = [i for i in candidates if not math.isnan(_number(_cell(body[0], i), decimal_comma))]
        if not sig_idx:
            raise ModelError(f"{path}: no numeric signal columns found")
    else:
        missing = [s for s in signals if s not in header]
        if missing:
            raise ModelError(f"{path}: no column(s) {', '.join(missing)}; columns are {', '.join(header)}")
        sig_idx = [header.index(s) for s in signals]
    ts = np.empty(len(body))
    values = np.empty((len(body), len(sig_idx)))
    abnormal = np.zeros(len(body), bool)
    for n, r in enumerate(body):
        try:
            ts[n] = parse_time(_cell(r, t_idx))
        except ValueError as exc:
            raise ModelError(f"{path}: line {n + 2}, column {header[t_idx]!r}: {exc}") from None
        values[n] = [_number(_cell(r, i), decimal_comma) for i in sig_idx]
        if l_idx is not None:
            abnormal[n] = _cell(r, l_idx).strip().lower() not in NORMAL_LABELS
    order = np.argsort(ts, kind="stable")
    return Dataset(
        ts=ts[order],
        values=values[order],
        signals=[header[i] for i in sig_idx],
        abnormal=abnormal[order],
        source=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


def load_labels(path: Path) -> list[FaultLabel]:
    """Fault windows from a ``kind,device,start,end`` file (the simulators' ``labels.csv``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text))):
        try:
            out.append(
                FaultLabel(row["kind"], row["device"], parse_time(row["start"]), parse_time(row["end"]))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: line {n + 2}: need kind,device,start,end ({exc})") from None
    return out


def in_windows(ts: np.ndarray, labels: list[FaultLabel], margin: float = 0.0) -> np.ndarray:
    """Rows inside any label window (extended by ``margin`` seconds after its end)."""
    mask = np.zeros(len(ts), bool)
    for lab in labels:
        mask |= (ts >= lab.start) & (ts <= lab.end + margin)
    return mask
