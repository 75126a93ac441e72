"""The process-model interface the protocol front ends serve, and what models share.

A model is pure process physics with no I/O: ``advance(t)`` steps it to simulated
Unix time ``t`` in fixed internal steps, then ``signals()`` / ``status()`` give what a
real device would show. Front ends (Modbus, OPC UA, serial) own the wire format and
call ``model.advance(clock.now())`` before serving a request, so a model is only
stepped as far as someone looks at it.

Everything is deterministic given ``(seed, device_id)`` and the sequence of ``advance``
targets does not matter: the step grid is anchored at ``start_time_s`` and noise comes
from one per-device stream consumed in a fixed order per step, so serving a device at
1x and generating its ground truth in one call give the same numbers.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from cleanroom_common.fields import Strict
from simulators.process.faults import Fault, FaultSet

__all__ = [
    "MODELS",
    "Clock",
    "Fault",
    "FaultSet",
    "ModelParams",
    "NoiseStream",
    "ProcessModel",
    "Signal",
    "create_model",
    "device_rng",
    "lag_alpha",
]


def device_rng(seed: int, device_id: str) -> np.random.Generator:
    """A generator stable across processes and Python versions (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(device_id.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest, "big")])


class NoiseStream:
    """Standard normals drawn from the device generator in blocks.

    Drawing one numpy scalar per use costs ~1 µs; blocks keep a 1 s step loop cheap
    while the order of values (hence determinism) stays that of a single stream.
    """

    BLOCK = 4096

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buf: list[float] = []
        self._i = 0

    def normal(self) -> float:
        if self._i >= len(self._buf):
            self._buf = self._rng.standard_normal(self.BLOCK).tolist()
            self._i = 0
        v = self._buf[self._i]
        self._i += 1
        return v


def lag_alpha(dt_s: float, tau_s: float) -> float:
    """Weight of one step of a first-order lag, exact for any step (stable at coarse steps)."""
    return 1.0 - math.exp(-dt_s / tau_s) if tau_s > 0 else 1.0


class Clock:
    """Maps wall time to simulated Unix time at ``speed`` times real time.

    Front ends share one clock so every device of a plant agrees on "now"; at speed
    3600 a day of process passes in 24 wall seconds.
    """

    def __init__(
        self, speed: float = 1.0, start_time_s: float | None = None, wall: Callable[[], float] = time.time
    ) -> None:
        if speed <= 0:
            raise ValueError("clock speed must be positive")
        self._wall = wall
        self._wall0 = wall()
        self._sim0 = self._wall0 if start_time_s is None else float(start_time_s)
        self._speed = float(speed)

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        """Change speed without a jump in simulated time."""
        if value <= 0:
            raise ValueError("clock speed must be positive")
        now_wall = self._wall()
        self._sim0 = self._sim0 + (now_wall - self._wall0) * self._speed
        self._wall0 = now_wall
        self._speed = float(value)

    def now(self) -> float:
        return self._sim0 + (self._wall() - self._wall0) * self._speed


@dataclass(frozen=True)
class Signal:
    """Documentation of one signal: unit, and the range it stays in during normal operation."""

    unit: str
    low: float
    high: float
    doc: str


class ModelParams(Strict):
    """Parameters every model has."""

    step_s: float = Field(1.0, gt=0, le=60)
    """Internal step. 1 s resolves a door opening; 5–30 s is fine for multi-day bioreactor runs."""


