"""Is the agent healthy? One answer for ``cleanroom-agent status``, the status API and the metrics.

Unhealthy means something an engineer must act on, each a typed :class:`HealthProblem`: a device
down past ``health.device_down_after``, the broker unreachable past ``health.broker_down_after``,
the buffer fuller than ``health.buffer_fill_max``, the clock unsynchronised (only when its state can
be read: a sandbox that refuses ``adjtimex`` proves nothing), or a certificate the agent presents
(the broker client certificate, a device's OPC UA certificate) within ``health.cert_warn_days`` of
its expiry.

"Down past a threshold" needs the moment it went down, which neither the scheduler nor the forwarder
keeps: :class:`HealthWatch` notes it, once a second on a task of the agent's own (no I/O, nothing on
the data path), so the first request after an hour-long outage already knows it is an hour long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from agent.buffer.async_buffer import AsyncBuffer
from agent.core.clock import ClockState, read_clock
from agent.core.device import ResolvedDevice
from agent.core.records import now_ns
from agent.sinks.forwarder import Forwarder, MqttConfig
from agent.sources.scheduler import Scheduler
from cleanroom_common.fields import Duration, Strict

log = logging.getLogger("cleanroom.health")

WATCH_INTERVAL_S = 1.0
"""How often :class:`HealthWatch` looks at devices and broker: the resolution of "down since"."""


BROKER = "\0broker"
"""The broker's key among the watched subjects (a device id cannot contain a NUL)."""


class HealthConfig(Strict):
    """The ``health:`` section: when ``status``, the status API and the metrics say unhealthy."""

    device_down_after: Duration = Field(default=60.0, gt=0)
    """A device not connected for longer than this is a problem (``device_down``). Shorter outages are
    visible in the device's state and in its bad-quality readings, but do not page anyone."""
    broker_down_after: Duration = Field(default=300.0, gt=0)
    """The broker unreachable for longer than this is a problem (``broker_unreachable``); the buffer
    keeps every reading meanwhile, so this is about how long a site tolerates data arriving late."""
    buffer_fill_max: float = Field(default=0.8, gt=0, le=1)
    """Fraction of ``buffer.max_bytes`` in use above which the buffer is a problem (``buffer_full``):
    once it is full, the oldest undelivered readings are dropped."""
    cert_warn_days: float = Field(default=30.0, ge=0)
    """A certificate the agent presents (``mqtt.tls.cert_file``, an OPC UA device's ``certificate``)
    that expires within this many days is a problem (``certificate_expiring``)."""
    clock_sync: bool = True
    """An unsynchronised wall clock is a problem (``clock_unsynchronised``): timestamps of GMP records
    rely on it. Turn off only on a gateway that has no time source at all (the records still say
    ``synced: false``). A clock whose state cannot be read never counts."""


class ProblemKind(StrEnum):
    DEVICE_DOWN = "device_down"
    BROKER_UNREACHABLE = "broker_unreachable"
    BUFFER_FULL = "buffer_full"
    CLOCK_UNSYNCHRONISED = "clock_unsynchronised"
    CERTIFICATE_EXPIRING = "certificate_expiring"


@dataclass(frozen=True)
class HealthProblem:
    kind: ProblemKind
    subject: str
    """What has the problem: a device id, ``host:port`` of the broker, ``buffer``, ``clock``, or
    the certificate's role (``mqtt``, ``opcua:{device}``). Never a secret or a file's content."""
    detail: str
    since_ns: int | None = None
    """Wall-clock time the condition began, for conditions that last (device, broker)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": str(self.kind),
            "subject": self.subject,
            "detail": self.detail,
            "since": None if self.since_ns is None else _iso(self.since_ns),
        }


@dataclass(frozen=True)
class Health:
    ok: bool
    problems: tuple[HealthProblem, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.as_dict() for p in self.problems]}


@dataclass(frozen=True)
class CertificateExpiry:
    subject: str
    """The certificate's role (``mqtt``, ``opcua:{device}``), what metrics label it with."""
    not_after: datetime

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400.0


@dataclass
class _Down:
    mono: float
    wall_ns: int


@dataclass
class _CertCache:
    key: tuple[int, int]
    """(mtime_ns, size) of the file when it was read: a renewed certificate is read again."""
    not_after: datetime | None


