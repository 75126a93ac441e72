"""The Sparkplug B 3.0 edge node: the session rules around the payloads of :mod:`.codec`.

The agent is one edge node (``spBv1.0/<group>/<TYPE>/<edge node>``), each configured device one
of its devices (``.../<device>``). What the specification asks of a session, and where it is done:

* ``bdSeq``: 0 on the first MQTT connect of the process, +1 on every connect after (also the
  first of the edge node a reload rebuilt the forwarder with), wrapping at 256; the NDEATH set as
  the connection's will and the NBIRTH of that connection carry the same one, so a host matches a
  death to its birth. An attempt the broker never accepted (it was down) takes no number: the host
  sees the next session's bdSeq one above the death it saw.
* ``seq``: one counter for NBIRTH, NDATA, DBIRTH, DDATA and DDEATH, 0 to 255 and round again;
  every NBIRTH (also a rebirth) starts it at 0.
* Births before data: NBIRTH and a DBIRTH per device that is up, on connect (or when the primary
  host comes online), before any segment; an NCMD ``Node Control/Rebirth`` = true sends them
  again, in the same bdSeq.
* Devices: a ``device_state`` event ``disconnected`` in a device's events is followed by its
  DDEATH, ``connected`` is preceded by a DBIRTH, both in segment order. While a device is down its
  gap blocks (every reading bad: the scheduler's marks of the outage) are not sent as DDATA, which
  the specification forbids after a DDEATH; the DDEATH says what they say, the JSON segments
  (``publish_segments``) still carry them, and ``withheld_blocks`` counts them. A down device that
  reports anything else (an event, a good reading) is born again first.
* Primary host: with ``primary_host_id`` the node follows the retained ``spBv1.0/STATE/<host>``
  (``{"online": bool, "timestamp": ms}``) and sends births and data only while the host is online;
  the data waits in the buffer meanwhile. An ``offline`` at least as new as the last state seen
  ends the session (NDEATH, disconnect) and the next one waits for ``online`` again; an older
  one (stale: a retained message overtaken by events) is ignored.
* History: a segment committed before this session could publish carries ``is_historical`` on
  every metric, with the original timestamps; segments go in commit order, so live data always
  follows the backlog.
* Commands: the agent is read-only by design. An NCMD or DCMD that writes anything (all but a
  rebirth) is refused: counted, logged once per streak (topic and metric names, never values) and
  audited with the command's topic as the actor and ``read-only agent`` as the reason. A payload
  that is not Sparkplug is refused and counted, never an exception.
* QoS: births and data are published with QoS 1, not the specification's QoS 0, because nothing
  leaves the buffer before the broker acknowledged it (PUBACK); the NDEATH will is QoS 1, not
  retained, as the specification says.

Every message of a session carries that session's numbers, so a connection that ends gives its
unacknowledged segments back to the buffer to be encoded again in the next session
(``resend_after_reconnect = False``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import field_validator

from agent.buffer.audit import Auditor
from agent.buffer.rows import StoredSegment
from agent.core import chain
from agent.core.records import AGENT_DEVICE, now_ns
from agent.sinks.payload import Catalog, Encoder, Message, Reaction
from agent.sinks.sparkplug import codec
from cleanroom_common.fields import Strict

log = logging.getLogger("cleanroom.sparkplug")

NAMESPACE = "spBv1.0"
MAX_LOGGED_VALUE = 64
"""Characters of a refused command's value kept in its audit record."""


def _token(value: str | None, what: str) -> str | None:
    if value is not None and (not value or any(c in value for c in "+#/")):
        raise ValueError(
            f"{what} {value!r} must be non-empty without '+', '#' or '/' (a Sparkplug topic level)"
        )
    return value


class SparkplugConfig(Strict):
    """The ``mqtt.sparkplug:`` section: who this edge node is (``mqtt.payload: sparkplug_b``)."""

    group_id: str | None = None
    """The Sparkplug group this edge node belongs to (``spBv1.0/<group_id>/...``); required with
    ``payload: sparkplug_b``. No ``+``, ``#`` or ``/``."""
    edge_node_id: str | None = None
    """The edge node id in the topics; default: the agent id (``agent.id``). No ``+``, ``#`` or ``/``."""
    primary_host_id: str | None = None
    """The primary host application to follow (its ``spBv1.0/STATE/<id>``): births and data go out
    only while it is online, and wait in the buffer meanwhile. Unset: publish whenever connected."""

    @field_validator("group_id", "edge_node_id", "primary_host_id")
    @classmethod
    def _topic_token(cls, value: str | None) -> str | None:
        return _token(value, "the id")


