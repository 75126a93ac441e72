"""OPC UA subscription throughput: 1,000 monitored items at 100 ms through one subscription.

The server runs in a child process (``--serve``) that changes every value every 100 ms,
so the CPU time measured here (``time.process_time`` of this process) is the agent's:
the driver decoding publish responses and building blocks. The server offers as many
changes as it can (on a loaded 2-core box fewer than 10,000/s: ``server_changes_per_s``,
read back from the values, which carry the server's update round). The monitored items
queue what the driver asks for by default; ``changes_lost`` counts the update rounds missing
between each node's first and last one seen (0: every change arrived), and
``queue_overflows_counted`` what the server said it dropped.
Compared, in the same run, with asyncua decoding every notification into its objects
(``baseline_per_item_decoding``, the path before bulk decoding), with the naive way (one Read
call per node, as fast as the server answers) and with the driver's poll mode (one Read for
all nodes per 100 ms tick).

Prints one JSON object: ``readings_per_s`` and ``cpu_s_per_100k_readings`` for each,
and the subscription's advantage as ratios. Bounded to well under 60 s.

    python -m bench.opcua_subscription [--nodes 1000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from cleanroom_common.net import free_port

NS = "urn:cleanroom-edge:bench"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- server process


async def serve(port: int, nodes: int, period_s: float) -> None:
    from asyncua import Server, ua

    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NS)
    folder = await server.nodes.objects.add_folder(idx, "Bench")
    ids = []
    for i in range(nodes):
        var = await folder.add_variable(ua.NodeId(f"v{i}", idx), ua.QualifiedName(f"v{i}", idx), 0.0)
        ids.append(var.nodeid)
    await server.start()
    print("ready", flush=True)
    k = 0
    next_tick = time.monotonic()
    while True:
        k += 1
        for i, nid in enumerate(ids):
            await server.write_attribute_value(
                nid, ua.DataValue(ua.Variant(float(k * 1000 + i), ua.VariantType.Double))
            )
        next_tick += period_s
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


# --------------------------------------------------------------------------- agent side


def _driver(url: str, nodes: int, group: dict[str, Any]) -> Any:
    from agent.core.driver import DeviceContext, build_groups
    from drivers.opcua.driver import OpcUaDriver

    tags = [{"name": f"v{i}", "node_id": f"nsu={NS};s=v{i}"} for i in range(nodes)]
    profile = OpcUaDriver.profile_model().model_validate(
        {"profile": "bench", "protocol": "opcua", "groups": {"default": group}, "tags": tags}
    )
    # The simulator offers no security; the driver's default (Basic256Sha256) needs certificates.
    conn = OpcUaDriver.Connection.model_validate(
        {"url": url, "timeout": "5s", "keepalive": "5s", "security_policy": "None"}
    )
    return OpcUaDriver(DeviceContext("bench", profile, conn, build_groups("bench", profile, conn, {})))


def _result(readings: int, wall: float, cpu: float) -> dict[str, float]:
    return {
        "readings_per_s": round(readings / wall, 1),
        "cpu_s_per_100k_readings": round(cpu / max(readings, 1) * 100_000, 3),
    }


async def measure_subscription(url: str, nodes: int, seconds: float, bulk: bool = True) -> dict[str, Any]:
    """At the driver's default queue size. ``bulk=False``: asyncua decodes every notification
    into its objects (the path before bulk decoding), for the A/B in the same run."""
    drv = _driver(url, nodes, {"interval": "1s", "mode": "subscribe", "sampling_interval": "100ms"})
    drv.bulk_decode = bulk
    await drv.connect()
    count = 0
    server_tick = 0
    measuring = False
    kept: list[Any] = []
    """The blocks of the measurement, checked for lost changes afterwards (not on its CPU time)."""

    def emit(block: Any) -> None:
        nonlocal count, server_tick
        count += len(block.values)
        server_tick = max(server_tick, int(max(v for v in block.values if v is not None) // 1000))
        if measuring:
            kept.append(block)

    try:
        await drv.subscribe(drv.ctx.groups["default"], emit)
        await asyncio.sleep(1.0)  # initial values and warm-up
        count, tick0, measuring = 0, server_tick, True
        t, c = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        wall = time.monotonic() - t
        cpu = time.process_time() - c
        measuring = False
        result: dict[str, Any] = _result(count, wall, cpu)
        # Values carry the server's update round: what the server managed to offer.
        result["server_changes_per_s"] = round((server_tick - tick0) * nodes / wall, 1)
        # A node's update round missing between the first and the last one it sent: a lost change.
        rounds: list[set[int]] = [set() for _ in range(nodes)]
        for block in kept:
            for tag, v in zip(block.tags, block.values, strict=True):
                rounds[int(tag[1:])].add(int(v // 1000))
        result["changes_lost"] = sum(max(r) - min(r) + 1 - len(r) for r in rounds if r)
        result["queue_overflows_counted"] = drv.ctx.stats.errors["queue_overflow"]
        return result
    finally:
        await drv.close()


async def measure_poll_one_read(url: str, nodes: int, seconds: float, bulk: bool = True) -> dict[str, float]:
    drv = _driver(url, nodes, {"interval": "100ms"})
    drv.bulk_decode = bulk
    await drv.connect()
    group = drv.ctx.groups["default"]
    count = 0
    try:
        t, c = time.monotonic(), time.process_time()
        next_tick = t
        while time.monotonic() - t < seconds:
            count += sum(len(b.values) for b in await drv.read(group))
            next_tick += 0.1
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        return _result(count, time.monotonic() - t, time.process_time() - c)
    finally:
        await drv.close()


async def measure_naive(url: str, nodes: int, seconds: float) -> dict[str, float]:
    """The baseline: a Read call per node, one after the other, with asyncua's high-level API."""
    from asyncua import Client

    client = Client(url, timeout=5)
    await client.connect()
    try:
        idx = await client.get_namespace_index(NS)
        handles = [client.get_node(f"ns={idx};s=v{i}") for i in range(nodes)]
        count = 0
        t, c = time.monotonic(), time.process_time()
        while time.monotonic() - t < seconds:
            for node in handles:
                await node.read_data_value()
                count += 1
                if time.monotonic() - t >= seconds:
                    break
        return _result(count, time.monotonic() - t, time.process_time() - c)
    finally:
        await client.disconnect()


