"""``cleanroom-agent reload -c CONFIG``: make the running agent re-read its configuration and say
whether it applied it.

The agent is found through its status listener (``agent.status_listen`` of the configuration),
which names its process id; it is sent SIGHUP (what ``systemctl reload`` does), and its
``reload.generation`` is watched until it moves on. Exit codes: 0 applied, 1 refused (or no
answer in time, or no agent running), 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from agent.app.status import fetch_status
from agent.cli.validate import load_or_report

WAIT_S = 60.0
"""How long a reload may take (stopping changed devices, the forwarder's grace) before giving up."""


def register(sub: Any) -> None:
    p = sub.add_parser("reload", help="make the running agent reload its configuration (SIGHUP)")
    p.add_argument("-c", "--config", required=True, help="agent configuration (YAML): finds the agent")
    p.add_argument("--timeout", type=float, default=WAIT_S, help=f"seconds to wait (default {WAIT_S:g})")
    p.set_defaults(func=cmd_reload)


def _reload_state(status: dict[str, Any]) -> dict[str, Any]:
    state = status.get("reload")
    return state if isinstance(state, dict) else {}


def cmd_reload(args: argparse.Namespace) -> int:
    loaded = load_or_report(args.config)
    if loaded is None:
        print("the running agent keeps its configuration: fix the errors above first", file=sys.stderr)
        return 2
    listen = loaded.config.agent.status_listen
    try:
        before = fetch_status(listen)
    except (ConnectionError, ValueError) as exc:
        print(f"cannot reload: {exc}", file=sys.stderr)
        return 1
    pid, generation = before.get("pid"), _reload_state(before).get("generation")
    if not isinstance(pid, int) or not isinstance(generation, int):
        print(f"cannot reload: the agent at {listen} does not support reload (upgrade it)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"cannot signal the agent (pid {pid}): {exc.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            state = _reload_state(fetch_status(listen))
        except ConnectionError:
            continue  # busy applying, or the listener was slow: ask again
        if state.get("generation", generation) != generation:
            return _report(state)
    print(f"no reload outcome from the agent (pid {pid}) within {args.timeout:g}s", file=sys.stderr)
    return 1


def _report(state: dict[str, Any]) -> int:
    if state.get("last_outcome") == "applied":
        applied = state.get("applied") or {}
        print(f"reloaded (generation {state['generation']}): {state.get('reason', '')}")
        for key, value in applied.items():
            if value:
                print(f"  {key}: {', '.join(value) if isinstance(value, list) else value}")
        return 0
    print(f"reload refused (generation {state.get('generation')}): {state.get('reason')}", file=sys.stderr)
    for error in state.get("errors") or []:
        print(f"  {error}", file=sys.stderr)
    print("the agent runs on with its previous configuration", file=sys.stderr)
    return 1
