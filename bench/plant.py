"""A whole cleanroom suite through the agent: every device kind, every protocol.

Generates a plant of about 2,000 tags polled at 1 s (bioreactors over OPC UA and
Modbus TCP, incubators on RS-485 buses over ptys and behind a TCP gateway, particle
counters over Modbus TCP/RTU and the serial ASCII protocol), serves it with
``cleanroom-sim plant`` in its own process, and runs ``cleanroom-agent run`` against it for
``BENCH_PLANT_S`` seconds (60) per variant, one after the other against the same simulator
and broker. It reports the agent's CPU as a fraction of one core (split: the event loop's
thread, all other threads), its peak RSS, poll-start jitter p99 over the window (every poll
of every polled group pooled, the worst group, the three worst; and the agent's own status
figure, which also holds its first polls among the connects), sample-to-broker latency
(acquisition timestamp to arrival at a subscriber of the same mosquitto) p50/p99, overall
and per protocol, and the failed polls and overruns counted in the window.

Variants (``--variants``, in that order, default ``phased,unphased,before``): ``phased``, today's
agent; ``unphased``, the same agent with every group at phase 0 (``Scheduler.phased = False``:
all of a link's groups on one instant, as before phases); ``before``, the agent as it was at
``--before-ref`` (default ``BEFORE_REF``, the code path the plant work started from), extracted
from git and run from that tree. A variant may carry settings put in its configuration, as in
``phased[buffer.commit_pause=0,buffer.mark_interval=0.1]`` (dotted paths, YAML values), and may
keep only the devices of some protocols, as in ``phased[protocols=opcua+serial]`` (``none``: no
device at all, the agent's own cost): what each protocol's share of the plant costs. With
``--rounds N`` (or ``BENCH_PLANT_ROUNDS``) the variants run N times, interleaved, and each
reports its median-CPU round, with every round's CPU and latency beside it. Latency and jitter
are wall-clock figures, noisy on a shared machine; CPU seconds less so, but compare variants of
one run only.

Particle counters deliver one record per 60 s sample, so whether a window holds one of a kind
shows in ``readings_per_s_at_broker`` and in the per-protocol latency (``serial`` may be absent):
compare those only between windows that hold the same records.

Prints one JSON object: the first variant's figures, the others under ``variants``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml

from agent.app.status import fetch_status
from bench.gitref import extract
from cleanroom_common.net import free_port
from tests.support import Mosquitto, wait_for

DURATION_S = float(os.environ.get("BENCH_PLANT_S", "60"))
ROUNDS = int(os.environ.get("BENCH_PLANT_ROUNDS", "1"))
BEFORE_REF = "dd003d1"
"""The code path the plant work (issue 17) started from: 7.4-8.3 % of a core, latency p99 ~450 ms."""

BASES = {
    "phased": [sys.executable, "-m", "agent.cli"],
    "unphased": [
        sys.executable,
        "-c",
        "import sys; from agent.sources.scheduler import Scheduler; Scheduler.phased = False; "
        "from agent.cli import main; sys.exit(main())",
    ],
    "before": [sys.executable, "-m", "agent.cli"],
}
"""How each variant starts the agent (``before`` from the extracted tree: its cwd and PYTHONPATH)."""


@dataclass(frozen=True)
class Variant:
    label: str
    """As given on the command line; the key of its figures."""
    base: str
    settings: dict[str, Any] = field(default_factory=dict)
    """Dotted configuration path -> value, put in the agent's configuration."""
    protocols: frozenset[str] | None = None
    """Only the devices of these protocols (``protocols=opcua+serial``); None: every device."""


def parse_variants(text: str) -> list[Variant]:
    """``a,b[x.y=1,z=2]``: commas inside brackets belong to the settings."""
    out: list[Variant] = []
    for found in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text):
        label = found.strip()
        if not label:
            continue
        base, _, rest = label.partition("[")
        settings: dict[str, Any] = {}
        for item in filter(None, rest.rstrip("]").split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"{label}: setting {item!r} is not path=value")
            settings[key.strip()] = yaml.safe_load(value)
        only = settings.pop("protocols", None)
        out.append(Variant(label, base, settings, None if only is None else frozenset(str(only).split("+"))))
    return out