class HealthWatch:
    """Remembers since when each device and the broker have been down, and reads the certificates'
    expiry (each file once, again when it changes). :meth:`run` is the agent's watch task."""

    def __init__(self, cfg: HealthConfig, certificates: Mapping[str, Path]) -> None:
        self.cfg = cfg
        self.certificates = dict(certificates)
        self.clock: Callable[[], ClockState] = read_clock
        """Its own attribute so that a test injects a clock state."""
        self._down: dict[str, _Down] = {}
        """Subjects down now (device ids, and :data:`BROKER` for the broker), since when."""
        self._certs: dict[Path, _CertCache] = {}
        self._unreadable: set[Path] = set()

    def observe(self, scheduler: Scheduler | None, forwarder: Forwarder | None) -> None:
        """Note what went down or came back since the last look."""
        up: dict[str, bool] = {}
        if scheduler is not None:
            up.update((r.id, r.connected) for r in scheduler.runners)
        if forwarder is not None:
            up[BROKER] = bool(forwarder.stats()["connected"])
        mono, wall = time.monotonic(), now_ns()
        for subject, connected in up.items():
            if connected:
                self._down.pop(subject, None)
            else:
                self._down.setdefault(subject, _Down(mono, wall))
        for gone in self._down.keys() - up.keys():
            del self._down[gone]

    def down_for(self, subject: str) -> tuple[float, int] | None:
        """(seconds, since wall ns) that ``subject`` has been down, None when it is up."""
        d = self._down.get(subject)
        return None if d is None else (time.monotonic() - d.mono, d.wall_ns)

    def certificate_expiry(self) -> list[CertificateExpiry]:
        out = []
        for subject, path in sorted(self.certificates.items()):
            not_after = self._not_after(path)
            if not_after is not None:
                out.append(CertificateExpiry(subject, not_after))
        return out

    def _not_after(self, path: Path) -> datetime | None:
        try:
            st = path.stat()
        except OSError as exc:
            self._warn_unreadable(path, exc.strerror or str(exc))
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._certs.get(path)
        if cached is None or cached.key != key:
            cached = _CertCache(key, self._read_not_after(path))
            self._certs[path] = cached
        return cached.not_after

    def _read_not_after(self, path: Path) -> datetime | None:
        from cryptography import x509

        try:
            data = path.read_bytes()
            pem = data.lstrip().startswith(b"-----BEGIN")
            cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
        except (OSError, ValueError) as exc:
            self._warn_unreadable(path, type(exc).__name__)
            return None
        self._unreadable.discard(path)
        return cert.not_valid_after_utc

    def _warn_unreadable(self, path: Path, why: str) -> None:
        """Once per file: the forwarder or the driver reports the failure that follows in detail."""
        if path not in self._unreadable:
            self._unreadable.add(path)
            log.warning("certificate %s: cannot read its expiry (%s)", path, why)

    async def run(self, agent: AgentView) -> None:
        """The watch task: the agent's scheduler and forwarder are looked up on each pass, since a
        reload may replace them."""
        while True:
            self.observe(agent.scheduler, agent.forwarder)
            await asyncio.sleep(WATCH_INTERVAL_S)


class AgentView(Protocol):
    """What health and metrics read of the running agent (:class:`agent.app.runtime.Agent`)."""

    @property
    def scheduler(self) -> Scheduler | None: ...
    @property
    def forwarder(self) -> Forwarder | None: ...
    @property
    def buffer(self) -> AsyncBuffer: ...
    @property
    def health_watch(self) -> HealthWatch: ...


def certificates_of(mqtt: MqttConfig | None, devices: Iterable[ResolvedDevice]) -> dict[str, Path]:
    """The certificates the agent presents, by role: the broker client certificate, and each
    enabled device's ``certificate`` connection setting (the OPC UA driver's application instance
    certificate; drivers are found through entry points, so the setting is looked up by name)."""
    out: dict[str, Path] = {}
    if mqtt is not None and mqtt.tls.cert_file is not None:
        out["mqtt"] = mqtt.tls.cert_file
    for device in devices:
        cert = getattr(device.connection, "certificate", None)
        if device.config.enabled and isinstance(cert, Path):
            out[f"{device.driver.protocol}:{device.id}"] = cert
    return out


async def health(agent: AgentView, buffer_stats: Mapping[str, Any] | None = None) -> Health:
    """The agent's health now. ``buffer_stats``: :meth:`AsyncBuffer.stats` when the caller has
    them already (the status API does), else they are read."""
    stats = await agent.buffer.stats() if buffer_stats is None else buffer_stats
    return assess(agent, stats)


def assess(agent: AgentView, buffer_stats: Mapping[str, Any]) -> Health:
    watch = agent.health_watch
    cfg = watch.cfg
    watch.observe(agent.scheduler, agent.forwarder)
    problems: list[HealthProblem] = []
    if agent.scheduler is not None:
        for runner in agent.scheduler.runners:
            down = watch.down_for(runner.id)
            if down is not None and down[0] > cfg.device_down_after:
                why = runner.last_error or runner.state
                detail = f"not connected for {down[0]:.0f} s ({why})"
                problems.append(HealthProblem(ProblemKind.DEVICE_DOWN, runner.id, detail, down[1]))
    if agent.forwarder is not None:
        down = watch.down_for(BROKER)
        if down is not None and down[0] > cfg.broker_down_after:
            fw = agent.forwarder.stats()
            detail = f"unreachable for {down[0]:.0f} s ({fw.get('last_error') or 'not connected yet'})"
            problems.append(HealthProblem(ProblemKind.BROKER_UNREACHABLE, str(fw["broker"]), detail, down[1]))
    size, limit = buffer_stats.get("size_bytes"), buffer_stats.get("max_bytes")
    if isinstance(size, int) and isinstance(limit, int) and limit > 0 and size / limit > cfg.buffer_fill_max:
        detail = f"{size / limit:.0%} of buffer.max_bytes in use (more than {cfg.buffer_fill_max:.0%})"
        problems.append(HealthProblem(ProblemKind.BUFFER_FULL, "buffer", detail))
    clock = watch.clock()
    if cfg.clock_sync and clock.synced is False:
        detail = f"the wall clock is not synchronised (max error {clock.max_error_s} s)"
        problems.append(HealthProblem(ProblemKind.CLOCK_UNSYNCHRONISED, "clock", detail))
    now = datetime.now(UTC)
    for cert in watch.certificate_expiry():
        days = cert.days_left(now)
        if days < cfg.cert_warn_days:
            when = f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days"
            detail = f"{when} ({cert.not_after.isoformat(timespec='seconds')})"
            problems.append(HealthProblem(ProblemKind.CERTIFICATE_EXPIRING, cert.subject, detail))
    return Health(ok=not problems, problems=tuple(problems))


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")
