"""``cleanroom-agent demo`` / ``make demo``: the whole product on one machine.

Starts the simulated plant (``cleanroom-sim plant``, a separate process, as real
equipment would be), an embedded MQTT broker (amqtt) unless ``--broker`` names one, and
the agent with a configuration built from the plant's endpoint list; then shows what
arrives *at the broker* — not what the agent thinks it sent — until Ctrl-C or
``--duration``, and ends with the account: readings polled, committed, delivered, lost.
The plant runs batches: one bioreactor declares its own, and a simulated MES (``cleanroom-sim
mes``, another process) assigns the others over the agent's MQTT command topic, so every record
on the broker names the batch it belongs to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from agent.app.config import ConfigError, load_config
from cleanroom_common.bundled import package_dir
from cleanroom_common.net import free_port, is_loopback_host

PLANT = "plant"
"""The simulators' shipped scenario the demo serves, named to ``cleanroom-sim`` (the agent
never reads the simulators' files)."""
MODELS = package_dir("agent.bundled", "models")
log = logging.getLogger("cleanroom.demo")


class DemoError(Exception):
    """A demo prerequisite failed; the message says which and why."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="simulators + broker + agent, with a live view of what reaches the broker"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--broker", default=None, help="use this broker HOST:PORT instead of an embedded one")
    p.add_argument("--speed", type=float, default=60.0, help="simulator time acceleration")
    p.add_argument(
        "--workdir", default=None, help="where the demo keeps its config and buffer (default: temp)"
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(duration=args.duration, broker=args.broker, speed=args.speed, workdir=args.workdir)


def _start_plant(workdir: Path, speed: float) -> tuple[subprocess.Popen[bytes], list[dict[str, Any]]]:
    endpoints = workdir / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    err = (workdir / "simulators.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "plant",
            "--config",
            PLANT,
            "--endpoints",
            str(endpoints),
            "--speed",
            str(speed),
        ],
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    deadline = time.monotonic() + 60
    while not endpoints.exists() or not endpoints.read_text().strip().endswith("]"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            tail = (workdir / "simulators.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise DemoError("the simulated plant did not start:\n  " + "\n  ".join(tail))
        time.sleep(0.1)
    return proc, json.loads(endpoints.read_text())


def _particle_limits(device: str, params: dict[str, Any]) -> dict[str, Any]:
    grade, state = params.get("grade", "B"), params.get("state", "at_rest")
    limits = {
        "device": device,
        "grade": grade,
        "state": state,
        "tag_0_5": "count_0_5um",
        "tag_5_0": "count_5_0um",
    }
    if grade == "D" and state == "in_operation":
        # Annex 1 leaves grade D in operation to risk assessment; the demo takes ISO 8's values
        limits |= {"action_0_5": 3_520_000, "action_5_0": 29_300}
    return limits


SHIPPED_MODELS = {"bioreactor": "bioreactor-pca", "incubator": "incubator-pca"}
"""Device kind -> model the demo binds in shadow mode (the counter model is for grade A at rest;
the demo's counters sit in every grade)."""
MIN_POLL_S = 0.2
"""Fastest process poll the demo asks of a simulated device."""


SOURCE_TIMED = {"opcua"}
"""Protocols whose readings carry the simulator's own clock (source timestamps). Other devices
are stamped on arrival by the agent's wall clock, which runs ×speed slower than their simulated
process: a model would see that process ×speed too fast."""


@dataclass
class DemoModel:
    """A shipped model the demo binds, the devices it can feed, and their process poll."""

    name: str
    devices: list[str]
    poll_s: float


def _demo_models(endpoints: list[dict[str, Any]], speed: float) -> tuple[list[DemoModel], list[str]]:
    """The shipped models the demo can feed at this clock speed (each of their devices polled
    twice per slot of simulated time), and a line per model saying what was bound or why not."""
    from agent.transforms.anomaly.manifest import read_manifest

    bound: list[DemoModel] = []
    notes: list[str] = []
    for kind, name in SHIPPED_MODELS.items():
        path = MODELS / f"{name}.model.yaml"
        of_kind = [e for e in endpoints if e["kind"] == kind]
        if not of_kind or not path.exists():
            continue
        period = read_manifest(path).period
        poll = period / speed / 2
        devices = [e["device"] for e in of_kind if speed == 1 or e["protocol"] in SOURCE_TIMED]
        if not devices:
            notes.append(
                f"{name} not bound: the demo's {kind}s are stamped by the agent's clock, ×{speed:g} slower "
                "than their simulated process (try --speed 1)"
            )
        elif poll < MIN_POLL_S:
            notes.append(
                f"{name} not bound: its {period:g} s period would need a poll every {poll * 1000:.0f} ms "
                f"at ×{speed:g} (try --speed {period / 2 / MIN_POLL_S:g})"
            )
        else:
            bound.append(DemoModel(name, devices, poll))
            notes.append(f"{name} in shadow mode on {', '.join(devices)}, process polled every {poll:g} s")
    return bound, notes


def _write_config(
    workdir: Path, endpoints: list[dict[str, Any]], broker: tuple[str, int], models: list[DemoModel]
) -> Path:
    polls = {d: m.poll_s for m in models for d in m.devices}
    devices: list[dict[str, Any]] = []
    for e in endpoints:
        device: dict[str, Any] = {
            "id": e["device"],
            "profile": e["profile"],
            "connection": e["connection"],
            "description": f"simulated {e['kind']} over {e['protocol']}",
        }
        if e["device"] in polls:  # the model's inputs, often enough for its period in simulated time
            ms = max(int(polls[e["device"]] * 1000), int(MIN_POLL_S * 1000))
            group: dict[str, str] = {"interval": f"{ms}ms"}
            if e["protocol"] == "opcua":
                group["sampling_interval"] = f"{ms // 2}ms"
            device["groups"] = {"process": group}
        devices.append(device)
    by_kind: dict[str, list[str]] = {}
    for e in endpoints:
        by_kind.setdefault(e["kind"], []).append(e["device"])
    params = {e["device"]: e.get("params", {}) for e in endpoints}
    limits: dict[str, Any] = {
        "tags": [
            {
                "tag": "temperature_c",
                "devices": by_kind.get("bioreactor", []),
                "alert_low": 36.6,
                "alert_high": 37.4,
                "action_low": 36.5,
                "action_high": 37.5,
                "consecutive": 3,
            },
            {
                "tag": "co2_pct",
                "devices": by_kind.get("incubator", []),
                "alert_low": 4.7,
                "alert_high": 5.3,
                "action_low": 4.5,
                "action_high": 5.5,
                "consecutive": 3,
            },
        ],
        "particles": [_particle_limits(d, params.get(d, {})) for d in by_kind.get("particle_counter", [])],
    }
    bindings = [
        {"manifest": str(MODELS / f"{m.name}.model.yaml"), "devices": m.devices, "mode": "shadow"}
        for m in models
    ]
    config: dict[str, Any] = {
        "agent": {
            "id": "demo-gateway",
            "site": "simulated cleanroom suite",
            "status_listen": f"127.0.0.1:{free_port()}",
        },
        "buffer": {"path": str(workdir / "buffer.db"), "synchronous": "normal"},
        # The demo speaks plain MQTT: to a --broker off loopback that has to be said (and is warned about).
        "mqtt": {"host": broker[0], "port": broker[1], "topic_prefix": "cleanroom"}
        | ({} if is_loopback_host(broker[0]) else {"tls": {"enabled": False}}),
        "devices": devices,
        "limits": limits,
        "models": bindings,
        # the simulated MES assigns batches over MQTT: on a loopback broker only the demo publishes
        "batch": {"mqtt_commands": True},
    }
    path = workdir / "agent.yaml"
    path.write_text("# written by cleanroom-agent demo\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _start_mes(
    workdir: Path, broker: tuple[str, int], agent_id: str, speed: float
) -> subprocess.Popen[bytes]:
    """The simulated MES, publishing the plant's batch commands as they fall due (its log:
    ``mes.log``, one line per command the broker acknowledged)."""
    log_file = (workdir / "mes.log").open("wb")
    with log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "simulators.cli", "mes", "--config", PLANT, "--agent", agent_id,
             "--broker", f"{broker[0]}:{broker[1]}", "--speed", str(speed)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


class LiveView:
    """Subscribes to everything under the prefix and prints a readable line per block
    and per event, from paho's thread (printing is all it does)."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.readings = 0
        self.events = 0
        self.batches: set[str] = set()
        """Batch refs the records at the broker named."""
        self.seqs: set[int] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-view-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        with self._lock:
            if msg.topic.endswith("/data"):
                for b in payload.get("blocks", []):
                    self.readings += b["n"]
                    self.seqs.update(range(b["seq"], b["seq"] + b["n"]))
                    if b.get("batch"):
                        self.batches.add(b["batch"])
                    print(_block_line(payload["device"], b), flush=True)
            elif msg.topic.endswith("/events"):
                for e in payload.get("events", []):
                    self.events += 1
                    self.seqs.add(e["seq"])
                    print(_event_line(payload["device"], e), flush=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _block_line(device: str, b: dict[str, Any]) -> str:
    quality = b.get("quality")
    shown = []
    for i, tag in enumerate(b["tags"][:5]):
        unit = b["units"][i] or ""
        q = "" if quality is None or quality[i] == "good" else f" [{quality[i]}: {b['reasons'][i]}]"
        shown.append(f"{tag}={_fmt(b['values'][i])}{(' ' + unit) if unit else ''}{q}")
    more = f"  (+{b['n'] - 5} more)" if b["n"] > 5 else ""
    bad = "" if quality is None else f"  {sum(q != 'good' for q in quality)} not good"
    seq = f"#{b['seq']}-{b['seq'] + b['n'] - 1}"
    batch = f"  batch {b['batch']}" if b.get("batch") else ""
    line = f"{_clock(b['ts'])}  {device:<8} {b['group']:<10} {seq:<14} " + "  ".join(shown)
    return line + more + bad + batch


def _event_line(device: str, e: dict[str, Any]) -> str:
    data = ", ".join(f"{k}={_fmt(v)}" for k, v in e.get("data", {}).items() if not isinstance(v, dict | list))
    return f"{_clock(e['ts'])}  {device:<8} EVENT {e['kind']} ({e['severity']}) #{e['seq']}  {data}"


async def _demo(workdir: Path, duration: float | None, broker_arg: str | None, speed: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    print(f"starting the simulated plant (speed ×{speed:g}) …", flush=True)
    plant, endpoints = await asyncio.to_thread(_start_plant, workdir, speed)
    amqtt_broker = None
    try:
        if broker_arg:
            host, _, port = broker_arg.rpartition(":")
            broker = (host or "127.0.0.1", int(port))
        else:
            amqtt_broker, broker = await _embedded_broker()
        return await _run(workdir, endpoints, broker, amqtt_broker is not None, duration, stop, speed)
    finally:
        plant.terminate()
        try:
            await asyncio.to_thread(plant.wait, 10)
        except subprocess.TimeoutExpired:
            plant.kill()
        if amqtt_broker is not None:
            await amqtt_broker.shutdown()


async def _embedded_broker() -> tuple[Any, tuple[str, int]]:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise DemoError(
            "no embedded broker: install the demo extra (pip install 'cleanroom-edge[demo]') "
            "or pass --broker HOST:PORT"
        ) from None
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    broker = ("127.0.0.1", free_port())
    amqtt_broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{broker[0]}:{broker[1]}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await amqtt_broker.start()
    return amqtt_broker, broker


async def _run(
    workdir: Path,
    endpoints: list[dict[str, Any]],
    broker: tuple[str, int],
    embedded: bool,
    duration: float | None,
    stop: asyncio.Event,
    speed: float,
) -> int:
    from agent.app.runtime import Agent

    models, model_notes = _demo_models(endpoints, speed)
    config_path = _write_config(workdir, endpoints, broker, models)
    try:
        loaded = load_config(config_path)
    except ConfigError as exc:
        raise DemoError(f"the generated configuration is invalid:\n  {exc}") from None
    kinds: dict[str, int] = {}
    for e in endpoints:
        kinds[f"{e['kind']} over {e['protocol']}"] = kinds.get(f"{e['kind']} over {e['protocol']}", 0) + 1
    print("plant:", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(f"broker: {'embedded amqtt' if embedded else 'external'} at {broker[0]}:{broker[1]}")
    print(f"agent config: {config_path} (sha256 {loaded.sha256[:12]})")
    for note in model_notes:
        print(f"model: {note}")
    print("live view of what reaches the broker (Ctrl-C to stop):\n", flush=True)

    view = LiveView(broker[0], broker[1], "cleanroom")
    agent = Agent(loaded)
    t0 = time.monotonic()
    mes: subprocess.Popen[bytes] | None = None
    try:
        await agent.start()
        mes = await asyncio.to_thread(_start_mes, workdir, broker, loaded.config.agent.id, speed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        if mes is not None and mes.poll() is None:
            mes.terminate()
            try:
                await asyncio.to_thread(mes.wait, 10)
            except subprocess.TimeoutExpired:
                mes.kill()
                await asyncio.to_thread(mes.wait, 10)
        if mes is not None and mes.returncode not in (0, -signal.SIGTERM):
            tail = (workdir / "mes.log").read_text(errors="replace").strip().splitlines()[-3:]
            print(
                f"the simulated MES failed (exit {mes.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr
            )
        polls = sum(
            g["polls"]
            for d in (agent.scheduler.status() if agent.scheduler else {}).values()
            for g in d["groups"].values()
        )
        model_status = agent.inference.status() if agent.inference else {}
        await agent.stop()
        await asyncio.sleep(0.5)  # the last acknowledged messages reach the view
        view.close()
    from agent.buffer.store import Buffer

    buf = Buffer(loaded.config.buffer, loaded.config.agent.id)
    buf.open(readonly=True)
    try:
        stats = buf.stats()
    finally:
        buf.close()
    elapsed = time.monotonic() - t0
    print(
        f"\n── summary after {elapsed:.0f} s ─────────────────────────────\n"
        f"devices                {len(loaded.devices)}\n"
        f"polls                  {polls}\n"
        f"readings committed     {stats['committed_readings_total']}\n"
        f"readings delivered     {stats['delivered_readings_total']}  (acknowledged by the broker)\n"
        f"readings seen at view  {view.readings}\n"
        f"events seen at view    {view.events}\n"
        f"batches on records     {', '.join(sorted(view.batches)) or 'none'}\n"
        f"still buffered         {stats['depth_readings']}\n"
        f"lost                   {stats['lost_readings_total']}\n"
        f"models                 {_model_states(model_status)}\n"
        f"buffer                 {stats['path']}"
    )
    return 0


def _model_states(status: dict[str, Any]) -> str:
    """Bindings per model and state (``ok``, ``alarm``, ``out_of_envelope``, ``warming_up``, …),
    so silence from a model is never mistaken for health."""
    states: dict[str, dict[str, int]] = {}
    for key, s in status.items():
        by_state = states.setdefault(key.rsplit("@", 1)[0], {})
        by_state[s["state"]] = by_state.get(s["state"], 0) + 1
    if not states:
        return "none bound"
    return "; ".join(
        f"{model}: " + ", ".join(f"{n} {state}" for state, n in sorted(by.items()))
        for model, by in sorted(states.items())
    )


def run_demo(duration: float | None, broker: str | None, speed: float, workdir: str | None) -> int:
    logging.getLogger().setLevel(logging.WARNING)
    try:
        if workdir:
            wd = Path(workdir)
            wd.mkdir(parents=True, exist_ok=True)
            return asyncio.run(_demo(wd, duration, broker, speed))
        with tempfile.TemporaryDirectory(prefix="cleanroom-demo-") as tmp:
            return asyncio.run(_demo(Path(tmp), duration, broker, speed))
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
