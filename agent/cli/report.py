"""``cleanroom-agent report batch ID [--buffer PATH | --capture FILE | -c CONFIG] [--format
html|json|pdf] [--out FILE]``: the review-by-exception report of one batch (docs/operations.md,
"Reviewing a batch").

Read-only on every input: a buffer is opened read-only (``-c`` names the running agent's; SQLite
WAL lets it be read while the agent writes), a capture is only read. Exit 0 with the report written
(whatever it finds: the findings are for the reviewer), 2 on bad input: an unreadable file, an
unknown batch (the message lists the batches the input holds), html or pdf without matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FORMATS = ("html", "json", "pdf")


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="reports for quality review (report batch ID)")
    kinds = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    b = kinds.add_parser("batch", help="the exception report of one batch: html, json or pdf")
    b.add_argument("batch_id", metavar="ID", help="the batch (lot) id, as assigned")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--buffer", metavar="PATH", help="buffer database file (opened read-only)")
    src.add_argument("--capture", metavar="FILE", help="capture (JSON lines, as `capture` writes them)")
    src.add_argument("-c", "--config", help="agent configuration: its buffer, key and particle limits")
    b.add_argument("--key", metavar="FILE", help="the agent's HMAC key file: check every segment's MAC")
    b.add_argument("--format", choices=FORMATS, default="html", help="default: html")
    b.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    b.set_defaults(func=cmd_report_batch)


class _BadInput(Exception):
    """One line, exit code 2."""


class _Reported(Exception):
    """Bad input already reported (a configuration's mistakes, each on its line): exit code 2."""


def _fail(message: str) -> int:
    print(f"cleanroom-agent report: error: {message}", file=sys.stderr)
    return 2


def cmd_report_batch(args: argparse.Namespace) -> int:
    from agent.review.exceptions import BatchNotFound
    from agent.review.plots import ExtraMissing, pyplot

    try:
        if args.format != "json":
            pyplot()  # before reading anything: say at once what to install
        data = _report(args)
    except ExtraMissing as exc:
        return _fail(str(exc))
    except BatchNotFound as exc:
        return _fail(str(exc))
    except _BadInput as exc:
        return _fail(str(exc))
    except _Reported:
        return 2
    if args.out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    try:
        Path(args.out).write_bytes(data)
    except OSError as exc:
        return _fail(f"--out {args.out}: {exc.strerror or exc}")
    return 0


def _report(args: argparse.Namespace) -> bytes:
    from agent.core.records import now_ns
    from agent.review import collect, render_html, render_json, render_pdf
    from agent.review.exceptions import build_report, window

    key = _key(args.key) if args.key else None
    classes = None
    path = args.buffer
    if args.config:
        path, config_key, classes = _from_config(args.config)
        key = key if key is not None else config_key
    try:
        if args.capture:
            collected = collect.read_capture_file(Path(args.capture), key)
            report = build_report(collected, args.batch_id, generated_ts=now_ns(), classes=classes)
        else:
            with collect.open_buffer(Path(path)) as buf:  # blocks are read while the report is built
                collected = collect.read_buffer(buf, key)
                devices, since, until = window(collected, args.batch_id)
                collected.blocks = collect.buffer_blocks(buf, devices, since, until)
                report = build_report(collected, args.batch_id, generated_ts=now_ns(), classes=classes)
    except collect.ReportInputError as exc:
        raise _BadInput(str(exc)) from None
    renderer = {"json": render_json.render, "html": render_html.render, "pdf": render_pdf.render}
    return renderer[args.format](report)


def _key(path: str) -> bytes:
    from agent.core import chain

    try:
        return chain.read_key_file(path)
    except ValueError as exc:
        raise _BadInput(f"--key {exc}") from None


def _from_config(config: str) -> tuple[str, bytes | None, dict[str, Any]]:
    """The configured buffer, HMAC key and the rooms of the particle counters (for the grade or
    class of their excursions)."""
    from agent.cli.validate import load_or_report
    from agent.review.exceptions import Classification

    loaded = load_or_report(config)  # prints every mistake with its line
    if loaded is None:
        raise _Reported
    try:
        key = loaded.hmac_key()
    except ValueError as exc:
        raise _BadInput(f"{config}: {exc}") from None
    limits = loaded.config.limits
    classes = {
        p.device: Classification(p.grade, p.iso_class_at_rest, p.iso_class_in_operation)
        for p in (limits.particles if limits is not None else ())
    }
    return str(loaded.config.buffer.path), key, classes
