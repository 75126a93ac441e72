"""OPC UA front end: a bioreactor or a CO2 incubator with a LADS-like (OPC 30500) address space.

One server implementation serves every kind in :data:`KINDS`; an :class:`OpcUaKind` holds what
differs (namespace, what the controller says about itself, its alarms, derived values). The
address space is built from the kind's profile (``deploy/profiles/bioreactor-sim-opcua.yaml``,
``incubator-sim-opcua.yaml``): each tag's node id ``nsu=<uri>;s=A.B.C`` becomes the variable
``C`` below the objects ``A`` / ``B`` under ``Objects``, so the map the agent reads and the
server it reads from come from one file. Values are pushed from the model on a short timer
with the device clock (simulated time) as source timestamp; subscriptions see them change
like on a real device. Security policies and user login are optional, as on a real server.
With ``client_trust`` the server checks the client's certificate when the secure channel
opens, as UA-.NET and open62541 servers do, and answers an untrusted one
``BadSecurityChecksFailed``.

Comm faults: timeout / garbled / exception become bad status codes on every value (the
device behind the server stopped answering, sent garbage, reported a failure);
disconnect takes the whole server off the network for the fault window.

Alarms: the controller's alarm flags (the bioreactor's temperature excursion, pH, DO low,
agitation fault, CO2 supply low: :data:`ALARMS`; the incubator's door open, CO2 low or high,
temperature excursion…: :data:`INCUBATOR_ALARMS`) are also Alarms & Conditions events
(OffNormalAlarmType) notified on the device object (the first element of the tags' paths,
``Bioreactor``, ``Incubator``): raised (active, unacknowledged, retained) when the flag sets
and cleared when it resets. The simulated controller has no operator panel, so it
acknowledges an alarm itself as it clears (inactive, acknowledged, no longer retained). The
server answers ConditionRefresh with the alarms still active. Process faults of a scenario
(``temperature_oscillation``, ``co2_supply_failure``, ``door_open``…) raise them as they move
the process past the flags' thresholds.

Batches: with a batch schedule (a scenario's ``batches:``), the ``ActiveProgram`` nodes show the
batch the device holds (``batch_id``, ``batch_step``, ``batch_product``, ``batch_coi_id``; empty
strings between batches), as a LADS device shows its running program, so a profile can declare
them the device's own batch assignment.

Arrays: the bioreactor's ``zone_temperature_c`` is a Double array (ValueRank 1) of the bag
temperature over the rocker plate's :data:`ZONES` heating zones, for profiles that read arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.server.address_space import NodeData
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.event_generator import EventGenerator
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509

from cleanroom_common.net import free_port
from cleanroom_common.profilefiles import load_profile
from simulators.process.base import Clock
from simulators.process.batch import BatchSchedule
from simulators.servers.counter import serial_number
from simulators.servers.device import SimulatedDevice, Value
from simulators.servers.faults import CommFault, FaultSchedule

log = logging.getLogger(__name__)

NAMESPACE = "urn:cleanroom-edge:sim:bioreactor"
APPLICATION_URI = "urn:cleanroom-edge:sim:bioreactor:server"
DEFAULT_PROFILE = "bioreactor-sim-opcua"
MANUFACTURER = "Cleanroom-Sim Bioprocess"
MODEL_NAME = "CLEANROOM-SIM BIOREACTOR"
FIRMWARE = "2.4.1"
BUILD_NUMBER = "2041"
"""What the simulated bioreactor controller says about itself: in its Identification object
(DI model) and in the server's BuildInfo, as an embedded OPC UA server does."""
BUILD_DATE = datetime(2026, 1, 15, tzinfo=UTC)
_NODE_RE = re.compile(r"^(?:nsu=(?P<uri>[^;]+)|ns=\d+);s=(?P<path>[A-Za-z0-9_.]+)$")

UNECE_CODES = {"degC": "CEL", "%": "P1", "rpm": "RPM", "kg": "KGM", "L": "LTR", "mL": "MLT", "bar": "BAR"}
UNECE_CODES |= {"d": "DAY", "slpm": "L2", "1/d": "E91"}
"""UNECE Rec. 20 common codes for the units the profile uses (EUInformation.UnitId)."""

