"""A whole plant of simulated devices in one process: one clock, many servers.

The plant file lists devices with what the process needs (kind, params, faults) and how
each is served (protocol, port, unit id, endpoint). Devices naming the same
``endpoint`` share one server: several Modbus unit ids behind one TCP gateway, or
several units on one RTU bus (one pty). ``endpoints()`` is what the agent's demo builds
its configuration from (written as JSON by ``cleanroom-sim plant --endpoints FILE``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from agent.fields import Strict
from simulators.process.base import Clock
from simulators.servers.device import SimulatedDevice
from simulators.servers.faults import FaultSchedule
from simulators.servers.modbus import DEFAULT_PROFILES, ModbusServer, ModbusUnit, unit_for
from simulators.servers.registers import load_profile

Kind = Literal["bioreactor", "incubator", "particle_counter"]
Protocol = Literal["modbus-tcp", "modbus-rtu", "opcua", "serial"]


class DeviceSpec(Strict):
    """One simulated device and how it is served."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """Device id: seeds the model (with the plant seed) and names the device in endpoints."""
    kind: Kind
    """Process model: ``bioreactor``, ``incubator`` or ``particle_counter``."""
    protocol: Protocol = "modbus-tcp"
    """Front end: ``modbus-tcp``, ``modbus-rtu`` (pty), ``opcua`` (bioreactors), ``serial`` (counters)."""
    endpoint: str | None = None
    """Devices naming the same endpoint share one server (Modbus TCP gateway, RTU bus); empty = own."""
    host: str = "127.0.0.1"
    """Listen address of TCP protocols."""
    port: int = Field(0, ge=0, le=65535)
    """TCP port; 0 picks a free one (see the endpoint list)."""
    unit_id: int = Field(1, ge=1, le=247)
    """Modbus unit id of the device on its server."""
    profile: str | None = None
    """Profile name or path the register/node map is built from (default: the kind's simulator profile)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Process-model parameters (see docs/simulators-process.md)."""
    faults: list[str] = Field(default_factory=list)
    """Communication faults, ``kind[=code]@start[+duration]`` in simulated time since start."""
    pty_link: str | None = None
    """Serial protocols: symlink created to the pty's slave side (what a client opens)."""
    cert: Path | None = None
    """OPC UA: server certificate; with ``key``, secure endpoints are offered besides None."""
    key: Path | None = None
    """OPC UA: server private key (PEM)."""
    user: str | None = None
    """OPC UA: user name required (with ``password``); anonymous access is then refused."""
    password: str | None = None
    """OPC UA: password for ``user`` (a simulator credential, not a secret of the plant)."""

    @model_validator(mode="after")
    def _protocol_fits_kind(self) -> DeviceSpec:
        if self.protocol == "opcua" and self.kind != "bioreactor":
            raise ValueError(f"{self.id}: the OPC UA front end serves bioreactors only")
        if self.protocol == "serial" and self.kind != "particle_counter":
            raise ValueError(f"{self.id}: the serial ASCII front end serves particle counters only")
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"{self.id}: give both cert and key, or neither")
        return self


class PlantConfig(Strict):
    """A plant file (``cleanroom-sim plant --config``)."""

    speed: float = Field(1.0, gt=0)
    """Simulated seconds per wall second, shared by every device."""
    seed: int = 0
    """Base seed; each device's stream is derived from (seed, device id)."""
    scenario: Path | None = None
    """Scenario file whose per-device params and faults apply to devices of the same id."""
    devices: list[DeviceSpec]
    """The devices."""

    @model_validator(mode="after")
    def _unique(self) -> PlantConfig:
        seen: set[str] = set()
        for d in self.devices:
            if d.id in seen:
                raise ValueError(f"device id {d.id!r} appears twice")
            seen.add(d.id)
        return self


