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

Variants (``--variants``, in that order, default both): ``phased``, today's scheduler (groups
sharing a link spread over its cycle, :class:`agent.sources.scheduler.PhasePlan`), and
``unphased``, the same agent with every group at phase 0 (``Scheduler.phased = False``: all of a
link's groups on one instant, as before phases), the baseline side by side. Latency and jitter
are wall-clock figures, noisy on a shared machine; CPU seconds are not.

Prints one JSON object: the first variant's figures, the others under ``variants``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml

from agent.app.status import fetch_status
from cleanroom_common.net import free_port
from tests.support import Mosquitto, wait_for

DURATION_S = float(os.environ.get("BENCH_PLANT_S", "60"))

VARIANTS = {
    "phased": [sys.executable, "-m", "agent.cli"],
    "unphased": [
        sys.executable,
        "-c",
        "import sys; from agent.sources.scheduler import Scheduler; Scheduler.phased = False; "
        "from agent.cli import main; sys.exit(main())",
    ],
}
"""How each variant starts the agent (the same code, the baseline with phases off)."""


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


def run_agent(
    variant: str, d: Path, endpoints: list[dict[str, Any]], latency: Latency, broker: int
) -> dict[str, Any]:
    """One agent run of ``variant`` against the simulated plant: its figures over ``DURATION_S``."""
    work = d / variant
    work.mkdir()
    status_port = free_port()
    config = {
        "agent": {"id": f"bench-plant-{variant}", "status_listen": f"127.0.0.1:{status_port}"},
        "buffer": {"path": str(work / "buffer.db")},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "devices": [
            {"id": e["device"], "profile": e["profile"], "connection": e["connection"]} for e in endpoints
        ],
    }
    (work / "agent.yaml").write_text(yaml.safe_dump(config))
    protocol = {e["device"]: e["protocol"] for e in endpoints}
    agent = subprocess.Popen(
        [*VARIANTS[variant], "--log-level", "WARNING", "run", "-c", str(work / "agent.yaml")],
        stderr=(work / "agent.log").open("wb"),
    )
    try:
        listen = f"127.0.0.1:{status_port}"

        def ready() -> bool:
            try:
                return int(fetch_status(listen)["buffer"]["delivered_readings_total"]) > 0
            except ConnectionError:
                return False

        try:
            wait_for(ready, timeout=60, interval=0.5, what="agent delivering")
        except AssertionError:
            tail = (work / "agent.log").read_text(errors="replace").splitlines()[-20:]
            raise AssertionError(
                f"{variant}: the agent delivered nothing; its log ends:\n" + "\n".join(tail)
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
    samples, ticks, readings = latency.take()
    wall = t1 - t0
    loop_cpu = (th1.get(agent.pid, 0.0) - th0.get(agent.pid, 0.0)) / wall
    others = sum(cpu - th0.get(tid, 0.0) for tid, cpu in th1.items() if tid != agent.pid) / wall
    groups = {(dev, name): g for dev, s in status["devices"].items() for name, g in s["groups"].items()}
    old = {(dev, name): g for dev, s in before["devices"].items() for name, g in s["groups"].items()}
    status_jitter = [g["jitter_p99_ms"] for g in groups.values() if g["jitter_p99_ms"] is not None]
    jitter: dict[str, float] = {}
    pooled: list[float] = []
    for key, g in groups.items():
        acquired = ticks.get(key, set())
        if g["mode"] != "poll" or len(acquired) < 3:
            continue  # subscriptions and record drains have no poll ticks in their blocks
        late = window_jitter_ms(acquired, g["interval_s"])
        pooled += late
        jitter["/".join(key)] = pct(late, 0.99) or 0.0
    by_protocol: dict[str, list[float]] = {}
    for device, ms in samples:
        by_protocol.setdefault(protocol.get(device, "?"), []).append(ms)
    lat = [ms for _, ms in samples]

    def counted(key: str) -> int:
        """Counted during the window (the connect and first polls before it are not the steady state)."""
        return sum(g[key] - old.get(k, {}).get(key, 0) for k, g in groups.items())

    return {
        "duration_s": round(wall, 1),
        "readings_per_s_at_broker": round(readings / wall, 1),
        "cpu_fraction_of_core": round(((c1.user - c0.user) + (c1.system - c0.system)) / wall, 4),
        "cpu_fraction_event_loop_thread": round(loop_cpu, 4),
        "cpu_fraction_other_threads": round(others, 4),
        "peak_rss_mb": round(peak / 2**20, 1),
        "jitter_p99_ms": pct(pooled, 0.99),
        "jitter_p99_worst_group_ms": max(jitter.values()) if jitter else None,
        "jitter_p99_worst_groups_ms": dict(sorted(jitter.items(), key=lambda kv: -kv[1])[:3]),
        "jitter_p99_status_worst_group_ms": max(status_jitter) if status_jitter else None,
        "latency_p50_ms": pct(lat, 0.5),
        "latency_p99_ms": pct(lat, 0.99),
        "latency_p99_ms_by_protocol": {k: pct(v, 0.99) for k, v in sorted(by_protocol.items())},
        "failed_polls": counted("failed"),
        "overruns": counted("overruns"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    broker = Mosquitto().start()
    with tempfile.TemporaryDirectory(prefix="bench-plant-") as tmp:
        d = Path(tmp)
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
            runs = {v: run_agent(v, d, endpoints, latency, broker.port) for v in variants}
        finally:
            if latency is not None:
                latency.close()
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
            broker.close()
    first, *others = variants
    result = {
        "name": "plant",
        "devices": len(endpoints),
        "protocols": sorted({e["protocol"] for e in endpoints}),
        "variant": first,
        **runs[first],
        "variants": {v: runs[v] for v in others},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