ALARMS: dict[str, tuple[str, int, str]] = {
    "temp_high": ("TemperatureHigh", 700, "Temperature above setpoint + 0.5 °C"),
    "temp_low": ("TemperatureLow", 700, "Temperature below setpoint - 0.5 °C"),
    "ph_high": ("PhHigh", 600, "pH above setpoint + 0.2"),
    "ph_low": ("PhLow", 600, "pH below setpoint - 0.2"),
    "do_low": ("DoLow", 600, "Dissolved oxygen below 20 % air saturation"),
    "agitation_fault": ("AgitationFault", 800, "Rocking stopped"),
    "gas_supply_low": ("Co2SupplyLow", 500, "CO2 supply pressure below 0.5 bar"),
}
"""Status flag → (condition name, OPC UA severity, message) of the alarm it raises (bioreactor)."""
INCUBATOR_ALARMS: dict[str, tuple[str, int, str]] = {
    "door_alarm": ("DoorOpen", 600, "Door open longer than the alarm delay"),
    "temp_high": ("TemperatureHigh", 700, "Temperature above setpoint + 0.5 °C"),
    "temp_low": ("TemperatureLow", 700, "Temperature below setpoint - 0.5 °C"),
    "over_temp": ("OverTemperature", 900, "Over-temperature cut-out tripped, heating off"),
    "co2_high": ("Co2High", 600, "CO2 more than 1 % above setpoint"),
    "co2_low": ("Co2Low", 600, "CO2 more than 1 % below setpoint"),
    "co2_supply_low": ("Co2SupplyLow", 500, "CO2 supply pressure below 0.5 bar"),
    "o2_alarm": ("O2Deviation", 600, "O2 more than 1 % from setpoint"),
}
"""The incubator's alarms. The door raises ``DoorOpen`` from ``door_alarm`` (open longer than
``door_alarm_delay_s``), not from ``door_open``: a door opened to load plates is no alarm."""
ZONES = (-0.15, -0.05, 0.05, 0.15)
"""Offset of each heating zone from the bag temperature (°C) at full heater output: the zones
over the heating element run warmer the harder it heats."""

BATCH_TAGS = ("batch_id", "batch_step", "batch_product", "batch_coi_id")
"""String values of the ``ActiveProgram`` nodes: the batch the device holds."""

ServedValue = Value | list[float]
"""What a variable serves: a scalar, or an array (``zone_temperature_c``)."""


@dataclass(frozen=True)
class OpcUaKind:
    """What makes one device kind's OPC UA server its own; everything else is shared."""

    namespace: str
    """Namespace URI of the device's nodes (the profile's ``nsu=``)."""
    application_uri: str
    """The server's ApplicationUri (a server certificate's subjectAltName must equal it)."""
    profile: str
    """Bundled profile the address space is built from unless another is given."""
    manufacturer: str
    model_name: str
    firmware: str
    build_number: str
    serial_prefix: str
    """Serial numbers are ``<prefix>-<6 digits>``, stable per device id."""
    alarms: Mapping[str, tuple[str, int, str]]
    """Status flag → (condition name, OPC UA severity, message) of the alarm it raises."""
    derived: Callable[[Mapping[str, ServedValue]], dict[str, ServedValue]]
    """Values the controller computes from the model's (state, arrays) on top of them."""


def _bioreactor_values(values: Mapping[str, ServedValue]) -> dict[str, ServedValue]:
    out: dict[str, ServedValue] = {"state": "Running" if values.get("running") else "Stopped"}
    temperature, heater = values.get("temperature_c"), values.get("heater_pct")
    if isinstance(temperature, float) and isinstance(heater, float):
        out["zone_temperature_c"] = [temperature + dz * heater / 100 for dz in ZONES]
    return out


def _no_values(values: Mapping[str, ServedValue]) -> dict[str, ServedValue]:
    return {}


