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
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from asyncua import ua
from asyncua.ua.attribute_ids import AttributeIds

from agent.core.driver import DriverStats, Emit, PollGroup
from agent.core.records import Reason, now_ns
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
                        self._link_lost(Reason.COMM_ERROR, f"subscription status {status.name}")
        except Exception as exc:
            self._failures.record(f"{self.group.device}/{self.group.name} notification handling", exc)
            self._link_lost("driver_error", repr(exc))

    def _emit_changes(self, items: Sequence[ua.MonitoredItemNotification], acq: int) -> None:
        """Layer k holds each tag's k-th sample of this message (a server lists an item's
        queued samples together), so every block has each tag at most once, in time order."""
        layers: list[dict[int, ua.DataValue]] = []
        seen: dict[int, int] = {}
        for item in items:
            handle = int(item.ClientHandle)
            targets = self.targets.get(handle)
            if targets is None:
                self._stats.error("unknown_handle")
                continue
            status = item.Value.StatusCode if isinstance(item.Value, ua.DataValue) else None
            if (
                isinstance(status, ua.StatusCode)
                and isinstance(status.value, int)
                and _overflowed(status.value)
            ):
                self._stats.error("queue_overflow")
            k = seen.get(handle, 0)
            seen[handle] = k + 1
            if k == len(layers):
                layers.append({})
            for i in targets:
                layers[k][i] = item.Value
        for layer in layers:
            self._emit_layer(layer, acq)

    def _emit_layer(self, layer: dict[int, ua.DataValue], acq: int) -> None:
        indices = tuple(sorted(layer))
        conv = Converted(len(indices))
        shapes = self._shapes
        for j, i in enumerate(indices):
            conv.set(j, layer[i], *shapes[i])
        conv.count_shape_errors(self._stats)
        self.emit(conv.finish(self.subset(indices), acq, self._record_raw))

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