class _Endpoint:
    """One server and the devices behind it."""

    def __init__(self, protocol: str, specs: list[DeviceSpec], devices: list[SimulatedDevice]) -> None:
        self.protocol = protocol
        self.specs = specs
        self.devices = devices
        self.server: Any = None

    async def start(self) -> None:
        spec = self.specs[0]
        if self.protocol in ("modbus-tcp", "modbus-rtu"):
            transport = "tcp" if self.protocol == "modbus-tcp" else "rtu"
            units: dict[int, ModbusUnit] = {}
            for s, dev in zip(self.specs, self.devices, strict=True):
                if s.unit_id in units:
                    raise ValueError(f"endpoint {s.endpoint!r}: unit id {s.unit_id} is used twice")
                data = load_profile(s.profile or DEFAULT_PROFILES[(s.kind, transport)])
                units[s.unit_id] = unit_for(dev, data)
            self.server = ModbusServer(units)
            if transport == "tcp":
                await self.server.start_tcp(spec.host, spec.port)
            else:
                await self.server.start_rtu(Path(spec.pty_link) if spec.pty_link else None)
        else:
            raise ValueError(f"protocol {self.protocol!r} is not served yet")

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for s in self.specs:
            e: dict[str, Any] = {"device": s.id, "kind": s.kind, "protocol": self.protocol}
            if self.protocol == "modbus-tcp":
                port = self.server.port
                e |= {"address": f"{s.host}:{port}", "host": s.host, "port": port, "unit_id": s.unit_id}
                e["connection"] = {"transport": "tcp", "host": s.host, "port": port, "unit_id": s.unit_id}
            elif self.protocol == "modbus-rtu":
                path = s.pty_link or self.server.pty_path
                e |= {"address": path, "pty": self.server.pty_path, "unit_id": s.unit_id}
                e["connection"] = {"transport": "rtu", "port": path, "unit_id": s.unit_id}
            e["profile"] = s.profile or DEFAULT_PROFILES[(s.kind, self.protocol.removeprefix("modbus-"))]
            out.append(e)
        return out


class Plant:
    """Start every endpoint of a plant (``async with plant:``) and stop them all on exit."""

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        *,
        speed: float = 1.0,
        seed: int = 0,
        scenario: Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.clock = clock or Clock(speed)
        self.seed = seed
        self.devices: dict[str, SimulatedDevice] = {}
        groups: dict[tuple[str, str], list[DeviceSpec]] = {}
        for i, s in enumerate(specs):
            key = (s.protocol, s.endpoint) if s.endpoint else (s.protocol, f"\0{i}")
            groups.setdefault(key, []).append(s)
            self.devices[s.id] = SimulatedDevice.create(
                s.kind,
                s.id,
                clock=self.clock,
                seed=seed,
                params=s.params,
                faults=FaultSchedule.parse(s.faults),
            )
        if scenario is not None:
            raise ValueError("scenario files are not supported yet")
        self._endpoints = [
            _Endpoint(protocol, group, [self.devices[s.id] for s in group])
            for (protocol, _), group in groups.items()
        ]

    @classmethod
    def from_config(cls, cfg: PlantConfig, *, speed: float | None = None, seed: int | None = None) -> Plant:
        return cls(
            cfg.devices,
            speed=speed if speed is not None else cfg.speed,
            seed=seed if seed is not None else cfg.seed,
            scenario=cfg.scenario,
        )

    @classmethod
    def from_file(cls, path: Path, *, speed: float | None = None, seed: int | None = None) -> Plant:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a plant file is a mapping with 'devices:'")
        return cls.from_config(PlantConfig.model_validate(data), speed=speed, seed=seed)

    async def __aenter__(self) -> Plant:
        try:
            for ep in self._endpoints:
                await ep.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for ep in self._endpoints:
            with contextlib.suppress(Exception):
                await ep.close()

    def endpoints(self) -> list[dict[str, Any]]:
        return [e for ep in self._endpoints for e in ep.entries()]
