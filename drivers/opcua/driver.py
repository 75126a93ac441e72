"""OPC UA client driver (asyncua): polling with one Read per group, or subscriptions.

Node ids. A tag's ``node_id`` is any of ``ns=2;i=…``/``ns=2;s=…`` (index form),
``nsu=URI;s=…`` (namespace URI form) or an absolute browse path such as
``/Objects/2:Bioreactor/2:Temperature.2:CurrentValue`` (OPC 10000-4 A.2 syntax, from the
Root folder), where an element's namespace may also be written as a URI in braces:
``/Objects/{urn:cleanroom-edge:sim:bioreactor}Bioreactor``. Namespace *indices* are
server-assigned and may change when a server restarts with its namespaces registered in
another order; URIs do not. So every URI and browse path is resolved to a concrete
NodeId on each :meth:`OpcUaDriver.connect` (the scheduler reconnects after any link
loss), and a Read that answers ``BadNodeIdUnknown`` re-resolves and retries (at most
once per ``_RERESOLVE_S``, so a tag that is simply wrong does not double every poll), so a
server that reloaded its address space never leaves tags stuck on a stale mapping. A tag that cannot be
resolved is a bad reading with the reason saying why; the rest of the device still runs.

Quality. Good status → good; ``Uncertain*`` → uncertain, value kept, the status name as
reason; ``Bad*`` → bad, value dropped, the status name as reason. Each reading keeps the
server's SourceTimestamp (ServerTimestamp where the device gave none) as
``source_ts_ns``; the acquisition time is the agent's clock.

Subscriptions (group ``mode: subscribe``). One subscription per group; monitored items
are created in batches of ``max_nodes_per_request`` so thousands of nodes work, with
each group's sampling interval, queue size, trigger and deadband. The driver consumes
raw PublishResults (not asyncua's per-item events) so a notification message stays one
unit: **each notification message becomes one Block holding only the tags that changed**
(in group order). Repeating unchanged values to fill a group-shaped block would forge
readings the server never sent, with a fresh acquisition time: not Original in the
ALCOA+ sense. When a message holds several samples of a tag (queue size > 1), the k-th
samples of all tags form the k-th block, so no block holds a tag twice and each tag's
samples stay in time order. The per-subset :class:`PollGroup` (which
carries scale/offset/range) is built once per distinct subset and cached.

Liveness. The scheduler calls :meth:`OpcUaDriver.read` on every tick of a subscribed
group as its liveness check: it returns no blocks while the subscription is healthy and
raises :class:`DeviceError` once asyncua's watchdog (which probes the server every
``keepalive``, so a dead server is noticed within about two keepalives), a bad
subscription status (BadShutdown, BadTimeout…) or a stale subscription (no publish
response, not even a keep-alive, for twice its keep-alive period) says the link is dead.
The scheduler then records bad readings for the gap and reconnects, which re-resolves
namespaces and re-creates the subscriptions. asyncua's own auto-reconnect is off: one
owner of reconnects (the scheduler) keeps the gap accounting in one place.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import nodeid_to_binary, struct_to_binary
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from pydantic import Field, SecretStr, field_validator, model_validator

from agent.core.certs import application_uri
from agent.core.driver import (
    ConnectionBase,
    DeviceContext,
    DeviceError,
    Driver,
    Emit,
    GroupSpec,
    PollGroup,
    TagBase,
)
from agent.core.records import Block, Quality, Reason, Value, now_ns
from cleanroom_common.fields import Duration

log = logging.getLogger("cleanroom.drivers.opcua")

_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_TRIGGERS = {
    "status": ua.DataChangeTrigger.Status,
    "status_value": ua.DataChangeTrigger.StatusValue,
    "status_value_timestamp": ua.DataChangeTrigger.StatusValueTimestamp,
}
_DEADBANDS = {
    "none": ua.DeadbandType.None_,
    "absolute": ua.DeadbandType.Absolute,
    "percent": ua.DeadbandType.Percent,
}
SecurityPolicyName = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
_URI_ELEMENT = re.compile(r"\{([^{}]+)\}")
_LINK_ERRORS = (OSError, TimeoutError, UaError)
"""What asyncua raises when the link, the session or the secure channel is gone."""
_RERESOLVE_S = 30.0
_SUBSET_CACHE = 32


# --------------------------------------------------------------------------- config


class Tag(TagBase):
    """An OPC UA variable read as one tag."""

    node_id: str = Field(min_length=1)
    """``ns=2;s=BR1.Temperature`` / ``ns=2;i=1001``, ``nsu=urn:…;s=…`` (namespace URI,
    stable across server restarts), or an absolute browse path from Root such as
    ``/Objects/2:Bioreactor/2:pH`` (elements may name their namespace as ``{urn:…}Name``)."""

    @field_validator("node_id")
    @classmethod
    def _parses(cls, value: str) -> str:
        NodeRef.parse(value)
        return value


class Group(GroupSpec):
    """A poll group, read with one Read call per interval or kept by a subscription."""

    mode: Literal["poll", "subscribe"] = "poll"
    """``poll``: one Read service call per interval for all the group's nodes.
    ``subscribe``: monitored items; the server pushes changes, the interval is then only
    the liveness check of the link."""
    sampling_interval: Duration | None = None
    """Subscribe mode: how often the server samples each node; defaults to the group interval."""
    publishing_interval: Duration | None = None
    """Subscribe mode: how often the server sends collected changes; defaults to the sampling interval."""
    queue_size: int = Field(default=1, ge=1)
    """Subscribe mode: samples the server keeps per node between publishes (1 = latest only)."""
    trigger: Literal["status", "status_value", "status_value_timestamp"] = "status_value"
    """Subscribe mode: what counts as a change (``status_value_timestamp`` reports every
    new sample even when the value repeats)."""
    deadband: Literal["none", "absolute", "percent"] = "none"
    """Subscribe mode: suppress changes smaller than ``deadband_value`` (absolute, or percent of EURange)."""
    deadband_value: float = Field(default=0.0, ge=0.0)
    """Subscribe mode: the deadband size, in engineering units or percent."""

    @model_validator(mode="after")
    def _deadband_consistent(self) -> Group:
        if self.deadband == "none" and self.deadband_value:
            raise ValueError("deadband_value is set but deadband is 'none'")
        return self


class Connection(ConnectionBase):
    """How to reach one OPC UA server, and with which identity."""

    url: str = Field(pattern=r"^opc\.tcp://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(:\d+)?(/.*)?$")
    """Endpoint URL, e.g. ``opc.tcp://10.0.4.21:4840`` or ``opc.tcp://[fd00::21]:4840/path``."""
    security_policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = (
        "None"
    )
    """Security policy of the secure channel. ``None`` only on an isolated network."""
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    """Message security: ``Sign`` protects integrity, ``SignAndEncrypt`` also confidentiality.
    Must be ``None`` exactly when the policy is ``None``."""
    certificate: Path | None = None
    """The agent's application instance certificate (DER or PEM); see ``cleanroom-agent certs create``."""
    private_key: Path | None = None
    """Private key of ``certificate`` (PEM)."""
    server_certificate: Path | None = None
    """Pinned server certificate: only a server holding its key can open the channel."""
    trust_dir: Path | None = None
    """Directory of trusted server or CA certificates; the server's certificate must chain to one."""
    application_uri: str | None = None
    """Application URI announced to the server; defaults to the URI in ``certificate``
    (they must match, servers check it)."""
    username: str | None = None
    """User name for a UserName identity token (anonymous when unset)."""
    password: SecretStr | None = None
    """Password for ``username``; prefer ``password_file`` or ``${ENV}`` expansion over plain text."""
    password_file: Path | None = None
    """File holding the password for ``username`` (first line), readable only by the agent."""
    keepalive: Duration = 5.0
    """Server liveness probe period: a dead server is detected within about twice this. A
    probe unanswered for this long counts as a dead link, so not much below the server's
    worst response time under load."""
    session_timeout: Duration = 30.0
    """Session lifetime the server keeps without traffic (asked for; the server may revise it)."""
    max_nodes_per_request: int = Field(default=1000, ge=1)
    """Largest number of nodes in one Read or CreateMonitoredItems call (servers cap it)."""

    @model_validator(mode="after")
    def _security_consistent(self) -> Connection:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError("security_mode must be 'None' exactly when security_policy is 'None'")
        if self.security_policy != "None":
            if self.certificate is None or self.private_key is None:
                raise ValueError(f"security_policy {self.security_policy} needs certificate and private_key")
            if self.server_certificate is None and self.trust_dir is None:
                raise ValueError(
                    "a secured connection needs server_certificate (pinned) or trust_dir: "
                    "an unverified server could feed the agent any data"
                )
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password needs a username")
        return self


