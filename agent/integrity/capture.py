"""Capture: what the agent publishes that ``verify --capture`` checks (its JSON segments and its
status), as one JSON line per message (docs/integrity.md).

The line holds only what any MQTT client sees (topic, payload, qos, retain, time received), so a
capture made with another tool and converted to this form verifies the same way: the proof lives
in the messages, not in this recorder. Each line is flushed as it is written, so a capture cut
short (power loss, kill) keeps every message received before the cut.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.sinks.forwarder import MqttConfig

log = logging.getLogger("cleanroom.capture")

RECONNECT_MAX_S = 2
"""Longest wait between the capture's own reconnect attempts: the broker keeps the capture's
session meanwhile, but a broker that restarts without persistence loses what it queued."""
SESSION_EXPIRY_S = 3600
"""How long an MQTT 5 broker keeps the capture's session while it is disconnected."""
RECENT_MAX = 10_000
"""Messages remembered to recognise the broker's own re-delivery to the capture."""


def capture_topics(prefix: str) -> tuple[str, ...]:
    """The topic filters of a capture: the JSON segments' topics (``{prefix}/{stream}``: a device's
    or the agent's data and events, the audit trail) and the agent's status (also the status topic
    of agents up to 0.2), exactly what verify checks. Anything else under the prefix is no segment
    (the ``flat`` messages published beside the segments, the batch commands sent to the agent):
    captured, each would be a ``malformed`` finding. The filters do not overlap, so a broker
    delivers each message once."""
    return (
        f"{prefix}/+/data",
        f"{prefix}/+/events",
        f"{prefix}/agent/audit",
        f"{prefix}/agent/status/+",
        f"{prefix}/agent/status",
    )


class CaptureError(Exception):
    """Bad input (a configuration, an unreachable or refusing broker, an unreadable capture file):
    reported as one line, exit code 2."""


@dataclass(frozen=True, slots=True)
class Captured:
    """One captured message. ``line`` is its 1-based line in the capture file, what a report cites."""

    line: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    time: float


def encode_line(topic: str, payload: bytes, qos: int, retain: bool, received: float) -> str:
    """The capture line of a message: the payload as text when it is UTF-8, else base64."""
    try:
        body: str | dict[str, str] = payload.decode("utf-8")
    except UnicodeDecodeError:
        body = {"base64": base64.b64encode(payload).decode("ascii")}
    line = {"topic": topic, "payload": body, "qos": qos, "retain": retain, "time": received}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_capture(path: Path) -> list[Captured]:
    """Every message of a capture file, in the order received; :class:`CaptureError` names the first
    line that is not in the capture form."""
    try:
        with path.open("rb") as f:
            return list(_parse_lines(f))
    except OSError as exc:
        raise CaptureError(f"{path}: {exc.strerror or exc}") from None


def _parse_lines(f: IO[bytes]) -> Iterator[Captured]:
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            yield _parse_line(number, raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CaptureError(f"line {number}: {exc}") from None


def _parse_line(number: int, raw: bytes) -> Captured:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("topic", "payload", "qos", "retain", "time") if k not in obj]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    topic, body, qos, retain, received = (obj[k] for k in ("topic", "payload", "qos", "retain", "time"))
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic is not a non-empty string")
    if isinstance(qos, bool) or qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    if not isinstance(retain, bool):
        raise ValueError(f"retain must be true or false, not {retain!r}")
    if isinstance(received, bool) or not isinstance(received, int | float):
        raise ValueError(f"time must be a number (seconds since the epoch), not {received!r}")
    return Captured(number, topic, _payload_bytes(body), qos, retain, float(received))


def _payload_bytes(body: Any) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, dict) and set(body) == {"base64"} and isinstance(body["base64"], str):
        try:
            return base64.b64decode(body["base64"], validate=True)
        except binascii.Error:
            raise ValueError("payload.base64 is not base64") from None
    raise ValueError('payload must be text or {"base64": "..."}')


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True, slots=True)
class CaptureResult:
    messages: int
    disconnects: int
    """Times the capture lost its broker connection (the broker queues for its session meanwhile)."""