def _text(value: Any) -> str:
    """A value from a command as text short enough for a log line or an audit record."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_LOGGED_VALUE else f"{text[:MAX_LOGGED_VALUE]}... ({len(text)} characters)"


class SparkplugEncoder(Encoder):
    """One edge node's Sparkplug session over the forwarder's MQTT connection."""

    name = "sparkplug_b"
    resend_after_reconnect = False

    def __init__(
        self,
        cfg: SparkplugConfig,
        catalog: Catalog,
        agent_id: str,
        auditor: Auditor | None = None,
        *,
        bd_seq: int = 0,
    ) -> None:
        """``bd_seq``: the bdSeq of the first connect, the :attr:`next_bd_seq` of the edge node this
        one replaces (a reload rebuilt the forwarder): the numbers count the process's connects."""
        if cfg.group_id is None:
            raise ValueError("mqtt.sparkplug.group_id is required with payload: sparkplug_b")
        self.group = cfg.group_id
        self.edge = cfg.edge_node_id or agent_id
        self.host = cfg.primary_host_id
        self.auditor = auditor
        self.node_specs = codec.node_metrics()
        self.device_specs = codec.catalog_metrics(catalog)
        self._tags = {device: list(tags) for device, tags in catalog.items()}
        """Each device's tags, with the value types learned from their readings."""
        self._relearned: set[tuple[str, str]] = set()
        self._bd_seq = bd_seq % 256
        """The bdSeq of the current (or last) connection attempt's will and birth."""
        self._bd_next = self._bd_seq
        """The bdSeq of the next attempt: one more once a connection was accepted. An attempt that
        never got a session (broker down) leaves no birth behind, so it takes no number."""
        self._seq = 0
        self._connected = False
        self._born = False
        """NBIRTH sent in this session."""
        self._born_devices: set[str] = set()
        self._down: set[str] = set()
        """Devices whose last ``device_state`` sent was ``disconnected``: no DBIRTH until they are back."""
        self._last: dict[str, dict[str, codec.Last]] = {}
        """Per device, the last value of each metric sent: what its next DBIRTH declares."""
        self._host_online = False
        self._host_ts = -1
        """Timestamp of the newest host STATE seen (ms); older ones are stale."""
        self._refusal_logged: tuple[str, tuple[str, ...]] | None = None
        self._counts = dict.fromkeys(
            ("births", "rebirths", "refused_commands", "malformed_commands", "withheld_blocks",
             "skipped_readings", "host_state_changes", "stale_host_states", "redeclared"), 0
        )  # fmt: skip

    # ------------------------------------------------------------------ topics and numbers

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.edge}"
        return base if device is None else f"{base}/{device}"

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    @property
    def bd_seq(self) -> int:
        return self._bd_seq

    @property
    def next_bd_seq(self) -> int:
        """The bdSeq the next connect takes: where a successor edge node goes on from."""
        return self._bd_next

    # ------------------------------------------------------------------ session

    def will(self, session: str) -> Message:
        self._bd_seq = self._bd_next
        return Message(
            self.topic("NDEATH"), codec.ndeath(bd_seq=self._bd_seq, ts_ms=_ms()), qos=1, retain=False
        )

    def subscriptions(self) -> list[str]:
        topics = [self.topic("NCMD"), self.topic("DCMD", "+")]
        if self.host is not None:
            topics.append(f"{NAMESPACE}/STATE/{self.host}")
        return topics

    def on_connect(self, session: str) -> list[Message]:
        self._connected = True
        self._bd_next = (self._bd_seq + 1) % 256
        if self.host is not None:
            return []  # births once the host's (retained) STATE says it is online
        return self._births()

    def on_disconnect(self) -> None:
        self._connected = False
        self._born = False
        self._born_devices.clear()
        self._host_online = False  # known again from the retained STATE of the next session

    def ready(self) -> bool:
        return self._born

    def on_clean_stop(self) -> list[Message]:
        """A clean DISCONNECT sends no will: the NDEATH goes out itself."""
        return [Message(self.topic("NDEATH"), codec.ndeath(bd_seq=self.bd_seq, ts_ms=_ms()), qos=1)]

    def _births(self) -> list[Message]:
        """NBIRTH (seq 0) and a DBIRTH per device that is up."""
        ts = _ms()
        self._seq = 0
        out = [
            Message(
                self.topic("NBIRTH"),
                codec.nbirth(bd_seq=self.bd_seq, seq=self._next_seq(), ts_ms=ts, specs=self.node_specs),
            )
        ]
        self._born = True
        self._born_devices.clear()
        for device in self.device_specs:
            if device not in self._down:
                out.append(self._dbirth(device, ts))
        self._counts["births"] += 1
        return out

    def _dbirth(self, device: str, ts: int) -> Message:
        specs = self._specs(device)
        self._born_devices.add(device)
        last = self._last.get(device, {})
        return Message(
            self.topic("DBIRTH", device), codec.dbirth(seq=self._next_seq(), ts_ms=ts, specs=specs, last=last)
        )

    def _specs(self, device: str) -> list[codec.MetricSpec]:
        specs = self.device_specs.get(device)
        if specs is None:
            # in the buffer from an earlier configuration: born with the fixed metrics only, so its
            # events still arrive (its readings are counted as skipped)
            first = max(
                (s.alias for all_ in self.device_specs.values() for s in all_), default=len(self.node_specs)
            )
            specs = codec.device_metrics([], first_alias=max(first, len(self.node_specs)) + 1)
            self.device_specs[device] = specs
        return specs

    # ------------------------------------------------------------------ incoming

    def on_message(self, topic: str, payload: bytes) -> Reaction:
        if self.host is not None and topic == f"{NAMESPACE}/STATE/{self.host}":
            return self._host_state(payload)
        if topic == self.topic("NCMD"):
            return self._command(topic, payload, None)
        prefix = self.topic("DCMD") + "/"
        if topic.startswith(prefix):
            return self._command(topic, payload, topic[len(prefix) :])
        return Reaction()

    def _host_state(self, payload: bytes) -> Reaction:
        try:
            doc = json.loads(payload)
            online, ts = doc["online"], doc["timestamp"]
            if not isinstance(online, bool) or type(ts) is not int:
                raise ValueError("online must be a boolean and timestamp an integer")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("primary host %s: STATE is not {\"online\": bool, \"timestamp\": ms} (%s); ignored",
                        self.host, str(exc)[:100])  # fmt: skip
            return Reaction()
        if ts < self._host_ts:
            self._counts["stale_host_states"] += 1
            return Reaction()
        self._host_ts = ts
        was, self._host_online = self._host_online, online
        if online and not was:
            self._counts["host_state_changes"] += 1
            log.info("primary host %s is online: edge node %s/%s births", self.host, self.group, self.edge)
            if self._connected and not self._born:
                return Reaction(publish=self._births())
        elif not online:
            if was:
                self._counts["host_state_changes"] += 1
            if self._born:
                log.warning(
                    "primary host %s went offline: ending the session, data waits in the buffer", self.host
                )
                ndeath = Message(self.topic("NDEATH"), codec.ndeath(bd_seq=self.bd_seq, ts_ms=_ms()), qos=1)
                self._born = False
                return Reaction(publish=[ndeath], reconnect=True)
        return Reaction()

    def _command(self, topic: str, payload: bytes, device: str | None) -> Reaction:
        try:
            decoded = codec.decode(payload)
        except codec.SparkplugDecodeError as exc:
            self._counts["malformed_commands"] += 1
            self._refuse_log(topic, ("malformed",), f"not a Sparkplug B payload: {str(exc)[:100]}")
            return Reaction()
        specs = self.node_specs if device is None else self.device_specs.get(device, [])
        writes = codec.command_writes(decoded, specs)
        out = Reaction()
        if device is None and codec.rebirth_requested(decoded):
            self._counts["rebirths"] += 1
            log.info("rebirth requested on %s", topic)
            if self._connected and (self.host is None or self._host_online):
                out.publish = self._births()
        if writes:
            self._refuse(topic, device, writes, decoded)
        return out

    def _refuse(self, topic: str, device: str | None, writes: list[str], decoded: codec.Decoded) -> None:
        self._counts["refused_commands"] += 1
        self._refuse_log(topic, tuple(writes), "the agent is read-only")
        if self.auditor is None:
            return
        values = {name: _text(m.value) for name, m in zip(writes, _write_metrics(decoded), strict=False)}
        self.auditor.record(
            "command_refused",
            f"{device or AGENT_DEVICE}: {', '.join(writes)}"[:200],
            actor=f"mqtt:{topic}",
            reason="read-only agent",
            device=device if device in self.device_specs else AGENT_DEVICE,  # (a topic names any device)
            new=values,
        )

    def _refuse_log(self, topic: str, names: tuple[str, ...], why: str) -> None:
        """Once per streak: the same refusal again is counted, not logged again."""
        key = (topic, names)
        if key != self._refusal_logged:
            self._refusal_logged = key
            # %r: names come from whoever can publish on the broker, a newline included
            log.warning("refused Sparkplug command on %s (%r): %s", topic, _text(", ".join(names)), why)

    # ------------------------------------------------------------------ segments

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        doc = chain.parse(seg.payload).doc
        ref = codec.segment_ref(seg.stream, seg.i, seg.hash)
        device = str(doc.get("device", seg.device))
        if device == AGENT_DEVICE:
            return self._data(None, doc, self.node_specs, ref, historical)
        out: list[Message] = []
        if "blocks" in doc:
            for block in doc.get("blocks") or []:
                if device in self._down and _all_bad(block):
                    self._counts["withheld_blocks"] += 1
                    continue
                if self._learn(device, block) and device in self._born_devices:
                    self._born_devices.discard(device)  # declared again, with the types its values have
                out += self._device_data(device, {**doc, "blocks": [block]}, ref, historical)
            return out
        for event in doc.get("events") or []:
            state = event.get("data", {}).get("state") if event.get("kind") == "device_state" else None
            if state == "connected":
                self._down.discard(device)
                self._born_devices.discard(device)  # born again, with the values it had
            out += self._device_data(device, {**doc, "events": [event]}, ref, historical)
            if state == "disconnected":
                self._down.add(device)
                self._born_devices.discard(device)
                out.append(
                    Message(self.topic("DDEATH", device), codec.ddeath(seq=self._next_seq(), ts_ms=_ms()))
                )
        return out

    def _learn(self, device: str, block: Mapping[str, Any]) -> bool:
        """Whether a reading's value has another type than its metric was declared with (an OPC UA
        node's type is not in its profile: it was declared ``float``): the metric takes the value's
        type, once per tag, and the device is declared again (a DBIRTH). A value of no Sparkplug
        type (an array) or a second change is left to the codec: null, ``type_mismatch``."""
        tags = self._tags.get(device)
        if tags is None:
            return False
        index = {t.name: k for k, t in enumerate(tags)}
        changed = False
        for name, value in zip(block.get("tags") or [], block.get("values") or [], strict=False):
            k = index.get(name)
            kind = _kind_of(value)
            if k is None or kind is None or _fits(tags[k].kind, kind) or (device, name) in self._relearned:
                continue
            self._relearned.add((device, name))
            tags[k] = dataclasses.replace(tags[k], kind=kind)
            self._last.get(device, {}).pop(name, None)
            changed = True
        if changed:
            first = self.device_specs[device][0].alias if self.device_specs.get(device) else None
            if first is not None:
                self.device_specs[device] = codec.device_metrics(tags, first_alias=first)
                self._counts["redeclared"] += 1
        return changed

    def _device_data(self, device: str, doc: Mapping[str, Any], ref: str, historical: bool) -> list[Message]:
        out = []
        if device not in self._born_devices:
            self._down.discard(device)  # it reports: it is up
            out.append(self._dbirth(device, _ms()))
        return out + self._data(device, doc, self._specs(device), ref, historical)

    def _data(
        self,
        device: str | None,
        doc: Mapping[str, Any],
        specs: list[codec.MetricSpec],
        ref: str,
        historical: bool,
    ) -> list[Message]:
        encoded = codec.data_from_segment(
            doc, specs=specs, seq_for=self._next_seq, segment_ref=ref, historical=historical, ts_ms=_ms()
        )
        if encoded.skipped:
            self._counts["skipped_readings"] += encoded.skipped
        if device is not None and encoded.last:
            self._last.setdefault(device, {}).update(encoded.last)
        topic = self.topic("NDATA") if device is None else self.topic("DDATA", device)
        return [Message(topic, p) for p in encoded.payloads]

    def stats(self) -> dict[str, Any]:
        return {"sparkplug": {**self._counts, "bd_seq": self.bd_seq, "host_online": self._host_online,
                              "born": self._born, "devices_down": sorted(self._down)}}  # fmt: skip


_REBIRTH_ALIAS = next(s.alias for s in codec.NODE_METRICS if s.name == codec.REBIRTH)


def _write_metrics(decoded: codec.Decoded) -> list[codec.DecodedMetric]:
    """The metrics :func:`codec.command_writes` names, in its order."""
    return [
        m
        for m in decoded.metrics
        if not (m.name == codec.REBIRTH or (m.name is None and m.alias == _REBIRTH_ALIAS))
    ]


def _kind_of(value: Any) -> str | None:
    """A reading's value as a ``TagInfo.kind``; None for null and what Sparkplug has no scalar for."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return None


def _fits(declared: str, kind: str) -> bool:
    """An integer fits a float metric (a Double holds it); anything else must be what was declared."""
    return declared == kind or (declared == "float" and kind == "int")


def _all_bad(block: Mapping[str, Any]) -> bool:
    quality = block.get("quality")
    return isinstance(quality, list) and bool(quality) and all(q != "good" for q in quality)


def _ms() -> int:
    return now_ns() // 1_000_000
