"""``cleanroom-agent run -c CONFIG``: acquire, buffer and forward until SIGTERM/SIGINT; SIGHUP
reloads the configuration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from agent.app.config import LoadedConfig
from agent.app.logs import LOG_FORMATS, LogFormat, configure, secret_values
from agent.cli.validate import load_or_report

log = logging.getLogger("cleanroom.agent")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="acquire, buffer and forward until SIGTERM/SIGINT; SIGHUP reloads")
    p.add_argument("-c", "--config", required=True, help="agent configuration (YAML)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text (default) or json: one JSON object per line, for journald and log shippers "
        "(overrides agent.log_format)",
    )
    p.set_defaults(func=cmd_run)


async def _run_until_signal(loaded: LoadedConfig) -> None:
    from agent.app.runtime import run_agent

    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A service manager's "reload" (ExecReload=kill -HUP) re-reads the configuration; the signal's
    # default action would kill the process.
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    await run_agent(loaded, stop, reload)


def _log_format(args: argparse.Namespace, loaded: LoadedConfig) -> LogFormat:
    """The option, else ``agent.log_format``."""
    chosen: LogFormat = args.log_format or loaded.config.agent.log_format
    return chosen


def cmd_run(args: argparse.Namespace) -> int:
    from agent.app.runtime import StartupError

    loaded = load_or_report(args.config)
    if loaded is None:
        return 2
    cfg = loaded.config
    secrets = secret_values(cfg, [d.connection for d in loaded.devices])
    try:
        password = cfg.mqtt.resolve_password() if cfg.mqtt else None
    except ValueError:
        password = None  # the start reports it
    configure(args.log_level, _log_format(args, loaded), secrets | ({password} if password else set()))
    try:
        asyncio.run(_run_until_signal(loaded))
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
