"""Scenario files: which devices exist, how each is parametrised, and which faults hit them when.

A scenario is data (YAML, documented in ``docs/simulators-process.md``)::

    start: 2026-01-05T00:00:00Z
    devices:
      - id: br-01
        kind: bioreactor
        params: {mu_max_per_h: 0.035}
        faults:
          - {kind: contamination, start: 3d, duration: 12h}
          - comm_timeout@2h+5m          # the front ends' shorthand works too

Fault ``start`` is an offset from the scenario start, so one file describes a run
whatever day it is replayed on. Plant files of the protocol front ends (``protocol``,
``port``, ``unit_id`` … per device, ``speed`` on top) load here as well: the serving
keys are kept aside in ``serve`` and a ``scenario:`` reference is merged by device id,
so ``cleanroom-sim plant`` and ``cleanroom-sim generate`` can read the same file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from cleanroom_common.bundled import package_dir
from cleanroom_common.fields import Duration, Strict, resolve_path
from cleanroom_common.yamlfile import YamlError, read_yaml
from simulators.process.base import MODELS, ProcessModel, create_model
from simulators.process.batch import BatchSchedule, BatchSpec, check_schedule
from simulators.process.faults import COMM_FAULTS, FAULT_PARAMS, Fault

SERVE_KEYS = frozenset(
    {
        "serve",
        "protocol",
        "endpoint",
        "host",
        "port",
        "unit_id",
        "profile",
        "pty_link",
        "cert",
        "key",
        "user",
        "password",
    }
)
"""Per-device keys owned by the protocol front ends; kept in ``DeviceSpec.serve``, unread here."""

DEFAULT_START = "2026-01-05T00:00:00Z"

_SHORTHAND = re.compile(r"^(?P<kind>[a-z0-9_]+)(?:=(?P<code>\d+))?@(?P<start>[^+]+)(?:\+(?P<dur>.+))?$")


def parse_time(value: Any) -> float:
    """Unix seconds from a number or an ISO-8601 timestamp (naive means UTC)."""
    if isinstance(value, bool):
        raise ValueError("expected Unix seconds or an ISO-8601 time such as 2026-01-05T00:00:00Z")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 time such as 2026-01-05T00:00:00Z") from None
    else:
        raise ValueError("expected Unix seconds or an ISO-8601 time such as 2026-01-05T00:00:00Z")
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


UnixTime = Annotated[float, BeforeValidator(parse_time)]
"""Simulated Unix seconds, written as a number or ISO-8601 (``2026-01-05T00:00:00Z``)."""


class FaultSpec(Strict):
    """One fault occurrence on a device."""

    kind: str
    """Fault kind (see the fault table in docs/simulators-process.md)."""
    start: Duration
    """When it starts, as an offset from the scenario start (``90m``, ``3d``)."""
    duration: Duration | None = None
    """How long it lasts; empty means until the end of the run."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Kind-specific tuning (e.g. ``rate_ph_per_day`` of ``ph_drift``)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``kind[=code]@start[+duration]``, the front ends' CLI form, also works in files."""
        if not isinstance(data, str):
            return data
        m = _SHORTHAND.match(data.strip())
        if not m:
            raise ValueError(f"{data!r} is not a fault; write kind[=code]@start[+duration] or a mapping")
        out: dict[str, Any] = {"kind": m["kind"], "start": m["start"]}
        if m["dur"]:
            out["duration"] = m["dur"]
        if m["code"]:
            out["params"] = {"code": int(m["code"])}
        return out

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(sorted(FAULT_PARAMS))}")
        return kind

    def window(self, start_time_s: float) -> tuple[float, float]:
        """Absolute ``[start, end)`` in simulated Unix seconds (end may be infinite)."""
        begin = start_time_s + self.start
        return begin, math.inf if self.duration is None else begin + self.duration


