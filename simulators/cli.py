"""``cleanroom-sim``: run simulated plant equipment behind real protocols.

    cleanroom-sim bioreactor --port 5020 --speed 60 --seed 1
    cleanroom-sim incubator --protocol modbus-rtu --unit-id 1,2,3 --pty-link /tmp/incubators
    cleanroom-sim particle-counter --protocol serial --pty-link /tmp/counter
    cleanroom-sim bioreactor --protocol opcua --port 4840
    cleanroom-sim incubator --protocol opcua --port 4841
    cleanroom-sim plant --config simulators/scenarios/plant.yaml --endpoints endpoints.json
    cleanroom-sim generate --scenario simulators/scenarios/plant.yaml --hours 24 --seed 1 --out out/
    cleanroom-sim mes --config plant --agent gw-01 --broker 127.0.0.1:1883

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
    p = sub.add_parser("mes", help="publish the plant's batch assignment commands to the agent over MQTT")
    p.add_argument(
        "--config", type=Path, required=True, help="plant or scenario YAML with a batches: section"
    )
    p.add_argument("--agent", required=True, help="agent id (agent.id in its configuration)")
    p.add_argument(
        "--broker", type=_host_port, default=("127.0.0.1", 1883), help="HOST:PORT (127.0.0.1:1883)"
    )
    p.add_argument("--prefix", default="cleanroom", help="the agent's mqtt.topic_prefix")
    p.add_argument(
        "--topic", default=None, help="command topic template (default {prefix}/agent/batch/{agent})"
    )
    p.add_argument("--speed", type=_positive, help="simulated seconds per wall second (default: the file's)")
    p.add_argument("--tls-ca", type=Path, help="CA of the broker's certificate: connect with TLS")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS), with --tls-key")
    p.add_argument("--tls-key", type=Path, help="client private key (PEM)")
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    p.add_argument("--ack-timeout", type=_positive, default=30.0, help="seconds to wait for each PUBACK")
    p.set_defaults(func=_run_mes)
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT, e.g. 127.0.0.1:1883")
    return host, number


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


def _run_mes(args: argparse.Namespace) -> int:
    from simulators.mes import DEFAULT_TOPIC, Broker, MesError, MesPublisher, command_line, run_mes
    from simulators.process.base import Clock
    from simulators.process.scenario import load_scenario

    scenario = load_scenario(args.config)
    if not scenario.batches:
        raise ValueError(f"{args.config}: no batches: section, so no commands to publish")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    password = None
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    try:
        topic = (args.topic or DEFAULT_TOPIC).format(prefix=args.prefix, agent=args.agent)
    except (KeyError, IndexError):
        raise ValueError(f"--topic {args.topic!r}: placeholders are {{prefix}} and {{agent}}") from None
    broker = Broker(
        args.broker[0], args.broker[1], args.tls_ca, args.tls_cert, args.tls_key, args.username, password
    )
    clock = Clock(args.speed or scenario.speed or 1.0)
    schedule = scenario.batch_schedule(clock.now())

    async def run() -> int:
        publisher = MesPublisher(broker, topic, ack_timeout_s=args.ack_timeout)
        await publisher.connect()
        try:
            sender = asyncio.create_task(
                run_mes(schedule, publisher, clock, lambda c: print(command_line(c), flush=True))
            )
            stopper = asyncio.create_task(_until_stopped())
            done, _ = await asyncio.wait({sender, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sender, stopper):
                if task not in done:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if sender in done:
                sender.result()
        finally:
            await publisher.close()
        return 0

    print(f"mes: {len(schedule.commands())} commands to {topic} on {broker.host}:{broker.port}", flush=True)
    try:
        return asyncio.run(run())
    except MesError as exc:
        print(f"cleanroom-sim: {exc}", file=sys.stderr)
        return 1


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
