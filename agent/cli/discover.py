"""``cleanroom-agent discover PROTOCOL ... --out PROFILE.yaml``: a profile from the device itself.

The protocols are the installed discoverers (:mod:`agent.core.discover`); each one's options
come from its ``add_arguments``. A protocol's module is imported only when it is asked for,
so one protocol's stack failing to import never breaks the other commands or protocols.

Nothing is written unless the discovery succeeded and its profile passes the driver's own
profile schema (what ``validate`` checks), and an existing file is kept unless ``--force``:
the output is a reviewed, committed file, not a scratch one. The file appears whole or not at
all (written beside the target, then renamed).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.core.discover import Discoverer, Discovery, DiscoveryError, discoverers
from agent.core.driver import driver_for

log = logging.getLogger("cleanroom.discover")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "discover",
        help="write a device profile from what the device says about itself (OPC UA browse, Modbus scan)",
        description="Write a device profile from what the device says about itself. "
        "`cleanroom-agent discover PROTOCOL --help` shows a protocol's options.",
        epilog="Exit codes: 0 written, 1 the device could not be discovered, 2 bad arguments.",
    )
    p.add_argument(
        "protocol", nargs="?", metavar="PROTOCOL", help="an installed discoverer, e.g. opcua, modbus"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the protocol's arguments and --out PROFILE.yaml")
    p.set_defaults(func=cmd_discover)


def discoverer_class(protocol: str) -> type[Discoverer]:
    """The installed discoverer of ``protocol``, imported now. Raises ``LookupError`` naming the
    installed protocols, or ``RuntimeError`` when the entry point cannot be used."""
    installed = discoverers()
    if protocol not in installed:
        known = ", ".join(sorted(installed)) or "none"
        raise LookupError(f"no discoverer for protocol {protocol!r}; installed: {known}")
    entry = installed[protocol]
    try:
        cls = entry.load()
    except Exception as exc:  # a broken installation: say which module, never a traceback
        raise RuntimeError(f"cannot load {entry.value}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Discoverer)):
        raise RuntimeError(f"{entry.value} is not a Discoverer")
    return cls


def protocol_parser(protocol: str, cls: type[Discoverer]) -> argparse.ArgumentParser:
    """``cleanroom-agent discover PROTOCOL``'s own parser: ``--out``, ``--force`` and the
    discoverer's arguments (also what a check of the docs' command lines needs)."""
    parser = argparse.ArgumentParser(prog=f"cleanroom-agent discover {protocol}", description=cls.help)
    parser.add_argument(
        "--out", required=True, metavar="PROFILE.yaml", help="file to write the profile to; - for stdout"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    cls.add_arguments(parser)
    return parser


def cmd_discover(args: argparse.Namespace) -> int:
    name = args.protocol
    try:
        cls = discoverer_class(name or "")
    except LookupError as exc:
        what = str(exc) if name else f"give the protocol; {str(exc).split('; ', 1)[1]}"
        print(f"discover: {what}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"discover {name}: {exc}", file=sys.stderr)
        return 1
    parser = protocol_parser(name, cls)
    opts = parser.parse_args(args.args)  # exits 2 with usage on bad arguments, like every command
    out = None if opts.out == "-" else Path(opts.out)
    if out is not None:
        refusal = _refuse_target(out, opts.force)
        if refusal:
            print(f"discover {name}: {refusal}", file=sys.stderr)
            return 2
    try:
        discovery = asyncio.run(cls().discover(opts))
    except DiscoveryError as exc:
        print(f"discover {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # anything unforeseen: one line; the traceback at DEBUG
        log.debug("discover %s failed", name, exc_info=True)
        print(
            f"discover {name}: failed: {type(exc).__name__}: {exc} (--log-level DEBUG shows where)",
            file=sys.stderr,
        )
        return 1
    problem = _schema_problem(name, discovery)
    if problem:
        print(
            f"discover {name}: the discovered profile does not validate, nothing written: {problem}",
            file=sys.stderr,
        )
        return 1
    text = discovery.render()
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(discovery.summary, file=sys.stderr)
        return 0
    try:
        _write(out, text, opts.force)
    except OSError as exc:
        print(f"discover {name}: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{out}: {discovery.summary}")
    return 0


def _refuse_target(out: Path, force: bool) -> str | None:
    """Why ``out`` cannot be written, checked before talking to the device."""
    if out.is_dir():
        return f"{out} is a directory"
    if out.exists() and not force:
        return f"{out} exists (--force replaces it)"
    if not out.parent.is_dir():
        return f"folder {out.parent} does not exist"
    return None


def _schema_problem(protocol: str, discovery: Discovery) -> str | None:
    """The driver's profile schema on the discovered profile: a discoverer's bug must not
    become a file that ``validate`` refuses."""
    driver = driver_for(protocol)
    if driver is None:
        return f"no driver for protocol {protocol!r} is installed"
    try:
        driver.profile_model().model_validate(discovery.profile)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{exc.error_count()} error(s), first at {where}: {first['msg']}"
    return None


def _write(out: Path, text: str, force: bool) -> None:
    """All or nothing: a temporary file beside ``out``, renamed over it."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if out.exists() and not force:  # appeared while the device was being discovered
            raise FileExistsError(errno.EEXIST, f"{out} appeared meanwhile (--force replaces it)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