class Recorder:
    """Subscribes to :func:`capture_topics` with the agent's broker settings and appends each
    message to ``out``. paho runs its network loop in its own thread; each line is written and
    flushed there, before the message is acknowledged, so an acknowledged message is in the file."""

    def __init__(self, cfg: MqttConfig, out: IO[str]) -> None:
        self.cfg = cfg
        self.out = out
        self.topics = capture_topics(cfg.topic_prefix)
        self.messages = 0
        self.disconnects = 0
        self.error: str | None = None
        self.failed = threading.Event()
        self._connack = threading.Event()
        self._refused: str | None = None
        self._subscribed = threading.Event()
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._v5 = cfg.protocol == "5"
        self.client_id = f"cleanroom-capture-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            password = cfg.resolve_password()
            context = cfg.tls.context() if cfg.tls.enabled else None
        except ValueError as exc:
            raise CaptureError(str(exc)) from None
        self._password, self._context = password, context
        self.client = self._make_client(clean=False)
        self.client.reconnect_delay_set(1, RECONNECT_MAX_S)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _make_client(self, *, clean: bool) -> mqtt.Client:
        """A persistent session (``clean`` False): while the capture reconnects, the broker queues
        what the agent publishes for it, so a network hiccup on the capture's side loses nothing."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self._v5 else clean,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.connect_timeout = self.cfg.connect_timeout
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self._context is not None:
            client.tls_set_context(self._context)
        return client

    @property
    def broker(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    @property
    def _named(self) -> str:
        return ", ".join(self.topics)

    def start(self) -> None:
        """Connect and subscribe; :class:`CaptureError` when the broker cannot be reached, refuses
        the connection or the subscription (nothing would be captured)."""
        try:
            if self._v5:
                expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                expiry.SessionExpiryInterval = SESSION_EXPIRY_S
                self.client.connect(self.cfg.host, self.cfg.port, int(self.cfg.keepalive),
                                    clean_start=MQTT_CLEAN_START_FIRST_ONLY, properties=expiry)  # fmt: skip
            else:
                self.client.connect(self.cfg.host, self.cfg.port, int(self.cfg.keepalive))
        except (OSError, ValueError) as exc:
            raise CaptureError(f"cannot connect to broker {self.broker}: {exc}") from None
        self.client.loop_start()
        wait_s = self.cfg.connect_timeout + 5.0
        if not self._connack.wait(wait_s):
            self.stop()
            raise CaptureError(f"broker {self.broker} did not answer the connection within {wait_s:g} s")
        if self._refused is not None:
            self.stop()
            raise CaptureError(f"broker {self.broker} refused the connection: {self._refused}")
        if not self._subscribed.wait(wait_s) or self.error is not None:
            self.stop()
            raise CaptureError(
                self.error or f"broker {self.broker} did not confirm the subscription to {self._named}"
            )
        log.info("capturing %s from %s", self._named, self.broker)

    def stop(self) -> None:
        """Disconnect and leave no session behind on the broker (it would queue messages forever)."""
        if self._v5:
            gone = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            gone.SessionExpiryInterval = 0
            self.client.disconnect(properties=gone)
            self.client.loop_stop()
            return
        self.client.disconnect()
        self.client.loop_stop()
        cleaner = self._make_client(clean=True)
        with contextlib.suppress(OSError, ValueError):
            cleaner.connect(self.cfg.host, self.cfg.port, int(self.cfg.keepalive))
            cleaner.loop_start()
            cleaner.disconnect()
            cleaner.loop_stop()

    def result(self) -> CaptureResult:
        return CaptureResult(self.messages, self.disconnects)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            if not self._connack.is_set():
                self._refused = str(reason)
                self._connack.set()
            else:
                log.error("broker %s refused the reconnection: %s", self.broker, reason)
            return
        if not flags.session_present:  # a kept session keeps its subscription (and its queue)
            client.subscribe([(topic, 1) for topic in self.topics])
        if self._connack.is_set():
            log.warning("reconnected to broker %s (session kept: %s)", self.broker, flags.session_present)
        self._connack.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = [f"{t} ({r})" for t, r in zip(self.topics, reasons, strict=False) if r.is_failure]
        if refused:
            self.error = f"broker {self.broker} refused the subscription to {', '.join(refused)}"
        self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.disconnects += 1
            log.warning(
                "lost the broker connection (%s): reconnecting; the broker queues for this capture "
                "meanwhile (what a broker restart without persistence drops shows as gaps)",
                reason,
            )

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.failed.is_set():
            return
        seen = hashlib.sha256(msg.topic.encode() + b"\0" + msg.payload).digest()
        if msg.dup and seen in self._recent:
            return  # the broker re-delivering to us what we stored before our PUBACK was lost
        self._recent[seen] = None
        if len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)
        line = encode_line(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.time())
        try:
            self.out.write(line)
            self.out.flush()
        except OSError as exc:
            self.error = f"cannot write the capture: {exc.strerror or exc}"
            self.failed.set()
            return
        self.messages += 1
