"""Remote airborne particle counter (Lighthouse ApexR / MET ONE 6000 / Lasair II style).

The counter samples room air at 28.3 L/min (1 ft³/min) for ``sample_s`` (60 s), then
stores a record (cumulative counts ≥ each channel size, flow, status bits) in a
rotating buffer of 3,000 records that clients drain by index. Counts are Poisson with
a gamma-distributed activity factor (real rooms are burstier than Poisson) around a
background concentration set by the room's EU GMP grade and state, with the ISO
14644-1 size slope ``C(≥D) ∝ D^-2.08``.

Sampling is event-driven: ``advance`` completes every sample that ended by then, so
a month of records costs a month of samples, not a month of one-second steps.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
from pydantic import Field, field_validator

from cleanroom_common.fields import Duration
from cleanroom_common.particle_limits import GMP_ACTION, ISO_SLOPE, Grade, RoomState
from simulators.process.base import Fault, ModelParams, ProcessModel, Signal, register
from simulators.process.faults import CounterFlowFaultParams, ParticleBurstParams, ParticleFactorParams

# EU GMP Annex 1 (2022) limits, particles/m³ at (0.5 µm, 5.0 µm), from the table the agent's
# limit rules use, so simulator and limit monitor cannot disagree. D in operation is set by
# risk assessment: the simulator takes 10x the at-rest value, like the other grades' steps.
GRADE_LIMITS: dict[tuple[Grade, RoomState], tuple[float, float]] = {
    key: (a, b) if a is not None and b is not None else (35_200_000, 293_000)
    for key, (a, b) in GMP_ACTION.items()
}

# Mean background at 0.5 µm, particles/m³: a well-run room sits one to two decades under
# its limit. Grade A at rest: ~1.4 counts per ft³ sample at 0.5 µm, ~0.01 at 5 µm.
BACKGROUND_0_5: dict[tuple[str, str], float] = {
    ("A", "at_rest"): 50.0,
    ("A", "in_operation"): 350.0,
    ("B", "at_rest"): 350.0,
    ("B", "in_operation"): 20_000.0,
    ("C", "at_rest"): 20_000.0,
    ("C", "in_operation"): 250_000.0,
    ("D", "at_rest"): 250_000.0,
    ("D", "in_operation"): 1_000_000.0,
}

COINCIDENCE_LIMIT_PER_M3 = 1.0e8
"""Above this at the smallest size the optics see overlapping particles; the overflow bit sets."""


def channel_key(size_um: float) -> str:
    """Signal-name fragment of a channel: 0.3 -> ``0_3um``, 5.0 -> ``5_0um``."""
    return f"{size_um:.1f}".replace(".", "_") + "um"


class ParticleCounterParams(ModelParams):
    """Room, sampling and buffer settings of one counter."""

    grade: Grade = "A"
    """EU GMP grade of the room or zone being monitored."""
    state: RoomState = "at_rest"
    """Room state; sets background level and which Annex 1 limit the threshold bit uses."""
    channels_um: tuple[float, ...] = (0.3, 0.5, 1.0, 5.0)
    """Channel sizes (µm), smallest first; counts are cumulative (≥ size)."""
    flow_lpm: float = Field(28.3, gt=0, le=100)
    """Nominal sample flow (28.3 L/min = 1 ft³/min)."""
    sample: Duration = 60.0
    """Sample time (Grade A monitoring: 1-minute samples)."""
    hold: Duration = 0.0
    """Pause between the end of one sample and the start of the next."""
    buffer_size: int = Field(3000, ge=1, le=100_000)
    """Rotating record buffer length (3,000 on the Lighthouse REMOTE series)."""
    location: int = Field(1, ge=0)
    """Location number stored in each record."""
    auto_start: bool = True
    """Sampling runs from power-up (else it waits for a start command)."""
    background_0_5_per_m3: float | None = Field(None, ge=0)
    """Override of the grade/state background at 0.5 µm (particles/m³)."""
    activity_shape: float = Field(4.0, gt=0)
    """Gamma shape of the per-sample activity factor (mean 1); larger is closer to pure Poisson."""
    clock_offset_s: float = 0.0
    """Device real-time clock minus true time at power-up (an unsynchronised clock)."""

    @field_validator("sample")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v < 1.0:
            raise ValueError("a sample lasts at least 1 s")
        return v

    @field_validator("channels_um")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)) or v[0] <= 0:
            raise ValueError("channels_um must be positive sizes in increasing order")
        return v


@dataclass(frozen=True)
class SampleRecord:
    """One stored sample, as the counter's buffer holds it."""

    index: int
    """Monotonic record number since power-up (0, 1, 2, …); buffer clears do not reset it."""
    timestamp_s: int
    """Sample end, Unix seconds by the device clock (true time + clock offset)."""
    sample_time_s: float
    volume_l: float
    """Volume the counter *believes* it sampled (nominal flow × time)."""
    flow_lpm: float
    """Flow measured during the sample."""
    location: int
    laser_ok: bool
    flow_ok: bool
    overflow: bool
    service: bool
    threshold_high: bool
    counts: tuple[int, ...]
    """Cumulative counts ≥ each channel size, smallest size first."""
    temperature_c: float
    rh_pct: float
    sim_end_s: float
    """True simulated time of the sample end (ground truth; not on any wire)."""


