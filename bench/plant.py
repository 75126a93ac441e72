"""A whole cleanroom suite through the agent: every device kind, every protocol.

Generates a plant of about 2,000 tags polled at 1 s (bioreactors over OPC UA and
Modbus TCP, incubators on RS-485 buses over ptys and behind a TCP gateway, particle
counters over Modbus TCP/RTU and the serial ASCII protocol), serves it with
``cleanroom-sim plant`` in its own process, runs ``cleanroom-agent run`` against it for
60 s, and reports the agent's CPU as a fraction of one core, its peak RSS, the p99
poll-start jitter (worst group) and sample-to-broker latency (acquisition timestamp
to arrival at a subscriber of the same mosquitto) p50/p99.

Prints one JSON object.
"""

from __future__ import annotations

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
        self.samples: list[float] = []
        self.readings = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-latency")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("cleanroom/+/data", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time_ns()
        for b in json.loads(msg.payload)["blocks"]:
            with self._lock:
                self.samples.append((now - b["ts"]) / 1e6)
                self.readings += b["n"]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p * len(s)))], 2)


def main() -> None:
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
        agent = None
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
            status_port = free_port()
            config = {
                "agent": {"id": "bench-plant", "status_listen": f"127.0.0.1:{status_port}"},
                "buffer": {"path": str(d / "buffer.db")},
                "mqtt": {"host": "127.0.0.1", "port": broker.port},
                "devices": [
                    {"id": e["device"], "profile": e["profile"], "connection": e["connection"]}
                    for e in endpoints
                ],
            }
            (d / "agent.yaml").write_text(yaml.safe_dump(config))
            latency = Latency(broker.port)
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.cli",
                    "--log-level",
                    "WARNING",
                    "run",
                    "-c",
                    str(d / "agent.yaml"),
                ],
                stderr=(d / "agent.log").open("wb"),
            )
            listen = f"127.0.0.1:{status_port}"

            def ready() -> bool:
                try:
                    return int(fetch_status(listen)["buffer"]["delivered_readings_total"]) > 0
                except ConnectionError:
                    return False

            wait_for(ready, timeout=60, interval=0.5, what="agent delivering")
            time.sleep(5)  # connect, first polls
            proc = psutil.Process(agent.pid)
            with latency._lock:
                latency.samples.clear()
                latency.readings = 0
            c0, t0, peak = proc.cpu_times(), time.monotonic(), proc.memory_info().rss
            while time.monotonic() - t0 < DURATION_S:
                time.sleep(0.5)
                peak = max(peak, proc.memory_info().rss)
            c1, t1 = proc.cpu_times(), time.monotonic()
            status = fetch_status(listen)
            groups = [g for dev in status["devices"].values() for g in dev["groups"].values()]
            jitters = [g["jitter_p99_ms"] for g in groups if g["jitter_p99_ms"] is not None]
            with latency._lock:
                lat = list(latency.samples)
                readings = latency.readings
            result = {
                "name": "plant",
                "devices": len(endpoints),
                "protocols": sorted({e["protocol"] for e in endpoints}),
                "duration_s": round(t1 - t0, 1),
                "readings_per_s_at_broker": round(readings / (t1 - t0), 1),
                "cpu_fraction_of_core": round(((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0), 4),
                "peak_rss_mb": round(peak / 2**20, 1),
                "jitter_p99_ms": max(jitters) if jitters else None,
                "latency_p50_ms": pct(lat, 0.5),
                "latency_p99_ms": pct(lat, 0.99),
                "failed_polls": sum(g["failed"] for g in groups),
                "overruns": sum(g["overruns"] for g in groups),
            }
        finally:
            if latency is not None:
                latency.close()
            for p in (agent, sim):
                if p is not None:
                    p.terminate()
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
            broker.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
