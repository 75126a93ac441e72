"""The MQTT forwarder: publishes committed segments and releases them only on PUBACK.

A segment's payload was built once, at commit, and is the unit the integrity chain hashes
(agent/core/chain.py): it is published byte for byte on ``{prefix}/{stream}``, one segment per
message, never merged or re-encoded, so what a verifier downstream hashes is what was stored.

Delivery is at-least-once with a bounded duplicate window: a segment is marked delivered in the
buffer only when the broker acknowledged (QoS 1) the message that carried it. Segments in flight
when the connection drops stay in paho's session queue and are resent, in order, after the
reconnect; segments not yet fetched stay in the buffer. Each connection has a *session*
(``{agent start ns}.{connection attempt}``) that its retained ``online`` status and its last will
carry; ``online`` is published before paho re-sends anything, so a re-sent duplicate always
follows the ``online`` of a newer session in any capture, which is how a verifier tells a
re-send from a replay. With a key, every status message (``online``, the will, the clean-stop
``offline``) is signed like a segment: a forged ``online`` could otherwise pass off a replay as a
re-send.

paho runs its network loop in its own thread; every callback is handed to the event
loop with ``call_soon_threadsafe``, so all forwarder state lives on the loop (the one
exception: ``online`` is published from paho's connect callback itself, the only place that
comes before the re-sends). The
forwarder owns reconnecting (exponential backoff with jitter): paho's own reconnect is
off, because its delay has no jitter and a plant full of gateways would reconnect in
lock-step after a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.rows import StoredSegment
from agent.core import chain
from agent.core.backoff import backoff_delay
from agent.core.records import AGENT_DEVICE, Block, Event, dumps, now_ns
from agent.core.supervise import Supervisor
from cleanroom_common.fields import ConfigPath, Duration, Strict, read_secret_file
from cleanroom_common.net import is_loopback_host

log = logging.getLogger("cleanroom.forwarder")

STATUS_SCHEMA = "cleanroom-edge/status/2"
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


@dataclass(frozen=True)
class AgentIdentity:
    """Who is publishing: carried in the retained status, so a consumer can tell which agent build
    and configuration produced the data it receives."""

    agent_id: str
    version: str
    config_hash: str
    site: str = ""
    started_ns: int = field(default_factory=now_ns)
    """When the agent started: the first half of every connection's session."""


def status_topic(prefix: str, agent_id: str) -> str:
    """The retained status topic: it names the agent, so gateways sharing a broker never overwrite
    each other's retained status."""
    return f"{prefix}/{AGENT_DEVICE}/status/{agent_id}"


