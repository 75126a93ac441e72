"""OPC UA client driver (asyncua): polling with one Read per group, or subscriptions.

The parts, one job each: :mod:`.config` (the tag, group and connection models),
:mod:`.security` (identity and secure channel), :mod:`.nodes` (node ids and their
resolution on the connected server), :mod:`.values` (DataValues as readings, quality
rules), :mod:`.subscription` (monitored items and notifications as blocks), :mod:`.alarms`
(Alarms & Conditions events as ``alarm`` events). This module owns the session:
connecting, reading, and knowing when the link is dead.

Alarm events and the buffer. The events of each publish response go to the buffer at once
(``ctx.submit_events``), not with the device's next block, so a 60 s group does not hold an
alarm 60 s, and a profile may subscribe to alarms only (``tags: []``). The event subscription's
pulse is watched by a task of its own (every ``keepalive``), so a dead link is noticed as soon
for an alarms-only device, or one with slow groups, as for a fast one.

Re-resolution. Every URI and browse path is resolved on each :meth:`OpcUaDriver.connect`
(the scheduler reconnects after any link loss), and a Read that answers
``BadNodeIdUnknown`` re-resolves and retries (at most once per ``_RERESOLVE_S``, so a tag
that is simply wrong does not double every poll), so a server that reloaded its address
space never leaves tags stuck on a stale mapping.

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
import contextlib
import logging
import math
import time
from typing import Any, ClassVar, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from agent.core.driver import (
    IDENTITY_UNAVAILABLE,
    ConnectionBase,
    DeviceContext,
    DeviceError,
    DeviceIdentity,
    Driver,
    Emit,
    GroupSpec,
    PollGroup,
    ProfileBase,
    TagBase,
)
from agent.core.records import Block, Reason, now_ns
from agent.core.supervise import Supervised
from drivers.opcua.alarms import AlarmSubscription, event_filter
from drivers.opcua.config import Alarms, ArraySpec, Connection, Group, Identity, Profile, Tag
from drivers.opcua.logs import tame_asyncua_logs
from drivers.opcua.nodes import NodeRef, resolve_nodes
from drivers.opcua.security import ServerCheck, configure_identity
from drivers.opcua.subscription import (
    BulkSession,
    Changes,
    GroupSubscription,
    Timing,
    decode_in_bulk,
    monitored_items,
)
from drivers.opcua.values import Converted, identity_value, shape

log = logging.getLogger("cleanroom.drivers.opcua")

_LINK_ERRORS = (OSError, TimeoutError, UaError)
"""What asyncua raises when the link, the session or the secure channel is gone."""
_RERESOLVE_S = 30.0
_BUILD_INFO = {
    "model": ObjectIds.Server_ServerStatus_BuildInfo_ProductName,
    "vendor": ObjectIds.Server_ServerStatus_BuildInfo_ManufacturerName,
    "firmware": ObjectIds.Server_ServerStatus_BuildInfo_SoftwareVersion,
    "build": ObjectIds.Server_ServerStatus_BuildInfo_BuildNumber,
}
"""Identity field → the Server object's BuildInfo variable that reports it (the build number
is appended to the software version)."""
ALARM_SOURCE_UNAVAILABLE = "alarm_source_unavailable"
"""Error kind counted when an alarm source cannot be resolved or subscribed on a connect."""
CONDITION_REFRESH_FAILED = "condition_refresh_failed"
"""Error kind counted when the server refused ConditionRefresh."""


class OpcUaDriver(Driver):
    """OPC UA client for one server (one session)."""

    protocol: ClassVar[str] = "opcua"
    Tag: ClassVar[type[TagBase]] = Tag
    Group: ClassVar[type[GroupSpec]] = Group
    Connection: ClassVar[type[ConnectionBase]] = Connection
    Profile: ClassVar[type[ProfileBase]] = Profile
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
        self._subs: dict[str, GroupSubscription] = {}
        self._unresolved_logged: set[str] = set()
        self._identity_logged = False
        alarms = ctx.profile.alarms if isinstance(ctx.profile, Profile) else None
        self._alarm_spec: Alarms | None = alarms
        self._alarm_refs = {s: NodeRef.parse(s) for s in alarms.sources} if alarms is not None else {}
        self._alarms: AlarmSubscription | None = None
        self._alarm_watch: Supervised | None = None
        self._logged_once: set[str] = set()
        self._shapes: dict[str, tuple[PollGroup, list[tuple[ArraySpec | None, int | None]]]] = {}
        """Each polled group's tag shapes (see :func:`shape`), looked up once per group object."""
        self.bulk_decode = True
        """Data changes and Read results decoded straight into columns (:func:`decode_in_bulk`);
        False leaves every value to asyncua's objects, the path the subscription bench compares
        against."""
        if self.conn.security_policy == "None":
            warning = (
                f"security_policy None: the session to {self.conn.url} is unsigned and unencrypted "
                "(anyone on that network can read and forge its values)"
            )
            log.warning("%s: %s", ctx.id, warning)
            ctx.stats.warnings.append(warning)

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        self._lost = None
        self._subs.clear()
        tame_asyncua_logs()
        client = Client(self.conn.url, timeout=self.conn.timeout, watchdog_intervall=self.conn.keepalive)
        client.session_timeout = int(self.conn.session_timeout * 1000)
        client.name = client.description = f"cleanroom-edge {self.ctx.id}"
        client.connection_lost_callback = self._on_connection_lost
        if self.bulk_decode:
            decode_in_bulk(client)
        check: ServerCheck | None = None
        try:
            check = await configure_identity(client, self.conn)
            await client.connect(auto_reconnect=False)
        except DeviceError:
            await self._close_client(client)
            raise
        except Exception as exc:  # whatever the stack raises while connecting is the device's failure
            await self._close_client(client)
            raise connect_failure(exc, self.conn, check) from exc
        self._client = client
        try:
            await self._resolve()
        except Exception as exc:
            await self.close()
            raise DeviceError(_reason(exc), f"resolving node ids: {_describe(exc)}") from exc
        self.ctx.identify(await self._read_identity(client))
        if self._alarm_spec is not None:
            await self._subscribe_alarms(client, self._alarm_spec)
        log.info(
            "%s: connected to %s (%s, %s)",
            self.ctx.id,
            self.conn.url,
            self.conn.security_policy,
            self.conn.security_mode,
        )

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
        self._alarms = None
        watch, self._alarm_watch = self._alarm_watch, None
        if watch is not None:
            watch.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch.task
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
        self._nodes = await resolve_nodes(
            self._require_client(), self._refs, self.conn.max_nodes_per_request, self._log_unresolved
        )
        self._resolved_at = time.monotonic()

    async def _read_identity(self, client: Client) -> DeviceIdentity:
        """The device's identity, in one Read within one timeout: the profile's identity tags,
        and the server's BuildInfo for the fields they leave open (unless the profile says
        ``build_info: false``). A device that cannot say who it is still measures: whatever
        fails leaves its field unknown, counted (``identity_unavailable``) and logged once per
        driver, and never fails the connect."""
        spec = self.ctx.profile.identity
        named = spec.named() if spec is not None else {}
        wanted: list[tuple[str, ua.NodeId]] = []
        problems: list[str] = []
        for key, tag in named.items():
            node = self._nodes.get(tag)
            if isinstance(node, ua.NodeId):
                wanted.append((key, node))
            else:
                problems.append(f"{key}: tag {tag} {node}")
        if not isinstance(spec, Identity) or spec.build_info:
            open_keys = [
                k for k in _BUILD_INFO if k not in named and not (k == "build" and "firmware" in named)
            ]
            wanted += [(k, ua.NodeId(ua.Int32(_BUILD_INFO[k]))) for k in open_keys]
        found: dict[str, str] = {}
        if wanted:
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Neither,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=AttributeIds.Value) for _, n in wanted],
            )
            values: list[Any] = []
            try:
                values = list(await asyncio.wait_for(client.uaclient.read(params), self.conn.timeout))
            except Exception as exc:  # whatever the stack raises: identity never fails the device
                problems.append(f"read: {_describe(exc)}")
            if values and len(values) != len(wanted):
                problems.append(f"{len(values)} values for {len(wanted)} identity nodes")
                values = []
            for (key, _), dv in zip(wanted, values, strict=False):
                text = identity_value(dv)
                if text is not None:
                    found[key] = text
                elif key != "build":  # a server may leave its build number empty
                    problems.append(f"{key}: no usable value")
        build = found.pop("build", None)
        if build and "firmware" in found and build != found["firmware"]:
            found["firmware"] = f"{found['firmware']} (build {build})"
        if problems:
            self.ctx.stats.error(IDENTITY_UNAVAILABLE)
            if not self._identity_logged:
                self._identity_logged = True
                log.warning("%s: device identity incomplete (%s)", self.ctx.id, "; ".join(problems))
        return DeviceIdentity(**found)

    def _log_unresolved(self, tag: str, why: str) -> None:
        if tag not in self._unresolved_logged:
            self._unresolved_logged.add(tag)
            log.warning("%s: tag %s (%s) not resolved: %s", self.ctx.id, tag, self._refs[tag].text, why)

    def _require_client(self) -> Client:
        if self._client is None:
            raise DeviceError(Reason.NOT_CONNECTED, "not connected")
        return self._client

    def _check_link(self) -> Client:
        client = self._require_client()
        if self._alarms is not None and self._alarms.stale():
            self.link_lost(
                Reason.TIMEOUT, f"event subscription silent for {self._alarms.keepalive_s * 2:.1f}s"
            )
        if self._lost is not None:
            raise self._lost
        return client

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged_once:
            self._logged_once.add(key)
            log.warning(message, *args)

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
        conv.count_shape_errors(self.ctx.stats)
        return [conv.finish(group, acq, self.ctx.record_raw)]

    async def _read_values(self, client: Client, group: PollGroup) -> Converted:
        conv = Converted(len(group.tags))
        shapes = self._shapes_of(group)
        by_node: dict[ua.NodeId, list[int]] = {}
        for i, tag in enumerate(group.tags):
            node = self._nodes.get(tag)
            if isinstance(node, ua.NodeId):
                by_node.setdefault(node, []).append(i)  # an expanded array's elements: one node
            else:
                conv.bad(i, node or "BadNodeIdUnknown")
        wanted = [(indices, node) for node, indices in by_node.items()]
        step = self.conn.max_nodes_per_request
        for start in range(0, len(wanted), step):
            chunk = wanted[start : start + step]
            params = ua.ReadParameters(
                MaxAge=0,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                NodesToRead=[ua.ReadValueId(NodeId=n, AttributeId=AttributeIds.Value) for _, n in chunk],
            )
            t = time.perf_counter()
            session = client.uaclient.session
            values: Changes | list[ua.DataValue]
            if isinstance(session, BulkSession):
                columns: Changes = await self._guard(session.read_values(params), "read")
                values, answered = columns, len(columns.handles)
            else:
                objects: list[ua.DataValue] = await self._guard(client.uaclient.read(params), "read")
                values, answered = objects, len(objects)
            self.ctx.stats.request_done(time.perf_counter() - t)
            if answered != len(chunk):
                self.ctx.stats.error(Reason.DECODE_ERROR)
                for indices, _ in chunk:
                    for i in indices:
                        conv.bad(i, Reason.DECODE_ERROR)
                continue
            if isinstance(values, Changes):
                full = values.full
                for p, (indices, _) in enumerate(chunk):
                    dv = full.get(p)
                    for i in indices:
                        if dv is None:
                            conv.set_plain(i, values.values[p], values.raw(p), values.src[p], *shapes[i])
                        else:
                            conv.set(i, dv, *shapes[i])
                continue
            for (indices, _), dv in zip(chunk, values, strict=True):
                for i in indices:
                    conv.set(i, dv, *shapes[i])
        return conv

    def _shapes_of(self, group: PollGroup) -> list[tuple[ArraySpec | None, int | None]]:
        cached = self._shapes.get(group.name)
        if cached is None or cached[0] is not group:
            cached = self._shapes[group.name] = (group, [shape(tag) for tag in group.tag_specs])
        return cached[1]

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
        timing = Timing.of(spec, group.interval_s, self.conn.keepalive, self.conn.timeout)
        sub = GroupSubscription(
            group,
            emit,
            timing.keepalive_s,
            link_lost=self.link_lost,
            stats=self.ctx.stats,
            timeout_s=self.conn.timeout,
            record_raw=self.ctx.record_raw,
        )
        result = await self._guard(
            client.uaclient.create_subscription(timing.parameters(), sub.on_publish), "create subscription"
        )
        sub.subscription_id = result.SubscriptionId
        sub.keepalive_s = result.RevisedMaxKeepAliveCount * result.RevisedPublishingInterval / 1000
        self._subs[group.name] = sub
        requests, bad, sub.targets = monitored_items(group, spec, self._nodes, timing)
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
                    for i in sub.targets[int(req.RequestedParameters.ClientHandle)]:
                        bad[i] = res.StatusCode.name
        if bad:
            # Tags the server refused to monitor would otherwise just never report:
            # say so once, in the data, for each of them.
            for i, why in bad.items():
                self._log_unresolved(group.tags[i], why)
            conv = Converted(len(bad))
            order = sorted(bad)
            for j, i in enumerate(order):
                conv.bad(j, bad[i])
            emit(conv.finish(sub.subset(tuple(order)), now_ns()))

    # ------------------------------------------------------------------ alarms

    async def _subscribe_alarms(self, client: Client, spec: Alarms) -> None:
        """The event subscription of this session, then ConditionRefresh. A source that cannot
        be resolved or subscribed is logged once and counted (``alarm_source_unavailable``);
        the device still measures and the other sources still report."""
        namespaces = await self._guard(client.get_namespace_array(), "read the namespace table")
        nodes = await self._guard(
            resolve_nodes(
                client,
                self._alarm_refs,
                self.conn.max_nodes_per_request,
                self._source_unavailable,
                namespaces,
            ),
            "resolve alarm sources",
        )
        sources = [(text, node) for text, node in nodes.items() if isinstance(node, ua.NodeId)]
        if not sources:
            return
        keepalive = max(
            1, math.ceil(max(self.conn.keepalive, spec.publishing_interval) / spec.publishing_interval)
        )
        timing = Timing(0.0, spec.publishing_interval, keepalive, spec.queue_size)
        alarms = AlarmSubscription(
            self.ctx.id,
            spec,
            self.ctx.submit_events,
            timing.keepalive_s,
            link_lost=self.link_lost,
            stats=self.ctx.stats,
            timeout_s=self.conn.timeout,
            namespaces=namespaces,
        )
        result = await self._guard(
            client.uaclient.create_subscription(timing.parameters(), alarms.on_publish),
            "create event subscription",
        )
        alarms.subscription_id = result.SubscriptionId
        alarms.keepalive_s = result.RevisedMaxKeepAliveCount * result.RevisedPublishingInterval / 1000
        self._alarms = alarms
        self._alarm_watch = self.ctx.tasks.spawn(f"alarms:{self.ctx.id}", self._watch_alarms, restart=False)
        flt = event_filter()
        items = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.EventNotifier),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=j,
                    SamplingInterval=0,
                    QueueSize=spec.queue_size,
                    DiscardOldest=True,
                    Filter=flt,
                ),
            )
            for j, (_, node) in enumerate(sources)
        ]
        results = await self._guard(
            client.uaclient.create_monitored_items(
                ua.CreateMonitoredItemsParameters(
                    SubscriptionId=alarms.subscription_id,
                    TimestampsToReturn=ua.TimestampsToReturn.Neither,
                    ItemsToCreate=items,
                )
            ),
            "create event monitored items",
        )
        for (text, _), res in zip(sources, results, strict=True):
            if not res.StatusCode.is_good():
                self._source_unavailable(text, res.StatusCode.name)
        if spec.refresh:
            await self._condition_refresh(client, alarms.subscription_id)

    async def _watch_alarms(self) -> None:
        """Raise (through ``ctx.tasks``, to the scheduler) once the link or the event subscription
        is dead: no group's poll may come to notice it for a long time, or ever (alarms only)."""
        while True:
            await asyncio.sleep(self.conn.keepalive)
            self._check_link()

    async def _condition_refresh(self, client: Client, subscription_id: int) -> None:
        request = ua.CallMethodRequest(
            ObjectId=ua.NodeId(ua.Int32(ObjectIds.ConditionType)),
            MethodId=ua.NodeId(ua.Int32(ObjectIds.ConditionType_ConditionRefresh)),
            InputArguments=[ua.Variant(subscription_id, ua.VariantType.UInt32)],
        )
        results = await self._guard(_refresh_call(client, request), "ConditionRefresh")
        if isinstance(results, str):
            self._refresh_failed(results)
            return
        status = results[0].StatusCode if results else None
        if not isinstance(status, ua.StatusCode) or not status.is_good():
            self._refresh_failed(status.name if isinstance(status, ua.StatusCode) else "no result")

    def _refresh_failed(self, why: str) -> None:
        self.ctx.stats.error(CONDITION_REFRESH_FAILED)
        self._log_once(
            "refresh",
            "%s: ConditionRefresh refused (%s): alarms raised while disconnected arrive when they change",
            self.ctx.id,
            why,
        )

    def _source_unavailable(self, source: str, why: str) -> None:
        self.ctx.stats.error(ALARM_SOURCE_UNAVAILABLE)
        self._log_once(f"source:{source}", "%s: alarm source %s not subscribed: %s", self.ctx.id, source, why)


