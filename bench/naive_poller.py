"""The naive baseline for the load benchmarks: how a first attempt would be written.

Per device a pymodbus client reads the registers in 125-register requests (so the
protocol side is fair), then for each register: decode in a Python loop, insert one
SQLite row (committed per poll), publish one MQTT message (QoS 1) and wait for the
acknowledgement before deleting the row. It writes its acknowledged count to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import struct
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from pymodbus.client import AsyncModbusTcpClient


async def main(args: argparse.Namespace) -> None:
    ports = [int(p) for p in args.ports.split(",")]
    db = sqlite3.connect(args.db)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, device, tag, value, ts)")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive")
    acked = 0
    lock = threading.Lock()

    def on_publish(c: object, u: object, mid: int, rc: object, p: object) -> None:
        nonlocal acked
        with lock:
            acked += 1

    client.on_publish = on_publish
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", args.broker)
    client.loop_start()
    clients = [AsyncModbusTcpClient("127.0.0.1", port=p) for p in ports]
    for c in clients:
        await c.connect()
    next_tick = time.monotonic()
    while True:
        for i, c in enumerate(clients):
            regs: list[int] = []
            for start in range(0, args.registers, 125):
                rr = await c.read_holding_registers(
                    start, count=min(125, args.registers - start), device_id=1
                )
                regs.extend(rr.registers)
            ts = time.time_ns()
            rows = []
            for n, raw in enumerate(regs):
                value = struct.unpack(">h", struct.pack(">H", raw))[0]
                rows.append((f"dev{i}", f"r{n}", value, ts))
            ids = []
            for row in rows:
                cur = db.execute("INSERT INTO readings (device, tag, value, ts) VALUES (?, ?, ?, ?)", row)
                ids.append(cur.lastrowid)
            db.commit()
            for row in rows:
                payload = json.dumps({"device": row[0], "tag": row[1], "value": row[2], "ts": row[3]})
                client.publish(f"naive/{row[0]}/{row[1]}", payload, qos=1)
            db.executemany("DELETE FROM readings WHERE id = ?", [(x,) for x in ids])
            db.commit()
        await asyncio.to_thread(Path(args.count_file).write_text, str(acked))
        next_tick += 1.0
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", required=True)
    parser.add_argument("--registers", type=int, default=1000)
    parser.add_argument("--broker", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--count-file", required=True)
    asyncio.run(main(parser.parse_args()))
