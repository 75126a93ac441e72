"""Subscriptions (group ``mode: subscribe``): what the driver asks the server for, and
how the server's notifications become blocks.

One subscription per group; monitored items are created in batches of
``max_nodes_per_request`` so thousands of nodes work, with each group's sampling
interval, queue size, trigger and deadband. The driver consumes raw PublishResults (not
asyncua's per-item events) so a notification message stays one unit: **each
notification message becomes one Block holding only the tags that changed** (in group
order). Repeating unchanged values to fill a group-shaped block would forge readings the
server never sent, with a fresh acquisition time: not Original in the ALCOA+ sense. When
a message holds several samples of a tag (queue size > 1), the k-th samples of all tags
form the k-th block, so no block holds a tag twice and each tag's samples stay in time
order. The per-subset :class:`PollGroup` (which carries scale/offset/range) is built
once per distinct subset and cached. A node several tags read (the elements of an expanded
array) is monitored once; each of its notifications fills all of them.

Bulk decoding. asyncua decodes a publish response into a MonitoredItemNotification, a
DataValue, a Variant, a StatusCode and two datetimes per data change: two thirds of the CPU
time of a subscription. The driver's session (:class:`BulkSession`) leaves each
DataChangeNotification as its bytes and :func:`decode_changes` reads a whole message into
columns with one ``struct`` call per field, building no object per reading for the plain ones
(a good, finite, scalar number or boolean); anything else (a string, an array, a bad or
uncertain status, picoseconds) is handed to asyncua's decoder for that item, so it keeps
exactly the meaning it had. Reads use the same decoder (:meth:`BulkSession.read_values`).
What a message gets wrong is counted, never raised: an item of an unknown client handle
(``unknown_handle``), a message that breaks off (``decode_error``: the items before the
break are kept), a sample the server's queue dropped (``queue_overflow``, the DataValue's
overflow bit; the sample carrying it still arrives).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_session import UaSession
from asyncua.common.shortcuts import Shortcuts
from asyncua.common.utils import Buffer
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.ua_binary import (
    Primitives,
    extensionobject_from_binary,
    nodeid_from_binary,
    struct_from_binary,
    unpack_uatype_array,
)
from asyncua.ua.uaerrors import UaStructParsingError

from agent.core.driver import DriverStats, Emit, PollGroup
from agent.core.precision import shortest_float32_one
from agent.core.records import Reason, Value, now_ns
from agent.core.supervise import FailureLog
from drivers.opcua.config import Group
from drivers.opcua.values import Converted, shape

log = logging.getLogger("cleanroom.drivers.opcua")

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
_SUBSET_CACHE = 32
MAX_QUEUE_SIZE = 1000
"""Largest queue the driver sizes by itself (samples per monitored item kept by the server)."""
_INFO_TYPE_MASK, _INFO_DATA_VALUE = 0x0C00, 0x0400
"""StatusCode InfoType bits, and their value when the info bits describe a DataValue (OPC 10000-4, 7.39)."""
_OVERFLOW = 0x0080
"""The DataValue info bit a server sets when the item's queue dropped samples before this one."""


@dataclass(frozen=True)
class Timing:
    """A group's subscription timing, in seconds: what the driver asks the server for."""

    sampling: float
    publishing: float
    keepalive_count: int
    queue_size: int

    @classmethod
    def of(cls, spec: Group, interval_s: float, keepalive: float, timeout: float) -> Timing:
        """Sampling defaults to the group interval and publishing to sampling; the
        keep-alive count makes the server report at least every ``keepalive``.

        The queue, unless the group sets it, holds every sample of a publishing interval
        plus those of a publish late by up to ``timeout`` (the client's publish request
        still on its way, a busy server): with the one-sample queue of old, a publish a
        little late replaced a change by the next one, and 22 % of the changes of 1,000
        items sampled every 100 ms were lost. Bounded, so a tiny sampling interval cannot
        ask a server for unbounded memory."""
        sampling = spec.sampling_interval if spec.sampling_interval is not None else interval_s
        publishing = spec.publishing_interval if spec.publishing_interval is not None else sampling
        keepalive_count = max(1, math.ceil(max(keepalive, publishing) / max(publishing, 1e-3)))
        queue = spec.queue_size
        if queue is None:
            queue = min(math.ceil((publishing + timeout) / max(sampling, 1e-3)) + 1, MAX_QUEUE_SIZE)
        return cls(sampling, publishing, keepalive_count, queue)

    @property
    def keepalive_s(self) -> float:
        return self.keepalive_count * max(self.publishing, 1e-3)

    def parameters(self) -> ua.CreateSubscriptionParameters:
        return ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=self.publishing * 1000,
            RequestedLifetimeCount=self.keepalive_count * 10,
            RequestedMaxKeepAliveCount=self.keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )


def monitored_items(
    group: PollGroup, spec: Group, nodes: Mapping[str, ua.NodeId | str], timing: Timing
) -> tuple[list[ua.MonitoredItemCreateRequest], dict[int, str], dict[int, tuple[int, ...]]]:
    """One monitored item per resolved node (its client handle is the index in the group of
    the first tag reading it), the tags that could not be resolved, with why, and the tags
    each handle fills."""
    flt = None
    if spec.trigger != "status_value" or spec.deadband != "none":
        flt = ua.DataChangeFilter(
            Trigger=_TRIGGERS[spec.trigger],
            DeadbandType=int(_DEADBANDS[spec.deadband]),
            DeadbandValue=spec.deadband_value,
        )
    requests: list[ua.MonitoredItemCreateRequest] = []
    bad: dict[int, str] = {}
    by_node: dict[ua.NodeId, list[int]] = {}
    for i, tag in enumerate(group.tags):
        node = nodes.get(tag)
        if not isinstance(node, ua.NodeId):
            bad[i] = node or "BadNodeIdUnknown"
            continue
        by_node.setdefault(node, []).append(i)
    for node, indices in by_node.items():
        i = indices[0]
        mp = ua.MonitoringParameters(
            ClientHandle=i,
            SamplingInterval=timing.sampling * 1000,
            QueueSize=timing.queue_size,
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
    return requests, bad, {ix[0]: tuple(ix) for ix in by_node.values()}


def _overflowed(code: int) -> bool:
    return code & _INFO_TYPE_MASK == _INFO_DATA_VALUE and bool(code & _OVERFLOW)


# --------------------------------------------------------------------------- bulk decoding

_DATA_CHANGE = ua.FourByteNodeId(ua.Int32(ObjectIds.DataChangeNotification_Encoding_DefaultBinary))
_HAS_VALUE, _HAS_STATUS, _HAS_SOURCE_TS, _HAS_SERVER_TS, _HAS_PICOSECONDS = 0x01, 0x02, 0x04, 0x08, 0x30
"""DataValue encoding mask bits (OPC 10000-6, 5.2.2.17)."""
_SCALARS = {
    int(t): struct.Struct(f)
    for t, f in (
        (ua.VariantType.Boolean, "<?"),
        (ua.VariantType.SByte, "<b"),
        (ua.VariantType.Byte, "<B"),
        (ua.VariantType.Int16, "<h"),
        (ua.VariantType.UInt16, "<H"),
        (ua.VariantType.Int32, "<i"),
        (ua.VariantType.UInt32, "<I"),
        (ua.VariantType.Int64, "<q"),
        (ua.VariantType.UInt64, "<Q"),
        (ua.VariantType.Float, "<f"),
        (ua.VariantType.Double, "<d"),
    )
}
"""Variant encoding byte of a scalar (no array bits) → its wire format: the types read without
asyncua's objects."""
_FLOAT, _DOUBLE = int(ua.VariantType.Float), int(ua.VariantType.Double)
_ITEM_HEAD = struct.Struct("<IB")
_INT32, _UINT32, _INT64 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<q")
_EPOCH_US = 11_644_473_600 * 1_000_000
"""1601-01-01 (the wire's epoch) to 1970-01-01, in microseconds."""
_TS_MAX_NS = 2**63 - 1


@dataclass(frozen=True, slots=True)
class RawDataChanges:
    """A DataChangeNotification as it came off the wire: :func:`decode_changes` reads it."""

    body: bytes


@dataclass(slots=True)
class Changes:
    """One DataChangeNotification as columns, item by item in message order. An item that is
    a plain reading (a good, finite, scalar number or boolean: nearly all of them) is its
    value and source time; any other is the DataValue asyncua decodes, in ``full``, and goes
    through every quality rule of :class:`Converted`."""

    handles: list[int] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    """The reading of a plain item (a Float already at its shortest decimal); None for the others."""
    src: list[int | None] = field(default_factory=list)
    full: dict[int, ua.DataValue] = field(default_factory=dict)
    widened: dict[int, float] = field(default_factory=dict)
    """A plain Float item's value as sent (the raw value), where it differs from the reading."""
    overflows: int = 0
    malformed: bool = False
    """The message broke off: the items before the break are kept, the rest is lost (counted)."""

    def raw(self, p: int) -> Value:
        return self.widened.get(p, self.values[p])


def _ns(ticks: int) -> int | None:
    """A wire DateTime as nanoseconds since 1970, to the microsecond as asyncua reads it; None
    where :func:`~drivers.opcua.values.ts_ns` has none (before 1970, beyond 64-bit nanoseconds)."""
    ns = (ticks // 10 - _EPOCH_US) * 1000
    return ns if 0 <= ns <= _TS_MAX_NS else None


def _full_value(body: bytes, pos: int) -> tuple[ua.DataValue, int]:
    buf = Buffer(body, pos)
    dv = struct_from_binary(ua.DataValue, buf)
    return dv, buf.cur_pos


def decode_changes(body: bytes) -> Changes:
    """A DataChangeNotification's body as :class:`Changes`, without a Python object per item for
    the plain ones: asyncua would build a MonitoredItemNotification, DataValue, Variant,
    StatusCode and two datetimes for each, two thirds of the CPU time of a data change. Anything
    else (a string, an array, a bad status, picoseconds) is decoded by asyncua, so it keeps
    exactly the meaning it always had."""
    return _decode_values(body, True)


def decode_read_results(body: bytes) -> Changes:
    """A Read response's results (an array of DataValues) as :class:`Changes`, each result's
    handle its position; a response that broke off has fewer."""
    return _decode_values(body, False)


def _decode_values(body: bytes, notifications: bool) -> Changes:
    """An array of MonitoredItemNotifications (``notifications``) or of DataValues (a Read's
    results, whose handles are then their positions)."""
    ch = Changes()
    handles, values, src, full = ch.handles, ch.values, ch.src, ch.full
    scalars = _SCALARS
    try:
        (count,) = _INT32.unpack_from(body, 0)
        pos = 4
        for p in range(max(count, 0)):
            if notifications:
                handle, mask = _ITEM_HEAD.unpack_from(body, pos)
                start = pos + 4
            else:
                handle, mask, start = p, body[pos], pos
            fmt = scalars.get(body[start + 1]) if mask & _HAS_VALUE and not mask & _HAS_PICOSECONDS else None
            if fmt is None:
                dv, pos = _full_value(body, start)
                full[p] = dv
                handles.append(handle)
                values.append(None)
                src.append(None)
                status = dv.StatusCode
                if isinstance(status, ua.StatusCode) and isinstance(status.value, int):
                    ch.overflows += _overflowed(status.value)
                continue
            pos = start + 2
            (value,) = fmt.unpack_from(body, pos)
            pos += fmt.size
            code = 0
            if mask & _HAS_STATUS:
                (code,) = _UINT32.unpack_from(body, pos)
                pos += 4
                ch.overflows += _overflowed(code)
            when = None
            if mask & _HAS_SOURCE_TS:
                when = _ns(_INT64.unpack_from(body, pos)[0])
                pos += 8
            if mask & _HAS_SERVER_TS:
                if not when:
                    when = _ns(_INT64.unpack_from(body, pos)[0])
                pos += 8
            vtype = body[start + 1]
            if code >> 30 or (vtype >= _FLOAT and not math.isfinite(value)):
                full[p] = _full_value(body, start)[0]
                value = when = None
            elif vtype == _FLOAT:
                ch.widened[p] = value
                value = shortest_float32_one(value)
            handles.append(handle)
            values.append(value)
            src.append(when)
    except Exception:  # whatever a broken message makes the decoders raise: counted by the caller
        ch.malformed = True
    return ch


def changes_of(items: Sequence[ua.MonitoredItemNotification]) -> Changes:
    """Notifications asyncua decoded (the per-item path) as :class:`Changes`."""
    ch = Changes()
    for p, item in enumerate(items):
        ch.handles.append(int(item.ClientHandle))
        ch.values.append(None)
        ch.src.append(None)
        ch.full[p] = item.Value
        status = item.Value.StatusCode if isinstance(item.Value, ua.DataValue) else None
        if isinstance(status, ua.StatusCode) and isinstance(status.value, int):
            ch.overflows += _overflowed(status.value)
    return ch


def _notification(data: Buffer) -> object:
    """One NotificationData entry: a DataChangeNotification left as its bytes, anything else
    (events, status changes) decoded by asyncua."""
    probe = data.copy()
    if nodeid_from_binary(probe) == _DATA_CHANGE and Primitives.Byte.unpack(probe) == 1:
        length = Primitives.Int32.unpack(probe)
        if length >= 0:
            body = probe.read(length)
            data.skip(probe.cur_pos - data.cur_pos)
            return RawDataChanges(bytes(body))
    return extensionobject_from_binary(data)


def decode_publish_response(data: Buffer) -> ua.PublishResponse:
    """A PublishResponse as asyncua's decoder makes it, except that each DataChangeNotification
    stays a :class:`RawDataChanges` for :func:`decode_changes`."""
    nodeid_from_binary(data)  # the response's type: a fault never gets here
    header = struct_from_binary(ua.ResponseHeader, data)
    result = ua.PublishResult(SubscriptionId=Primitives.UInt32.unpack(data))
    result.AvailableSequenceNumbers = unpack_uatype_array(ua.VariantType.UInt32, data) or []
    result.MoreNotifications = Primitives.Boolean.unpack(data)
    message = result.NotificationMessage
    message.SequenceNumber = Primitives.UInt32.unpack(data)
    message.PublishTime = Primitives.DateTime.unpack(data)
    count = Primitives.Int32.unpack(data)
    message.NotificationData = [_notification(data) for _ in range(max(count, 0))]
    result.Results = unpack_uatype_array(ua.VariantType.StatusCode, data) or []
    result.DiagnosticInfos = unpack_uatype_array(ua.VariantType.DiagnosticInfo, data) or []
    return ua.PublishResponse(ResponseHeader=header, Parameters=result)


class BulkSession(UaSession):
    """asyncua's session, with publish responses decoded by :func:`decode_publish_response`,
    and Reads whose values come as :class:`Changes` (:meth:`read_values`)."""

    async def read_values(self, parameters: ua.ReadParameters) -> Changes:
        """asyncua's ``read``, the results decoded by :func:`decode_read_results`."""
        request = ua.ReadRequest()
        request.Parameters = parameters
        data = await self._send_request(request)
        nodeid_from_binary(data)  # the response's type: a fault never gets here
        struct_from_binary(ua.ResponseHeader, data).ServiceResult.check()
        return decode_read_results(data.read(len(data)))

    async def publish(self, acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await self._send_request(request, timeout=0)
        try:
            return decode_publish_response(data)
        except Exception as exc:  # as asyncua's own publish: the loop goes on with the next response
            self.logger.exception("Error parsing notification from server")
            raise UaStructParsingError from exc


def decode_in_bulk(client: Client) -> None:
    """Make a client (before it connects) hand data changes over as :class:`RawDataChanges` and
    offer :meth:`BulkSession.read_values`."""
    session = BulkSession(client.uaclient)
    client.uaclient.session = session
    client.nodes = Shortcuts(session)


class GroupSubscription:
    """One group's subscription: turns PublishResults into blocks and watches its pulse."""

    def __init__(
        self,
        group: PollGroup,
        emit: Emit,
        keepalive_s: float,
        *,
        link_lost: Callable[[str, str], None],
        stats: DriverStats,
        timeout_s: float,
        record_raw: bool = False,
    ) -> None:
        self.group = group
        self.emit = emit
        self.keepalive_s = keepalive_s
        self.subscription_id: int | None = None
        self.targets: dict[int, tuple[int, ...]] = {i: (i,) for i in range(len(group.tags))}
        """Client handle → the indices of the tags its node fills: each tag its own until
        :func:`monitored_items` says which tags share a node."""
        self.last_publish = time.monotonic()
        self._failures = FailureLog(log)
        """A handler bug repeats with every notification: logged once, then counted."""
        self._subsets: OrderedDict[tuple[int, ...], PollGroup] = OrderedDict()
        self._link_lost = link_lost
        self._stats = stats
        self._timeout_s = timeout_s
        self._record_raw = record_raw
        self._shapes = [shape(tag) for tag in group.tag_specs]
        """Each tag's (array spec, element), looked up once: per reading it is a pydantic private
        attribute read, a tenth of the driver's cost of a data change."""
        self._all_scalar = all(array is None for array, _ in self._shapes)
        """No array tag: plain readings go to the block as columns, without :class:`Converted`."""

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
                if isinstance(notification, RawDataChanges):
                    self._emit_changes(decode_changes(notification.body), acq)
                elif isinstance(notification, ua.DataChangeNotification):
                    self._emit_changes(changes_of(notification.MonitoredItems), acq)
                elif isinstance(notification, ua.StatusChangeNotification):
                    status = notification.Status
                    if not status.is_good():
                        self._link_lost(Reason.COMM_ERROR, f"subscription status {status.name}")
        except Exception as exc:
            self._failures.record(f"{self.group.device}/{self.group.name} notification handling", exc)
            self._link_lost("driver_error", repr(exc))

    def _emit_changes(self, ch: Changes, acq: int) -> None:
        """Layer k holds each tag's k-th sample of this message (a server lists an item's
        queued samples together), so every block has each tag at most once, in time order.
        A sample the server's queue dropped (overflow bit), an item of a handle this
        subscription never created and a message that broke off are counted, not raised."""
        stats = self._stats
        for _ in range(ch.overflows):
            stats.error("queue_overflow")
        if ch.malformed:
            stats.error(Reason.DECODE_ERROR)
        targets = self.targets
        layers: list[dict[int, int]] = []
        seen: dict[int, int] = {}
        for p, handle in enumerate(ch.handles):
            tags = targets.get(handle)
            if tags is None:
                stats.error("unknown_handle")
                continue
            k = seen.get(handle, 0)
            seen[handle] = k + 1
            if k == len(layers):
                layers.append({})
            layer = layers[k]
            for i in tags:
                layer[i] = p
        for layer in layers:
            self._emit_layer(ch, layer, acq)

    def _emit_layer(self, ch: Changes, layer: dict[int, int], acq: int) -> None:
        """One block of the tags in ``layer`` (tag index → item of ``ch``). Plain readings of
        scalar tags go to the block as the decoder's columns; anything else through
        :class:`Converted`'s rules."""
        indices = tuple(sorted(layer))
        items = [layer[i] for i in indices]
        group = self.subset(indices)
        if self._all_scalar and not ch.full:
            plain, when = ch.values, ch.src
            raw = [ch.raw(p) for p in items] if self._record_raw else None
            self.emit(
                group.finish(
                    [plain[p] for p in items],
                    acq_ts_ns=acq,
                    source_ts_ns=[when[p] for p in items],
                    device_raw=raw,
                )
            )
            return
        conv = Converted(len(indices))
        shapes = self._shapes
        full = ch.full
        for j, (i, p) in enumerate(zip(indices, items, strict=True)):
            dv = full.get(p)
            if dv is None:
                conv.set_plain(j, ch.values[p], ch.raw(p), ch.src[p], *shapes[i])
            else:
                conv.set(j, dv, *shapes[i])
        conv.count_shape_errors(self._stats)
        self.emit(conv.finish(group, acq, self._record_raw))

    def subset(self, indices: tuple[int, ...]) -> PollGroup:
        """The group of just these tags, cached: a group's changes fall into few distinct subsets."""
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
        return time.monotonic() - self.last_publish > 2 * self.keepalive_s + self._timeout_s
