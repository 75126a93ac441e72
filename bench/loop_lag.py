"""Why SQLite commits run on the buffer's own thread: event-loop lag, measured.

Pollers, subscriptions and the forwarder share one asyncio loop; anything that blocks it
delays every poll of every device. This bench offers 40,000 readings/s (8 devices, blocks
of 50 readings every 10 ms, ``synchronous=full``) for a few seconds while a 5 ms ticker
measures how late the loop wakes it, two ways in the same run:

* ``thread``: the agent's :class:`~agent.buffer.async_buffer.AsyncBuffer` (group commit on a dedicated
  thread);
* ``inline``: the same :class:`~agent.buffer.store.Buffer` committing each tick's blocks on the
  loop itself, as a naive implementation would.

Prints one JSON object: ticker lag p50/p99/max in ms for each, and the ratio of p99s.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.core.records import Block, now_ns

SECONDS = 4.0
DEVICES = 8
BLOCK = 50
TICK_S = 0.01


def _blocks(i: int) -> list[Block]:
    tags = [f"t{k}" for k in range(BLOCK)]
    return [
        Block(f"dev{d}", "g", now_ns(), tags, [None] * BLOCK, [float(i + k) for k in range(BLOCK)])
        for d in range(DEVICES)
    ]


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append((time.perf_counter() - t - 0.005) * 1000)


async def _offer(submit: Any) -> None:
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < SECONDS:
        submit(_blocks(i))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i * TICK_S - time.perf_counter()))


def _summary(lags: list[float]) -> dict[str, float]:
    s = sorted(lags)
    return {
        "lag_p50_ms": round(s[len(s) // 2], 3),
        "lag_p99_ms": round(s[int(0.99 * (len(s) - 1))], 3),
        "lag_max_ms": round(s[-1], 3),
    }


async def threaded(path: Path) -> dict[str, float]:
    buf = AsyncBuffer(BufferConfig(path=path, synchronous="full"), "bench")
    await buf.open()
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    await _offer(buf.submit)
    stop.set()
    await ticker
    await buf.close()
    return _summary(lags)


async def inline(path: Path) -> dict[str, float]:
    buf = Buffer(BufferConfig(path=path, synchronous="full"), "bench")
    buf.open()
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    await _offer(buf.commit)
    stop.set()
    await ticker
    buf.close()
    return _summary(lags)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-lag-") as tmp:
        t = asyncio.run(threaded(Path(tmp) / "thread.db"))
        n = asyncio.run(inline(Path(tmp) / "inline.db"))
    print(
        json.dumps(
            {
                "name": "loop_lag",
                "offered_readings_per_s": int(DEVICES * BLOCK / TICK_S),
                "thread": t,
                "inline": n,
                "p99_ratio_inline_over_thread": round(n["lag_p99_ms"] / t["lag_p99_ms"], 1)
                if t["lag_p99_ms"]
                else None,
            }
        )
    )


if __name__ == "__main__":
    main()