def apply_settings(config: dict[str, Any], settings: dict[str, Any]) -> None:
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value


def plant_spec() -> dict[str, Any]:
    devices: list[dict[str, Any]] = []
    for i in range(16):
        proto = "opcua" if i < 8 else "modbus-tcp"
        devices.append({"id": f"br-{i:02d}", "kind": "bioreactor", "protocol": proto})
    for i in range(32):
        if i < 16:
            devices.append(
                {
                    "id": f"inc-{i:02d}",
                    "kind": "incubator",
                    "protocol": "modbus-rtu",
                    "endpoint": f"inc-bus-{i // 8}",
                    "unit_id": i % 8 + 1,
                }
            )
        else:
            devices.append(
                {
                    "id": f"inc-{i:02d}",
                    "kind": "incubator",
                    "protocol": "modbus-tcp",
                    "endpoint": "inc-gw",
                    "unit_id": i - 15,
                }
            )
    grades = ["A", "B", "C", "D"]
    for i in range(40):
        params = {"grade": grades[i % 4], "state": "in_operation" if i % 2 else "at_rest"}
        if i < 24:
            spec = {"protocol": "modbus-tcp", "endpoint": f"pc-gw-{i // 12}", "unit_id": i % 12 + 1}
        elif i < 32:
            spec = {"protocol": "modbus-rtu", "endpoint": "pc-bus", "unit_id": i - 23}
        else:
            spec = {"protocol": "serial"}
        devices.append({"id": f"pc-{i:02d}", "kind": "particle_counter", "params": params, **spec})
    return {"speed": 1, "seed": 3, "devices": devices}


class Latency:
    def __init__(self, port: int) -> None:
        self.samples: list[tuple[str, float]] = []
        self.ticks: dict[tuple[str, str], set[int]] = {}
        """Acquisition times seen per (device, group): where each poll started."""
        self.readings = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-latency")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("cleanroom/+/data", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time_ns()
        doc = json.loads(msg.payload)
        with self._lock:
            for b in doc["blocks"]:
                self.samples.append((doc["device"], (now - b["ts"]) / 1e6))
                self.ticks.setdefault((doc["device"], b["group"]), set()).add(b["ts"])
                self.readings += b["n"]

    def take(self) -> tuple[list[tuple[str, float]], dict[tuple[str, str], set[int]], int]:
        """What arrived since the last call."""
        with self._lock:
            samples, ticks, readings = self.samples, self.ticks, self.readings
            self.samples, self.ticks, self.readings = [], {}, 0
        return samples, ticks, readings

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p * len(s)))], 2)


