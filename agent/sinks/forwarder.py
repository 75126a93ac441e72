"""The MQTT forwarder: the MQTT session that publishes committed segments and releases them only
on PUBACK, whatever the payload format.

What a segment becomes on the wire is its encoder's business (agent/sinks/payload.py): ``json``
publishes the stored segment byte for byte (agent/sinks/json_segments.py), ``flat`` one message
per device sample (agent/sinks/flat.py), ``sparkplug_b`` a Sparkplug B edge node's messages
(agent/sinks/sparkplug/session.py). The forwarder owns what every format shares: the connection,
the in-flight window, acknowledgements and the delivery marks in the buffer.

Delivery is at-least-once with a bounded duplicate window: a segment is marked delivered in the
buffer only when the broker acknowledged (QoS 1) every message that carried it (in the buffer's next
commit: a crash before it re-sends the segment, never loses it); the window counts segments. When
the connection drops, what is in flight is either re-sent by paho, in order, after the reconnect
(``json``, ``flat``: paho's session queue keeps it), or, for a format whose messages carry
per-session numbers (Sparkplug's ``seq``), given back to the buffer and encoded again in the next
session, on a fresh paho client, so no old-session message follows the new session's first ones.
Segments not yet fetched stay in the buffer.

paho has no thread of its own here: its socket is watched by the agent's event loop, which
reads it when the broker sent something, writes it only while paho has bytes to send, and
runs paho's timers (keepalive) once a second. A thread cost a share of a core at plant scale,
and every acknowledgement crossed into the loop through a wake-up; on the loop, paho's
callbacks are the forwarder's own code and touch its state directly, in the order paho calls
them (a re-sending encoder's first messages, e.g. ``online``, are published from the connect
callback, the only place that comes before paho's re-sends). Only the connection attempt
(DNS, TCP, TLS handshake) runs in a worker thread: it blocks. A callback that raises leaves
paho's reading half done, so the connection is dropped (the broker publishes the will) and
made again, as after any loss. The forwarder owns reconnecting (exponential backoff with
jitter): paho's own reconnect is off, because its delay has no jitter and a plant full of
gateways would reconnect in lock-step after a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.buffer.rows import StoredSegment
from agent.core.backoff import backoff_delay
from agent.core.records import Block, Event
from agent.core.supervise import Supervisor
from agent.sinks.flat import FlatConfig, FlatEncoder
from agent.sinks.json_segments import JsonSegmentsEncoder
from agent.sinks.payload import AgentIdentity as AgentIdentity  # noqa: PLC0414 (app, tests import it from here)
from agent.sinks.payload import Catalog, Encoder, Message, Reaction
from agent.sinks.sparkplug.session import SparkplugConfig, SparkplugEncoder
from cleanroom_common.fields import ConfigPath, Duration, Strict, read_secret_file
from cleanroom_common.net import is_loopback_host

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = logging.getLogger("cleanroom.forwarder")

RESCAN_INTERVAL_S = 10.0
"""When idle, look for undelivered segments behind the cursor this often (a broker-rejected message,
or a ``buffer replay`` run while the agent is running)."""
REMOVED_KEYS = {
    "flush_interval": "flush_interval was removed: each segment is published as soon as it is "
    "committed, so buffer.commit_interval bounds the latency",
    "flush_max_readings": "flush_max_readings was replaced by buffer.segment_max_readings "
    "(readings per segment, which is one message)",
}
"""Keys older configurations have, and what replaced them."""

CommandHandler = Callable[[str, bytes, bool], None]
"""What handles messages on a command topic (:meth:`Forwarder.add_command_handler`): called on the
event loop with the topic, the payload and whether the broker delivered it as a retained message
(a stale command, replayed at every subscription)."""


TlsMode = Literal["on", "unverified", "off", "loopback"]
"""How the broker connection is protected, as ``status`` shows it: ``on`` (TLS, broker certificate
verified), ``unverified`` (TLS without the check), ``off`` (plain MQTT leaving this machine),
``loopback`` (plain MQTT to a broker on this machine)."""


class _KeyPasswordMissing(Exception):
    pass


def _no_key_password() -> str:
    """Asked for an encrypted key without ``key_password``: OpenSSL's default would prompt on the
    terminal (``run`` or ``validate`` from a shell waits for it) or fail with a bare EINVAL."""
    raise _KeyPasswordMissing


class TlsConfig(Strict):
    """TLS to the broker."""

    enabled: bool | None = None
    """Connect with TLS (brokers usually listen for it on port 8883). Unset: plain MQTT to a broker on
    loopback (``127.0.0.0/8``, ``::1``, ``localhost``), and a validation error for any other host, which
    needs ``true``, or ``false`` written out to send readings and the password in clear text (then every
    start logs a warning and ``status`` shows it)."""
    ca_file: ConfigPath | None = None
    """PEM bundle of the CA(s) that sign the broker certificate; without it the system store is used."""
    cert_file: ConfigPath | None = None
    """PEM client certificate, for brokers that authenticate clients by certificate."""
    key_file: ConfigPath | None = None
    """PEM private key of ``cert_file`` (may be in ``cert_file`` itself)."""
    key_password: SecretStr | None = None
    """Passphrase of an encrypted private key (write ``${ENV_VAR}`` to take it from the environment);
    never logged or echoed."""
    verify: bool = True
    """Verify the broker certificate chain and host name. Turning it off allows a man in the middle to
    read and alter every reading: for commissioning only (every start logs a warning and ``status``
    shows it)."""

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file given without cert_file")
        if self.key_password is not None and self.cert_file is None:
            raise ValueError("key_password given without cert_file")
        if self.enabled and all(p.exists() for p in (self.ca_file, self.cert_file, self.key_file) if p):
            self.context()  # what run would fail on, found by validate (missing files are reported apart)
        return self

    def context(self) -> ssl.SSLContext:
        """Verification on unless explicitly turned off; a file that cannot be loaded is a
        ``ValueError`` that never echoes the key password."""
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load certificates: tls.ca_file: {exc}") from None
        try:
            if self.cert_file is not None:
                ctx.load_cert_chain(
                    str(self.cert_file),
                    str(self.key_file) if self.key_file else None,
                    self.key_password.get_secret_value() if self.key_password else _no_key_password,
                )
        except _KeyPasswordMissing:
            raise ValueError(
                "cannot load certificates: the private key is encrypted: set tls.key_password"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            why = "not a PEM certificate and key, or tls.key_password does not decrypt the key"
            raise ValueError(
                f"cannot load certificates: tls.cert_file/key_file: {why if 'PEM lib' in str(exc) else exc}"
            ) from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


TLS_REFUSALS = (
    ("CERTIFICATE_REQUIRED", "the broker requires a client certificate (tls.cert_file, tls.key_file)"),
    ("ALERT_CERTIFICATE_EXPIRED", "the broker refused the client certificate: it has expired"),
    ("ALERT_UNKNOWN_CA", "the broker does not trust the CA that signed the client certificate"),
    ("ALERT_CERTIFICATE_REVOKED", "the broker refused the client certificate: it was revoked"),
    ("ALERT_BAD_CERTIFICATE", "the broker refused the client certificate"),
    ("ALERT_UNSUPPORTED_CERTIFICATE", "the broker refused the client certificate"),
    ("Hostname mismatch", "the broker certificate is not valid for mqtt.host"),
    ("certificate has expired", "the broker certificate has expired"),
    ("certificate is not yet valid", "the broker certificate is not valid yet"),
    ("local issuer", "the broker certificate is not signed by a CA of tls.ca_file (or the system store)"),
    ("self-signed certificate", "the broker certificate is not signed by a CA of tls.ca_file"),
)
"""OpenSSL's words for why a TLS handshake failed, and what they mean for the operator. The TLS 1.3
refusals of our client certificate arrive as alerts after our side of the handshake completed,
on paho's first read."""


