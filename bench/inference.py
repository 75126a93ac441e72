"""Anomaly scoring cost: 100 bindings of one model, each scored once a second (1 Hz).

A PCA model and an autoencoder (6 signals, 30-slot windows, 1 s period) are trained on
the same synthetic data, then each is driven through the agent's own
:class:`~agent.transforms.inference.InferenceEngine`: every simulated second, one
committed block per device goes to ``on_committed`` and the engine windows, scores
(one batched ``session.run`` for all 100 bindings, in its worker thread) and decides.
Ticks are replayed back to back, not slept through, and each tick's CPU time
(``time.process_time``) is charged against the one second it represents:
``cpu_fraction_of_core`` = CPU seconds per simulated second.
``p99_latency_ms`` = from ``on_committed`` to every event emitted (``engine.idle()``).

Baseline, in the same run: the same tracks scored the naive way, one ``session.run``
per binding per tick. Ratio = naive CPU / batched CPU for the scoring stage. The top-level
figures are the PCA model's; ``autoencoder`` holds the same figures for the autoencoder,
measured in the same run, with ``autoencoder_over_pca_cpu_ratio`` between them.
``train_cpu_s`` is each model's training CPU time (calibration folds included).

Prints one JSON object; bounded to about two minutes on a busy 2-core machine.

    python -m bench.inference [--bindings 100] [--seconds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase, TagBase
from agent.core.records import Block, Event
from agent.modeltools.csvdata import Dataset
from agent.modeltools.train import TrainOptions, train
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.track import Settings, Track
from agent.transforms.inference import InferenceEngine, ModelBindingConfig

SIGNALS = ("temperature_c", "ph", "do_pct", "agitation_rpm", "o2_flow_slpm", "co2_flow_slpm")
T0 = 1_767_571_200
WINDOW = 30


def synthetic(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = np.array([37.0, 7.2, 40.0, 10.0, 0.02, 0.05])
    noise = np.array([0.03, 0.01, 0.5, 0.05, 0.002, 0.003])
    out = base + noise * rng.standard_normal((n, len(SIGNALS)))
    out[:, 2] += 2 * np.sin(t / 600)
    return out


def model(tmp: Path, method: Literal["pca", "autoencoder"]) -> tuple[Path, float]:
    """The trained model's manifest and the CPU seconds its training took."""
    n = 6 * 3600
    ds = Dataset(
        T0 + np.arange(n, dtype=float), synthetic(n, 1), list(SIGNALS), np.zeros(n, bool), "bench", "0"
    )
    c0 = time.process_time()
    opts = TrainOptions(model_id=f"bench-{method}", method=method, window=WINDOW, period=1.0)
    return train([ds], opts, tmp), time.process_time() - c0


def pct(values: list[float], q: float) -> float:
    return round(float(np.quantile(values, q)), 3)


async def engine_run(manifest: Path, bindings: int, seconds: int) -> dict[str, Any]:
    events: list[Event] = []
    profile = ProfileBase(
        profile="b", protocol="bench", device_kind="bio", tags=[TagBase(name=s) for s in SIGNALS]
    )
    devices = {f"bio{i:03d}": profile for i in range(bindings)}
    engine = InferenceEngine(
        [ModelBindingConfig(manifest=manifest, device_kind="bio", mode="active")],
        devices,
        events.append,
        Auditor(events.append, "bench"),
    )
    await engine.start()
    data = {d: synthetic(WINDOW + seconds + 1, i + 10) for i, d in enumerate(devices)}
    latencies, cpu = [], []
    try:
        for k in range(WINDOW + seconds):
            ts = (T0 + 86400 + k) * 10**9
            blocks = [
                Block(d, "process", ts, SIGNALS, [None] * len(SIGNALS), data[d][k].tolist(), seq_first=k)
                for d in devices
            ]
            c0, w0 = time.process_time(), time.perf_counter()
            engine.on_committed(blocks, [])
            await engine.idle()
            if k >= WINDOW:  # warm: every binding scores one window per tick
                latencies.append((time.perf_counter() - w0) * 1000)
                cpu.append(time.process_time() - c0)
        scored = sum(s["windows_scored"] for s in engine.status().values())
    finally:
        await engine.stop()
    return {"latency_ms": latencies, "cpu_s": cpu, "windows_scored": scored}


def scoring_stage(manifest: Path, bindings: int, seconds: int, batched: bool) -> list[float]:
    """CPU per tick of feed + score + decide for all tracks, batched or one run per track."""
    loaded = LoadedModel(manifest)
    tracks = [Track(loaded, Settings.of(loaded.manifest), drift=False) for _ in range(bindings)]
    data = [synthetic(WINDOW + seconds + 1, i + 10) for i in range(bindings)]
    cpu = []
    for k in range(WINDOW + seconds):
        ts = np.array([float(T0 + 86400 + k)])
        c0 = time.process_time()
        readies = [t.feed(ts, data[i][k : k + 1]) for i, t in enumerate(tracks)]
        if batched:
            scores, contribs = loaded.score(np.concatenate([r.windows for r in readies]))
            at = 0
            for t, r in zip(tracks, readies, strict=True):
                n = len(r.windows)
                t.decide(r, scores[at : at + n], contribs[at : at + n])
                at += n
        else:
            for t, r in zip(tracks, readies, strict=True):
                t.decide(r, *loaded.score(r.windows))
        if k >= WINDOW:
            cpu.append(time.process_time() - c0)
    return cpu


def measure(tmp: Path, method: Literal["pca", "autoencoder"], bindings: int, seconds: int) -> dict[str, Any]:
    """Every figure of one model: trained, run in the engine, then its scoring stage alone."""
    manifest, train_cpu = model(tmp / method, method)
    run = asyncio.run(engine_run(manifest, bindings, seconds))
    batched = scoring_stage(manifest, bindings, seconds, batched=True)
    naive = scoring_stage(manifest, bindings, seconds, batched=False)
    return {
        "method": method,
        "train_cpu_s": round(train_cpu, 2),
        "windows_scored": run["windows_scored"],
        "cpu_fraction_of_core": round(float(np.mean(run["cpu_s"])), 4),
        "p50_latency_ms": pct(run["latency_ms"], 0.5),
        "p99_latency_ms": pct(run["latency_ms"], 0.99),
        "scoring_cpu_ms_per_tick_batched": round(1000 * float(np.mean(batched)), 3),
        "naive_one_run_per_binding": {
            "scoring_cpu_ms_per_tick": round(1000 * float(np.mean(naive)), 3),
            "cpu_fraction_of_core": round(float(np.mean(naive)), 4),
        },
        "naive_over_batched_cpu_ratio": round(float(np.mean(naive) / np.mean(batched)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=300, help="simulated seconds measured (after warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pca = measure(Path(tmp), "pca", args.bindings, args.seconds)
        ae = measure(Path(tmp), "autoencoder", args.bindings, args.seconds)
    out = {
        "name": "inference",
        "bindings": args.bindings,
        "rate_hz": 1.0,
        "window": WINDOW,
        "signals": len(SIGNALS),
        "ticks": args.seconds,
        **pca,
        "autoencoder": ae,
        "autoencoder_over_pca_cpu_ratio": round(ae["cpu_fraction_of_core"] / pca["cpu_fraction_of_core"], 2),
        "targets": {"cpu_fraction_of_core": 0.05, "p99_latency_ms": 10.0},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
