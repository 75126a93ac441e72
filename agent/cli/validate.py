"""``cleanroom-agent validate CONFIG``: every mistake of a configuration, with its file, line and
YAML path, before anything starts (exit 2 when there is any)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.app.config import ConfigError, LoadedConfig, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="check a configuration; list every error with its YAML path and line")
    p.add_argument("config", nargs="?", help="agent configuration (YAML)")
    p.add_argument("-c", "--config", dest="config_opt", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_validate)


def load_or_report(path: str) -> LoadedConfig | None:
    """Load a config; on mistakes print them all (never a traceback) and return None.
    Every command that reads a configuration reports it this way."""
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