class Forwarder:
    """Committed segments -> MQTT, one paho client per forwarder. A reload that changes the broker
    section stops one forwarder and starts another on the same buffer: what the old one had in
    flight is unclaimed at its stop and sent again by the new one (the in-flight window bounds
    those duplicates), and ``attempts`` carries the connection count over so the new forwarder's
    sessions are newer than the old one's."""

    def __init__(
        self, cfg: MqttConfig, buffer: AsyncBuffer, identity: AgentIdentity, attempts: int = 0
    ) -> None:
        self.cfg = cfg
        self.buffer = buffer
        self.identity = identity
        self.client_id = cfg.client_id or f"cleanroom-edge-{identity.agent_id}"
        self.status_topic = status_topic(cfg.topic_prefix, identity.agent_id)
        self._key = buffer.core.key
        """The key the buffer signs segments with: the status messages are signed with it too."""
        self._password = cfg.resolve_password()
        self._ssl = cfg.tls.context() if cfg.tls.enabled else None
        self._client = self._make_client()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.tasks = Supervisor("forwarder", log)
        """Owns the loops: one that raises is logged once, counted and restarted with backoff."""
        self._client_lock = threading.Lock()
        self._attempts = attempts
        self._session = ""
        """``{agent start ns}.{connection attempt}``: set (with the will) before each attempt, under
        the client lock; read by paho's thread when that connection is accepted."""
        self._stopping = False
        self._connected = False
        self._refused = False
        self._session_ended = asyncio.Event()
        self._wake = asyncio.Event()
        self._mark_wake = asyncio.Event()
        self._marking = False
        self._cursor = 0
        self._inflight: dict[int, StoredSegment] = {}
        self._to_mark: list[int] = []
        self._status_acks: dict[int, asyncio.Future[None]] = {}
        self._last_rescan = 0.0
        self._counts = dict.fromkeys(
            ("published", "published_readings", "acked", "acked_readings", "rejected", "reconnects"), 0
        )
        self._last_error: str | None = None
        self._closed_early: str | None = None
        """paho's reason when the broker closed this attempt's connection before accepting it."""
        self._tls_refusal: str | None = None
        """The broker's refusal of our client certificate, in the operator's words, until it
        accepts us (a probe costs a handshake: one per streak of refusals)."""
        self._connected_since: float | None = None
        self._rng = random.Random()  # unseeded: gateways restarted together must not jitter alike

    # ------------------------------------------------------------------ paho side (its thread)

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
        client.max_inflight_messages_set(self.cfg.inflight_window + 2)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        return client

    def _status(self, status: Literal["online", "offline"], **extra: Any) -> bytes:
        doc = {"schema": STATUS_SCHEMA, "status": status, "agent": self.identity.agent_id,
               "session": self._session, **extra}  # fmt: skip
        text = dumps(doc).encode()
        return text if self._key is None else chain.sign(text, self._key)

    def _to_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            # Here, on paho's thread, not on the loop: paho re-sends the unacknowledged publishes as
            # soon as this callback returns, and the new session's online must come before them.
            online = self._status("online", version=self.identity.version,
                                  config_hash=self.identity.config_hash, site=self.identity.site,
                                  ts=now_ns())  # fmt: skip
            client.publish(self.status_topic, online, qos=1, retain=True)
        self._to_loop(self._on_connect, not reason.is_failure, str(reason))

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._to_loop(self._on_disconnect, str(reason))

    def _paho_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._to_loop(self._on_puback, mid, not reason.is_failure, str(reason))

    def _connect_blocking(self) -> bool:
        """One connection attempt (TCP, TLS, CONNECT) in a new session, then paho's network thread.
        Under the client lock so :meth:`stop` never races a half-made connection."""
        with self._client_lock:
            if self._stopping:
                return False
            self._refused = False
            client = self._client
            client.loop_stop()
            self._attempts += 1
            self._session = f"{self.identity.started_ns}.{self._attempts}"
            # the broker publishes this if the connection dies: it names the session that ended
            will = self._status("offline", reason="connection_lost")
            client.will_set(self.status_topic, will, qos=1, retain=True)
            if self.cfg.protocol == "5":
                client.connect(self.cfg.host, self.cfg.port, int(self.cfg.keepalive), clean_start=True)
            else:
                client.connect(self.cfg.host, self.cfg.port, int(self.cfg.keepalive))
            client.loop_start()
            return True

    def _shutdown_blocking(self) -> None:
        with self._client_lock:
            self._client.disconnect()
            self._client.loop_stop()

    # ------------------------------------------------------------------ loop side

    def _on_connect(self, ok: bool, reason: str) -> None:
        if not ok:
            self._refused = True
            error = f"broker refused connection: {reason}"
            if error != self._last_error:  # once per streak, not once per retry
                log.error("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            self._last_error = error
            return
        self._connected = True
        self._tls_refusal = None
        self._connected_since = time.monotonic()
        log.info("connected to broker %s:%d (session %s)", self.cfg.host, self.cfg.port, self._session)
        self._wake.set()

    def _on_disconnect(self, reason: str) -> None:
        was = self._connected
        self._connected = False
        self._session_ended.set()
        if self._stopping:
            return
        if was:
            self._last_error = f"disconnected: {reason}"
            log.warning("lost broker connection (%s); %d publishes in flight will be resent",
                        reason, len(self._inflight))  # fmt: skip
        elif not self._refused:
            # Closed before a CONNACK, without a refusal: e.g. the broker rejected our client
            # certificate after the TLS 1.3 handshake had already completed on our side.
            self._closed_early = reason

    def _on_puback(self, mid: int, ok: bool, reason: str) -> None:
        status = self._status_acks.pop(mid, None)
        if status is not None:
            if not status.done():
                status.set_result(None)
            return
        seg = self._inflight.pop(mid, None)
        if seg is None:
            return
        if ok:
            self._counts["acked"] += 1
            self._counts["acked_readings"] += seg.n_readings
            self._to_mark.append(seg.id)
            self._mark_wake.set()
        else:
            # The segment stays undelivered; the idle rescan sends it again.
            self.buffer.unclaim([seg.id])
            self._counts["rejected"] += 1
            self._last_error = f"broker rejected a publish: {reason}"
            log.error("broker rejected segment %d of %s: %s", seg.i, seg.stream, reason)
        self._wake.set()

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
        ]
        self._wake.set()

    async def _connection_loop(self) -> None:
        attempts = 0
        while not self._stopping:
            self._session_ended.clear()
            self._closed_early = None
            try:
                started = await asyncio.to_thread(self._connect_blocking)
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
            self._maybe_rewind()
            try:
                await self._fill()
            except Exception as exc:
                self._last_error = f"reading the buffer failed: {exc}"
                log.exception("forwarding failed; retrying")
                await asyncio.sleep(1.0)

    def _maybe_rewind(self) -> None:
        """Segments behind the cursor that are still undelivered were rejected or replayed: start
        over from the oldest undelivered one, but only when nothing is in flight or waiting to be
        marked, so no acknowledged segment is sent twice."""
        now = time.monotonic()
        if now - self._last_rescan < RESCAN_INTERVAL_S or self._inflight or self._to_mark or self._marking:
            return
        self._last_rescan = now
        self._cursor = 0

    async def _fill(self) -> None:
        """Publish the next segments, exactly as many as the window has room for: what is taken is
        claimed as in flight (buffer overflow keeps it until the broker's answer, so a loss count
        never includes what the broker may have) and the cursor moves past it."""
        while self._connected and (room := self.cfg.inflight_window - len(self._inflight)) > 0:
            segments = await self.buffer.take_for_sending(self._cursor, room)
            if not segments:
                return
            for seg in segments:
                self._publish(seg)
            self._cursor = segments[-1].id

    def _publish(self, seg: StoredSegment) -> None:
        info = self._client.publish(f"{self.cfg.topic_prefix}/{seg.stream}", seg.payload, qos=1)
        # Even when the connection just dropped, paho keeps a QoS 1 message queued and sends it on
        # reconnect; only a full queue loses it (cannot happen: the window bounds it).
        self._inflight[info.mid] = seg
        self._counts["published"] += 1
        self._counts["published_readings"] += seg.n_readings

    async def _marker(self) -> None:
        while True:
            await self._mark_wake.wait()
            self._mark_wake.clear()
            while self._to_mark:
                ids, self._to_mark = self._to_mark, []
                self._marking = True
                try:
                    await self.buffer.mark_delivered(ids)
                except Exception as exc:
                    # Not marked means sent again later: a duplicate, never a loss.
                    self._last_error = f"marking delivered failed: {exc}"
                    log.exception("marking %d segments delivered failed", len(ids))
                finally:
                    self._marking = False

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
            await asyncio.sleep(0.02)
        self._tasks[1].cancel()  # the pump: nothing new is published from here on
        if self._connected:
            offline = self._status("offline", reason="clean_stop", ts=now_ns())
            info = self._client.publish(self.status_topic, offline, qos=1, retain=True)
            ack = loop.create_future()
            self._status_acks[info.mid] = ack
            try:
                await asyncio.wait_for(ack, max(0.5, min(2.0, deadline - loop.time())))
            except TimeoutError:
                log.warning("broker did not acknowledge the offline status")
        self._stopping = True
        await asyncio.to_thread(self._shutdown_blocking)
        self._session_ended.set()
        # Acks that arrived before the disconnect are marked; the rest is resent next start.
        await asyncio.sleep(0)
        while self._to_mark or self._marking:
            self._mark_wake.set()
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._connected = False
        self.buffer.unclaim(seg.id for seg in self._inflight.values())  # not in flight now
        self._inflight.clear()
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
        if self._connected:
            online = self._status("online", version=identity.version, config_hash=identity.config_hash,
                                  site=identity.site, ts=now_ns())  # fmt: skip
            self._client.publish(self.status_topic, online, qos=1, retain=True)

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "client_id": self.client_id,
            **self._counts,
            "inflight": len(self._inflight),
            "last_error": self._last_error,
        }