async def run(nodes: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.opcua_subscription",
        "--serve",
        str(port),
        "--nodes",
        str(nodes),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=40)
        if line.strip() != b"ready":
            raise RuntimeError("bench server did not start")
        url = f"opc.tcp://127.0.0.1:{port}"
        sub = await measure_subscription(url, nodes, seconds)
        per_item = await measure_subscription(url, nodes, seconds, bulk=False)
        poll = await measure_poll_one_read(url, nodes, seconds)
        poll_per_item = await measure_poll_one_read(url, nodes, seconds, bulk=False)
        naive = await measure_naive(url, nodes, seconds)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=10)
    return {
        "name": "opcua_subscription",
        "nodes": nodes,
        "sampling_ms": 100,
        "seconds": seconds,
        "readings_per_s": sub["readings_per_s"],
        "cpu_s_per_100k_readings": sub["cpu_s_per_100k_readings"],
        "server_changes_per_s": sub["server_changes_per_s"],
        "changes_lost": sub["changes_lost"],
        "queue_overflows_counted": sub["queue_overflows_counted"],
        "baseline_per_item_decoding": per_item,
        "ratio_cpu_per_item_over_bulk": round(
            per_item["cpu_s_per_100k_readings"] / max(sub["cpu_s_per_100k_readings"], 1e-9), 2
        ),
        "poll_one_read": poll,
        "poll_one_read_per_item_decoding": poll_per_item,
        "baseline_naive_read_per_node": naive,
        "ratio_cpu_naive_over_subscription": round(
            naive["cpu_s_per_100k_readings"] / max(sub["cpu_s_per_100k_readings"], 1e-9), 2
        ),
        "ratio_readings_per_s_subscription_over_naive": round(
            sub["readings_per_s"] / max(naive["readings_per_s"], 1e-9), 2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, args.nodes, 0.1))
        return 0
    import logging

    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(asyncio.run(run(args.nodes, args.seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
