"""Ground-truth generation speed: simulated seconds per wall second, next to naive baselines
in the same run.

``python -m bench.process_generate [--hours H]`` prints one JSON object:

* bioreactor at 1 s steps, noise drawn in blocks (as shipped) vs one numpy draw per value;
* particle counter event-driven (one draw set per sample) vs stepping every second and
  drawing that second's Poisson counts;
* the wall time of a whole demo-plant hour (18 devices, ``simulators/scenarios/plant.yaml``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from simulators.process import create_model
from simulators.process.base import NoiseStream
from simulators.process.generate import generate
from simulators.process.particle_counter import ParticleCounter

PLANT = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "plant.yaml"


def bioreactor_rate(hours: float, block: int) -> float:
    """Simulated seconds per wall second with noise drawn ``block`` values at a time."""
    saved = NoiseStream.BLOCK
    NoiseStream.BLOCK = block
    try:
        model = create_model("bioreactor", "br-bench", seed=1)
        t0 = time.perf_counter()
        model.advance(hours * 3600)
        return hours * 3600 / (time.perf_counter() - t0)
    finally:
        NoiseStream.BLOCK = saved


def counter_rate(hours: float) -> float:
    pc = create_model("particle_counter", "pc-bench", seed=1, params={"grade": "C"})
    assert isinstance(pc, ParticleCounter)
    t0 = time.perf_counter()
    step = 0.5 * pc.params.buffer_size * pc.params.sample
    t = 0.0
    while t < hours * 3600:
        t = min(hours * 3600, t + step)
        pc.advance(t)
    return hours * 3600 / (time.perf_counter() - t0)


def naive_counter_rate(hours: float) -> float:
    """Per-second stepping: Poisson counts for each second, summed into 60 s records."""
    rng = np.random.default_rng(1)
    lam = 20_000 * (0.5 / np.array([0.3, 0.5, 1.0, 5.0])) ** 2.08 * 28.3 / 60 / 1000
    diff = np.maximum(lam - np.append(lam[1:], 0.0), 0.0)
    records = []
    acc = np.zeros(4, dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(int(hours * 3600)):
        acc += rng.poisson(diff)
        if s % 60 == 59:
            records.append(tuple(np.cumsum(acc[::-1])[::-1]))
            acc[:] = 0
    return hours * 3600 / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=6.0, help="simulated hours per measurement")
    args = ap.parse_args(argv)
    h = args.hours
    block = bioreactor_rate(h, NoiseStream.BLOCK)
    naive = bioreactor_rate(h, 1)
    counter = counter_rate(24 * h)
    naive_counter = naive_counter_rate(h)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        generate(PLANT, 1.0, 1, out, period_s=60.0)
        plant_hour_s = time.perf_counter() - t0
    result = {
        "bench": "process_generate",
        "bioreactor_sim_s_per_wall_s": round(block),
        "bioreactor_naive_sim_s_per_wall_s": round(naive),
        "bioreactor_speedup": round(block / naive, 2),
        "bioreactor_24h_at_1s_wall_s": round(86400 / block, 2),
        "counter_sim_s_per_wall_s": round(counter),
        "counter_naive_sim_s_per_wall_s": round(naive_counter),
        "counter_speedup": round(counter / naive_counter, 1),
        "plant_18_devices_1h_wall_s": round(plant_hour_s, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