class DeviceSpec(Strict):
    """One simulated device: its process model, parameters and faults."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """Device id; with the seed it fixes the device's random stream, and it names the output CSV."""
    kind: Literal["bioreactor", "incubator", "particle_counter"]
    """Process model."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Model parameters (per kind, see docs/simulators-process.md); unknown keys are errors."""
    seed_offset: int = 0
    """Added to the run seed, to give two otherwise identical devices the same stream or not."""
    faults: list[FaultSpec] = Field(default_factory=list)
    """Faults scheduled on this device."""
    serve: dict[str, Any] = Field(default_factory=dict)
    """Protocol front-end settings (``protocol``, ``port`` … may also sit next to ``id``); not read here."""

    @model_validator(mode="before")
    @classmethod
    def _collect_serving_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out = {k: v for k, v in data.items() if k not in SERVE_KEYS or k == "serve"}
        serve = dict(data.get("serve") or {})
        serve.update({k: v for k, v in data.items() if k in SERVE_KEYS and k != "serve"})
        if serve:
            out["serve"] = serve
        return out

    @model_validator(mode="after")
    def _check_against_model(self) -> DeviceSpec:
        """Reject bad params and faults the model cannot act out when the file loads, not mid-run."""
        import simulators.process  # noqa: F401  (registers the model kinds)

        cls = MODELS[self.kind]
        try:
            cls.Params.model_validate(self.params)
        except ValidationError as exc:
            raise ValueError(f"device {self.id!r}: bad params: {_errors(exc)}") from None
        for i, f in enumerate(self.faults):
            if f.kind not in cls.FAULTS and f.kind not in COMM_FAULTS:
                known = ", ".join(sorted(cls.FAULTS | COMM_FAULTS))
                raise ValueError(
                    f"device {self.id!r}: faults[{i}]: {f.kind!r} does not apply to kind {self.kind}; "
                    f"it takes: {known}"
                )
            try:
                Fault.make(f.kind, 0.0, 0.0, f.params)
            except (ValidationError, ValueError) as exc:
                msg = _errors(exc) if isinstance(exc, ValidationError) else str(exc)
                raise ValueError(f"device {self.id!r}: faults[{i}] ({f.kind}): {msg}") from None
        return self

    def faults_at(self, start_time_s: float) -> list[Fault]:
        """This device's faults in absolute simulated time."""
        return [Fault.make(f.kind, *f.window(start_time_s), f.params) for f in self.faults]

    def build(self, *, seed: int, start_time_s: float) -> ProcessModel:
        """The model with its faults attached, seeded from ``seed + seed_offset`` and the id."""
        model = create_model(
            self.kind, self.id, seed=seed + self.seed_offset, params=self.params, start_time_s=start_time_s
        )
        for fault in self.faults_at(start_time_s):
            model.faults.add(fault)
        return model


@dataclass(frozen=True)
class Label:
    """Ground truth: fault ``kind`` was active on ``device`` over ``[start, end)`` (Unix s)."""

    kind: str
    device: str
    start: float
    end: float


