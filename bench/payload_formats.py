"""What each MQTT payload format costs the agent's forwarding side, ``json`` the baseline.

One committed load (``--devices`` devices × ``--tags``-tag blocks, ``--readings`` readings,
``--blocks-per-segment`` blocks per device per commit, with the clock state and attribution the
agent's segments carry) is written into a real buffer once; each format then drains its own copy
of that file to a mosquitto of its own: ``json``, then ``flat`` and ``sparkplug_b``, each with
``publish_segments`` off and on. Every format so sends the same segments, byte for byte, and a
run ends when every segment is acknowledged and marked delivered and every message published
has reached a subscriber.

The forwarding side (buffer read and check, encode, publish, PUBACKs, delivery marks: the
agent's ``AsyncBuffer`` and ``Forwarder`` on one event loop, paho's network thread) runs in a
process of its own, started afresh for every run, so its CPU time (``time.process_time``) is
the forwarding side's alone and no format inherits another's heap; the broker runs in its own
process, the subscriber (paho, QoS 1, ``#``) in the bench's. Per format, per 100k readings: CPU
seconds, messages and payload bytes published (counted where the forwarder hands them to paho,
checked against what the subscriber received); the wall time to drain; the peak RSS of the
forwarding process above what it held when it started forwarding (sampled with psutil every
10 ms). ``--repeat`` rounds run every format in turn; each format's median run (by CPU) is
reported, with every run's CPU beside it: a shared 2-core machine varies by 10-20 % a run.

A backlog drain: the segments were committed before the forwarder connected, so ``flat`` and
``sparkplug_b`` mark every message historical, as they would after an outage (18 and 44 bytes a
message of the default load). One block per segment, the default, is the live shape (one poll
per device per commit interval); larger segments favour ``json``, whose envelope is per segment
where the other formats' cost is per block.

``python -m bench.payload_formats [--readings N] [--devices D] [--tags T]
[--blocks-per-segment B] [--repeat R] [--formats json,flat,...]`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from hashlib import sha256
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredSegment
from agent.core.clock import read_clock
from agent.core.records import Block, now_ns
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig, make_encoder
from agent.sinks.payload import Catalog, Encoder, Message, Reaction, TagInfo
from tests.support import Mosquitto, until, wait_for

FORMATS: dict[str, dict[str, Any]] = {
    "json": {"payload": "json"},
    "flat": {"payload": "flat", "publish_segments": False},
    "flat+segments": {"payload": "flat", "publish_segments": True},
    "sparkplug_b": {"payload": "sparkplug_b", "publish_segments": False},
    "sparkplug_b+segments": {"payload": "sparkplug_b", "publish_segments": True},
}
"""Name in the report -> the ``mqtt:`` keys that select it."""
BASELINE = "json"


def _devices(n: int) -> list[str]:
    return [f"dev-{d:02d}" for d in range(n)]


def _tags(n: int) -> list[str]:
    return [f"tag{k:02d}" for k in range(n)]


def _catalog(devices: int, tags: int) -> Catalog:
    """What the profiles would declare: a float tag with a unit each (Sparkplug's DBIRTH)."""
    return {d: [TagInfo(t, unit="degC") for t in _tags(tags)] for d in _devices(devices)}


async def commit_load(path: Path, devices: int, tags: int, polls: int, blocks_per_segment: int) -> int:
    """``polls`` blocks per device into a fresh buffer at ``path``, ``blocks_per_segment`` of each
    device per commit (a flush ends each commit); returns the readings committed."""
    # synchronous off: only this setup commits, and a clean close leaves a sound file either way
    buf = AsyncBuffer(BufferConfig(path=path, synchronous="off"), "bench")
    names, tag_names = _devices(devices), _tags(tags)
    # what the agent's segments carry: the clock's state, each device's attribution (profile and
    # configuration hashes: what every device has before it reports a serial number)
    buf.clock = lambda: read_clock().as_dict()
    for dev in names:
        buf.set_source(dev, {"profile": "bench-load", "profile_sha256": sha256(dev.encode()).hexdigest(),
                             "config_sha256": sha256(b"bench").hexdigest()})  # fmt: skip
    await buf.open()
    units: list[str | None] = ["degC"] * tags
    t0 = now_ns() - polls * 1_000_000_000  # one poll a second, ending now

    def poll(d: int, q: int) -> Block:
        """Device ``d``'s poll ``q``: values like a process's, a few decimals, moving a little."""
        values: list[Any] = [round(20 + d * 0.5 + k * 0.125 + (q % 97) * 0.01, 3) for k in range(tags)]
        return Block(names[d], "fast", t0 + q * 1_000_000_000, tag_names, units, values)

    for p in range(0, polls, blocks_per_segment):
        buf.submit([poll(d, q) for q in range(p, min(p + blocks_per_segment, polls)) for d in range(devices)])
        await buf.flush()
    readings = int((await buf.stats())["depth_readings"])
    await buf.close()
    return readings


class Counting(Encoder):
    """An encoder's messages, counted where the forwarder hands them to paho (segments' and the
    session's own: births, status); everything else is the wrapped encoder's."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.resend_after_reconnect = inner.resend_after_reconnect
        self.messages_per_segment = inner.messages_per_segment
        self.messages = 0
        self.payload_bytes = 0
        self.topic_bytes = 0

    def _count(self, messages: list[Message]) -> list[Message]:
        self.messages += len(messages)
        self.payload_bytes += sum(len(m.payload) for m in messages)
        self.topic_bytes += sum(len(m.topic) for m in messages)
        return messages

    def will(self, session: str) -> Message | None:
        return self.inner.will(session)

    def subscriptions(self) -> list[str]:
        return self.inner.subscriptions()

    def on_connect(self, session: str) -> list[Message]:
        return self._count(self.inner.on_connect(session))

    def on_disconnect(self) -> None:
        self.inner.on_disconnect()

    def ready(self) -> bool:
        return self.inner.ready()

    def on_message(self, topic: str, payload: bytes) -> Reaction:
        reaction = self.inner.on_message(topic, payload)
        self._count(reaction.publish)
        return reaction

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        return self._count(self.inner.encode(seg, historical=historical))

    def on_clean_stop(self) -> list[Message]:
        return self._count(self.inner.on_clean_stop())

    def on_identity(self, identity: AgentIdentity) -> list[Message]:
        return self._count(self.inner.on_identity(identity))

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


async def forward(fmt: str, path: Path, port: int, devices: int, tags: int) -> dict[str, Any]:
    """The forwarding side: drain the buffer at ``path`` in format ``fmt``. Prints ``ready`` and
    waits for a line on stdin before it starts, so the parent has its RSS from just before."""
    buf = AsyncBuffer(BufferConfig(path=path), "bench")
    await buf.open()
    before = await buf.stats()
    cfg = MqttConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "sparkplug": {"group_id": "bench"}, **FORMATS[fmt]}
    )
    identity = AgentIdentity("bench", "bench", "-")
    encoder = Counting(make_encoder(cfg, identity, buf.core.key, _catalog(devices, tags)))
    fw = Forwarder(cfg, buf, identity, encoder=encoder)
    print("ready", flush=True)
    sys.stdin.readline()  # go: the parent has this process's RSS before forwarding
    cpu0, t0 = time.process_time(), time.perf_counter()
    await fw.start()
    await until(lambda: fw.stats()["acked"] >= before["depth_segments"], within_s=300, what="every PUBACK")
    acked_s = time.perf_counter() - t0
    await until(lambda: _drained(buf), within_s=60, what="every segment marked delivered")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stats = fw.stats()
    await fw.stop(grace_s=1)
    after = await buf.stats()
    await buf.close()
    readings = int(before["depth_readings"])
    assert after["depth_records"] == 0 and stats["encode_errors"] == 0, (after, stats)
    per = 100_000 / readings
    return {
        "readings": readings,
        "segments": int(before["depth_segments"]),
        "drain_s": round(elapsed, 3),
        "acked_s": round(acked_s, 3),
        "readings_per_s": round(readings / elapsed),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_100k_readings": round(cpu * per, 3),
        "messages": encoder.messages,
        "payload_bytes": encoder.payload_bytes,
        "topic_bytes": encoder.topic_bytes,
        "messages_per_100k_readings": round(encoder.messages * per),
        "bytes_per_100k_readings": round(encoder.payload_bytes * per),
        "segment_messages": stats["messages"],
    }


async def _drained(buf: AsyncBuffer) -> bool:
    return bool((await buf.stats())["depth_records"] == 0)


class Subscriber:
    """Counts what arrives on ``#`` (QoS 1): every message the forwarder published must arrive."""

    def __init__(self, port: int) -> None:
        self.messages = 0
        self.payload_bytes = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the subscriber was not subscribed within 10 s")

    def _message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages += 1
            self.payload_bytes += len(msg.payload)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.messages, self.payload_bytes

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_format(fmt: str, load: Path, rundir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One format on its own copy of the load, its own broker, subscriber and forwarding process."""
    path = rundir / "buffer.db"
    path.parent.mkdir()
    shutil.copyfile(load, path)
    broker = Mosquitto().start()
    sub = Subscriber(broker.port)
    child: subprocess.Popen[str] | None = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.payload_formats", "--forward", fmt, "--buffer", str(path),
             "--port", str(broker.port), "--devices", str(args.devices), "--tags", str(args.tags)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{fmt}: the forwarding process did not start (exit {child.wait()})")
        proc = psutil.Process(child.pid)
        rss0 = peak = proc.memory_info().rss
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.01):
                try:
                    peak = max(peak, proc.memory_info().rss)
                except psutil.NoSuchProcess:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        child.stdin.write("go\n")
        child.stdin.flush()
        out = child.stdout.readline()  # the result: printed once the forwarder stopped
        t_result = time.perf_counter()
        done.set()
        if not out.startswith("{"):
            raise RuntimeError(f"{fmt}: the forwarding process failed (exit {child.wait(30)})")
        result: dict[str, Any] = json.loads(out)
        wait_for(
            lambda: sub.counts()[0] >= result["messages"], timeout=60, what=f"{fmt}: every message received"
        )
        # how long the subscriber still waited for messages once the forwarder had stopped
        result["receive_lag_s"] = round(time.perf_counter() - t_result, 3)
        sampler.join()
        if child.wait(30) != 0:
            raise RuntimeError(f"{fmt}: the forwarding process failed (exit {child.returncode})")
        received, received_bytes = sub.counts()
        assert (received, received_bytes) == (result["messages"], result["payload_bytes"]), (
            fmt, received, received_bytes, result,
        )  # fmt: skip
        result["peak_rss_delta_mb"] = round((peak - rss0) / 2**20, 1)
        return result
    finally:
        if child is not None and child.poll() is None:  # failed half-way: not left behind
            child.kill()
            child.wait(10)
        sub.close()
        broker.close()


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per reading (its other figures stay consistent with it)."""
    return sorted(runs, key=lambda r: r["cpu_s_per_100k_readings"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.payload_formats", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--readings", type=int, default=50_000, help="readings per format and round")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every format; each one's median run is reported"
    )
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--tags", type=int, default=20, help="readings per block (one poll)")
    parser.add_argument("--blocks-per-segment", type=int, default=1, help="polls of a device per commit")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"some of {', '.join(FORMATS)}")
    parser.add_argument("--forward", choices=FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--buffer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward:  # the forwarding process of one format (run_format)
        print(json.dumps(asyncio.run(forward(args.forward, args.buffer, args.port, args.devices, args.tags))))
        return 0
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in FORMATS]:
        parser.error(f"unknown format(s) {', '.join(unknown)}: known are {', '.join(FORMATS)}")
    polls = max(1, args.readings // (args.devices * args.tags))
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        workdir = Path(tmp)
        load = workdir / "load.db"
        readings = asyncio.run(commit_load(load, args.devices, args.tags, polls, args.blocks_per_segment))
        # Rounds of every format in turn, not every round of one format together: a shared machine's
        # load drifts, and this spreads its drift over the formats alike.
        rounds = [
            {fmt: run_format(fmt, load, workdir / f"{fmt}-{i}", args) for fmt in formats}
            for i in range(max(1, args.repeat))
        ]
    runs = {fmt: _median_run([r[fmt] for r in rounds]) for fmt in formats}
    base = runs.get(BASELINE)
    result: dict[str, Any] = {
        "name": "payload_formats",
        "readings": readings,
        "devices": args.devices,
        "tags_per_block": args.tags,
        "blocks_per_segment": args.blocks_per_segment,
        "runs": len(rounds),
        "formats": {},
    }
    for fmt, r in runs.items():
        row = {k: r[k] for k in ("cpu_s_per_100k_readings", "messages_per_100k_readings",
                                 "bytes_per_100k_readings", "drain_s", "peak_rss_delta_mb")}  # fmt: skip
        if base is not None:
            for k in ("cpu_s_per_100k_readings", "messages_per_100k_readings", "bytes_per_100k_readings"):
                row[f"{k.split('_per_')[0]}_vs_{BASELINE}"] = round(r[k] / max(base[k], 1e-9), 2)
        row["runs_cpu_s_per_100k_readings"] = [rnd[fmt]["cpu_s_per_100k_readings"] for rnd in rounds]
        result["formats"][fmt] = row | {"run": r}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