def thread_cpu(proc: psutil.Process) -> dict[int, float]:
    """CPU seconds of each of the agent's threads, by thread id."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def window_jitter_ms(acquired: set[int], interval_s: float) -> list[float]:
    """Poll-start jitter of one group over the measuring window, from its blocks' acquisition
    times (taken as a poll starts): each poll is put on the tick grid ``origin + k·interval``
    whose origin is the least late poll, so the figures are lateness relative to the group's
    most punctual poll (a constant delay common to all polls does not show). The agent's own
    ``jitter_p99_ms`` (status) also holds its first polls, among connects: the start, not the
    steady state this bench measures."""
    ts = sorted(acquired)
    ks = [round((t - ts[0]) / 1e9 / interval_s) for t in ts]
    late = [t / 1e9 - k * interval_s for t, k in zip(ts, ks, strict=True)]
    origin = min(late)
    return [(x - origin) * 1000 for x in late]


@dataclass
class Run:
    """What one agent run left: figures known at once, and the raw material of the rest."""

    figures: dict[str, Any]
    samples: list[tuple[str, float]]
    ticks: dict[tuple[str, str], set[int]]
    before: dict[str, Any]
    status: dict[str, Any]
    protocol: dict[str, str]


def run_agent(
    variant: Variant,
    work: Path,
    endpoints: list[dict[str, Any]],
    latency: Latency,
    broker: int,
    before_tree: Path | None,
) -> Run:
    """One agent run of ``variant`` against the simulated plant, over ``DURATION_S``."""
    work.mkdir()
    if variant.protocols is not None:
        endpoints = [e for e in endpoints if e["protocol"] in variant.protocols]
    status_port = free_port()
    config: dict[str, Any] = {
        "agent": {"id": "bench-plant", "status_listen": f"127.0.0.1:{status_port}"},
        "buffer": {"path": str(work / "buffer.db")},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "devices": [
            {"id": e["device"], "profile": e["profile"], "connection": e["connection"]} for e in endpoints
        ],
    }
    apply_settings(config, variant.settings)
    (work / "agent.yaml").write_text(yaml.safe_dump(config))
    env, cwd = None, None
    if variant.base == "before":
        assert before_tree is not None
        env, cwd = {**os.environ, "PYTHONPATH": str(before_tree)}, before_tree
    agent = subprocess.Popen(
        [*BASES[variant.base], "--log-level", "WARNING", "run", "-c", str(work / "agent.yaml")],
        stderr=(work / "agent.log").open("wb"),
        env=env,
        cwd=cwd,
    )
    try:
        listen = f"127.0.0.1:{status_port}"

        def ready() -> bool:
            try:
                delivered = int(fetch_status(listen)["buffer"]["delivered_readings_total"])
            except ConnectionError:
                return False
            return delivered > 0 or not endpoints  # an agent without devices delivers no reading

        try:
            wait_for(ready, timeout=60, interval=0.5, what="agent delivering")
        except AssertionError:
            tail = (work / "agent.log").read_text(errors="replace").splitlines()[-20:]
            raise AssertionError(
                f"{variant.label}: the agent delivered nothing; its log ends:\n" + "\n".join(tail)
            ) from None
        time.sleep(5)  # connect, first polls
        proc = psutil.Process(agent.pid)
        before = fetch_status(listen)
        latency.take()
        c0, th0, t0, peak = proc.cpu_times(), thread_cpu(proc), time.monotonic(), proc.memory_info().rss
        while time.monotonic() - t0 < DURATION_S:
            time.sleep(0.5)
            peak = max(peak, proc.memory_info().rss)
        c1, th1, t1 = proc.cpu_times(), thread_cpu(proc), time.monotonic()
        status = fetch_status(listen)
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
    samples, ticks, readings = latency.take()
    wall = t1 - t0
    loop_cpu = (th1.get(agent.pid, 0.0) - th0.get(agent.pid, 0.0)) / wall
    others = sum(cpu - th0.get(tid, 0.0) for tid, cpu in th1.items() if tid != agent.pid) / wall
    figures = {
        "devices": len(endpoints),
        "duration_s": round(wall, 1),
        "readings_per_s_at_broker": round(readings / wall, 1),
        "cpu_fraction_of_core": round(((c1.user - c0.user) + (c1.system - c0.system)) / wall, 4),
        "cpu_fraction_event_loop_thread": round(loop_cpu, 4),
        "cpu_fraction_other_threads": round(others, 4),
        "peak_rss_mb": round(peak / 2**20, 1),
    }
    protocol = {e["device"]: e["protocol"] for e in endpoints}
    return Run(figures, samples, ticks, before, status, protocol)


def groups_of(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(dev, name): g for dev, s in status["devices"].items() for name, g in s["groups"].items()}


def summarise(run: Run, modes: dict[tuple[str, str], str]) -> dict[str, Any]:
    """``modes``: each group's mode (poll, subscription...) as today's agents report it; an
    earlier agent's status may not say."""
    groups, old = groups_of(run.status), groups_of(run.before)
    status_jitter = [g["jitter_p99_ms"] for g in groups.values() if g["jitter_p99_ms"] is not None]
    jitter: dict[str, float] = {}
    pooled: list[float] = []
    for key, g in groups.items():
        acquired = run.ticks.get(key, set())
        if g.get("mode", modes.get(key)) != "poll" or len(acquired) < 3:
            continue  # subscriptions and record drains have no poll ticks in their blocks
        late = window_jitter_ms(acquired, g["interval_s"])
        pooled += late
        jitter["/".join(key)] = pct(late, 0.99) or 0.0
    by_protocol: dict[str, list[float]] = {}
    for device, ms in run.samples:
        by_protocol.setdefault(run.protocol.get(device, "?"), []).append(ms)
    lat = [ms for _, ms in run.samples]

    def counted(key: str) -> dict[str, int]:
        """Counted during the window (the connect and first polls before it are not the steady state)."""
        per = {"/".join(k): g[key] - old.get(k, {}).get(key, 0) for k, g in groups.items()}
        return {k: n for k, n in sorted(per.items()) if n}

    failed = counted("failed")
    return {
        **run.figures,
        "jitter_p99_ms": pct(pooled, 0.99),
        "jitter_p99_worst_group_ms": max(jitter.values()) if jitter else None,
        "jitter_p99_worst_groups_ms": dict(sorted(jitter.items(), key=lambda kv: -kv[1])[:3]),
        "jitter_p99_status_worst_group_ms": max(status_jitter) if status_jitter else None,
        "latency_p50_ms": pct(lat, 0.5),
        "latency_p99_ms": pct(lat, 0.99),
        "latency_p99_ms_by_protocol": {k: pct(v, 0.99) for k, v in sorted(by_protocol.items())},
        "failed_polls": sum(failed.values()),
        "failed_polls_by_group": failed,
        "overruns": sum(counted("overruns").values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default="phased,unphased,before", help="comma-separated, run in this order"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of every variant")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="git ref of the `before` variant")
    args = parser.parse_args()
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = [v.label for v in variants if v.base not in BASES]
    if unknown or not variants or args.rounds < 1:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(BASES)}")
    broker = Mosquitto().start()
    with tempfile.TemporaryDirectory(prefix="bench-plant-") as tmp:
        d = Path(tmp)
        before_tree = None
        if any(v.base == "before" for v in variants):
            before_tree = d / "before"
            before_tree.mkdir()
            why_not = extract(args.before_ref, before_tree)
            if why_not:
                variants = [v for v in variants if v.base != "before"]
                print(f"bench.plant: no `before` variant: {why_not}", file=sys.stderr)
        (d / "plant.yaml").write_text(yaml.safe_dump(plant_spec()))
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulators.cli",
                "plant",
                "--config",
                str(d / "plant.yaml"),
                "--endpoints",
                str(d / "endpoints.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(d / "sim.log").open("wb"),
        )
        latency = None
        runs: dict[str, list[Run]] = {v.label: [] for v in variants}
        try:
            wait_for(
                lambda: (
                    (d / "endpoints.json").exists()
                    and (d / "endpoints.json").read_text().rstrip().endswith("]")
                ),
                timeout=120,
                interval=0.2,
                what="simulated plant",
            )
            endpoints = json.loads((d / "endpoints.json").read_text())
            latency = Latency(broker.port)
            for r in range(args.rounds):
                for k, v in enumerate(variants):
                    work = d / f"run-{r}-{k}"
                    runs[v.label].append(run_agent(v, work, endpoints, latency, broker.port, before_tree))
        finally:
            if latency is not None:
                latency.close()
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
            broker.close()
    modes = {
        key: g["mode"]
        for rs in runs.values()
        for run in rs
        for key, g in groups_of(run.status).items()
        if "mode" in g
    }
    figures: dict[str, dict[str, Any]] = {}
    for label, rs in runs.items():
        each = [summarise(run, modes) for run in rs]
        median = sorted(each, key=lambda f: f["cpu_fraction_of_core"])[(len(each) - 1) // 2]
        figures[label] = median
        if len(each) > 1:
            median["rounds_cpu_fraction_of_core"] = [f["cpu_fraction_of_core"] for f in each]
            median["rounds_latency_p50_ms"] = [f["latency_p50_ms"] for f in each]
            median["rounds_latency_p99_ms"] = [f["latency_p99_ms"] for f in each]
            median["rounds_jitter_p99_ms"] = [f["jitter_p99_ms"] for f in each]
    first, *others = [v.label for v in variants]
    result = {
        "name": "plant",
        "devices": len(endpoints),
        "protocols": sorted({e["protocol"] for e in endpoints}),
        "rounds": args.rounds,
        "before_ref": args.before_ref,
        "variant": first,
        **figures[first],
        "variants": {v: figures[v] for v in others},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
