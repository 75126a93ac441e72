"""Subcommands that run or inspect the agent: ``run``, ``validate``, ``status``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from agent.app.config import ConfigError, LoadedConfig, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="acquire, buffer and forward until SIGTERM/SIGINT")
    p.add_argument("-c", "--config", required=True, help="agent configuration (YAML)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a configuration; list every error with its YAML path and line")
    p.add_argument("config", nargs="?", help="agent configuration (YAML)")
    p.add_argument("-c", "--config", dest="config_opt", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="state of the running agent: devices, buffer, broker")
    p.add_argument("-c", "--config", help="configuration of the running agent (for its status address)")
    p.add_argument("--listen", help="status address HOST:PORT (instead of -c)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "demo", help="simulators + broker + agent, with a live view of what reaches the broker"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--broker", default=None, help="use this broker HOST:PORT instead of an embedded one")
    p.add_argument("--speed", type=float, default=60.0, help="simulator time acceleration")
    p.add_argument(
        "--workdir", default=None, help="where the demo keeps its config and buffer (default: temp)"
    )
    p.set_defaults(func=cmd_demo)


def load_or_report(path: str) -> LoadedConfig | None:
    """Load a config; on mistakes print them all (never a traceback) and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"{path}: {n} problem{'s' if n != 1 else ''}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    path = args.config or args.config_opt
    if not path:
        print("validate: give the configuration file: cleanroom-agent validate CONFIG", file=sys.stderr)
        return 2
    loaded = load_or_report(path)
    if loaded is None:
        return 2
    print(loaded.summary())
    return 0


async def _run_until_signal(loaded: LoadedConfig) -> None:
    from agent.app.runtime import run_agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_agent(loaded, stop)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.app.runtime import StartupError

    loaded = load_or_report(args.config)
    if loaded is None:
        return 2
    try:
        asyncio.run(_run_until_signal(loaded))
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.app.status import fetch_status

    if args.listen:
        listen = args.listen
    elif args.config:
        loaded = load_or_report(args.config)
        if loaded is None:
            return 2
        listen = loaded.config.agent.status_listen
    else:
        listen = "127.0.0.1:8765"
    try:
        status = fetch_status(listen)
    except ConnectionError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(s: dict[str, Any]) -> str:
    buf = s.get("buffer", {})
    broker = s.get("broker", {})
    lines = [
        f"agent {s.get('agent')}  version {s.get('version')}  config {str(s.get('config_sha256'))[:12]}",
        f"broker connected: {broker.get('connected')}  published {broker.get('published')}  "
        f"acked {broker.get('acked')}  inflight {broker.get('inflight')}",
        f"buffer depth: {buf.get('depth_readings')} readings in {buf.get('depth_records')} records, "
        f"oldest undelivered {buf.get('oldest_undelivered_age_s')} s, size {buf.get('size_bytes')} bytes",
        "",
        f"{'device':<16} {'state':<11} {'last poll':<25} {'polls':>7} {'failed':>6} {'errors':<30} "
        "rtt p50/p99 ms",
    ]
    for dev, d in (s.get("devices") or {}).items():
        groups = d.get("groups", {}).values()
        polls = sum(g.get("polls", 0) for g in groups)
        failed = sum(g.get("failed", 0) for g in groups)
        last = max((g.get("last_poll") or "" for g in groups), default="")
        drv = d.get("driver", {})
        errors = ",".join(f"{k}={v}" for k, v in drv.get("errors", {}).items()) or "-"
        rtt = f"{drv.get('rtt_p50_ms')}/{drv.get('rtt_p99_ms')}"
        lines.append(
            f"{dev:<16} {d.get('state', ''):<11} {last:<25} {polls:>7} {failed:>6} {errors:<30} {rtt}"
        )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli.demo import run_demo

    return run_demo(duration=args.duration, broker=args.broker, speed=args.speed, workdir=args.workdir)