def tls_refusal(text: str) -> str | None:
    """An OpenSSL error in the operator's words, with OpenSSL's own reason kept in brackets (minus
    the ``[SSL: ...]`` code and ``(_ssl.c:NNN)`` source line, noise to an operator); None when it is
    not a certificate refusal."""
    detail = re.sub(r"^\[SSL: \w+\] |^\[\w+\] | \(_ssl\.c:\d+\)$", "", text.strip())
    for marker, meaning in TLS_REFUSALS:
        if marker in text:
            return f"{meaning} ({detail})"
    return None


class MqttConfig(Strict):
    """The ``mqtt:`` section: the broker readings and events are forwarded to (QoS 1 always)."""

    host: str = Field(min_length=1)
    """Broker host name or address. Anything but loopback needs ``tls`` (see ``tls.enabled``)."""
    port: int = Field(default=1883, ge=1, le=65535)
    """Broker port (1883 plain, usually 8883 with TLS)."""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    """MQTT protocol version. With ``5`` a broker that refuses a publish (e.g. an ACL denies the topic)
    says so in the PUBACK: those rows stay undelivered and are retried. MQTT 3.1.1 cannot say no, so a
    broker acknowledges and silently drops a denied publish: use ``5`` where broker ACLs are used."""
    client_id: str | None = None
    """MQTT client id; default ``cleanroom-edge-{agent id}``. Must be unique on the broker."""
    topic_prefix: str = Field(default="cleanroom", pattern=r"^[^#+]+$")
    """First level(s) of every topic: ``{prefix}/{device}/data``, ``{prefix}/{device}/events``,
    ``{prefix}/agent/events``, ``{prefix}/agent/audit``, ``{prefix}/agent/status/{agent id}``."""
    keepalive: Duration = Field(default=30.0, ge=5)
    """MQTT keepalive: a dead connection is noticed after about 1.5 times this."""
    username: str | None = None
    """User name for broker authentication."""
    password: SecretStr | None = None
    """Password (write ``${ENV_VAR}`` to take it from the environment); never logged or echoed."""
    password_file: ConfigPath | None = None
    """File holding the password (first line), instead of ``password``."""
    tls: TlsConfig = Field(default_factory=TlsConfig, validate_default=True)
    """TLS settings."""
    inflight_window: int = Field(default=16, ge=1, le=1000)
    """Maximum unacknowledged publishes (segments: data, events, audit). Bounds memory and the
    duplicates a reconnect can cause."""
    reconnect_min: Duration = Field(default=1.0, gt=0)
    """First reconnect delay; doubles per failed attempt up to ``reconnect_max``, and each wait is
    jittered to between half and all of it."""
    reconnect_max: Duration = Field(default=60.0, gt=0)
    """Upper bound of the reconnect delay, jitter included."""
    connect_timeout: Duration = Field(default=5.0, gt=0)
    """Time allowed for the TCP and TLS handshake of one connection attempt."""
    payload: Literal["json", "flat", "sparkplug_b"] = "json"
    """What goes on the wire: ``json`` the stored segments themselves, byte for byte (what the
    integrity chain covers; docs/payloads.md); ``flat`` one message per device sample with one value
    per tag name, for historians and a Unified Namespace (see ``flat``); ``sparkplug_b`` a Sparkplug B
    3.0 edge node (see ``sparkplug``)."""
    flat: FlatConfig = Field(default_factory=FlatConfig)
    """Topics and UNS placement of the ``flat`` payload."""
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig, validate_default=True)
    """Group, edge node and primary host of the ``sparkplug_b`` payload."""
    publish_segments: bool = True
    """With ``flat`` or ``sparkplug_b``: also publish the chained JSON segments on
    ``{prefix}/{stream}`` (and the retained status), exactly as ``json`` does, so a verifier
    downstream can check every value against the integrity chain (each flat and Sparkplug message
    names the segment it came from). On by default: integrity by default. Off halves the traffic,
    and verification is then only possible against the gateway's own buffer (``verify --buffer``)."""

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        """An upgraded gateway's old configuration says what to write instead, not just "extra input"."""
        if isinstance(data, dict):
            old = [REMOVED_KEYS[k] for k in REMOVED_KEYS if k in data]
            if old:
                raise ValueError("; ".join(old))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @field_validator("sparkplug")
    @classmethod
    def _sparkplug_complete(cls, sparkplug: SparkplugConfig, info: ValidationInfo) -> SparkplugConfig:
        if info.data.get("payload") == "sparkplug_b" and sparkplug.group_id is None:
            raise ValueError(
                "group_id is required with payload: sparkplug_b (the Sparkplug group of this edge node)"
            )
        return sparkplug

    @field_validator("tls")
    @classmethod
    def _tls_off_loopback(cls, tls: TlsConfig, info: ValidationInfo) -> TlsConfig:
        """Readings and the broker password cross the plant network in clear text only when the
        configuration says so in so many words."""
        host = info.data.get("host")
        if tls.enabled is None and host is not None and not is_loopback_host(host):
            raise ValueError(
                f"broker {host!r} is not on loopback: set tls.enabled: true (or tls.enabled: false "
                "to send readings and credentials in clear text)"
            )
        return tls

    @property
    def tls_mode(self) -> TlsMode:
        if self.tls.enabled:
            return "on" if self.tls.verify else "unverified"
        return "loopback" if is_loopback_host(self.host) else "off"

    def security_warnings(self) -> list[str]:
        """What an auditor must hear about at every start: the broker link is open to reading or
        tampering on the network."""
        broker = f"{self.host}:{self.port}"
        if self.tls_mode == "off":
            return [f"mqtt: TLS is off to broker {broker}, which is not on loopback: readings and "
                    "credentials cross the network in clear text (mqtt.tls.enabled: false)"]  # fmt: skip
        if self.tls_mode == "unverified":
            return [f"mqtt: TLS to broker {broker} does not verify the broker certificate: anyone on "
                    "the network can impersonate it (mqtt.tls.verify: false)"]  # fmt: skip
        return []

    def resolve_password(self) -> str | None:
        """The password from ``password`` or ``password_file``; a missing file is a config error."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            return read_secret_file(self.password_file)
        except OSError as exc:
            raise ValueError(f"mqtt.password_file {self.password_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"mqtt.password_file {self.password_file}: not UTF-8 text") from None


class WithSegments(Encoder):
    """A format that is not the stored segment (``flat``, ``sparkplug_b``), with the JSON segments
    and status published beside it (``publish_segments``): each segment's JSON message goes first,
    then the format's; the segment is delivered when the broker acknowledged them all. The
    format's session rules (its will, re-sends, readiness) are the session's."""

    def __init__(self, primary: Encoder, segments: JsonSegmentsEncoder) -> None:
        self.primary = primary
        self.segments = segments
        self.name = primary.name
        self.resend_after_reconnect = primary.resend_after_reconnect
        self.messages_per_segment = None

    def will(self, session: str) -> Message | None:
        """One will per connection: the format's (Sparkplug's NDEATH) when it has one."""
        json_will = self.segments.will(session)
        return self.primary.will(session) or json_will

    def subscriptions(self) -> list[str]:
        return self.primary.subscriptions()

    def on_connect(self, session: str) -> list[Message]:
        return self.segments.on_connect(session) + self.primary.on_connect(session)

    def on_disconnect(self) -> None:
        self.primary.on_disconnect()

    def ready(self) -> bool:
        return self.primary.ready()

    def on_message(self, topic: str, payload: bytes) -> Reaction:
        return self.primary.on_message(topic, payload)

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        return self.segments.encode(seg, historical=historical) + self.primary.encode(
            seg, historical=historical
        )

    def on_clean_stop(self) -> list[Message]:
        return self.primary.on_clean_stop() + self.segments.on_clean_stop()

    def on_identity(self, identity: AgentIdentity) -> list[Message]:
        return self.segments.on_identity(identity) + self.primary.on_identity(identity)

    def stats(self) -> dict[str, Any]:
        return self.primary.stats()


def make_encoder(
    cfg: MqttConfig,
    identity: AgentIdentity,
    key: bytes | None,
    catalog: Catalog | None = None,
    auditor: Auditor | None = None,
    previous: Encoder | None = None,
) -> Encoder:
    """The encoder ``cfg.payload`` names. ``catalog``: the configured devices' tags (what a
    Sparkplug DBIRTH declares); ``auditor``: where refused Sparkplug commands are recorded;
    ``previous``: the encoder of the forwarder this one replaces, whose Sparkplug bdSeq goes on
    (Sparkplug numbers the connects of the process, not of one forwarder)."""
    segments = JsonSegmentsEncoder(cfg.topic_prefix, identity, key)
    primary: Encoder
    if cfg.payload == "json":
        return segments
    if cfg.payload == "flat":
        primary = FlatEncoder(cfg.flat, catalog or {}, cfg.topic_prefix)
    else:
        if isinstance(previous, WithSegments):
            previous = previous.primary
        bd_seq = previous.next_bd_seq if isinstance(previous, SparkplugEncoder) else 0
        primary = SparkplugEncoder(cfg.sparkplug, catalog or {}, identity.agent_id, auditor, bd_seq=bd_seq)
    return WithSegments(primary, segments) if cfg.publish_segments else primary


@dataclass(slots=True)
class _Flight:
    """A segment in flight: the mids of its messages not acknowledged yet."""

    seg: StoredSegment
    mids: set[int]
    refusal: str | None = None
    """The broker refused one of its messages (MQTT 5): the whole segment goes again later."""


class Forwarder:
    """Committed segments -> MQTT, one paho client per forwarder. A reload that changes the broker
    section stops one forwarder and starts another on the same buffer: what the old one had in
    flight is unclaimed at its stop and sent again by the new one (the in-flight window bounds
    those duplicates), and ``attempts`` carries the connection count over so the new forwarder's
    sessions are newer than the old one's (``previous``, the old one's encoder, does the same for
    Sparkplug's bdSeq)."""

    def __init__(
        self,
        cfg: MqttConfig,
        buffer: AsyncBuffer,
        identity: AgentIdentity,
        attempts: int = 0,
        *,
        catalog: Catalog | None = None,
        auditor: Auditor | None = None,
        encoder: Encoder | None = None,
        previous: Encoder | None = None,
    ) -> None:
        """``encoder``: what segments become on the wire; by default the one ``cfg.payload`` names,
        made with ``catalog``, ``auditor`` and ``previous`` (see :func:`make_encoder`)."""
        self.cfg = cfg
        self.buffer = buffer
        self.identity = identity
        self.client_id = cfg.client_id or f"cleanroom-edge-{identity.agent_id}"
        self.encoder = encoder or make_encoder(cfg, identity, buffer.core.key, catalog, auditor, previous)
        self._password = cfg.resolve_password()
        self._ssl = cfg.tls.context() if cfg.tls.enabled else None
        self._client = self._make_client()
        self._client_used = False
        """Whether ``_client`` has connected before: a format that never re-sends gets a fresh one."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.tasks = Supervisor("forwarder", log)
        """Owns the loops: one that raises is logged once, counted and restarted with backoff."""
        self._attempts = attempts
        self._session = ""
        """``{agent start ns}.{connection attempt}``: set (with the will) before each attempt; read
        when that connection is accepted."""
        self._connecting: asyncio.Task[bool] | None = None
        """The latest connection attempt: :meth:`stop` waits for one in progress (it owns the
        client meanwhile, from a worker thread) before it disconnects."""
        self._sock: SocketLike | None = None
        """The socket the event loop watches for paho (None between connections): paho's
        socket callbacks and its loop functions act only on this one, never on a socket of a
        connection already given up."""
        self._fd = -1
        """The file descriptor of ``_sock`` when it was watched."""
        self._unwatched = asyncio.Event()
        self._unwatched.set()
        self._stopping = False
        self._connected = False
        self._refused = False
        self._session_ended = asyncio.Event()
        self._wake = asyncio.Event()
        self._mark_wake = asyncio.Event()
        self._marking = 0
        """Batches of delivery marks handed to the buffer and not committed yet."""
        self._cursor = 0
        self._inflight: dict[int, _Flight] = {}
        """Segments in flight by id."""
        self._mids: dict[int, int] = {}
        """paho message id -> the id of the segment the message carries."""
        self._acked: set[int] = set()
        """Acknowledged segments not marked delivered yet: never taken again meanwhile."""
        self._live_from = 0
        """Segments up to this id were committed before the current session could publish: they
        are ``historical`` (they waited in the buffer)."""
        self._flowing = False
        """Whether this connection has published segments since it became ready (``_live_from`` set)."""
        self._to_mark: list[int] = []
        self._status_acks: dict[int, asyncio.Future[None]] = {}
        self._last_rescan = 0.0
        self._counts = dict.fromkeys(
            ("published", "published_readings", "acked", "acked_readings", "rejected", "reconnects",
             "messages", "encode_errors", "message_errors", "commands", "command_errors",
             "callback_errors"), 0
        )  # fmt: skip
        self._commands: list[tuple[str, CommandHandler]] = []
        """Command topic filters and their handlers, subscribed on every connection."""
        self._failing: set[str] = set()
        """Command topic filters whose handler failed: the first failure is logged with its traceback."""
        self._last_error: str | None = None
        self._closed_early: str | None = None
        """paho's reason when the broker closed this attempt's connection before accepting it."""
        self._tls_refusal: str | None = None
        """The broker's refusal of our client certificate, in the operator's words, until it
        accepts us (a probe costs a handshake: one per streak of refusals)."""
        self._connected_since: float | None = None
        self._rng = random.Random()  # unseeded: gateways restarted together must not jitter alike

    # ------------------------------------------------------------------ paho side (on the loop)

    def _make_client(self) -> mqtt.Client:
        v5 = self.cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else True,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.cfg.connect_timeout
        # Room for the window's messages and two status messages (a reload's online, the stop's
        # offline): a new session's first message must never wait in paho's queue behind re-sends.
        # Without a fixed count per segment, no paho limit: the window bounds what is in flight.
        per_segment = self.encoder.messages_per_segment
        client.max_inflight_messages_set(self.cfg.inflight_window * per_segment + 2 if per_segment else 0)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        # With these set, publish() never writes itself: paho asks for the socket to be watched
        # for writing, and what a burst of publishes queued is written in one pass when the loop
        # is free, never in the middle of the forwarder's own code.
        client.on_socket_close = self._paho_socket_close
        client.on_socket_register_write = self._paho_want_write
        client.on_socket_unregister_write = self._paho_written
        return client

    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure and self.encoder.resend_after_reconnect:
            # Inside the callback: paho re-sends the unacknowledged publishes as soon as it
            # returns, and the new session's online must come before them.
            for m in self.encoder.on_connect(self._session):
                client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
        self._on_connect(client, not reason.is_failure, str(reason))

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._on_disconnect(client, str(reason))

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._on_puback(client, mid, not reason.is_failure, str(reason))

    def _paho_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(client, msg.topic, bytes(msg.payload), bool(msg.retain))

    def _paho_socket_close(self, client: Any, userdata: Any, sock: SocketLike) -> None:
        if sock is self._sock:
            self._unwatch()

    def _paho_want_write(self, client: Any, userdata: Any, sock: SocketLike) -> None:
        # paho also calls this from the connection attempt's thread, for a socket not watched
        # yet: :meth:`_watch` looks at what is waiting once the attempt returned.
        if sock is self._sock and self._loop is not None:
            self._loop.add_writer(sock, self._writable, client)

    def _paho_written(self, client: Any, userdata: Any, sock: SocketLike) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.remove_writer(sock)

    def _watch(self, client: mqtt.Client) -> None:
        """Hand the socket of a connection just made to the event loop."""
        sock = client.socket()
        if sock is None or self._loop is None:
            return
        self._sock, self._fd = sock, sock.fileno()
        self._unwatched.clear()
        self._loop.add_reader(sock, self._readable, client)
        if client.want_write():  # the CONNECT, queued by the attempt
            self._loop.add_writer(sock, self._writable, client)

    def _unwatch(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._loop is not None:
            # by number: a socket closed behind our back no longer has one (paho tells before it
            # closes, so the number is still this socket's)
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._unwatched.set()

    def _readable(self, client: mqtt.Client) -> None:
        sock = self._sock
        if sock is None or client.socket() is not sock:
            return  # a socket given up since (a read scheduled before the drop)
        for _ in range(64):
            if not self._drive(client, client.loop_read):
                return
            # An SSL socket can hold decrypted bytes (the rest of a TLS record) that epoll does
            # not report: read them now, as paho's own loop does.
            if client.socket() is not sock or not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return
        if self._loop is not None:  # a flood: let the rest of the agent run first
            self._loop.call_soon(self._readable, client)

    def _writable(self, client: mqtt.Client) -> None:
        sock = self._sock
        if sock is None or client.socket() is not sock:
            return
        if self._drive(client, client.loop_write) and self._sock is sock and not client.want_write():
            # paho reports only changes of its own write flag: never leave the loop polling an
            # idle writer
            assert self._loop is not None
            self._loop.remove_writer(sock)

    async def _network_timers(self) -> None:
        """paho's timers: a PINGREQ when the connection was quiet for ``keepalive``, and the
        connection given up when the broker does not answer it."""
        while True:
            await asyncio.sleep(1.0)
            client = self._client
            if self._sock is not None and client.socket() is self._sock:
                self._drive(client, client.loop_misc)

    def _drive(self, client: mqtt.Client, step: Callable[[], Any]) -> bool:
        """One of paho's loop functions; an exception out of it (one of our callbacks raised,
        or paho itself) drops the connection. paho does not finish handling a packet whose
        callback raised, so reading on would handle it again: the connection is given up,
        without a DISCONNECT so the broker publishes the will, and the connection loop makes a
        new one with backoff, as after any loss. Returns whether the connection is still used."""
        try:
            step()
        except Exception as exc:
            self._callback_failed(client, exc)
            return False
        return True

    def _callback_failed(self, client: mqtt.Client, exc: Exception) -> None:
        self._counts["callback_errors"] += 1
        self.tasks.failures.record("mqtt-network", exc)  # with its traceback the first time
        sock = client.socket()
        if sock is self._sock:
            self._unwatch()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # paho forgets it at the next connect
        if client is not self._client:
            return
        error = f"handling the broker's traffic failed: {exc!r}"
        if not self._session_ended.is_set():  # paho did not get to report the end itself
            try:
                self._on_disconnect(client, error)
            finally:
                self._session_ended.set()
                self._closed_early = None  # the cause is known: no TLS refusal to look for
        self._last_error = error

    async def _connect(self, session: str, will: Message | None) -> bool:
        """One connection attempt (TCP, TLS, CONNECT) in session ``session``; the socket is
        watched once the attempt returned. False when the forwarder is stopping."""
        if self._stopping:
            return False
        self._unwatch()
        self._refused = False
        if self._client_used and not self.encoder.resend_after_reconnect:
            self._client = self._make_client()  # nothing of the old session is ever sent
        self._client_used = True
        client = self._client
        self._attempts += 1
        self._session = session
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        # Blocking (name lookup, TCP and TLS handshakes), so in a worker thread; nothing on the
        # loop touches the client meanwhile: it is not connected, and stop() waits for this.
        if self.cfg.protocol == "5":
            connect = functools.partial(
                client.connect, self.cfg.host, self.cfg.port, int(self.cfg.keepalive), clean_start=True
            )
        else:
            connect = functools.partial(client.connect, self.cfg.host, self.cfg.port, int(self.cfg.keepalive))
        await asyncio.to_thread(connect)
        self._watch(client)
        return True

    async def _disconnect(self, within_s: float) -> None:
        """DISCONNECT (the broker discards the will) and close, within ``within_s``: a socket
        that cannot be written (a frozen broker) is closed without it."""
        client, sock = self._client, self._sock
        if sock is None:
            with contextlib.suppress(OSError):
                if (stale := client.socket()) is not None:
                    stale.close()  # e.g. a connection given up after a callback failed
            return
        client.disconnect()  # written by the loop; paho closes the socket after it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._unwatched.wait(), within_s)
        if self._sock is sock:
            log.warning("broker %s:%d: DISCONNECT not sent within %.1f s; closing the connection",
                        self.cfg.host, self.cfg.port, within_s)  # fmt: skip
            self._unwatch()
            with contextlib.suppress(OSError):
                sock.close()

    # ------------------------------------------------------------------ loop side

    def _on_connect(self, client: mqtt.Client, ok: bool, reason: str) -> None:
        if client is not self._client:
            return
        if not ok:
            self._refused = True
            error = f"broker refused connection: {reason}"
            if error != self._last_error:  # once per streak, not once per retry
                log.error("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            self._last_error = error
            return
        for topic in [*self.encoder.subscriptions(), *(f for f, _ in self._commands)]:
            client.subscribe(topic, qos=1)
        if not self.encoder.resend_after_reconnect:
            # on the loop: nothing of this connection is published before these (a fresh client
            # has nothing to re-send)
            for m in self.encoder.on_connect(self._session):
                self._publish_message(m)
        self._connected = True
        self._tls_refusal = None
        self._connected_since = time.monotonic()
        log.info("connected to broker %s:%d (session %s)", self.cfg.host, self.cfg.port, self._session)
        self._wake.set()

    def _publish_message(self, m: Message) -> int:
        """A message of the session itself (a birth, a status): acknowledged, but no segment's."""
        return int(self._client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain).mid)

    def add_command_handler(self, topic_filter: str, handler: CommandHandler) -> None:
        """Subscribe to ``topic_filter`` (QoS 1) on every connection, beside the payload format's own
        subscriptions, and hand each message on it to ``handler`` on the event loop. A handler that
        raises is logged and counted (``command_errors``), never fatal to the session: what a
        message holds is the handler's to refuse."""
        self._commands.append((topic_filter, handler))
        if self._connected:
            self._client.subscribe(topic_filter, qos=1)

    def _on_command(
        self, topic_filter: str, handler: CommandHandler, topic: str, payload: bytes, retained: bool
    ) -> None:
        self._counts["commands"] += 1
        try:
            handler(topic, payload, retained)
        except Exception:
            self._counts["command_errors"] += 1
            self._last_error = f"handling a command on {topic} failed"
            if topic_filter in self._failing:
                log.error("handling a command on %s failed again; ignored", topic)
            else:
                self._failing.add(topic_filter)
                log.exception("handling a command on %s failed; ignored", topic)

    def _on_message(self, client: mqtt.Client, topic: str, payload: bytes, retained: bool = False) -> None:
        """A message on a subscribed topic: whatever it holds, a refusal or a log line, never an
        exception out of here."""
        if client is not self._client or not self._connected:
            return
        for topic_filter, handler in self._commands:
            if mqtt.topic_matches_sub(topic_filter, topic):
                self._on_command(topic_filter, handler, topic, payload, retained)
                return
        try:
            reaction = self.encoder.on_message(topic, payload)
        except Exception:
            self._counts["message_errors"] += 1
            log.exception("handling a message on %s failed; ignored", topic)
            return
        for m in reaction.publish:
            self._publish_message(m)
        if reaction.reconnect:
            log.info("ending MQTT session %s at the payload format's request", self._session)
            client.disconnect()  # the disconnect callback starts a new session
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, reason: str) -> None:
        if client is not self._client:
            return
        was = self._connected
        self._connected = False
        self._flowing = False
        self._session_ended.set()
        self.encoder.on_disconnect()
        if not self.encoder.resend_after_reconnect:
            self._give_back()
        if self._stopping:
            return
        if was:
            self._last_error = f"disconnected: {reason}"
            again = "resent" if self.encoder.resend_after_reconnect else "encoded again in the next session"
            log.warning("lost broker connection (%s); %d publishes in flight will be %s",
                        reason, len(self._inflight), again)  # fmt: skip
        elif not self._refused:
            # Closed before a CONNACK, without a refusal: e.g. the broker rejected our client
            # certificate after the TLS 1.3 handshake had already completed on our side.
            self._closed_early = reason

    def _give_back(self) -> None:
        """A format that never re-sends: what the lost session had in flight goes back to the
        buffer, and the cursor before it, so it is encoded again in the next session, in order."""
        ids = list(self._inflight)
        self._inflight.clear()
        self._mids.clear()
        if ids:
            self.buffer.unclaim(ids)
            self._cursor = min(self._cursor, min(ids) - 1)

    def _on_puback(self, client: mqtt.Client, mid: int, ok: bool, reason: str) -> None:
        if client is not self._client:
            return  # a previous session's client: what it had in flight was given back
        status = self._status_acks.pop(mid, None)
        if status is not None:
            if not status.done():
                status.set_result(None)
            return
        seg_id = self._mids.pop(mid, None)
        flight = None if seg_id is None else self._inflight.get(seg_id)
        if flight is None:
            return
        flight.mids.discard(mid)
        if not ok and flight.refusal is None:
            flight.refusal = reason
        if flight.mids:
            return  # the segment's other messages are not acknowledged yet
        # Only a full window held the pump back: otherwise it has taken everything committed so
        # far, and the next commit wakes it (a wake per ack is a buffer read per ack, for nothing).
        was_full = len(self._inflight) >= self.cfg.inflight_window
        del self._inflight[flight.seg.id]
        seg = flight.seg
        if flight.refusal is None:
            self._acked_segment(seg)
            if was_full:
                self._wake.set()
        else:
            reason = flight.refusal
            # The segment stays undelivered; the idle rescan sends it again.
            self.buffer.unclaim([seg.id])
            self._counts["rejected"] += 1
            self._last_error = f"broker rejected a publish: {reason}"
            log.error("broker rejected segment %d of %s: %s", seg.i, seg.stream, reason)
            self._wake.set()

    def _acked_segment(self, seg: StoredSegment) -> None:
        self._counts["acked"] += 1
        self._counts["acked_readings"] += seg.n_readings
        self._acked.add(seg.id)
        self._to_mark.append(seg.id)
        self._mark_wake.set()

    def _on_commit(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        if not self._stopping:  # a stopped forwarder stays a listener of the buffer, idle
            self._wake.set()

    # ------------------------------------------------------------------ tasks

    async def start(self) -> None:
        """Begin connecting in the background: a broker that is down never fails the agent's start."""
        self._loop = asyncio.get_running_loop()
        for warning in self.cfg.security_warnings():
            log.warning("%s", warning)
        self.buffer.add_listener(self._on_commit)
        self._tasks = [
            self.tasks.spawn("mqtt-connection", self._connection_loop).task,
            self.tasks.spawn("mqtt-pump", self._pump).task,
            self.tasks.spawn("mqtt-marker", self._marker).task,
            self.tasks.spawn("mqtt-network", self._network_timers).task,
        ]
        self._wake.set()

    async def _connection_loop(self) -> None:
        attempts = 0
        while not self._stopping:
            self._session_ended.clear()
            self._closed_early = None
            session = f"{self.identity.started_ns}.{self._attempts + 1}"
            try:
                # the broker publishes the will if the connection dies: it names the session that ended
                will = self.encoder.will(session)
                self._connecting = asyncio.ensure_future(self._connect(session, will))
                # shielded: a cancelled loop must not leave stop() a half-made connection
                started = await asyncio.shield(self._connecting)
            except Exception as exc:  # OSError, ssl.SSLError, ValueError...: never end the retry loop
                cause = tls_refusal(str(exc)) or exc
                self._last_error = f"connect to {self.cfg.host}:{self.cfg.port} failed: {cause}"
                if attempts == 0:
                    log.warning("%s; retrying with backoff", self._last_error)
            else:
                if not started:
                    return
                await self._session_ended.wait()
                if self._closed_early is not None and not self._stopping:
                    await self._explain_early_close(self._closed_early)
                if self._connected_since is not None:  # the broker accepted us: start backoff afresh
                    attempts = 0
                self._connected_since = None
            if self._stopping:
                return
            attempts += 1
            self._counts["reconnects"] += 1
            await asyncio.sleep(
                backoff_delay(attempts, self.cfg.reconnect_min, self.cfg.reconnect_max, self._rng)
            )

    async def _explain_early_close(self, reason: str) -> None:
        """With TLS 1.3 a broker refuses our client certificate only after our side of the
        handshake completed; its alert then races our CONNECT, and paho mostly reports a bare EOF.
        A handshake that sends nothing afterwards always hears the alert."""
        if self._tls_refusal is None and self._ssl is not None:
            self._tls_refusal = await asyncio.to_thread(self._probe_tls)
        error = f"connection closed before the broker accepted it: {self._tls_refusal or reason}"
        if error != self._last_error:  # once per streak, not once per retry
            log.error("broker %s:%d: %s", self.cfg.host, self.cfg.port, error)
        self._last_error = error

    def _probe_tls(self) -> str | None:
        assert self._ssl is not None
        timeout = min(self.cfg.connect_timeout, 2.0)
        try:
            with (
                socket.create_connection((self.cfg.host, self.cfg.port), timeout) as raw,
                self._ssl.wrap_socket(raw, server_hostname=self.cfg.host) as tls,
            ):
                tls.recv(1)
        except OSError as exc:  # ssl.SSLError included; a timeout: the broker took the certificate
            return tls_refusal(str(exc))
        return None

    async def _pump(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN_INTERVAL_S)
            self._wake.clear()
            if not self._connected:
                continue
            if not self.encoder.ready():
                self._flowing = False  # held in the buffer: historical once the session may publish
                continue
            self._maybe_rewind()
            try:
                if not self._flowing:
                    self._live_from = await self.buffer.last_segment_id()
                    self._flowing = True
                await self._fill()
            except Exception as exc:
                self._last_error = f"reading the buffer failed: {exc}"
                log.exception("forwarding failed; retrying")
                await asyncio.sleep(1.0)

    def _maybe_rewind(self) -> None:
        """Segments behind the cursor that are still undelivered were rejected or replayed: start
        over from the oldest undelivered one, but only when nothing is in flight (acknowledged
        segments waiting for their delivery mark are skipped by :meth:`_fill`), so no segment the
        broker has or may have is sent twice."""
        now = time.monotonic()
        if now - self._last_rescan < RESCAN_INTERVAL_S or self._inflight:
            return
        self._last_rescan = now
        self._cursor = 0

    async def _fill(self) -> None:
        """Publish the next segments, exactly as many as the window has room for: what is taken is
        claimed as in flight (buffer overflow keeps it until the broker's answer, so a loss count
        never includes what the broker may have) and the cursor moves past it."""
        client = self._client
        while self._connected and (room := self.cfg.inflight_window - len(self._inflight)) > 0:
            if not self.encoder.ready():
                return
            # Acknowledged before the read began and perhaps marked only after it: the read may
            # still show them undelivered (acknowledged during the read: they were in flight).
            acked = set(self._acked)
            segments = await self.buffer.take_for_sending(self._cursor, room)
            if not segments:
                return
            if client is not self._client or not (self._connected or self.encoder.resend_after_reconnect):
                # the session ended while they were read, and its messages are never re-sent
                self.buffer.unclaim(s.id for s in segments if s.id not in acked)
                return
            for seg in segments:
                if seg.id not in acked:  # (acknowledged, being marked: not again)
                    self._publish(seg)
            self._cursor = segments[-1].id
            if len(segments) < room:
                return  # everything committed so far is out; the next commit wakes the pump

    def _publish(self, seg: StoredSegment) -> None:
        try:
            messages = self.encoder.encode(seg, historical=seg.id <= self._live_from)
        except Exception as exc:
            # Stays undelivered in the buffer (the idle rescan tries again): a stuck segment is
            # reported, never dropped, and never holds up the others.
            self.buffer.unclaim([seg.id])
            self._counts["encode_errors"] += 1
            self._last_error = f"cannot encode segment {seg.i} of {seg.stream}: {exc}"
            log.exception("cannot encode segment %d of %s as %s", seg.i, seg.stream, self.encoder.name)
            return
        self._counts["published"] += 1
        self._counts["published_readings"] += seg.n_readings
        if not messages:  # nothing of it goes on the wire in this format: delivered as it is
            self._acked_segment(seg)
            return
        flight = _Flight(seg, set())
        for m in messages:
            # Even when the connection just dropped, paho keeps a QoS 1 message queued and sends it
            # on reconnect (or, for a format that never re-sends, it is given back to the buffer).
            mid = self._publish_message(m)
            flight.mids.add(mid)
            self._mids[mid] = seg.id
        self._inflight[seg.id] = flight
        self._counts["messages"] += len(messages)

    async def _marker(self) -> None:
        """Hands the acknowledged segments to the buffer as they come, without waiting for the
        marks before: the buffer writes them with its next commit of records, or alone within
        ``buffer.mark_interval`` when none come (a stop hurries them)."""
        while True:
            await self._mark_wake.wait()
            self._mark_wake.clear()
            if not self._to_mark:
                continue
            ids, self._to_mark = self._to_mark, []
            try:
                marked = self.buffer.mark_delivered_soon(ids)
            except Exception as exc:
                self._mark_failed(ids, exc)
                continue
            self._marking += 1
            marked.add_done_callback(functools.partial(self._marked, ids))

    def _marked(self, ids: list[int], marked: asyncio.Future[None]) -> None:
        self._marking -= 1
        exc = None if marked.cancelled() else marked.exception()
        if exc is None:
            self._acked.difference_update(ids)
        else:
            self._mark_failed(ids, exc)

    def _mark_failed(self, ids: list[int], exc: BaseException) -> None:
        """Not marked means sent again later: a duplicate, never a loss."""
        self._acked.difference_update(ids)
        self._last_error = f"marking delivered failed: {exc}"
        log.error("marking %d segments delivered failed: %s", len(ids), exc)

    async def _idle(self) -> bool:
        if self._inflight or self._to_mark or self._marking:
            return False
        return not await self.buffer.pending(self._cursor, 1)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Deliver what is committed within ``grace_s``, publish the retained ``offline`` status,
        disconnect. Whatever is not acknowledged by then stays in the buffer for the next start."""
        if not self._tasks:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline and not await self._idle():
            self._wake.set()
            self.buffer.hurry_marks()  # marks alone would wait mark_interval
            await asyncio.sleep(0.02)
        self._tasks[1].cancel()  # the pump: nothing new is published from here on
        if self._connected:
            acks = []
            for m in self.encoder.on_clean_stop():
                ack = loop.create_future()
                self._status_acks[self._publish_message(m)] = ack
                acks.append(ack)
            try:
                await asyncio.wait_for(asyncio.gather(*acks), max(0.5, min(2.0, deadline - loop.time())))
            except TimeoutError:
                log.warning("broker did not acknowledge the %s offline messages", self.encoder.name)
        self._stopping = True
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting  # an attempt in progress owns the client until it returns
        await self._disconnect(min(2.0, max(0.2, deadline - loop.time())))
        self._session_ended.set()
        # Acks that arrived before the disconnect are marked; the rest is resent next start.
        await asyncio.sleep(0)
        while self._to_mark or self._marking:
            self._mark_wake.set()
            self.buffer.hurry_marks()
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._connected = False
        self.buffer.unclaim(self._inflight)  # not in flight now
        self._inflight.clear()
        self._mids.clear()
        self.buffer.remove_listener(self._on_commit)
        log.info("forwarder stopped: %s", self.stats())

    @property
    def attempts(self) -> int:
        """Connection attempts so far: what a successor forwarder continues from."""
        return self._attempts

    def republish_online(self, identity: AgentIdentity) -> None:
        """A reload kept this connection but changed the configuration hash: the retained
        ``online`` says so at once, in the current session (not a newer one, so it explains no
        re-send)."""
        self.identity = identity
        messages = self.encoder.on_identity(identity)
        if self._connected:
            for m in messages:
                self._publish_message(m)

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "client_id": self.client_id,
            "payload": self.encoder.name,
            **self._counts,
            **self.encoder.stats(),
            "inflight": len(self._inflight),
            "last_error": self._last_error,
        }
