"""``cleanroom-agent verify --capture FILE | --buffer PATH [--key FILE] [--json]``: is the record
complete and unaltered, and is every gap explained? (docs/integrity.md).

Exit 0 when everything is explained, 1 on any unexplained gap, chain break, alteration or replay
(and any segment the agent quarantined), 2 on bad input. Works without the gateway: a capture
needs nothing but the messages, a buffer file nothing but itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core import chain

if TYPE_CHECKING:
    from agent.buffer.verify import BufferReport
    from agent.integrity.verify import CaptureReport


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="check a capture or a buffer file: chain, completeness, explained gaps")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--capture", metavar="FILE", help="capture (JSON lines, as `capture` writes them)")
    src.add_argument("--buffer", metavar="PATH", help="buffer database file (opened read-only)")
    p.add_argument("--key", metavar="FILE", help="the agent's HMAC key file: check every segment's MAC")
    p.add_argument("--prefix", help="topic prefix of the agent (default: the one its segments use)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)


class _BadInput(Exception):
    """One line, exit code 2."""


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = _read_key(args.key) if args.key else None
        if args.capture:
            return _verify_capture(args, key)
        return _verify_buffer(args, key)
    except _BadInput as exc:
        print(f"cleanroom-agent verify: error: {exc}", file=sys.stderr)
        return 2


def _read_key(path: str) -> bytes:
    try:
        return chain.read_key_file(path)
    except ValueError as exc:
        raise _BadInput(f"--key {exc}") from None


def _verify_capture(args: argparse.Namespace, key: bytes | None) -> int:
    from agent.integrity.capture import CaptureError, read_capture
    from agent.integrity.verify import verify_capture

    try:
        messages = read_capture(Path(args.capture))
    except CaptureError as exc:
        raise _BadInput(f"--capture {args.capture}: {exc}") from None
    report = verify_capture(messages, key, args.prefix)
    if args.json:
        doc = {"ok": report.ok, "problems": report.problems, **dataclasses.asdict(report)}
        print(json.dumps(doc, indent=2))
    else:
        print(format_capture_report(args.capture, report))
    return 0 if report.ok else 1


def _verify_buffer(args: argparse.Namespace, key: bytes | None) -> int:
    from agent.buffer.verify import BufferUnreadable, check_buffer

    path = Path(args.buffer)
    try:
        report = check_buffer(path, key)
    except (BufferUnreadable, sqlite3.Error) as exc:
        raise _BadInput(str(exc)) from None
    if args.json:
        print(json.dumps({"ok": report.ok, **dataclasses.asdict(report)}, indent=2))
    else:
        print(format_buffer_report(report))
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- text


def _iso(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return f"{dt.datetime.fromtimestamp(secs, dt.UTC):%Y-%m-%dT%H:%M:%S}.{frac // 1_000_000:03d}Z"


def _lines(lines: tuple[int, ...]) -> str:
    if not lines:
        return ""
    return f" [line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}]"


def _span(kind: str, first: int, last: int) -> str:
    if kind == "time":
        return f"{_iso(first)} .. {_iso(last)} ({(last - first) / 1e9:.1f} s without readings)"
    if kind == "restart":
        return f"chain restarted at i 0 after i {first}"
    unit = "i" if kind == "segments" else "seq"
    return f"{unit} {first}" if first == last else f"{unit} {first}..{last}"


def format_capture_report(path: str, r: CaptureReport) -> str:
    """People's form of a :class:`~agent.integrity.verify.CaptureReport`: every unexplained finding
    marked, every explained one with its cause."""
    mac = "checked" if r.mac_checked else "not checked (no --key)"
    if r.mac_unchecked:
        mac += f" ({r.mac_unchecked} segments from before the key took effect rest on the chain alone)"
    out = [
        f"capture {path}: {r.messages} messages, agent {r.agent}, prefix {r.prefix}",
        f"sessions {len(r.sessions)}, MACs {mac}, {r.records} records ({r.readings} readings)",
        "",
        f"{'stream':<28} {'segments':>8} {'i':>15} {'records':>8} {'readings':>9}",
    ]
    for s in r.streams:
        out.append(
            f"{s.stream:<28} {s.segments:>8} {f'{s.first_i}..{s.last_i}':>15} {s.records:>8} {s.readings:>9}"
        )
    if r.seq_window is not None:
        out.append(f"\nseqs {r.seq_window[0]}..{r.seq_window[1]} checked for completeness")
    if r.gaps:
        out.append("\ngaps:")
        for g in r.gaps:
            cause = g.cause if g.cause is not None else "UNEXPLAINED"
            out.append(f"  {g.kind:<8} {g.where}: {_span(g.kind, g.first, g.last)}: {cause}{_lines(g.lines)}")
    if r.duplicates:
        out.append("\nduplicates:")
        for d in r.duplicates:
            cause = (
                d.cause
                if d.cause is not None
                else "REPLAYED: no reconnect or replay recorded between the copies"
            )
            out.append(f"  {d.stream} i {d.i}: {cause}{_lines(d.lines)}")
    if r.breaks:
        out.append("\nbreaks:")
        for b in r.breaks:
            where = f" {b.stream}" if b.stream is not None else ""
            at = f" i {b.i}" if b.i is not None else ""
            out.append(f"  {b.kind.upper()}{where}{at}: {b.detail}{_lines(b.lines)}")
    verdict = "OK: complete, unaltered, every gap explained" if r.ok else f"FAILED: {r.problems} unexplained"
    out.append(f"\n{verdict}")
    return "\n".join(out)


def format_buffer_report(report: BufferReport) -> str:
    """People's form of :class:`~agent.buffer.verify.BufferReport`."""
    mac = "checked" if report.mac_checked else "not checked (no --key)"
    if unchecked := sum(s.mac_unchecked for s in report.streams):
        mac += f" ({unchecked} segments from before the key took effect rest on the chain alone)"
    out = [
        f"buffer {report.path}: agent {report.agent}, {report.segments} segments, {report.records} records",
        f"MACs {mac}",
        "",
        f"{'stream':<28} {'segments':>8} {'i':>15} {'next i':>7} {'records':>8} {'readings':>9}",
    ]
    for s in report.streams:
        span = "-" if s.first_i is None else f"{s.first_i}..{s.last_i}"
        out.append(
            f"{s.stream:<28} {s.segments:>8} {span:>15} {s.next_i if s.next_i is not None else '-':>7} "
            f"{s.records:>8} {s.readings:>9}"
        )
    if report.gaps:
        out.append("\nremoved on purpose (chain_gaps):")
        out.extend(f"  {g.stream} {_span('segments', g.first_i, g.last_i)}: {g.reason} at {_iso(g.ts_ns)}"
                   for g in report.gaps)  # fmt: skip
    if report.quarantined:
        out.append("\nQUARANTINED by the agent (never sent):")
        out.extend(f"  {q.stream} i {q.i}: {q.problem} at {_iso(q.ts_ns)}" for q in report.quarantined)
    if report.breaks:
        out.append("\nbreaks:")
        for b in report.breaks:
            row = f" [row id {b.segment_id}]" if b.segment_id is not None else ""
            span = _span("segments", b.first_i, b.last_i)
            out.append(f"  {str(b.kind).upper()} {b.stream} {span}: {b.detail}{row}")
    problems = len(report.breaks) + len(report.quarantined)
    out.append("\nOK: every stored chain holds" if report.ok else f"\nFAILED: {problems} findings")
    return "\n".join(out)