KINDS: dict[str, OpcUaKind] = {
    "bioreactor": OpcUaKind(
        namespace=NAMESPACE,
        application_uri=APPLICATION_URI,
        profile=DEFAULT_PROFILE,
        manufacturer=MANUFACTURER,
        model_name=MODEL_NAME,
        firmware=FIRMWARE,
        build_number=BUILD_NUMBER,
        serial_prefix="BR-SIM",
        alarms=ALARMS,
        derived=_bioreactor_values,
    ),
    "incubator": OpcUaKind(
        namespace="urn:cleanroom-edge:sim:incubator",
        application_uri="urn:cleanroom-edge:sim:incubator:server",
        profile="incubator-sim-opcua",
        manufacturer="Cleanroom-Sim Cell Culture",
        model_name="CLEANROOM-SIM CO2 INCUBATOR",
        firmware="3.2.0",
        build_number="3200",
        serial_prefix="INC-SIM",
        alarms=INCUBATOR_ALARMS,
        derived=_no_values,
    ),
}
"""The device kinds served over OPC UA, by process model kind."""


def opcua_kind(kind: str) -> OpcUaKind:
    """The OPC UA description of a device kind, or a clear error naming the kinds served."""
    try:
        return KINDS[kind]
    except KeyError:
        served = " and ".join(f"{k}s" for k in KINDS)
        raise ValueError(f"the OPC UA front end serves {served} only, not {kind!r}") from None


FAULT_STATUS = {
    CommFault.TIMEOUT: ua.StatusCodes.BadTimeout,
    CommFault.GARBLED: ua.StatusCodes.BadDataEncodingInvalid,
    CommFault.EXCEPTION: ua.StatusCodes.BadDeviceFailure,
}


def eu_information(unit: str) -> ua.EUInformation:
    code = UNECE_CODES.get(unit)
    return ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=int.from_bytes(code.encode(), "big") if code else -1,
        DisplayName=ua.LocalizedText(unit),
        Description=ua.LocalizedText(unit),
    )


def _variant(value: ServedValue) -> ua.Variant:
    if isinstance(value, list):
        return ua.Variant([float(v) for v in value], ua.VariantType.Double)
    if isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    if isinstance(value, str):
        return ua.Variant(value, ua.VariantType.String)
    return ua.Variant(float(value), ua.VariantType.Double)


