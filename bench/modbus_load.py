"""The whole agent polling Modbus TCP register servers into mosquitto.

10 devices × N int16 holding registers, read with 125-register requests every second,
every register decoded into its own committed, acknowledged reading: N=1,000 gives
10k points/s, N=10,000 gives 100k points/s. The agent runs as a real
``cleanroom-agent run`` process; we sample its CPU time and RSS with psutil, and count
acknowledged readings from its status endpoint.

Baselines, same machine, same run, same server and broker:

* a straightforward poller (pymodbus client, per-tag decode in a Python loop, one SQLite
  row per reading, one publish per reading) at the 10k load, so the ratio says what the
  agent's design buys;
* the agent as it was before the integrity chain (``--encoding-ref``, default
  :data:`UNCHAINED_REF`: rows per block, re-spliced into messages at forwarding, no hashing),
  extracted from git into a temporary directory and run from there at the 100k load, so the
  cost of hashed segments is read against the encoding it replaced, not against a figure
  from another day.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.gitref import extract
from cleanroom_common.net import free_port
from tests.support import Mosquitto, wait_for

DEVICES = 10
WARMUP_S = 6.0
MEASURE_S = float(os.environ.get("BENCH_MEASURE_S", "20"))
UNCHAINED_REF = "849538e"
"""The last commit whose buffer stored one row per block and whose forwarder spliced rows into
messages without hashing (0.2.0)."""


def _profile(dirpath: Path, registers: int) -> None:
    lines = [
        "profile: load",
        "protocol: modbus",
        "device_kind: generic",
        "groups: {all: {interval: 1s}}",
        "tags:",
    ]
    lines += [
        f"  - {{name: r{i}, table: holding, address: {i}, address_base: 0, vendor_notation: false, "
        "type: int16, group: all}"
        for i in range(registers)
    ]
    (dirpath / "load.yaml").write_text("\n".join(lines) + "\n")


def _config(dirpath: Path, ports: list[int], broker: int, status_port: int) -> Path:
    devices = "\n".join(
        f"  - {{id: dev{i:02d}, profile: load, connection: {{host: 127.0.0.1, port: {p}, timeout: 2s}}}}"
        for i, p in enumerate(ports)
    )
    cfg = dirpath / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: bench, status_listen: '127.0.0.1:{status_port}'}}\n"
        f"buffer: {{path: buffer.db, synchronous: normal, retention: 1m}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker}}}\n"
        f"profiles_dirs: [profiles]\n"
        f"devices:\n{devices}\n"
    )
    return cfg


def _measure(pid: int, counter: Any, seconds: float) -> dict[str, float]:
    """CPU fraction of one core and peak RSS of ``pid`` over ``seconds``; rate of ``counter()``."""
    proc = psutil.Process(pid)
    peak = proc.memory_info().rss
    c0, n0, t0 = proc.cpu_times(), counter(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(0.25)
        peak = max(peak, proc.memory_info().rss)
    c1, n1, t1 = proc.cpu_times(), counter(), time.monotonic()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {
        "points_per_s": round((n1 - n0) / (t1 - t0), 1),
        "cpu_fraction_of_core": round(cpu / (t1 - t0), 4),
        "peak_rss_mb": round(peak / 2**20, 1),
    }


def _register_servers(registers: int) -> tuple[list[int], subprocess.Popen[bytes]]:
    """One register server process serving DEVICES ports; returns when it is listening."""
    ports = [free_port() for _ in range(DEVICES)]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.regserver",
            "--ports",
            ",".join(map(str, ports)),
            "--registers",
            str(registers),
        ],
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    server.stdout.readline()
    return ports, server


def fetch_status(listen: str) -> dict[str, Any]:
    """The agent's status at ``/status``, which this agent and the unchained one both answer."""
    try:
        with urllib.request.urlopen(f"http://{listen}/status", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(str(exc)) from None


def run_agent_load(registers: int, broker: int, code: Path | None = None) -> dict[str, float]:
    """The agent under load; ``code``: run the agent found there instead of this checkout's."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        d = Path(tmp)
        (d / "profiles").mkdir()
        _profile(d / "profiles", registers)
        ports, server = _register_servers(registers)
        status_port = free_port()
        cfg = _config(d, ports, broker, status_port)
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--log-level", "WARNING", "run", "-c", str(cfg)],
            stderr=(d / "agent.log").open("wb"),
            cwd=code,
            env=env,
        )
        try:
            listen = f"127.0.0.1:{status_port}"

            def acked() -> int:
                return int(fetch_status(listen)["buffer"]["delivered_readings_total"])

            def up() -> bool:
                try:
                    return acked() > 0
                except ConnectionError:
                    return False

            wait_for(up, timeout=30, interval=0.2, what="agent delivering")
            time.sleep(WARMUP_S)
            result = _measure(agent.pid, acked, MEASURE_S)
            status = fetch_status(listen)
            result["failed_polls"] = sum(
                g["failed"] for dev in status["devices"].values() for g in dev["groups"].values()
            )
            result["overruns"] = sum(
                g["overruns"] for dev in status["devices"].values() for g in dev["groups"].values()
            )
            result["buffer_depth_readings"] = status["buffer"]["depth_readings"]
            return result
        finally:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
            server.kill()
            server.wait()


def run_baseline(registers: int, broker: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as tmp:
        ports, server = _register_servers(registers)
        counter = Path(tmp) / "count"
        naive = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.naive_poller",
                "--ports",
                ",".join(map(str, ports)),
                "--registers",
                str(registers),
                "--broker",
                str(broker),
                "--db",
                str(Path(tmp) / "naive.db"),
                "--count-file",
                str(counter),
            ],
        )
        try:

            def count() -> int:
                try:
                    return int(counter.read_text() or 0)
                except (OSError, ValueError):
                    return 0

            wait_for(lambda: count() > 0, timeout=30, interval=0.2, what="naive poller delivering")
            time.sleep(WARMUP_S)
            return _measure(naive.pid, count, MEASURE_S)
        finally:
            naive.kill()
            naive.wait()
            server.kill()
            server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--encoding-ref", default=UNCHAINED_REF, help="git ref of the unchained agent ('' to skip)"
    )
    args = ap.parse_args()
    broker = Mosquitto().start()
    unchained: dict[str, Any]
    try:
        at_10k = run_agent_load(1000, broker.port)
        at_100k = run_agent_load(10000, broker.port)
        naive = run_baseline(1000, broker.port)
        with tempfile.TemporaryDirectory(prefix="bench-unchained-") as old:
            why_not = extract(args.encoding_ref, Path(old)) if args.encoding_ref else "skipped"
            unchained = (
                {"ref": args.encoding_ref, "error": why_not}
                if why_not
                else {"ref": args.encoding_ref, **run_agent_load(10000, broker.port, Path(old))}
            )
    finally:
        broker.close()
    ratio = (
        naive["cpu_fraction_of_core"] / at_10k["cpu_fraction_of_core"]
        if at_10k["cpu_fraction_of_core"]
        else None
    )
    print(
        json.dumps(
            {
                "name": "modbus_load",
                "devices": DEVICES,
                "load_10k": at_10k,
                "load_100k": at_100k,
                "baseline_10k": naive,
                "unchained_100k": unchained,
                "cpu_ratio_baseline_over_agent_10k": round(ratio, 2) if ratio else None,
                "measure_s": MEASURE_S,
            }
        )
    )


if __name__ == "__main__":
    main()
