"""``cleanroom-agent buffer stats|export|replay``: the buffer from the command line.

These work on the database file directly (``--db``) or through the agent config
(``-c``), whether or not the agent is running: SQLite WAL lets a reader look while the
agent writes, and a writer (``replay``) waits for the agent's commit to finish. Export
expands blocks into one row per reading, so a quality reviewer gets a plain table;
replay marks delivered segments undelivered again, so the forwarder republishes them,
byte for byte (a consumer de-duplicates by ``(agent, seq)``), and records who asked for
it and why in the audit trail.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from agent.buffer.audit import Auditor, add_attribution_args
from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredRecord
from agent.buffer.store import Buffer
from agent.core import chain
from agent.core.records import Event

EXPORT_COLUMNS = (
    "agent", "device", "group", "tag", "seq", "value", "unit", "quality", "reason",
    "source_ts", "source_ts_ns", "acq_ts", "acq_ts_ns",
)  # fmt: skip


class UsageError(Exception):
    """Bad input: reported as one line and exit code 2."""


def iso_ns(ns: int | None) -> str | None:
    """ISO-8601 UTC with all nine fractional digits (nanoseconds survive the round trip)."""
    if ns is None:
        return None
    secs, frac = divmod(ns, 1_000_000_000)
    return f"{dt.datetime.fromtimestamp(secs, dt.UTC):%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def parse_time(text: str | None) -> int | None:
    """ISO-8601 to UTC ns; a time without offset is taken as UTC (the buffer's clock)."""
    if text is None:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an ISO-8601 time (e.g. 2026-05-01T08:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def expand(agent: str, record: StoredRecord, tags: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """One dict per reading of a stored block, in tag order."""
    b = json.loads(record.body)
    n = b["n"]
    quality = b.get("quality") or ["good"] * n
    reasons = b.get("reasons") or [None] * n
    src = b.get("src_ts")
    for i in range(n):
        tag = b["tags"][i]
        if tags is not None and tag not in tags:
            continue
        src_i = src[i] if isinstance(src, list) else src
        yield {
            "agent": agent,
            "device": record.device,
            "group": b["group"],
            "tag": tag,
            "seq": b["seq"] + i,
            "value": b["values"][i],
            "unit": b["units"][i],
            "quality": quality[i],
            "reason": reasons[i],
            "source_ts": iso_ns(src_i),
            "source_ts_ns": src_i,
            "acq_ts": iso_ns(b["ts"]),
            "acq_ts_ns": b["ts"],
        }


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def _buffer_config(args: argparse.Namespace) -> tuple[BufferConfig, bytes | None]:
    """The buffer's settings and the HMAC key its segments are signed with (``--key``, or the
    config's ``integrity.hmac_key_file``)."""
    from agent.app.config import ConfigError, load_config, read_hmac_key

    key_file = getattr(args, "key", None)
    try:
        key = None if key_file is None else read_hmac_key(Path(key_file))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.db is not None:
        return BufferConfig(path=Path(args.db)), key
    try:
        loaded = load_config(args.config)
        return loaded.config.buffer, key if key is not None else loaded.hmac_key()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # the configured key file
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read configuration {args.config}: {exc.strerror}") from None


@contextlib.contextmanager
def _opened(args: argparse.Namespace, readonly: bool) -> Iterator[Buffer]:
    cfg, key = _buffer_config(args)
    if not cfg.path.is_file():
        raise UsageError(f"no buffer database at {cfg.path}")
    core = Buffer(cfg, agent_id=None, key=key)
    try:
        core.open(readonly=readonly)
    except (sqlite3.DatabaseError, RuntimeError) as exc:
        raise UsageError(f"{cfg.path}: {exc}") from None
    try:
        yield core
    finally:
        core.close()


def _check_key(core: Buffer) -> None:
    """Before a tool signs a segment: the key must be the one the buffer's streams are signed with
    now, or the agent would quarantine what the tool writes (and an unsigned audit record in a signed
    trail would be a break). Only the public key ids are compared, never the key."""
    signed = {
        str(k) for (k,) in core.conn.execute("SELECT DISTINCT key_id FROM chain WHERE key_id IS NOT NULL")
    }
    if not signed:
        return  # unsigned: what the tool writes is not MAC-checked, signed or not
    if core.key is None:
        raise UsageError(f"{core.cfg.path} is signed: give its HMAC key (--key FILE, or -c CONFIG)")
    if signed != {chain.key_id(core.key)}:
        raise UsageError(f"{core.cfg.path}: the HMAC key given is not the one its segments are signed with")


def cmd_stats(args: argparse.Namespace) -> int:
    with _opened(args, readonly=True) as core:
        stats = core.stats()
        stats["agent"] = core.agent_id
    print(json.dumps(stats, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    since, until = parse_time(args.since), parse_time(args.until)
    tags = set(args.tag) if args.tag else None
    with _opened(args, readonly=True) as core:
        agent = core.agent_id or ""
        try:
            out: IO[str] = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror}") from None
        try:
            rows = (
                row
                for record in core.records(args.device, since, until)
                for row in expand(agent, record, tags)
            )
            count = 0
            if args.format == "csv":
                writer = csv.writer(out)
                writer.writerow(EXPORT_COLUMNS)
                for row in rows:
                    writer.writerow([_csv_cell(row[c]) for c in EXPORT_COLUMNS])
                    count += 1
            else:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                    count += 1
        finally:
            if out is not sys.stdout:
                out.close()
    print(f"exported {count} readings", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    since, until = parse_time(args.since), parse_time(args.until)
    with _opened(args, readonly=False) as core:
        _check_key(core)
        done = core.mark_undelivered(args.device, since, until)

        def commit(event: Event) -> None:
            core.commit([event])

        selection = {"device": args.device, "since": args.since, "until": args.until}
        Auditor(commit, core.agent_id or "").record(
            "buffer_replay",
            str(core.cfg.path),
            actor=args.actor,
            reason=args.reason,
            new={"segments": done.segments, "readings": done.readings, **selection},
            extra={"segments": [s.data() for s in done.intervals]},
        )
    print(f"marked {done.segments} delivered segments ({done.readings} readings) for republishing")
    return 0


def _run(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except UsageError as exc:
            print(f"cleanroom-agent buffer: error: {exc}", file=sys.stderr)
            return 2
        except sqlite3.Error as exc:
            print(f"cleanroom-agent buffer: database error: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:  # a stored segment that does not parse (altered behind our back)
            print(f"cleanroom-agent buffer: error: {exc}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("buffer", help="inspect, export and replay the store-and-forward buffer")
    actions = p.add_subparsers(dest="buffer_command", required=True, metavar="ACTION")

    def action(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_)
        src = a.add_mutually_exclusive_group(required=True)
        src.add_argument("--db", metavar="PATH", help="buffer database file")
        src.add_argument("-c", "--config", metavar="CONFIG", help="agent config (its buffer.path is used)")
        a.set_defaults(func=_run(func))
        return a

    action("stats", "depth, age of the oldest undelivered record, size, counters (JSON)", cmd_stats)

    export = action("export", "one row per reading (CSV or JSON lines)", cmd_export)
    export.add_argument("--device", help="only this device")
    export.add_argument("--tag", action="append", help="only this tag (repeatable)")
    export.add_argument("--since", help="acquired at or after this ISO-8601 time (UTC if no offset)")
    export.add_argument("--until", help="acquired before this ISO-8601 time (UTC if no offset)")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    export.add_argument("--out", metavar="FILE", help="write here instead of stdout")

    replay = action("replay", "mark delivered segments undelivered so they are published again", cmd_replay)
    replay.add_argument("--device", help="only this device")
    replay.add_argument("--since", help="acquired at or after this ISO-8601 time (UTC if no offset)")
    replay.add_argument("--until", help="acquired before this ISO-8601 time (UTC if no offset)")
    replay.add_argument(
        "--key", metavar="FILE", help="HMAC key file of a signed buffer (default with -c: the config's)"
    )
    add_attribution_args(replay)