class _Users:
    """One user name and password; anonymous sessions are refused."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username == self.user and password == self.password:
            return User(role=UserRole.User, name=username)
        return None


class _CheckingProcessor(UaProcessor):
    """Refuses an untrusted client certificate in the OpenSecureChannel answer itself (asyncua's
    own server only checks at CreateSession, where most servers have long refused)."""

    def __init__(self, trust: TrustStore, *args: Any) -> None:
        super().__init__(*args)
        self._trust = trust

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        cert = algohdr.SenderCertificate
        if (
            self._connection.is_open()
            or not cert
            or self._trust.validate(x509.load_der_x509_certificate(cert))
        ):
            super().open_secure_channel(algohdr, seqhdr, body)
            return
        request = struct_from_binary(ua.OpenSecureChannelRequest, body)
        self._connection.select_policy(algohdr.SecurityPolicyURI, cert, request.Parameters.SecurityMode)
        response = ua.OpenSecureChannelResponse()
        response.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadSecurityChecksFailed)
        self.send_response(request.RequestHeader.RequestHandle, seqhdr, response, ua.MessageType.SecureOpen)


class _CheckingProtocol(OPCUAProtocol):
    trust: TrustStore

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is not None:
            self.processor = _CheckingProcessor(self.trust, self.iserver, self.transport, self.limits)
            self.processor.set_policies(self.policies)


class _CheckingBinaryServer(BinaryServer):
    """The listener of a server that checks client certificates (see :class:`_CheckingProcessor`)."""

    def __init__(self, base: BinaryServer, trust: TrustStore) -> None:
        super().__init__(base.iserver, base.hostname, base.port, base.limits)
        self.set_policies(base._policies)
        self._trust = trust

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _CheckingProtocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.trust = self._trust
        return protocol


class OpcUaDevice:
    """One device (a kind of :data:`KINDS`), one OPC UA server."""

    def __init__(
        self,
        device: SimulatedDevice,
        profile: Mapping[str, Any],
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        cert: Path | None = None,
        key: Path | None = None,
        user: str | None = None,
        password: str | None = None,
        client_trust: Path | None = None,
        update_interval_s: float = 0.2,
        batches: BatchSchedule | None = None,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self.device = device
        self.kind = opcua_kind(device.kind)
        self.tags = [_parse_tag(t, self.kind.namespace) for t in profile["tags"]]
        self.host, self.port = host, port
        self.cert, self.key = cert, key
        self.user, self.password = user, password
        self.client_trust = client_trust
        self.update_interval_s = update_interval_s
        self.batches = batches
        self.serial = f"{self.kind.serial_prefix}-{serial_number(device.device_id):06d}"
        missing = sorted({name for name, *_ in self.tags} - set(self.values()))
        if missing:
            raise ValueError(f"{profile.get('profile')}: tags with no simulated value: {', '.join(missing)}")
        self.history: OrderedDict[float, dict[str, ServedValue]] = OrderedDict()
        """Recent snapshots by simulated time: what was served with that source timestamp."""
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._task: asyncio.Task[None] | None = None
        self.offline = False
        self._refused: set[ua.NodeId] = set()
        self._alarms: dict[str, EventGenerator] = {}
        self._raised: dict[str, bool] = {}
        """Each alarm flag as last notified (absent: never raised)."""

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/cleanroom-sim/"

    def values(self) -> dict[str, ServedValue]:
        out: dict[str, ServedValue] = dict(self.device.values())
        out |= self.kind.derived(out)
        out["serial_number"] = self.serial
        out["firmware_version"] = self.kind.firmware
        out["model_name"] = self.kind.model_name
        out |= self._batch_values()
        return out

    def _batch_values(self) -> dict[str, ServedValue]:
        """The batch held at the device clock's now; empty strings when none (the nodes exist
        either way, so one profile serves a device with and without a schedule)."""
        held = self.batches.held(self.device.device_id, self.device.clock.now()) if self.batches else None
        if held is None:
            return dict.fromkeys(BATCH_TAGS, "")
        b = held.batch
        return {
            "batch_id": b.id,
            "batch_step": held.step,
            "batch_product": b.product or "",
            "batch_coi_id": b.coi_id or "",
        }

    # ------------------------------------------------------------------ server

    async def _build(self) -> Server:
        server = Server(
            user_manager=_Users(self.user, self.password) if self.user and self.password else None
        )
        server.iserver.bind_condition_methods = True  # ConditionRefresh, as A&C servers answer it
        await server.init()
        k = self.kind
        await server.set_build_info(
            k.application_uri, k.manufacturer, k.model_name, k.firmware, k.build_number, BUILD_DATE
        )
        server.set_endpoint(self.url)
        server.set_server_name(f"cleanroom-sim {self.device.kind}")
        await server.set_application_uri(k.application_uri)
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.cert is not None and self.key is not None:
            await server.load_certificate(str(self.cert))
            await server.load_private_key(str(self.key))
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
                ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
                ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
                ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
            ]
        server.set_security_policy(policies)
        if self.user:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(k.namespace)
        await self._address_space(server, idx)
        server.subscribe_server_callback(CallbackType.PostWrite, self._post_write)
        return server

    async def _address_space(self, server: Server, idx: int) -> None:
        objects: dict[str, Any] = {}
        values = self.values()
        setpoints = self.device.model.SETPOINTS
        self._nodes = {}
        for name, path, unit, rng in self.tags:
            parts = path.split(".")
            parent = server.nodes.objects
            for depth in range(1, len(parts)):
                key = ".".join(parts[:depth])
                if key not in objects:
                    objects[key] = await parent.add_object(
                        ua.NodeId(key, idx), ua.QualifiedName(parts[depth - 1], idx)
                    )
                parent = objects[key]
            variant = _variant(values[name])
            if isinstance(variant.Value, list):
                variant.Dimensions = [len(variant.Value)]  # ValueRank 1, ArrayDimensions [n]
            node = await parent.add_variable(ua.NodeId(path, idx), ua.QualifiedName(parts[-1], idx), variant)
            if variant.VariantType is ua.VariantType.Double:
                if rng is not None:
                    await node.add_property(
                        ua.NodeId(f"{path}.EURange", idx), "EURange", ua.Range(Low=rng[0], High=rng[1])
                    )
                if unit is not None:
                    await node.add_property(
                        ua.NodeId(f"{path}.EngineeringUnits", idx), "EngineeringUnits", eu_information(unit)
                    )
            if name in setpoints:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._setter(name))
            self._nodes[name] = node.nodeid
        await self._alarm_generators(server, idx, objects)

    async def _alarm_generators(self, server: Server, idx: int, objects: Mapping[str, Any]) -> None:
        """One OffNormalAlarm condition per alarm flag the device has, notified on the device object."""
        if not self.tags:
            return
        root = self.tags[0][1].split(".")[0]
        source = objects.get(root)
        if source is None:
            return
        flags = self.device.values()
        self._alarms = {}
        for flag, (condition, severity, _) in self.kind.alarms.items():
            if flag not in flags:
                continue
            gen = await server.get_event_generator(ua.ObjectIds.OffNormalAlarmType, source)
            ev = gen.event
            ev.ConditionName = condition
            ev.Severity = severity
            ev.NodeId = ua.NodeId(f"{root}.Conditions.{condition}", idx)
            ev.EnabledState = ua.LocalizedText("Enabled")
            setattr(ev, "EnabledState/Id", True)
            self._alarms[flag] = gen

    def _setter(self, name: str) -> Any:
        """Client writes reach the model; a value the device refuses is not stored and is
        answered ``BadOutOfRange`` (by :meth:`_post_write`: a setter cannot return a status)."""

        def setter(node: NodeData, attr: ua.AttributeIds, value: ua.DataValue) -> None:
            raw = value.Value.Value if value.Value is not None else None
            try:
                if not isinstance(raw, int | float) or isinstance(raw, bool):
                    raise ValueError(f"{name} needs a number, got {raw!r}")
                self.device.model.set_setpoint(name, float(raw))
            except ValueError as exc:
                log.info("%s: write refused: %s", self.device.device_id, exc)
                self._refused.add(node.nodeid)
                return
            node.attributes[attr].value = value

        return setter

    async def _post_write(self, event: Any, dispatcher: Any) -> None:
        """Turn the status of refused setpoint writes into ``BadOutOfRange`` before the reply goes out."""
        for i, item in enumerate(event.request_params.NodesToWrite):
            if item.NodeId in self._refused:
                event.response_params[i] = ua.StatusCode(ua.StatusCodes.BadOutOfRange)
        self._refused.clear()

    async def start(self) -> None:
        self._server = await self._build()
        await self._server.start()
        if self.client_trust is not None and self._server.bserver is not None:
            trust = TrustStore([self.client_trust], [])
            await trust.load()
            await self._server.bserver.stop()
            self._server.bserver = _CheckingBinaryServer(self._server.bserver, trust)
            await self._server.bserver.start()
        await self._update()
        self._task = asyncio.create_task(self._run(), name=f"opcua-sim-{self.device.device_id}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            if self.offline and self._server.bserver is not None:
                await self._server.bserver.start()  # stop() expects a listening server
            await self._server.stop()
            self._server = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.update_interval_s)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: OPC UA update failed", self.device.device_id)

    async def _tick(self) -> None:
        """One update; a disconnect fault closes the listener and every session (the
        address space is kept, so the server comes back within one update)."""
        assert self._server is not None and self._server.bserver is not None
        fault = self.device.fault()
        down = fault is not None and fault.kind is CommFault.DISCONNECT
        if down and not self.offline:
            await self._server.bserver.stop()
            self.offline = True
        elif not down and self.offline:
            await self._server.bserver.start()
            self.offline = False
        if not down:
            await self._update()

    async def _update(self) -> None:
        """Write every variable from the model at one simulated instant."""
        server = self._server
        if server is None:
            return
        t = self.device.now()
        values = self.values()
        fault = self.device.fault()
        status = ua.StatusCode(FAULT_STATUS[fault.kind]) if fault is not None else ua.StatusCode()
        source_ts = datetime.fromtimestamp(t, UTC)
        server_ts = datetime.now(UTC)
        for name, nodeid in self._nodes.items():
            dv = ua.DataValue(
                Value=_variant(values[name]),
                StatusCode=status,
                SourceTimestamp=source_ts,
                ServerTimestamp=server_ts,
            )
            await server.write_attribute_value(nodeid, dv)
        await self._notify_alarms(values, source_ts)
        self.history[t] = values
        while len(self.history) > 200:
            self.history.popitem(last=False)

    async def _notify_alarms(self, values: Mapping[str, ServedValue], source_ts: datetime) -> None:
        """Raise the alarms whose flag set since the last update, clear those that reset."""
        for flag, gen in self._alarms.items():
            active = bool(values.get(flag))
            if self._raised.get(flag, False) == active:
                continue
            self._raised[flag] = active
            _, _, message = self.kind.alarms[flag]
            ev = gen.event
            ev.Retain = active
            ev.ActiveState = ua.LocalizedText("Active" if active else "Inactive")
            setattr(ev, "ActiveState/Id", active)
            ev.AckedState = ua.LocalizedText("Unacknowledged" if active else "Acknowledged")
            setattr(ev, "AckedState/Id", not active)
            await gen.trigger(source_ts, message if active else f"Back to normal: {message}")


def _parse_tag(
    tag: Mapping[str, Any], namespace: str
) -> tuple[str, str, str | None, tuple[float, float] | None]:
    m = _NODE_RE.match(str(tag.get("node_id", "")))
    if not m:
        raise ValueError(
            f"tag {tag.get('name')!r}: the simulator serves string node ids (ns=…;s=… or nsu=…;s=…)"
        )
    if m["uri"] is not None and m["uri"] != namespace:
        raise ValueError(f"tag {tag['name']!r}: namespace {m['uri']!r} is not {namespace!r}")
    rng = tag.get("range")
    return str(tag["name"]), m["path"], tag.get("unit"), (float(rng[0]), float(rng[1])) if rng else None


@dataclass
class OpcUaSim:
    server: OpcUaDevice
    device: SimulatedDevice
    clock: Clock

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def model(self) -> Any:
        return self.device.model


@asynccontextmanager
async def serve_opcua(
    kind: str,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    speed: float = 1.0,
    seed: int = 0,
    device_id: str | None = None,
    profile: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    faults: list[str] | None = None,
    clock: Clock | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    user: str | None = None,
    password: str | None = None,
    client_trust: Path | None = None,
    update_interval_s: float = 0.2,
    batches: BatchSchedule | None = None,
) -> AsyncIterator[OpcUaSim]:
    """One device of ``kind`` (id ``<kind>-1`` unless given) on its own OPC UA server for the
    duration of the ``async with`` block: ``sim.url``, ``sim.model``, ``sim.device.faults``."""
    spec = opcua_kind(kind)
    clock = clock or Clock(speed)
    device = SimulatedDevice.create(
        kind,
        device_id or f"{kind}-1",
        clock=clock,
        seed=seed,
        params=params,
        faults=FaultSchedule.parse(faults),
    )
    server = OpcUaDevice(
        device,
        load_profile(profile or spec.profile),
        host=host,
        port=port or free_port(host),
        cert=cert,
        key=key,
        user=user,
        password=password,
        client_trust=client_trust,
        update_interval_s=update_interval_s,
        batches=batches,
    )
    await server.start()
    try:
        yield OpcUaSim(server, device, clock)
    finally:
        await server.close()


def serve_bioreactor_opcua(**kwargs: Any) -> AbstractAsyncContextManager[OpcUaSim]:
    """``async with serve_bioreactor_opcua(port=0, speed=60) as sim:`` → ``sim.url``, ``sim.model``."""
    return serve_opcua("bioreactor", **kwargs)


def serve_incubator_opcua(**kwargs: Any) -> AbstractAsyncContextManager[OpcUaSim]:
    """``async with serve_incubator_opcua(port=0, speed=60) as sim:`` → ``sim.url``, ``sim.model``."""
    return serve_opcua("incubator", **kwargs)
