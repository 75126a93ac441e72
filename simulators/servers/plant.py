"""A whole plant of simulated devices in one process: one clock, many servers.

A plant file is a scenario file (:mod:`simulators.process.scenario`: kind, params and
faults per device) whose devices also say how they are served: ``protocol``, ``port``,
``unit_id``, ``endpoint`` … (validated here as :class:`ServeSpec`). Devices naming the
same ``endpoint`` share one server: several Modbus unit ids behind one TCP gateway, or
several units on one RTU bus (one pty). ``endpoints()`` is what the agent's demo builds
its configuration from (``cleanroom-sim plant --endpoints FILE`` writes it as JSON).
A plant file's ``batches:`` run on the plant clock: the devices show the batch they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cleanroom_common.fields import FILE_DIR, ConfigPath, Strict
from cleanroom_common.net import free_port
from cleanroom_common.profilefiles import load_profile
from simulators.process.base import Clock
from simulators.process.batch import BatchSchedule, BatchSpec
from simulators.process.scenario import DeviceSpec, Scenario, load_scenario, scenario_path
from simulators.servers.device import SimulatedDevice
from simulators.servers.faults import FaultSchedule
from simulators.servers.modbus import DEFAULT_PROFILES, ModbusServer, unit_for
from simulators.servers.modbus_unit import ModbusUnit
from simulators.servers.opcua import OpcUaDevice, opcua_kind
from simulators.servers.serial_ascii import SERIAL_PROFILE, SerialCounterServer

Protocol = Literal["modbus-tcp", "modbus-rtu", "opcua", "serial"]


class ServeSpec(Strict):
    """How one device is served (the serving keys of a plant file's device entry)."""

    protocol: Protocol = "modbus-tcp"
    """Front end: ``modbus-tcp``, ``modbus-rtu`` (pty), ``opcua`` (bioreactors, incubators), ``serial``."""
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
    faults: list[str] = Field(default_factory=list)
    """Extra comm faults, ``kind[=code]@start[+duration]`` (simulated time since start); CLI ``--fault``."""
    pty_link: ConfigPath | None = None
    """Serial protocols: symlink created to the pty's slave side (what a client opens)."""
    cert: ConfigPath | None = None
    """OPC UA: server certificate; with ``key``, secure endpoints are offered besides None."""
    key: ConfigPath | None = None
    """OPC UA: server private key (PEM)."""
    user: str | None = None
    """OPC UA: user name required (with ``password``); anonymous access is then refused."""
    password: str | None = None
    """OPC UA: password for ``user`` (a simulator credential, not a secret of the plant)."""

    @model_validator(mode="after")
    def _pairs(self) -> ServeSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        if (self.user is None) != (self.password is None):
            raise ValueError("give both user and password, or neither")
        return self

    def check_kind(self, device: str, kind: str) -> None:
        if self.protocol == "opcua":
            try:
                opcua_kind(kind)
            except ValueError as exc:
                raise ValueError(f"{device}: {exc}") from None
        if self.protocol == "serial" and kind != "particle_counter":
            raise ValueError(f"{device}: the serial ASCII front end serves particle counters only")

    def profile_name(self, kind: str) -> str:
        if self.profile:
            return self.profile
        if self.protocol == "opcua":
            return opcua_kind(kind).profile
        if self.protocol == "serial":
            return SERIAL_PROFILE
        return DEFAULT_PROFILES[(kind, self.protocol.removeprefix("modbus-"))]


class _Endpoint:
    """One server and the devices behind it."""

    def __init__(
        self, serves: list[ServeSpec], devices: list[SimulatedDevice], batches: BatchSchedule
    ) -> None:
        self.serves = serves
        self.devices = devices
        self.batches = batches
        self.protocol = serves[0].protocol
        self.server: Any = None
        if self.protocol in ("opcua", "serial") and len(devices) > 1:
            names = ", ".join(d.device_id for d in devices)
            raise ValueError(f"{names}: one device per {self.protocol} endpoint")

    async def start(self) -> None:
        s, dev = self.serves[0], self.devices[0]
        if self.protocol in ("modbus-tcp", "modbus-rtu"):
            units: dict[int, ModbusUnit] = {}
            for spec, device in zip(self.serves, self.devices, strict=True):
                if spec.unit_id in units:
                    raise ValueError(f"endpoint {spec.endpoint!r}: unit id {spec.unit_id} is used twice")
                units[spec.unit_id] = unit_for(device, load_profile(spec.profile_name(device.kind)))
            self.server = ModbusServer(units)
            if self.protocol == "modbus-tcp":
                await self.server.start_tcp(s.host, s.port)
            else:
                await self.server.start_rtu(s.pty_link)
        elif self.protocol == "opcua":
            self.server = OpcUaDevice(
                dev,
                load_profile(s.profile_name(dev.kind)),
                host=s.host,
                port=s.port or free_port(s.host),
                cert=s.cert,
                key=s.key,
                user=s.user,
                password=s.password,
                batches=self.batches,
            )
            await self.server.start()
        else:
            self.server = SerialCounterServer(dev)
            self.server.start(s.pty_link)

    async def close(self) -> None:
        if self.server is not None:
            if isinstance(self.server, SerialCounterServer):
                self.server.close()
            else:
                await self.server.close()
            self.server = None

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for s, dev in zip(self.serves, self.devices, strict=True):
            e: dict[str, Any] = {"device": dev.device_id, "kind": dev.kind, "protocol": self.protocol}
            if self.protocol == "modbus-tcp":
                port = self.server.port
                e["address"] = f"{s.host}:{port}"
                e["unit_id"] = s.unit_id
                e["connection"] = {"transport": "tcp", "host": s.host, "port": port, "unit_id": s.unit_id}
            elif self.protocol == "modbus-rtu":
                path = str(s.pty_link) if s.pty_link else self.server.pty_path
                e["address"] = path
                e["unit_id"] = s.unit_id
                e["connection"] = {"transport": "rtu", "port": path, "unit_id": s.unit_id}
            elif self.protocol == "opcua":
                e["address"] = self.server.url
                e["connection"] = {"url": self.server.url, "security_policy": "None"}
            else:
                path = str(s.pty_link) if s.pty_link else self.server.path
                e["address"] = path
                e["connection"] = {"port": path}
            e["profile"] = s.profile_name(dev.kind)
            # what a client configures from, e.g. the grade and state whose limits a counter is held to
            e["params"] = dev.model.params.model_dump(mode="json", exclude_unset=True)
            out.append(e)
        return out


class Plant:
    """Start every endpoint of a plant (``async with plant:``) and stop them all on exit."""

    def __init__(
        self,
        devices: Sequence[tuple[DeviceSpec, ServeSpec]],
        *,
        speed: float = 1.0,
        seed: int = 0,
        clock: Clock | None = None,
        batches: Sequence[BatchSpec] = (),
    ) -> None:
        self.clock = clock or Clock(speed)
        self.batches = BatchSchedule(batches, self.clock.now())
        """The batches on the plant clock (offsets count from the plant start, like faults)."""
        self.devices: dict[str, SimulatedDevice] = {}
        groups: dict[tuple[str, str], tuple[list[ServeSpec], list[SimulatedDevice]]] = {}
        for i, (spec, serve) in enumerate(devices):
            serve.check_kind(spec.id, spec.kind)
            model = spec.build(seed=seed, start_time_s=self.clock.now())
            device = SimulatedDevice(spec.id, model, self.clock, FaultSchedule.parse(serve.faults))
            self.devices[spec.id] = device
            key = (serve.protocol, serve.endpoint or f"\0{i}")
            group = groups.setdefault(key, ([], []))
            group[0].append(serve)
            group[1].append(device)
        self._endpoints = [_Endpoint(serves, devs, self.batches) for serves, devs in groups.values()]

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario,
        *,
        speed: float | None = None,
        seed: int | None = None,
        base: Path | None = None,
    ) -> Plant:
        """``base`` is the folder of the file the scenario came from: relative certificate,
        key and pty paths in ``serve`` are relative to it."""
        pairs = []
        context = {FILE_DIR: base} if base is not None else None
        for d in scenario.devices:
            try:
                pairs.append((d, ServeSpec.model_validate(d.serve, context=context)))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"device {d.id!r}: {problems}") from None
        return cls(
            pairs,
            speed=speed if speed is not None else (scenario.speed or 1.0),
            seed=seed if seed is not None else scenario.seed,
            batches=scenario.batches,
        )

    @classmethod
    def from_file(cls, path: Path, *, speed: float | None = None, seed: int | None = None) -> Plant:
        return cls.from_scenario(load_scenario(path), speed=speed, seed=seed, base=scenario_path(path).parent)

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
