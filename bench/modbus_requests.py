"""Modbus read planning and decoding, measured against naive baselines in the same run.

1. Requests per scan for a realistic sparse register map (a bioreactor-controller-like
   layout: clusters of float32 process values, status words, 64-bit totals, a name
   string, sparse setpoints and alarm blocks), counted on a real pymodbus server over
   loopback, against one-request-per-tag and against the theoretical minimum computed
   here independently of the driver (dynamic programme over the sorted values: a read
   covers a run of whole values within the register limit and the gap limit).
2. Decoding a 10,000-tag int16 poll group: the driver's vectorised path against
   decoding tag by tag; and the client CPU of a whole poll of that group (requests,
   pymodbus framing, decoding) against a server in another process, as the share of
   one core that 10 devices × 10,000 tags per second would take.

Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from typing import Any

import numpy as np
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from agent.core.driver import DeviceContext, build_groups
from cleanroom_common.codec import DataType, decode, register_count
from cleanroom_common.net import free_port
from drivers.modbus.config import Connection, as_tag
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import build_plan, decode_plan

MAX_REGS = 125
MAX_GAP = 10


def sparse_map(seed: int = 7) -> list[dict[str, Any]]:
    """Tags of a controller-like map: 12 clusters of mixed values with irregular spacing."""
    rng = random.Random(seed)
    kinds = [("float32", 2), ("float32", 2), ("int16", 1), ("uint16", 1), ("uint32", 2), ("int64", 4)]
    tags: list[dict[str, Any]] = []
    address = 0
    for cluster in range(12):
        address += rng.choice([3, 15, 40, 90, 200])
        for k in range(rng.randint(4, 30)):
            dtype, width = rng.choice(kinds)
            tags.append({"name": f"c{cluster}_{k}", "address": 40001 + address, "type": dtype})
            address += width + rng.choice([0, 0, 0, 1, 2, 6, 12])
    tags.append({"name": "model", "address": 40001 + address + 5, "type": "string", "length": 32})
    for k in range(20):  # an alarm block: bit fields of a few status words
        tags.append({"name": f"alarm{k}", "address": 40001 + address + 30 + k // 16, "bit": k % 16})
    return tags


def fewest_reads(spans: list[tuple[int, int]], max_count: int, max_gap: int) -> int:
    """Fewest reads covering every ``(start, width)`` value whole, computed independently of
    the driver: DP over the values sorted by address (an optimal read covers a run of
    consecutive values; reading over a value is free), each run checked for the register
    limit and for holes wider than ``max_gap``."""
    spans = sorted(spans)
    best = [0] + [len(spans) + 1] * len(spans)
    for i in range(1, len(spans) + 1):
        for j in range(i):
            run = spans[j:i]
            covered, ok = run[0][0] + run[0][1], True
            for s, w in run[1:]:
                ok = ok and s - covered <= max_gap
                covered = max(covered, s + w)
            if ok and covered - run[0][0] <= max_count:
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


def minimum_reads(tags: list[dict[str, Any]]) -> int:
    spans = {
        (t["address"] - 40001, 1 if "bit" in t else register_count(DataType(t["type"]), t.get("length")))
        for t in tags
    }
    return fewest_reads(sorted(spans), MAX_REGS, MAX_GAP)


def driver_for(tags: list[dict[str, Any]], port: int, **conn: Any) -> ModbusDriver:
    profile = ModbusDriver.profile_model().model_validate(
        {"profile": "bench", "protocol": "modbus", "tags": tags}
    )
    connection = Connection.model_validate(
        {"host": "127.0.0.1", "port": port, "max_gap": MAX_GAP, "max_registers_per_request": MAX_REGS, **conn}
    )
    groups = build_groups("bench", profile, connection, {})
    return ModbusDriver(DeviceContext(id="bench", profile=profile, connection=connection, groups=groups))


async def requests_per_scan(tags: list[dict[str, Any]], **conn: Any) -> int:
    """One scan of the map against a real server; the server counts the requests."""
    seen: list[int] = []

    def trace(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            seen.append(pdu.function_code)
        return pdu

    port = free_port()
    top = max(t["address"] - 40001 for t in tags) + 40
    device = SimDevice(id=1, simdata=[SimData(0, count=top, values=0, datatype=SimType.REGISTERS)])
    server = ModbusTcpServer(device, address=("127.0.0.1", port), trace_pdu=trace)
    await server.serve_forever(background=True)
    driver = driver_for(tags, port, **conn)
    try:
        await driver.connect()
        (block,) = await driver.read(driver.ctx.groups["default"])
        if block.quality is not None:
            raise RuntimeError(f"bench scan failed: {set(block.reasons or [])}")
    finally:
        await driver.close()
        await server.shutdown()
    return len(seen)


def decode_timing(n_tags: int = 10_000, repeat: int = 20) -> dict[str, float]:
    tags = [{"name": f"t{i}", "address": 400001 + i, "type": "int16"} for i in range(n_tags)]
    driver = driver_for(tags, 502)
    group = driver.ctx.groups["default"]
    plan = build_plan([as_tag(t) for t in group.tag_specs], driver.conn)
    rng = np.random.default_rng(1)
    regs = rng.integers(0, 65536, size=plan.n_regs, dtype=np.uint16)
    bits = np.zeros(0, dtype=np.bool_)

    def vectorised() -> None:
        values, quality, reasons = decode_plan(plan, regs, bits, {})
        group.finish(values, quality=quality, reasons=reasons)

    starts = [
        pos for _, pos in sorted(zip(plan.numeric[0][0].tolist(), plan.numeric[0][1].tolist(), strict=True))
    ]
    reg_list = regs.tolist()

    def naive() -> None:
        values = [decode(reg_list[p : p + 1], DataType.INT16) for p in starts]
        group.finish(values)

    out = {}
    for name, fn in (("vectorised", vectorised), ("naive", naive)):
        fn()
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        out[name] = (time.process_time() - t0) / repeat
    return out


async def _serve(port: int, n_regs: int) -> None:
    """Server half of :func:`poll_cpu`, run in a child process so its CPU is not counted."""
    device = SimDevice(id=1, simdata=[SimData(0, count=n_regs, values=7, datatype=SimType.REGISTERS)])
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever()


def poll_cpu(n_tags: int = 10_000, polls: int = 20) -> float:
    """Client CPU seconds for one full poll of an ``n_tags`` int16 group (80 requests of
    125 registers, pymodbus framing and PDU decoding included) against a server in
    another process."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.modbus_requests", "--serve", str(port), str(n_tags)]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("bench server did not start") from None
                time.sleep(0.05)
        tags = [{"name": f"t{i}", "address": 400001 + i, "type": "int16"} for i in range(n_tags)]

        async def run() -> float:
            driver = driver_for(tags, port, timeout=5)
            await driver.connect()
            try:
                await driver.read(driver.ctx.groups["default"])
                t0 = time.process_time()
                for _ in range(polls):
                    (block,) = await driver.read(driver.ctx.groups["default"])
                    if block.quality is not None or block.values[-1] != 7:
                        raise RuntimeError("bench poll failed")
                return (time.process_time() - t0) / polls
            finally:
                await driver.close()

        return asyncio.run(run())
    finally:
        child.terminate()
        child.wait(10)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(_serve(int(sys.argv[2]), int(sys.argv[3])))
        return
    tags = sparse_map()
    planned = asyncio.run(requests_per_scan(tags))
    naive = asyncio.run(requests_per_scan(tags, one_request_per_tag=True))
    timing = decode_timing()
    poll_s = poll_cpu()
    result = {
        "name": "modbus_requests",
        "tags": len(tags),
        "requests_per_scan": planned,
        "minimum_requests_per_scan": minimum_reads(tags),
        "naive_requests_per_scan": naive,
        "request_reduction": round(naive / planned, 2),
        "decode_10k_int16_ms": round(timing["vectorised"] * 1000, 3),
        "naive_decode_10k_int16_ms": round(timing["naive"] * 1000, 3),
        "decode_speedup": round(timing["naive"] / timing["vectorised"], 1),
        "poll_10k_int16_client_cpu_ms": round(poll_s * 1000, 2),
        "core_share_10_devices_x_10k_tags_per_s": round(10 * poll_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