class Scenario(Strict):
    """A scenario (or plant) file."""

    name: str = ""
    """Short name, for people and output manifests."""
    description: str = ""
    """What the scenario exercises."""
    start: UnixTime = parse_time(DEFAULT_START)
    """Simulated time of the scenario start (fault offsets count from here)."""
    seed: int = 0
    """Base seed when the caller gives none (``cleanroom-sim plant``)."""
    speed: float | None = Field(None, gt=0)
    """Plant files: simulated seconds per wall second (front ends only)."""
    scenario: Path | None = None
    """Plant files: a scenario file merged in by device id (its params override, its faults add)."""
    devices: list[DeviceSpec]
    """The devices."""
    batches: list[BatchSpec] = Field(default_factory=list)
    """Batches the devices hold, with their procedure steps (simulators/process/batch.py)."""

    @model_validator(mode="after")
    def _unique_ids(self) -> Scenario:
        seen: set[str] = set()
        for d in self.devices:
            if d.id in seen:
                raise ValueError(f"device id {d.id!r} appears twice")
            seen.add(d.id)
        check_schedule(self.batches, seen)
        return self

    def batch_schedule(self, start_time_s: float | None = None) -> BatchSchedule:
        """The batches anchored at ``start_time_s`` (default: the scenario start)."""
        return BatchSchedule(self.batches, self.start if start_time_s is None else start_time_s)

    def device(self, device_id: str) -> DeviceSpec:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(f"no device {device_id!r} in the scenario")

    def build(self, *, seed: int | None = None, start_time_s: float | None = None) -> dict[str, ProcessModel]:
        """Every device's model, faults attached, by id."""
        s = self.seed if seed is None else seed
        t0 = self.start if start_time_s is None else start_time_s
        return {d.id: d.build(seed=s, start_time_s=t0) for d in self.devices}

    def labels(self, *, start_time_s: float | None = None, end_s: float = math.inf) -> list[Label]:
        """Every fault occurrence, clipped to ``end_s``, sorted by start then device."""
        t0 = self.start if start_time_s is None else start_time_s
        out = []
        for d in self.devices:
            for f in d.faults:
                a, b = f.window(t0)
                if a < end_s:
                    out.append(Label(f.kind, d.id, a, min(b, end_s)))
        return sorted(out, key=lambda lab: (lab.start, lab.device, lab.kind))


def _errors(exc: ValidationError) -> str:
    """One line per problem, located by key path (``devices[2].faults[0].kind: …``)."""
    parts = []
    for e in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = read_yaml(path).data
    except YamlError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict) or "devices" not in data:
        raise ValueError(f"{path}: a scenario is a mapping with a 'devices:' list")
    return data


def _merge(plant: dict[str, Any], scenario: dict[str, Any]) -> dict[str, Any]:
    """Overlay a scenario on a plant: per id, params override and faults append; new ids are added;
    batches of both run."""
    merged = {k: v for k, v in scenario.items() if k != "devices"} | {
        k: v for k, v in plant.items() if k not in ("devices", "scenario")
    }
    if scenario.get("batches") or plant.get("batches"):
        merged["batches"] = [*(plant.get("batches") or []), *(scenario.get("batches") or [])]
    devices = [dict(d) if isinstance(d, dict) else d for d in plant.get("devices") or []]
    by_id = {d.get("id"): d for d in devices if isinstance(d, dict)}
    for extra in scenario.get("devices") or []:
        if not isinstance(extra, dict) or extra.get("id") not in by_id:
            devices.append(extra)
            continue
        base = by_id[extra["id"]]
        base["params"] = {**(base.get("params") or {}), **(extra.get("params") or {})}
        base["faults"] = [*(base.get("faults") or []), *(extra.get("faults") or [])]
        if "seed_offset" in extra:
            base["seed_offset"] = extra["seed_offset"]
    merged["devices"] = devices
    return merged


def scenario_path(name_or_path: str | Path) -> Path:
    """A scenario file: a path as given, or a bare name (``plant``) of a scenario shipped with
    the simulators, so an installed ``cleanroom-sim`` needs no checkout to find them."""
    path = Path(name_or_path)
    if path.suffix or path.exists() or len(path.parts) != 1:
        return path
    return package_dir("simulators", "scenarios", f"{path.name}.yaml")


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario or plant file (a path or a shipped scenario's name); every
    problem is a ``ValueError`` naming the key."""
    path = scenario_path(path)
    data = _read_yaml(path)
    ref = data.get("scenario")
    if ref is not None:
        ref_path = resolve_path(Path(ref), path.parent)
        inner = _read_yaml(ref_path)
        if inner.get("scenario") is not None:
            raise ValueError(f"{ref_path}: a referenced scenario cannot reference another")
        data = _merge(data, inner)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: {_errors(exc)}") from None


__all__ = ["DeviceSpec", "FaultSpec", "Label", "Scenario", "load_scenario", "parse_time"]
