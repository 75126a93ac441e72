"""``cleanroom-agent certs create``: the OPC UA application certificate, made by :mod:`agent.core.certs`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_create(args: argparse.Namespace) -> int:
    # Here, not at the top: the parser imports every command module, and `run` need not pay for
    # cryptography (7.5 MB of RSS on a gateway) to offer this command.
    from agent.core.certs import CertError, create_certificate

    try:
        paths = create_certificate(
            Path(args.out), args.uri, args.hostname, days=args.days, server=args.server, force=args.force
        )
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"certificate: {paths.cert}\nprivate key: {paths.key}\napplication URI: {args.uri}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = subparsers.add_parser("certs", help="OPC UA application instance certificates")
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="make a self-signed application certificate and key")
    create.add_argument("--out", required=True, help="directory for cert.der and key.pem")
    create.add_argument("--uri", required=True, help="application URI (subjectAltName), e.g. urn:site:agent")
    create.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="DNS name in subjectAltName (repeatable; default: this host)",
    )
    create.add_argument("--days", type=int, default=730, help="validity in days (default 730)")
    create.add_argument(
        "--server", action="store_true", help="also allow server authentication (for simulators)"
    )
    create.add_argument("--force", action="store_true", help="replace an existing certificate and key")
    create.set_defaults(func=_cmd_create)
