"""``cleanroom-agent validate CONFIG``: every mistake of a configuration, with its file, line and
YAML path, before anything starts (exit 2 when there is any).

``validate`` finds everything ``run`` would refuse, and more: beyond the configuration it opens
the buffer read-only and loads every model the way the agent does at start. A model that cannot
be loaded is an error here, while ``run`` starts without it (the model is disabled alone)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.app.config import ConfigError, LoadedConfig, check_startup, load_config
from agent.core.problems import Problem


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
        _report(path, exc.problems)
        return None


def _report(path: str, problems: list[Problem]) -> None:
    n = len(problems)
    print(f"{path}: {n} problem{'s' if n != 1 else ''}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    path = args.config or args.config_opt
    if not path:
        print("validate: give the configuration file: cleanroom-agent validate CONFIG", file=sys.stderr)
        return 2
    loaded = load_or_report(path)
    if loaded is None:
        return 2
    problems = check_startup(loaded)
    if problems:
        _report(path, problems)
        return 2
    print(loaded.summary())
    return 0
