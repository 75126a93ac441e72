"""``cleanroom-agent status``: the running agent's health, devices, buffer and broker, asked over its
status listener. Exit 0 healthy, 1 unhealthy or not answering (a monitoring script needs no parsing:
``cleanroom-agent status -c agent.yaml || page-someone``), 2 for a bad configuration or address."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.validate import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status", help="state of the running agent: health, devices, buffer, broker (exit 1 when unhealthy)"
    )
    p.add_argument("-c", "--config", help="configuration of the running agent (for its status address)")
    p.add_argument("--listen", help="status address HOST:PORT (instead of -c)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)


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
    except ValueError as exc:
        print(f"--listen {listen!r}: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if status.get("health", {}).get("ok") is True else 1


def format_status(s: dict[str, Any]) -> str:
    buf = s.get("buffer", {})
    broker = s.get("broker", {})
    security = s.get("security", {})
    integrity = s.get("integrity", {})
    clock = integrity.get("clock", {})
    health = s.get("health") or {}
    problems = health.get("problems", [])
    lines = [
        f"agent {s.get('agent')}  version {s.get('version')}  config {str(s.get('config_sha256'))[:12]}",
        "health: " + _verdict(health),
        *(
            f"PROBLEM {p.get('kind')} {p.get('subject')}: {p.get('detail')}"
            + (f" (since {p['since']})" if p.get("since") else "")
            for p in problems
        ),
        f"broker connected: {broker.get('connected')}  published {broker.get('published')}  "
        f"acked {broker.get('acked')}  inflight {broker.get('inflight')}",
        f"buffer depth: {buf.get('depth_readings')} readings in {buf.get('depth_records')} records, "
        f"oldest undelivered {buf.get('oldest_undelivered_age_s')} s, size {buf.get('size_bytes')} bytes",
        f"security: mqtt tls {security.get('mqtt_tls') or '-'}  "
        f"status listener {security.get('status_listener')}",
        f"integrity: chain sha256{' + hmac' if integrity.get('hmac') else ''}  "
        f"clock synced {clock.get('synced')} offset {clock.get('offset_s')} s "
        f"max error {clock.get('max_error_s')} s",
        *(f"WARNING {w}" for w in security.get("warnings", [])),
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


def _verdict(health: dict[str, Any]) -> str:
    if "ok" not in health:
        return "unknown (the agent reports no health: a version before it had one)"
    return "ok" if health["ok"] is True else f"UNHEALTHY ({len(health.get('problems', []))} problems)"
