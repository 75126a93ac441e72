"""``cleanroom-sim``: run simulated plant equipment behind real protocols.

    cleanroom-sim bioreactor --port 5020 --speed 60 --seed 1
    cleanroom-sim incubator --protocol modbus-rtu --unit-id 1,2,3 --pty-link /tmp/incubators
    cleanroom-sim particle-counter --protocol serial --pty-link /tmp/counter
    cleanroom-sim bioreactor --protocol opcua --port 4840
    cleanroom-sim plant --config simulators/scenarios/plant.yaml --endpoints endpoints.json
    cleanroom-sim generate --scenario simulators/scenarios/plant.yaml --hours 24 --seed 1 --out out/

Exit codes: 0 ok (also after SIGINT/SIGTERM), 1 runtime failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("cleanroom-sim")

KINDS = {"bioreactor": "bioreactor", "incubator": "incubator", "particle-counter": "particle_counter"}
PROTOCOLS = ("modbus-tcp", "modbus-rtu", "opcua", "serial")


def _unit_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: unit ids are integers, e.g. 1 or 1,2,3") from None
    if not ids or any(not 1 <= i <= 247 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: unit ids are 1..247")
    return ids


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanroom-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, kind in KINDS.items():
        p = sub.add_parser(name, help=f"serve simulated {name}(s)")
        p.add_argument("--protocol", choices=PROTOCOLS, help="default modbus-tcp")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (TCP protocols)")
        p.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port, printed)")
        p.add_argument("--speed", type=_positive, default=1.0, help="simulated seconds per wall second")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--scenario", type=Path, help="scenario YAML: params and faults of the device(s)")
        p.add_argument(
            "--unit-id", type=_unit_ids, default=[1], help="Modbus unit id(s): 1 or 1,2,3 (a device each)"
        )
        p.add_argument("--device-id", action="append", help="device id, one per unit (default <kind>-<unit>)")
        p.add_argument("--profile", help="profile name or path (default: the simulator's profile)")
        p.add_argument("--fault", action="append", default=[], help="comm fault, e.g. comm_timeout@60s+30s")
        p.add_argument("--pty-link", type=Path, help="symlink to the pty's slave side (serial protocols)")
        p.add_argument("--cert", type=Path, help="OPC UA server certificate: adds secure endpoints")
        p.add_argument("--key", type=Path, help="OPC UA server private key (PEM)")
        p.add_argument("--user", help="OPC UA: require this user name (with --password)")
        p.add_argument("--password", help="OPC UA: password for --user")
        p.set_defaults(func=_run_device, kind=kind)
    p = sub.add_parser("plant", help="a whole suite of devices in one process")
    p.add_argument("--config", type=Path, required=True, help="plant YAML (devices, protocols, ports)")
    p.add_argument("--endpoints", type=Path, help="write the endpoint list here as JSON")
    p.add_argument("--speed", type=_positive, help="override the plant's speed")
    p.add_argument("--seed", type=int, help="override the plant's seed")
    p.set_defaults(func=_run_plant)
    p = sub.add_parser("generate", help="ground-truth CSVs and labels, as fast as possible (no protocols)")
    p.add_argument("--scenario", type=Path, required=True)
    p.add_argument("--hours", type=_positive, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--period", type=_positive, default=None, help="output resolution in seconds")
    p.set_defaults(func=_run_generate)
    return parser


async def _until_stopped() -> None:
    """Wait for SIGINT/SIGTERM: the caller's ``async with`` then shuts down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_endpoints(endpoints: Sequence[dict[str, Any]]) -> None:
    """One line per device: what a person (or a test) needs to connect."""
    for e in endpoints:
        unit = f" unit={e['unit_id']}" if e.get("unit_id") is not None else ""
        print(f"{e['device']:<18} {e['kind']:<17} {e['protocol']:<11} {e['address']}{unit}", flush=True)


def _run_device(args: argparse.Namespace) -> int:
    from simulators.process.scenario import DeviceSpec, load_scenario
    from simulators.servers.plant import Plant, ServeSpec

    if args.scenario is not None:
        scenario = load_scenario(args.scenario)
        specs = [d for d in scenario.devices if d.kind == args.kind]
        if args.device_id:
            specs = [scenario.device(i) for i in args.device_id]
        if not specs:
            raise ValueError(f"{args.scenario}: no {args.kind} device in the scenario")
    else:
        ids = args.device_id or [f"{args.kind.replace('_', '-')}-{u}" for u in args.unit_id]
        specs = [DeviceSpec(id=i, kind=args.kind) for i in ids]
    units = args.unit_id if len(args.unit_id) == len(specs) else list(range(1, len(specs) + 1))
    serve = {
        "protocol": args.protocol or "modbus-tcp",
        "endpoint": "cli",
        "host": args.host,
        "port": args.port,
        "profile": args.profile,
        "faults": args.fault,
        "pty_link": args.pty_link,
        "cert": args.cert,
        "key": args.key,
        "user": args.user,
        "password": args.password,
    }
    pairs = [(d, ServeSpec(unit_id=u, **serve)) for d, u in zip(specs, units, strict=True)]
    return asyncio.run(_serve(Plant(pairs, speed=args.speed, seed=args.seed), None))


def _run_plant(args: argparse.Namespace) -> int:
    from simulators.servers.plant import Plant

    plant = Plant.from_file(args.config, speed=args.speed, seed=args.seed)
    return asyncio.run(_serve(plant, args.endpoints))


async def _serve(plant: Any, endpoints_file: Path | None) -> int:
    async with plant:
        endpoints = plant.endpoints()
        if endpoints_file is not None:
            await asyncio.to_thread(endpoints_file.write_text, json.dumps(endpoints, indent=2) + "\n")
        _print_endpoints(endpoints)
        await _until_stopped()
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from simulators.process.generate import generate

    kwargs: dict[str, Any] = {} if args.period is None else {"period_s": args.period}
    written = generate(args.scenario, args.hours, args.seed, args.out, **kwargs)
    for path in written or []:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # asyncua and pymodbus log every unusual client and their own start-up failures
        # (with tracebacks); a simulator expects the former and reports the latter itself
        for noisy in ("asyncua", "pymodbus"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 0
    except (ValueError, ValidationError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"cleanroom-sim: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cleanroom-sim: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