class ProcessModel(ABC):
    """One simulated device's process. Subclasses implement ``_step`` and the read-outs."""

    kind: ClassVar[str]
    """``bioreactor`` | ``incubator`` | ``particle_counter``."""
    Params: ClassVar[type[ModelParams]]
    """Pydantic model of the ``params:`` block for this kind."""
    SIGNALS: ClassVar[Mapping[str, Signal]]
    """Every key ``signals()`` returns, with unit and normal range."""
    STATUS: ClassVar[tuple[str, ...]]
    """Every key ``status()`` returns."""
    FAULTS: ClassVar[frozenset[str]]
    """Process fault kinds this model acts out (communication faults apply to all)."""
    SETPOINTS: ClassVar[Mapping[str, tuple[float, float]]] = {}
    """Writable setpoints and their accepted ``(low, high)`` range."""

    def __init__(
        self,
        device_id: str,
        *,
        seed: int,
        params: Mapping[str, Any] | None = None,
        start_time_s: float = 0.0,
    ) -> None:
        self.device_id = device_id
        self.seed = seed
        self.params = self.Params.model_validate(dict(params or {}))
        self.start_time_s = float(start_time_s)
        self.rng = device_rng(seed, device_id)
        self.noise = NoiseStream(self.rng)
        self.faults = FaultSet()
        self._steps = 0
        # Writable setpoints start at the parameter of the same name.
        self._setpoints: dict[str, float] = {
            name: float(getattr(self.params, name)) for name in self.SETPOINTS
        }

    @property
    def t(self) -> float:
        """Current simulated Unix time (on the step grid, never past the last ``advance`` target)."""
        return self.start_time_s + self._steps * self.params.step_s

    def advance(self, t_s: float) -> None:
        """Step to simulated time ``t_s``; earlier times are ignored (the process never rewinds)."""
        dt = self.params.step_s
        target = math.floor((t_s - self.start_time_s) / dt + 1e-9)
        while self._steps < target:
            now = self.t
            self._step(now, dt, self.faults.active(now))
            self._steps += 1

    @abstractmethod
    def _step(self, t_s: float, dt_s: float, faults: dict[str, Fault]) -> None:
        """Advance the state from ``t_s`` to ``t_s + dt_s`` with the given faults active."""

    def signal_specs(self) -> Mapping[str, Signal]:
        """Signals of this instance (a particle counter's depend on its channels and grade)."""
        return self.SIGNALS

    @abstractmethod
    def signals(self) -> dict[str, float]:
        """Current readings in engineering units, as the device's sensors report them."""

    @abstractmethod
    def status(self) -> dict[str, bool]:
        """Current status and alarm bits."""

    def offline_sample(self) -> dict[str, float]:
        """What an offline analysis of a sample drawn now would give, by signal name: the process's
        true values where the model knows them apart from its sensors' (a reference sample that
        shows a probe's drift), else the readings themselves."""
        return self.signals()

    def comm_fault(self) -> str | None:
        """Communication fault to act out now (``comm_timeout`` …), or None."""
        return self.faults.comm_fault(self.t)

    def setpoints(self) -> dict[str, float]:
        return dict(self._setpoints)

    def set_setpoint(self, name: str, value: float) -> None:
        """A device write; out-of-range values are refused as the real device would (exception 3)."""
        if name not in self.SETPOINTS:
            raise KeyError(f"{self.kind} has no setpoint {name!r}; writable: {', '.join(self.SETPOINTS)}")
        low, high = self.SETPOINTS[name]
        if not low <= value <= high:
            raise ValueError(f"{name} must be within [{low}, {high}], got {value}")
        self._setpoints[name] = float(value)


MODELS: dict[str, type[ProcessModel]] = {}
"""Model classes by ``kind``; filled by the model modules when the package is imported."""


def register(cls: type[ProcessModel]) -> type[ProcessModel]:
    MODELS[cls.kind] = cls
    return cls


def create_model(
    kind: str,
    device_id: str,
    *,
    seed: int,
    params: Mapping[str, Any] | None = None,
    start_time_s: float = 0.0,
) -> ProcessModel:
    """Instantiate a model by kind name (what scenario files and front-end configs use)."""
    import simulators.process  # noqa: F401  (registers the model modules)

    if kind not in MODELS:
        raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[kind](device_id, seed=seed, params=params, start_time_s=start_time_s)