# --------------------------------------------------------------------------- node references


class _RefKind(Enum):
    NODE_ID = "node_id"
    NAMESPACE_URI = "nsu"
    BROWSE_PATH = "browse_path"


@dataclass(frozen=True)
class NodeRef:
    """A tag's node id as written, parsed once; :meth:`resolve` maps it onto the
    namespace table of the server currently connected."""

    kind: _RefKind
    text: str
    node_id: ua.NodeId | None = None
    uri: str | None = None

    @classmethod
    def parse(cls, text: str) -> NodeRef:
        """Parse and encode once: what the stack cannot put on the wire (an index beyond
        UInt16, a negative numeric id) is a config error now, not a failing poll later."""
        text = text.strip()
        try:
            if text.startswith("/"):
                struct_to_binary(ua.RelativePath.from_string(_URI_ELEMENT.sub("0:", text)))
                return cls(_RefKind.BROWSE_PATH, text)
            if text.startswith("nsu="):
                uri, sep, rest = text[4:].partition(";")
                if not sep or not uri or rest.startswith(("ns=", "srv=")):
                    raise ValueError("expected nsu=<namespace URI>;<i=, s=, g= or b= identifier>")
                node = ua.NodeId.from_string(rest)
                nodeid_to_binary(node)
                return cls(_RefKind.NAMESPACE_URI, text, node_id=node, uri=uri)
            node = ua.NodeId.from_string(text)
            if isinstance(node, ua.ExpandedNodeId):
                raise ValueError("srv= (a node on another server) is not supported")
            nodeid_to_binary(node)
        except (ValueError, UaError, struct.error, OverflowError, TypeError) as exc:
            raise ValueError(f"{text!r} is not a node id ({exc})") from None
        return cls(_RefKind.NODE_ID, text, node_id=node)

    def browse_path(self, namespaces: Sequence[str]) -> ua.RelativePath:
        def index_of(m: re.Match[str]) -> str:
            try:
                return f"{namespaces.index(m.group(1))}:"
            except ValueError:
                raise LookupError(f"namespace {m.group(1)} not on server") from None

        return ua.RelativePath.from_string(_URI_ELEMENT.sub(index_of, self.text))

    def with_index(self, namespaces: Sequence[str]) -> ua.NodeId:
        assert self.node_id is not None
        if self.kind is _RefKind.NODE_ID:
            return self.node_id
        assert self.uri is not None
        try:
            idx = namespaces.index(self.uri)
        except ValueError:
            raise LookupError(f"namespace {self.uri} not on server") from None
        return ua.NodeId(self.node_id.Identifier, ua.Int16(idx), self.node_id.NodeIdType)


