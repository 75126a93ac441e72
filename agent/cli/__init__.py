"""``cleanroom-agent``: one entry point, one module per subcommand.

Each module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, adding its
subcommand(s) with ``set_defaults(func=...)``; ``func(args) -> int`` is the exit code.
Exit codes: 0 ok, 1 runtime failure, 2 bad input (config, arguments, files).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent import __version__

COMMAND_MODULES = (
    "agent.cli.init",  # init DIR
    "agent.cli.validate",  # validate CONFIG
    "agent.cli.run",  # run -c CONFIG
    "agent.cli.reload",  # reload -c CONFIG
    "agent.cli.status",  # status
    "agent.cli.demo",  # demo
    "agent.cli.buffer",  # buffer stats|export|replay
    "agent.cli.models",  # models train|evaluate|score|verify
    "agent.cli.certs",  # certs create
    "agent.cli.capture",  # capture -c CONFIG --out FILE
    "agent.cli.verify",  # verify --capture FILE | --buffer PATH
    "agent.cli.discover",  # discover PROTOCOL ... --out PROFILE.yaml
    "agent.cli.batch",  # batch start|step|end|show -c CONFIG
    "agent.cli.sample",  # sample add -c CONFIG --device D --tag T --value V --at TIME
    "agent.cli.report",  # report batch ID
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleanroom-agent",
        description="cleanroom-edge data-acquisition agent: devices -> durable buffer -> MQTT.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad input. "
        "Docs: docs/configuration.md, docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=f"cleanroom-edge {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