CERTIFICATE_REJECTED = "certificate_rejected"
"""Reason of a connect the server refused because it does not trust the agent's certificate."""


def connect_failure(exc: Exception, conn: Connection, check: ServerCheck | None) -> DeviceError:
    """What went wrong while connecting, said so that someone can act on it.

    A server that does not trust the agent's certificate answers the secure channel or the
    session with a certificate status (``BadSecurityChecksFailed``, ``BadCertificate*``), or,
    when it answers OpenSecureChannel with a fault, makes asyncua fail an internal assertion:
    on a secured connection, either means the certificate must be trusted on the server.
    """
    where = f"connect {conn.url}"
    if check is not None and check.rejected is not None:
        return DeviceError(
            check.rejected,
            f"{where}: the server's certificate is not trusted: add it to trust_dir {conn.trust_dir} "
            f"if it is the right server ({check.rejected})",
        )
    status = ua.StatusCode(exc.code).name if isinstance(exc, UaStatusCodeError) else None
    refused_channel = isinstance(exc, AssertionError)
    if conn.security_policy != "None" and (
        refused_channel or (status is not None and _is_certificate_status(status))
    ):
        why = status or "secure channel refused"
        return DeviceError(
            CERTIFICATE_REJECTED,
            f"{where}: server rejected the client certificate: "
            f"trust {conn.certificate} on the server ({why})",
        )
    if refused_channel:
        return DeviceError(Reason.COMM_ERROR, f"{where}: the server refused the secure channel")
    return DeviceError(_reason(exc), f"{where}: {_describe(exc)}")


async def _refresh_call(client: Client, request: ua.CallMethodRequest) -> list[ua.CallMethodResult] | str:
    """ConditionRefresh's results, or why the server refused the call itself (a server without
    the Call service answers with a service fault): a refusal is not a dead link, alarms still flow."""
    try:
        return await client.uaclient.call([request])
    except UaStatusCodeError as exc:
        return _describe(exc)


def _is_certificate_status(name: str) -> bool:
    return name.startswith("BadCertificate") or name == "BadSecurityChecksFailed"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return Reason.TIMEOUT
    if isinstance(exc, UaStatusCodeError):
        return ua.StatusCode(exc.code).name or Reason.COMM_ERROR
    return Reason.COMM_ERROR


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
