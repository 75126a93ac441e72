"""Alarms & Conditions: the events of the profile's ``alarms.sources`` as ``alarm`` events.

One subscription per session holds one event monitored item per source object (its
EventNotifier attribute), with a fixed select list: the BaseEventType fields every server
sends (EventId, EventType, SourceName, SourceNode, Time, Message, Severity) and the
condition fields an alarm adds (ConditionName, the ConditionId, Retain, ActiveState/Id,
AckedState/Id). Each event becomes one :class:`~agent.core.records.Event` of kind ``alarm``.

Latency. The server collects the events of a publishing interval and sends them in one publish
response; the events of each response are handed to the buffer together, at once
(``ctx.submit_events``), whatever the device's poll intervals. So an alarm is committed within
``alarms.publishing_interval`` plus the buffer's ``commit_interval`` (1 s + 100 ms by default)
and the commit's own time of being raised, and a storm costs one submit per publishing
interval, of at most ``queue_size`` events per source (the server drops the oldest beyond).
The events travel the buffer like readings (committed, chained, then forwarded), never beside it.

Severity. OPC UA severities run 1–1000; the profile's ``warning_from`` and ``alarm_from``
(default 400 and 700) cut them into ``info``, ``warning`` and ``alarm``. An event whose
severity cannot be read is published as ``alarm``: an alarm nobody can rank must not be
filed as noise.

A server is a device like any other: an event field may be missing, null or of the wrong
type. Whatever can be read is kept, every field that could not is named in the event's
``decode_errors``, the device counts ``event_decode_error``, and the subscription goes on.

After every (re)connect the driver calls ConditionRefresh (unless ``refresh: false``): the
server sends the conditions still active or unacknowledged again, between a RefreshStart
and a RefreshEnd event, which the driver does not publish; events inside them carry
``refresh: true`` (the same ``event_id`` as when first raised, so a consumer can tell the
repeat). A server that does not notify RefreshStart/End on the subscribed sources (asyncua's
own server sends them from the Server object only) delivers them without the mark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from asyncua import ua
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds

from agent.core.driver import DriverStats
from agent.core.records import Event, Reason, Severity, now_ns
from agent.core.supervise import FailureLog
from drivers.opcua.config import Alarms
from drivers.opcua.values import ts_ns

log = logging.getLogger("cleanroom.drivers.opcua")

KIND = "alarm"
"""Kind of the events an OPC UA alarm becomes."""
EVENT_DECODE_ERROR = "event_decode_error"
"""Error kind counted for an event with a field that could not be read."""

_BASE, _CONDITION = ObjectIds.BaseEventType, ObjectIds.ConditionType
_ACKABLE, _ALARM = ObjectIds.AcknowledgeableConditionType, ObjectIds.AlarmConditionType
_REFRESH_START, _REFRESH_END = ObjectIds.RefreshStartEventType, ObjectIds.RefreshEndEventType

SELECT: tuple[tuple[str, int, str], ...] = (
    ("event_id", _BASE, "EventId"),
    ("event_type", _BASE, "EventType"),
    ("source", _BASE, "SourceName"),
    ("source_node", _BASE, "SourceNode"),
    ("time", _BASE, "Time"),
    ("message", _BASE, "Message"),
    ("severity_ua", _BASE, "Severity"),
    ("condition", _CONDITION, "ConditionName"),
    ("condition_id", _CONDITION, ""),
    ("retain", _CONDITION, "Retain"),
    ("active", _ALARM, "ActiveState/Id"),
    ("acked", _ACKABLE, "AckedState/Id"),
)
"""The event fields asked for, in order: (key in the event's data, the type that defines the
field, its browse path; empty for the ConditionId, which is the condition's NodeId attribute)."""
_REQUIRED = frozenset({"event_id", "event_type", "time", "severity_ua"})
"""BaseEventType fields every event has: null is a decode error. The others are null for an
event that is not a condition (or not an alarm)."""


def event_filter() -> ua.EventFilter:
    """The select clauses of :data:`SELECT`, no where clause: every event of the source."""
    clauses = []
    for _, type_id, path in SELECT:
        op = ua.SimpleAttributeOperand()
        op.TypeDefinitionId = ua.NodeId(ua.Int32(type_id))
        if path:
            op.BrowsePath = [ua.QualifiedName(name, 0) for name in path.split("/")]
            op.AttributeId = AttributeIds.Value
        else:
            op.AttributeId = AttributeIds.NodeId
        clauses.append(op)
    return ua.EventFilter(SelectClauses=clauses)


def severity_of(ua_severity: int | None, spec: Alarms) -> Severity:
    """The event's severity from the OPC UA one (1–1000); unknown is ``alarm``."""
    if ua_severity is None:
        return Severity.ALARM
    if ua_severity >= spec.alarm_from:
        return Severity.ALARM
    return Severity.WARNING if ua_severity >= spec.warning_from else Severity.INFO


def node_text(v: Any, namespaces: Sequence[str]) -> str:
    """A node id as text: a standard node by its name (``OffNormalAlarmType``), another in the
    ``nsu=`` form where the namespace is known, which survives the server renumbering its
    namespaces."""
    if not isinstance(v, ua.NodeId):
        raise TypeError
    if v.NamespaceIndex == 0 and isinstance(v.Identifier, int) and v.Identifier in ObjectIdNames:
        return ObjectIdNames[v.Identifier]
    text = str(v.to_string())
    if 0 < v.NamespaceIndex < len(namespaces) and text.startswith(f"ns={v.NamespaceIndex};"):
        return f"nsu={namespaces[v.NamespaceIndex]};{text.partition(';')[2]}"
    return text


def _text(v: Any) -> str | None:
    if isinstance(v, ua.LocalizedText):
        v = v.Text
    if v is None:
        return None
    if not isinstance(v, str):
        raise TypeError
    v.encode()  # lone surrogates cannot be stored: a decode error, not a broken commit
    return v


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def _severity(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
        raise TypeError
    return v


def _time(v: Any) -> int:
    ns = ts_ns(v) if isinstance(v, datetime) else None
    if ns is None:
        raise TypeError
    return ns


def _event_id(v: Any) -> str:
    if not isinstance(v, bytes) or not v:
        raise TypeError
    return v.hex()


_DECODE: dict[str, Callable[[Any], Any]] = {
    "event_id": _event_id,
    "source": _text,
    "time": _time,
    "message": _text,
    "severity_ua": _severity,
    "condition": _text,
    "retain": _flag,
    "active": _flag,
    "acked": _flag,
}
_NODE_KEYS = frozenset({"event_type", "source_node", "condition_id"})


def decode_fields(fields: Any, namespaces: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """The event's fields by :data:`SELECT` key, and the keys that could not be read (missing,
    of the wrong type, or null where every event has them); node ids in the ``nsu=`` form of
    the server's ``namespaces``. Never raises."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    given = list(fields) if isinstance(fields, list | tuple) else []
    if not isinstance(fields, list | tuple):
        problems.append("fields")
    for j, (key, _, _) in enumerate(SELECT):
        variant = given[j] if j < len(given) else None
        value = variant.Value if isinstance(variant, ua.Variant) else None
        data[key] = None
        if value is None:
            if key in _REQUIRED or not isinstance(variant, ua.Variant):
                problems.append(key)
            continue
        try:
            data[key] = node_text(value, namespaces) if key in _NODE_KEYS else _DECODE[key](value)
        except (TypeError, ValueError, UnicodeEncodeError, OverflowError):
            problems.append(key)
    return data, problems


def is_refresh_marker(event_type: ua.NodeId | None) -> int | None:
    """RefreshStartEventType or RefreshEndEventType when the event is one of them."""
    if (
        isinstance(event_type, ua.NodeId)
        and event_type.NamespaceIndex == 0
        and event_type.Identifier in (_REFRESH_START, _REFRESH_END)
    ):
        return int(event_type.Identifier)
    return None


class AlarmSubscription:
    """The session's event subscription: turns EventNotificationLists into ``alarm`` events
    and watches its pulse like a group's subscription."""

    def __init__(
        self,
        device: str,
        spec: Alarms,
        deliver: Callable[[list[Event]], None],
        keepalive_s: float,
        *,
        link_lost: Callable[[str, str], None],
        stats: DriverStats,
        timeout_s: float,
        namespaces: Sequence[str] = (),
    ) -> None:
        self.device = device
        self.spec = spec
        self.namespaces = namespaces
        """The server's namespace table at subscription time: node ids are published by URI."""
        self.keepalive_s = keepalive_s
        self.subscription_id: int | None = None
        self.last_publish = time.monotonic()
        self._deliver = deliver
        self._link_lost = link_lost
        self._stats = stats
        self._timeout_s = timeout_s
        self._refreshing = False
        self._failures = FailureLog(log)

    def on_publish(self, result: ua.PublishResult) -> None:
        """Publish-loop callback: the response's events delivered in one call; must not block,
        and a failure must reach the scheduler."""
        self.last_publish = time.monotonic()
        data = result.NotificationMessage.NotificationData
        if not data:
            return
        events: list[Event] = []
        try:
            try:
                for notification in data:
                    if isinstance(notification, ua.EventNotificationList):
                        for fields in notification.Events:
                            efl = fields.EventFields if isinstance(fields, ua.EventFieldList) else None
                            if (event := self.on_event(efl)) is not None:
                                events.append(event)
                    elif isinstance(notification, ua.StatusChangeNotification):
                        status = notification.Status
                        if not status.is_good():
                            self._link_lost(Reason.COMM_ERROR, f"event subscription status {status.name}")
            finally:
                if events:  # what was read before a failure is still committed
                    self._deliver(events)
        except Exception as exc:
            self._failures.record(f"{self.device} alarm handling", exc)
            self._link_lost("driver_error", repr(exc))

    def on_event(self, fields: Sequence[Any] | None) -> Event | None:
        """One event as an ``alarm`` event, or ``None`` for a refresh marker (noted, not published)."""
        raw_type = (
            fields[1].Value if fields and len(fields) > 1 and isinstance(fields[1], ua.Variant) else None
        )
        marker = is_refresh_marker(raw_type)
        if marker is not None:
            self._refreshing = marker == _REFRESH_START
            return None
        return self.event(fields)

    def event(self, fields: Sequence[Any] | None) -> Event:
        data, problems = decode_fields(fields, self.namespaces)
        data["refresh"] = self._refreshing
        if problems:
            data["decode_errors"] = problems
            self._stats.error(EVENT_DECODE_ERROR)
        return Event(self.device, KIND, severity_of(data["severity_ua"], self.spec), data, now_ns())

    def stale(self) -> bool:
        return time.monotonic() - self.last_publish > 2 * self.keepalive_s + self._timeout_s