# --------------------------------------------------------------------------- value conversion


def _ts_ns(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return calendar.timegm(dt.timetuple()) * 1_000_000_000 + dt.microsecond * 1000


def _scalar(v: Any) -> tuple[Value, str | None]:
    """An OPC UA variant value as a payload value, or the reason it cannot be one."""
    if v is None or isinstance(v, bool | str):
        return v, None
    if isinstance(v, int):
        return int(v), None
    if isinstance(v, float):
        return (v, None) if math.isfinite(v) else (None, Reason.DECODE_ERROR)
    if isinstance(v, datetime):
        return v.isoformat(), None
    if isinstance(v, ua.LocalizedText):
        return v.Text, None
    return None, "unsupported_type"


class _Converted:
    """Columns of one group's (or subset's) readings, filled from DataValues."""

    __slots__ = ("quality", "raw", "reasons", "src")

    def __init__(self, n: int) -> None:
        self.raw: list[Value] = [None] * n
        self.quality: list[Quality] = [Quality.GOOD] * n
        self.reasons: list[str | None] = [None] * n
        self.src: list[int | None] = [None] * n

    def set(self, i: int, dv: ua.DataValue) -> None:
        status = dv.StatusCode
        self.src[i] = _ts_ns(dv.SourceTimestamp or dv.ServerTimestamp)
        if status is not None and not status.is_good():
            name = status.name
            if status.is_uncertain():
                self.quality[i], self.reasons[i] = Quality.UNCERTAIN, name
            else:
                self.quality[i], self.reasons[i] = Quality.BAD, name
                return
        value, why = _scalar(dv.Value.Value if dv.Value is not None else None)
        if why is not None:
            self.quality[i], self.reasons[i] = Quality.BAD, why
            return
        self.raw[i] = value

    def bad(self, i: int, reason: str) -> None:
        self.quality[i], self.reasons[i] = Quality.BAD, reason

    def finish(self, group: PollGroup, acq_ts_ns: int) -> Block:
        return group.finish(
            self.raw, acq_ts_ns=acq_ts_ns, quality=self.quality, reasons=self.reasons, source_ts_ns=self.src
        )


# --------------------------------------------------------------------------- subscriptions


class _GroupSubscription:
    """One group's subscription: turns PublishResults into blocks and watches its pulse."""

    def __init__(self, driver: OpcUaDriver, group: PollGroup, emit: Emit, keepalive_s: float) -> None:
        self.driver = driver
        self.group = group
        self.emit = emit
        self.keepalive_s = keepalive_s
        self.subscription_id: int | None = None
        self.last_publish = time.monotonic()
        self._subsets: OrderedDict[tuple[int, ...], PollGroup] = OrderedDict()

    def on_publish(self, result: ua.PublishResult) -> None:
        """Publish-loop callback: must not block; a failure here must reach the scheduler
        (asyncua would only log it and data would silently stop)."""
        self.last_publish = time.monotonic()
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        acq = now_ns()
        try:
            for notification in data:
                if isinstance(notification, ua.DataChangeNotification):
                    self._emit_changes(notification.MonitoredItems, acq)
                elif isinstance(notification, ua.StatusChangeNotification):
                    status = notification.Status
                    if not status.is_good():
                        self.driver.link_lost(Reason.COMM_ERROR, f"subscription status {status.name}")
        except Exception as exc:
            log.exception("%s/%s: notification handling failed", self.group.device, self.group.name)
            self.driver.link_lost("driver_error", repr(exc))

    def _emit_changes(self, items: Sequence[ua.MonitoredItemNotification], acq: int) -> None:
        """Layer k holds each tag's k-th sample of this message (a server lists an item's
        queued samples together), so every block has each tag at most once, in time order."""
        n = len(self.group.tags)
        layers: list[dict[int, ua.DataValue]] = []
        seen: dict[int, int] = {}
        for item in items:
            handle = int(item.ClientHandle)
            if not 0 <= handle < n:
                self.driver.ctx.stats.error("unknown_handle")
                continue
            k = seen.get(handle, 0)
            seen[handle] = k + 1
            if k == len(layers):
                layers.append({})
            layers[k][handle] = item.Value
        for layer in layers:
            self._emit_layer(layer, acq)

    def _emit_layer(self, layer: dict[int, ua.DataValue], acq: int) -> None:
        indices = tuple(sorted(layer))
        conv = _Converted(len(indices))
        for j, i in enumerate(indices):
            conv.set(j, layer[i])
        self.emit(conv.finish(self._subset(indices), acq))

    def _subset(self, indices: tuple[int, ...]) -> PollGroup:
        if len(indices) == len(self.group.tags):
            return self.group
        sub = self._subsets.get(indices)
        if sub is None:
            g = self.group
            sub = PollGroup(g.device, g.name, g.spec, [g.tag_specs[i] for i in indices], g.timeout_s)
            self._subsets[indices] = sub
            if len(self._subsets) > _SUBSET_CACHE:
                self._subsets.popitem(last=False)
        else:
            self._subsets.move_to_end(indices)
        return sub

    def stale(self) -> bool:
        return time.monotonic() - self.last_publish > 2 * self.keepalive_s + self.driver.conn.timeout


# --------------------------------------------------------------------------- driver


class OpcUaDriver(Driver):
    """OPC UA client for one server (one session)."""

    protocol: ClassVar[str] = "opcua"
    Tag: ClassVar[type[TagBase]] = Tag
    Group: ClassVar[type[GroupSpec]] = Group
    Connection: ClassVar[type[ConnectionBase]] = Connection
    supports_subscribe: ClassVar[bool] = True

    def __init__(self, ctx: DeviceContext) -> None:
        super().__init__(ctx)
        self.conn = cast(Connection, ctx.connection)
        self._refs: dict[str, NodeRef] = {
            t.name: NodeRef.parse(t.node_id) for t in ctx.profile.tags if isinstance(t, Tag)
        }
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId | str] = {}
        """Resolved NodeId per tag, or why the tag could not be resolved."""
        self._resolved_at = 0.0
        self._lost: DeviceError | None = None
        """Why the link is known dead (watchdog, subscription status, a failed call): read raises it."""
        self._subs: dict[str, _GroupSubscription] = {}
        self._unresolved_logged: set[str] = set()

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        self._lost = None
        self._subs.clear()
        client = Client(self.conn.url, timeout=self.conn.timeout, watchdog_intervall=self.conn.keepalive)
        client.session_timeout = int(self.conn.session_timeout * 1000)
        client.name = client.description = f"cleanroom-edge {self.ctx.id}"
        client.connection_lost_callback = self._on_connection_lost
        try:
            await self._configure_identity(client)
            await client.connect(auto_reconnect=False)
        except _LINK_ERRORS as exc:
            await self._close_client(client)
            raise DeviceError(_reason(exc), f"connect {self.conn.url}: {_describe(exc)}") from exc
        self._client = client
        try:
            await self._resolve()
        except _LINK_ERRORS as exc:
            await self.close()
            raise DeviceError(_reason(exc), f"resolving node ids: {_describe(exc)}") from exc

    async def _configure_identity(self, client: Client) -> None:
        conn = self.conn
        if conn.username:
            client.set_user(conn.username)
            client.set_password(_password(conn))
        if conn.security_policy == "None":
            if conn.application_uri:
                client.application_uri = conn.application_uri
            return
        assert conn.certificate is not None and conn.private_key is not None
        try:
            cert = await uacrypto.load_certificate(conn.certificate)
        except (OSError, ValueError) as exc:
            raise DeviceError("config_error", f"certificate {conn.certificate}: {exc}") from exc
        client.application_uri = conn.application_uri or application_uri(cert) or client.application_uri
        if conn.trust_dir is not None:
            store = TrustStore([conn.trust_dir], [])
            try:
                await store.load()
            except (OSError, ValueError) as exc:  # missing or empty directory, unreadable file
                raise DeviceError("config_error", f"trust_dir {conn.trust_dir}: {exc}") from exc
            client.certificate_validator = CertificateValidator(
                CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_SERVER,
                store,
            )
        try:
            await client.set_security(
                _POLICIES[conn.security_policy],
                certificate=str(conn.certificate),
                private_key=str(conn.private_key),
                server_certificate=str(conn.server_certificate) if conn.server_certificate else None,
                mode=getattr(ua.MessageSecurityMode, conn.security_mode),
            )
        except (FileNotFoundError, PermissionError, IsADirectoryError, ValueError) as exc:
            raise DeviceError("config_error", f"certificate, key or server certificate: {exc}") from exc

    async def _on_connection_lost(self, exc: Exception) -> None:
        self.link_lost(_reason(exc), _describe(exc))

    def link_lost(self, reason: str, detail: str) -> None:
        """Remember that the link is dead; the next liveness check or read raises."""
        if self._lost is None:
            log.info("%s: OPC UA link lost: %s", self.ctx.id, detail)
            self._lost = DeviceError(reason, detail)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._subs.clear()
        if client is not None:
            await self._close_client(client)

    async def _close_client(self, client: Client) -> None:
        """Disconnect within a bounded time, whatever state the link is in."""
        try:
            await asyncio.wait_for(client.disconnect(), timeout=self.conn.timeout)
        except Exception as exc:  # a dead server cannot be told goodbye; close must not raise
            log.debug("%s: disconnect: %s", self.ctx.id, exc)
            client.disconnect_socket()
        # asyncua leaves the publish loop running when the transport was already gone.
        task = getattr(client.uaclient.session, "_publish_task", None)
        if task is not None and not task.done():
            task.cancel()

    # ------------------------------------------------------------------ resolution

    async def _resolve(self) -> None:
        """Map every tag onto the connected server's namespace table and address space."""
        client = self._require_client()
        namespaces = await client.get_namespace_array()
        nodes: dict[str, ua.NodeId | str] = {}
        paths: list[tuple[str, ua.RelativePath]] = []
        for name, ref in self._refs.items():
            try:
                if ref.kind is _RefKind.BROWSE_PATH:
                    paths.append((name, ref.browse_path(namespaces)))
                else:
                    nodes[name] = ref.with_index(namespaces)
            except LookupError as exc:
                nodes[name] = "BadNamespaceUnknown"
                self._log_unresolved(name, str(exc))
        root = ua.NodeId(ua.Int32(ObjectIds.RootFolder))
        for start in range(0, len(paths), self.conn.max_nodes_per_request):
            chunk = paths[start : start + self.conn.max_nodes_per_request]
            results = await client.translate_browsepaths(root, [p for _, p in chunk])
            for (name, _), res in zip(chunk, results, strict=True):
                if res.StatusCode.is_good() and res.Targets:
                    target = res.Targets[0].TargetId  # an ExpandedNodeId: keep the local part
                    nodes[name] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
                else:
                    nodes[name] = res.StatusCode.name if not res.StatusCode.is_good() else "BadNoMatch"
                    self._log_unresolved(name, nodes[name])
        self._nodes = nodes
        self._resolved_at = time.monotonic()

    def _log_unresolved(self, tag: str, why: Any) -> None:
        if tag not in self._unresolved_logged:
            self._unresolved_logged.add(tag)
            log.warning("%s: tag %s (%s) not resolved: %s", self.ctx.id, tag, self._refs[tag].text, why)

    def _require_client(self) -> Client:
        if self._client is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        return self._client

    def _check_link(self) -> Client:
        client = self._require_client()
        if self._lost is not None:
            raise self._lost
        return client

    # ------------------------------------------------------------------ polling

    async def read(self, group: PollGroup) -> list[Block]:
        client = self._check_link()
        sub = self._subs.get(group.name)
        if sub is not None:
            if sub.stale():
                self.link_lost(
                    Reason.TIMEOUT, f"subscription {group.name} silent for {sub.keepalive_s * 2:.1f}s"
                )
                self._check_link()
            return []
        acq = now_ns()
        conv = await self._read_values(client, group)
        stale_map = time.monotonic() - self._resolved_at > _RERESOLVE_S
        if stale_map and any(r == "BadNodeIdUnknown" for r in conv.reasons):
            # The server may have reloaded its address space behind an unbroken link:
            # resolve again and read once more.
            self.ctx.stats.retries += 1
            await self._guard(self._resolve(), "resolve")
            conv = await self._read_values(client, group)
        return [conv.finish(group, acq)]

    async def _read_values(self, client: Client, group: PollGroup) -> _Converted:
        conv = _Converted(len(group.tags))
        wanted: list[tuple[int, ua.NodeId]] = []
        for i, tag in enumerate(group.tags):
            node = self._nodes.get(tag)
            if isinstance(node, ua.NodeId):
                wanted.append((i, node))
            else:
                conv.bad(i, node or "BadNodeIdUnknown")
        step = self.conn.max_nodes_per_request
        for start in range(0, len(wanted), step):
            chunk = wanted[start : start + step]
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=AttributeIds.Value) for _, n in chunk],
            )
            t = time.perf_counter()
            values = await self._guard(client.uaclient.read(params), "read")
            self.ctx.stats.request_done(time.perf_counter() - t)
            if len(values) != len(chunk):
                self.ctx.stats.error(Reason.DECODE_ERROR)
                for i, _ in chunk:
                    conv.bad(i, Reason.DECODE_ERROR)
                continue
            for (i, _), dv in zip(chunk, values, strict=True):
                conv.set(i, dv)
        return conv

    async def _guard(self, call: Any, what: str) -> Any:
        """Await an asyncua call, turning link failures into :class:`DeviceError`."""
        try:
            return await call
        except _LINK_ERRORS as exc:
            reason = _reason(exc)
            self.ctx.stats.error(reason)
            self.link_lost(reason, _describe(exc))
            raise DeviceError(reason, f"{what}: {_describe(exc)}") from exc

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, group: PollGroup, emit: Emit) -> None:
        client = self._check_link()
        spec = cast(Group, group.spec)
        sampling = spec.sampling_interval if spec.sampling_interval is not None else group.interval_s
        publishing = spec.publishing_interval if spec.publishing_interval is not None else sampling
        keepalive_count = max(1, math.ceil(max(self.conn.keepalive, publishing) / max(publishing, 1e-3)))
        sub = _GroupSubscription(self, group, emit, keepalive_s=keepalive_count * max(publishing, 1e-3))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=publishing * 1000,
            RequestedLifetimeCount=keepalive_count * 10,
            RequestedMaxKeepAliveCount=keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        result = await self._guard(
            client.uaclient.create_subscription(params, sub.on_publish), "create subscription"
        )
        sub.subscription_id = result.SubscriptionId
        sub.keepalive_s = result.RevisedMaxKeepAliveCount * result.RevisedPublishingInterval / 1000
        self._subs[group.name] = sub
        flt = None
        if spec.trigger != "status_value" or spec.deadband != "none":
            flt = ua.DataChangeFilter(
                Trigger=_TRIGGERS[spec.trigger],
                DeadbandType=int(_DEADBANDS[spec.deadband]),
                DeadbandValue=spec.deadband_value,
            )
        requests: list[ua.MonitoredItemCreateRequest] = []
        bad: dict[int, str] = {}
        for i, tag in enumerate(group.tags):
            node = self._nodes.get(tag)
            if not isinstance(node, ua.NodeId):
                bad[i] = node or "BadNodeIdUnknown"
                continue
            mp = ua.MonitoringParameters(
                ClientHandle=i,
                SamplingInterval=sampling * 1000,
                QueueSize=spec.queue_size,
                DiscardOldest=True,
            )
            if flt is not None:
                mp.Filter = flt
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=mp,
                )
            )
        step = self.conn.max_nodes_per_request
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            cparams = ua.CreateMonitoredItemsParameters(
                SubscriptionId=sub.subscription_id,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=chunk,
            )
            t = time.perf_counter()
            results = await self._guard(
                client.uaclient.create_monitored_items(cparams), "create monitored items"
            )
            self.ctx.stats.request_done(time.perf_counter() - t)
            for req, res in zip(chunk, results, strict=True):
                if not res.StatusCode.is_good():
                    bad[int(req.RequestedParameters.ClientHandle)] = res.StatusCode.name
        if bad:
            # Tags the server refused to monitor would otherwise just never report:
            # say so once, in the data, for each of them.
            for i, why in bad.items():
                self._log_unresolved(group.tags[i], why)
            conv = _Converted(len(bad))
            order = sorted(bad)
            for j, i in enumerate(order):
                conv.bad(j, bad[i])
            emit(conv.finish(sub._subset(tuple(order)), now_ns()))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return Reason.TIMEOUT
    if isinstance(exc, UaStatusCodeError):
        return ua.StatusCode(exc.code).name or Reason.COMM_ERROR
    return Reason.COMM_ERROR


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _password(conn: Connection) -> str:
    if conn.password is not None:
        return conn.password.get_secret_value()
    if conn.password_file is not None:
        try:
            return conn.password_file.read_text().splitlines()[0] if conn.password_file.stat().st_size else ""
        except OSError as exc:
            raise DeviceError("config_error", f"password_file {conn.password_file}: {exc.strerror}") from exc
    return ""
