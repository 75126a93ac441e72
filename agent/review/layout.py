"""The people's form of a report, section by section, shared by the HTML and the PDF: one place
decides what a reviewer reads, so the two formats cannot tell different stories."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from agent.review.exceptions import BatchReport

NONE = "none"


@dataclass(frozen=True, slots=True)
class Section:
    """A titled table; ``rows`` empty reads "none" (a clean batch says so, section by section)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str | None = None


def iso(ns: int | None) -> str:
    if ns is None:
        return "-"
    secs, frac = divmod(ns, 1_000_000_000)
    return f"{dt.datetime.fromtimestamp(secs, dt.UTC):%Y-%m-%d %H:%M:%S}.{frac // 1_000_000:03d}Z"


def _s(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def title(r: BatchReport) -> str:
    return f"Batch {r.header.batch_id}: exception report"


def sections(r: BatchReport) -> list[Section]:
    h = r.header
    out = [
        Section(
            "Batch",
            ("", ""),
            (
                ("batch id", h.batch_id),
                ("chain of identity", _s(h.coi_id)),
                ("product", _s(h.product)),
                ("devices", ", ".join(h.devices)),
                ("groups", "; ".join(", ".join(g) for g in h.groups) or NONE),
                ("from", iso(h.start_ts)),
                ("to", iso(h.end_ts) if h.end_ts is not None else "open (no end recorded)"),
                ("source", f"{r.source.kind} {r.source.path} (agent {_s(r.source.agent)})"),
                ("generated", iso(r.generated_ts)),
            ),
        ),
        Section(
            "Start, steps and end",
            ("time", "device", "phase", "step", "ref", "source", "actor", "reason"),
            tuple(
                (iso(c.ts), c.device, c.phase, _s(c.step), c.ref, c.source, c.actor, c.reason)
                for c in h.changes
            ),
        ),
        Section(
            "Records",
            ("device", "readings", "bad readings", "uncertain readings", "events"),
            tuple(
                (c.device, str(c.readings), str(c.bad), str(c.uncertain), str(c.events)) for c in r.records
            ),
        ),
        Section(
            "Limit excursions",
            (
                "#",
                "device",
                "tag",
                "limit",
                "level",
                "start",
                "end",
                "duration s",
                "peak",
                "limit value",
                "grade / class",
            ),
            tuple(
                (
                    str(n),
                    x.device,
                    x.tag,
                    _s(x.limit_kind),
                    _s(x.level),
                    iso(x.start_ts),
                    iso(x.end_ts) if x.end_ts is not None else "ongoing",
                    _s(x.duration_s),
                    _s(x.peak),
                    _s(x.limit),
                    _s(x.classification),
                )
                for n, x in enumerate(r.excursions)
            ),
        ),
        Section(
            "Device alarms",
            ("time", "device", "condition", "source", "message", "severity", "active", "acked"),
            tuple(
                (
                    iso(a.ts),
                    a.device,
                    _s(a.condition),
                    _s(a.source),
                    _s(a.message),
                    _s(a.severity_ua),
                    _s(a.active),
                    _s(a.acked),
                )
                for a in r.alarms
            ),
        ),
        Section(
            "Anomalies",
            ("device", "model", "binding", "start", "end", "peak score", "threshold", "top signals"),
            tuple(
                (
                    a.device,
                    _s(a.model) + (" (shadow)" if a.shadow else ""),
                    _s(a.binding),
                    iso(a.start_ts),
                    iso(a.end_ts) if a.end_ts is not None else "ongoing",
                    _s(a.peak_score),
                    _s(a.threshold),
                    ", ".join(f"{t.tag or t.signal} {_s(t.contribution)}" for t in a.top_signals) or "-",
                )
                for a in r.anomalies
            ),
        ),
        Section(
            "Reference-sample differences",
            (
                "sample time",
                "device",
                "tag",
                "offline",
                "online",
                "difference",
                "limit",
                "verdict",
                "sample",
                "actor",
                "reason",
            ),
            tuple(
                (
                    iso(x.sample_ts),
                    x.device,
                    x.tag,
                    _s(x.offline) + (f" {x.unit}" if x.unit else ""),
                    _s(x.online),
                    _s(x.difference),
                    _s(x.limit),
                    _verdict(x.within, x.online),
                    _s(x.sample_id),
                    _s(x.actor),
                    _s(x.reason),
                )
                for x in r.reference_samples.samples
            ),
            r.reference_samples.note or None,
        ),
        Section(
            "Data gaps",
            ("kind", "device / where", "from", "to", "cause", "detail", "readings lost"),
            tuple(
                (
                    g.kind,
                    _s(g.device),
                    _time_or_n(g.kind, g.from_ts),
                    _time_or_n(g.kind, g.to_ts),
                    g.cause,
                    _s(g.detail),
                    _s(g.readings_lost),
                )
                for g in r.gaps
            ),
        ),
        Section(
            "Configuration, model and limits changes",
            ("time", "change", "device", "actor", "reason", "detail"),
            tuple(
                (iso(c.ts), c.kind, _s(c.device), _s(c.actor), _s(c.reason), _s(c.detail)) for c in r.changes
            ),
        ),
        Section(
            "Operator actions",
            ("time", "action", "target", "device", "actor", "reason"),
            tuple(
                (iso(a.ts), a.action, _s(a.target), _s(a.device), a.actor, _s(a.reason))
                for a in r.operator_actions
            ),
        ),
        Section(
            "Batch conflicts and refused commands",
            ("time", "kind", "device", "source", "actor", "detail"),
            tuple(
                (iso(c.ts), c.kind, _s(c.device), _s(c.source), _s(c.actor), _s(c.detail))
                for c in r.conflicts
            ),
        ),
        _integrity(r),
    ]
    return out


def _verdict(within: bool | None, online: float | None) -> str:
    if online is None:
        return "not compared: no online reading near the sample time"
    return {True: "within limit", False: "BEYOND LIMIT", None: "no limit set"}[within]


def _time_or_n(kind: str, v: int | None) -> str:
    """Chain gaps count positions or seqs, the others are times."""
    return _s(v) if kind == "chain" else iso(v)


def _integrity(r: BatchReport) -> Section:
    i = r.integrity
    mac = "MACs checked" if i.mac_checked else "MACs not checked (no key)"
    verdict = (
        "chain intact, every gap explained" if i.ok else "FAILED: unexplained findings in the batch's records"
    )
    whole = "" if i.input_ok else " (the input as a whole has findings; those listed here concern this batch)"
    streams = ", ".join(
        f"{s.stream} i {_s(s.first_i)}..{'its end' if s.last_i is None else s.last_i} ({s.segments} segments)"
        for s in i.streams
    )
    note = f"{i.verifier} verifier: {verdict}; {mac}{whole}. Checked: {streams or NONE}."
    return Section(
        "Integrity verification",
        ("finding", "kind", "where", "range", "cause", "detail"),
        tuple(
            (
                f.what,
                f.kind,
                _s(f.where),
                f"{f.unit} {_s(f.first)}..{_s(f.last)}",
                f.cause or ("UNEXPLAINED" if f.problem else "-"),
                f.detail,
            )
            for f in i.findings
        ),
        note,
    )


SIGN_OFF = ("Reviewed by", "Date", "Decision", "Signature")


def plot_caption(r: BatchReport, n: int) -> str:
    p = r.plots[n]
    x = r.excursions[p.excursion]
    return (
        f"Excursion {p.excursion}: {p.device} {p.tag} {_s(x.level)} ({iso(x.start_ts)}), limit {_s(p.limit)}"
    )


def text_lines(s: Section, width: int) -> Sequence[str]:
    """A section as plain text lines (the PDF's form)."""
    lines = [s.title.upper()]
    if s.note:
        lines += _wrap(s.note, width)
    if not s.rows and s.columns:
        lines.append(f"  {NONE}")
    for row in s.rows:
        if any(s.columns):
            text = "; ".join(f"{c}: {v}" for c, v in zip(s.columns, row, strict=True))
        else:  # a list of fields: name and value
            text = ": ".join(row)
        lines += _wrap("  " + text, width)
    return lines


def _wrap(text: str, width: int) -> list[str]:
    out = []
    while len(text) > width:
        cut = text.rfind(" ", 0, width)
        cut = width if cut <= 0 else cut
        out.append(text[:cut])
        text = "    " + text[cut:].lstrip()
    out.append(text)
    return out
