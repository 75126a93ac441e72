"""``cleanroom-agent run -c CONFIG``: acquire, buffer and forward until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from agent.app.config import LoadedConfig
from agent.cli.validate import load_or_report

log = logging.getLogger("cleanroom.agent")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="acquire, buffer and forward until SIGTERM/SIGINT")
    p.add_argument("-c", "--config", required=True, help="agent configuration (YAML)")
    p.set_defaults(func=cmd_run)


async def _run_until_signal(loaded: LoadedConfig) -> None:
    from agent.app.runtime import run_agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Its default action kills the process: a service manager's "reload" (or a closed terminal)
    # must not stop acquisition.
    loop.add_signal_handler(signal.SIGHUP, _sighup)
    await run_agent(loaded, stop)


def _sighup() -> None:
    log.warning("reload is not supported yet; SIGHUP ignored")


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