@register
class ParticleCounter(ProcessModel):
    """Particle counter with a 3,000-record rotating buffer and live values."""

    kind = "particle_counter"
    Params = ParticleCounterParams
    SIGNALS: ClassVar[Mapping[str, Signal]] = {
        "flow_lpm": Signal("L/min", 27.0, 29.6, "Sample flow (nominal 28.3; ±5 % is flow OK)."),
        "sample_elapsed_s": Signal("s", 0.0, 3600.0, "Time into the current sample."),
        "record_count": Signal("", 0.0, 100_000.0, "Records in the buffer."),
        "temperature_c": Signal("degC", 18.0, 23.0, "Room temperature at the probe (last record)."),
        "rh_pct": Signal("%", 30.0, 60.0, "Room humidity at the probe (last record)."),
    }
    STATUS = (
        "running",
        "sampling",
        "device_error",
        "laser_ok",
        "flow_ok",
        "overflow",
        "service",
        "threshold_high",
    )
    FAULTS = frozenset({"particle_burst", "particle_elevation", "counter_flow_fault", "laser_failure"})

    params: ParticleCounterParams

    def __init__(
        self,
        device_id: str,
        *,
        seed: int,
        params: Mapping[str, Any] | None = None,
        start_time_s: float = 0.0,
    ) -> None:
        super().__init__(device_id, seed=seed, params=params, start_time_s=start_time_s)
        p = self.params
        self.buffer: deque[SampleRecord] = deque(maxlen=p.buffer_size)
        self.clock_offset_s = p.clock_offset_s
        self.running = p.auto_start
        self._sample_start = self.start_time_s
        self._next_index = 0
        self._last: SampleRecord | None = None
        key = (p.grade, p.state)
        self.background_0_5 = (
            BACKGROUND_0_5[key] if p.background_0_5_per_m3 is None else p.background_0_5_per_m3
        )
        self.limit_0_5, self.limit_5_0 = GRADE_LIMITS[key]
        sizes = np.asarray(p.channels_um)
        self._shape = (0.5 / sizes) ** ISO_SLOPE  # background C(≥D)/C(≥0.5)
        self._sizes = sizes
        self.channel_keys = [channel_key(d) for d in p.channels_um]
        self._limit_channels = [
            (i, limit)
            for size, limit in ((0.5, self.limit_0_5), (5.0, self.limit_5_0))
            for i, d in enumerate(p.channels_um)
            if math.isclose(d, size)
        ]

    # ------------------------------------------------------------------ commands

    def start(self) -> None:
        """Start sampling now (command 11 on a Lighthouse, ``CSS`` on a Lasair)."""
        if not self.running:
            self.running = True
            self._sample_start = self.t

    def stop(self) -> None:
        """Stop sampling; the sample in progress is discarded."""
        self.running = False

    def clear_records(self) -> None:
        """Empty the buffer (an auditable action on the agent side; never automatic)."""
        self.buffer.clear()

    def set_clock(self, unix_s: float) -> None:
        """Set the device clock; later records are stamped by it."""
        self.clock_offset_s = float(unix_s) - self.t

    def device_time(self) -> float:
        return self.t + self.clock_offset_s

    def records(self) -> list[SampleRecord]:
        """Buffered records, oldest first."""
        return list(self.buffer)

    def records_since(self, index: int) -> list[SampleRecord]:
        """Records with ``record.index > index`` still in the buffer (a client's watermark)."""
        return [r for r in self.buffer if r.index > index]

    # ------------------------------------------------------------------ time

    def advance(self, t_s: float) -> None:
        """Complete every sample that ended by ``t_s`` (event-driven, no per-second stepping)."""
        dt = self.params.step_s
        target = math.floor((t_s - self.start_time_s) / dt + 1e-9)
        if target <= self._steps:
            return
        now = self.start_time_s + target * dt
        p = self.params
        while self.running and self._sample_start + p.sample <= now:
            end = self._sample_start + p.sample
            self._complete(self._sample_start, end)
            self._sample_start = end + p.hold
        self._steps = target

    def _step(self, t_s: float, dt_s: float, faults: dict[str, Fault]) -> None:
        """Unused: the counter advances by samples (see :meth:`advance`)."""

    def _overlap(self, kind: str, t0: float, t1: float) -> tuple[float, Fault | None]:
        """Fraction of ``[t0, t1)`` covered by the first fault of ``kind`` overlapping it."""
        for f in self.faults:
            if f.kind == kind and f.start_s < t1 and f.end_s > t0:
                return (min(t1, f.end_s) - max(t0, f.start_s)) / (t1 - t0), f
        return 0.0, None

    def _complete(self, t0: float, t1: float) -> None:
        p = self.params
        rng = self.rng
        conc = self.background_0_5 * self._shape  # expected C(≥D) per m³
        base = self.background_0_5
        frac, burst = self._overlap("particle_burst", t0, t1)
        if burst is not None:
            bp = cast(ParticleBurstParams, burst.params)
            conc = conc + frac * base * (bp.factor - 1) * (0.5 / self._sizes) ** bp.size_exponent
        frac, leak = self._overlap("particle_elevation", t0, t1)
        if leak is not None:
            conc = conc + frac * base * (cast(ParticleFactorParams, leak.params).factor - 1) * self._shape
        frac, flow_fault = self._overlap("counter_flow_fault", t0, t1)
        flow = p.flow_lpm
        if flow_fault is not None:
            flow = p.flow_lpm + frac * (cast(CounterFlowFaultParams, flow_fault.params).flow_lpm - p.flow_lpm)
        # With the laser out nothing is detected for that part of the sample.
        dark, _ = self._overlap("laser_failure", t0, t1)
        sampled_m3 = flow * (t1 - t0) / 60.0 / 1000.0 * (1.0 - dark)
        activity = rng.gamma(p.activity_shape, 1.0 / p.activity_shape)
        expected = conc * activity * sampled_m3
        differential = np.maximum(expected - np.append(expected[1:], 0.0), 0.0)
        counts = np.cumsum(rng.poisson(differential)[::-1])[::-1]
        env = rng.standard_normal(2)
        nominal_l = p.flow_lpm * (t1 - t0) / 60.0
        conc_measured = counts / (nominal_l / 1000.0)
        record = SampleRecord(
            index=self._next_index,
            timestamp_s=math.floor(t1 + self.clock_offset_s),
            sample_time_s=t1 - t0,
            volume_l=nominal_l,
            flow_lpm=round(flow, 2),
            location=p.location,
            laser_ok=dark == 0.0,
            flow_ok=abs(flow - p.flow_lpm) <= 0.05 * p.flow_lpm,
            overflow=bool(conc[0] * activity > COINCIDENCE_LIMIT_PER_M3),
            service=dark > 0.0,
            threshold_high=self._over_limit(conc_measured),
            counts=tuple(int(c) for c in counts),
            temperature_c=round(20.5 + 0.3 * float(env[0]), 2),
            rh_pct=round(45.0 + 1.5 * float(env[1]), 1),
            sim_end_s=t1,
        )
        self._next_index += 1
        self.buffer.append(record)
        self._last = record

    def _over_limit(self, conc: np.ndarray[Any, np.dtype[np.float64]]) -> bool:
        """The device threshold bit: any Annex 1 size over its limit in this one sample."""
        return any(conc[i] > limit for i, limit in self._limit_channels)

    # ------------------------------------------------------------------ read-outs

    def signal_specs(self) -> Mapping[str, Signal]:
        specs = dict(self.SIGNALS)
        liters = self.params.flow_lpm * self.params.sample / 60.0
        for size, key in zip(self.params.channels_um, self.channel_keys, strict=True):
            limit = self.limit_0_5 * (0.5 / size) ** ISO_SLOPE
            specs[f"count_{key}"] = Signal(
                "counts", 0.0, limit * liters / 1000.0, f"Cumulative count ≥ {size} µm, last sample."
            )
            specs[f"conc_{key}_per_m3"] = Signal(
                "1/m3", 0.0, limit, f"Concentration ≥ {size} µm, last sample (counts / nominal volume)."
            )
        return specs

    def signals(self) -> dict[str, float]:
        last = self._last
        flow = self.params.flow_lpm
        flow_fault = self.faults.active(self.t).get("counter_flow_fault")
        if flow_fault is not None:
            flow = cast(CounterFlowFaultParams, flow_fault.params).flow_lpm
        out = {
            "flow_lpm": flow,
            "sample_elapsed_s": max(0.0, self.t - self._sample_start) if self.running else 0.0,
            "record_count": float(len(self.buffer)),
            "temperature_c": last.temperature_c if last else 20.5,
            "rh_pct": last.rh_pct if last else 45.0,
        }
        for i, key in enumerate(self.channel_keys):
            count = last.counts[i] if last else 0
            out[f"count_{key}"] = float(count)
            out[f"conc_{key}_per_m3"] = count / (last.volume_l / 1000.0) if last else 0.0
        return out

    def status(self) -> dict[str, bool]:
        last = self._last
        active = self.faults.active(self.t)
        return {
            "running": self.running,
            "sampling": self.running and self.t >= self._sample_start,
            "device_error": False,
            "laser_ok": "laser_failure" not in active,
            "flow_ok": "counter_flow_fault" not in active,
            "overflow": bool(last and last.overflow),
            "service": "laser_failure" in active,
            "threshold_high": bool(last and last.threshold_high),
        }
