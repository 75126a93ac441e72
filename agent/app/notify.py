"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), spoken with the socket module alone.

The protocol is one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named in
``$NOTIFY_SOCKET``; libsystemd's ``sd_notify`` is a few dozen lines around a ``sendmsg``. Binding
it (python-systemd) would put a C extension and libsystemd into an offline bundle that must
install on two architectures, for nothing the standard library cannot do.

What the agent tells the service manager, and why each matters:

- ``READY=1`` once acquisition and forwarding run: ``systemctl start`` (and units ordered after
  the agent) return only then, and a start that fails before it is a failed start, not a
  running service that quietly does nothing.
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, but only while the agent can still do its job:
  the ping comes from a task on the event loop (a blocked loop sends none), and only while the
  buffer's commit thread answers. A commit stuck in the kernel (a dead disk, an NFS mount gone)
  leaves the loop alive and the process "running" while nothing is committed any more; withholding
  the pings makes systemd abort and restart the agent, which the buffer survives by design.
- ``STOPPING=1`` when shutdown begins, so a stop that takes ``shutdown_grace`` to deliver the
  backlog is shown as stopping, not as a hung service.
- ``STATUS=`` one line for ``systemctl status``: what the agent is doing, or why pings stopped.

Without ``$NOTIFY_SOCKET`` (run by hand, in a container, under another supervisor) every call is a
no-op. A send that fails is logged once per kind of failure and never raised: telling systemd is
never a reason to stop acquiring.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.buffer.async_buffer import AsyncBuffer
from agent.sinks.forwarder import Forwarder
from agent.sources.scheduler import Scheduler

log = logging.getLogger("cleanroom.agent.notify")


class Agent(Protocol):
    """What the watchdog and the status line read of the running agent (not imported from the
    runtime, which imports this module)."""

    buffer: AsyncBuffer
    scheduler: Scheduler | None
    forwarder: Forwarder | None


PROBES_PER_PING = 4
"""The buffer thread is asked this often per ping interval whether it answers, so a stall is seen
within a quarter interval of its start, not a whole interval later."""


class NotifySetupError(ValueError):
    """``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` cannot be used; the message says which and why."""


@dataclass(frozen=True)
class NotifyEnv:
    """What the service manager put in the environment for this process."""

    address: bytes | None
    """The socket's address as ``sendto`` takes it (an abstract name starts with a NUL byte);
    None when the agent was not started by a manager that listens."""
    watchdog_s: float | None
    """``WatchdogSec=`` in seconds, None when the watchdog is off or meant for another process."""

    @classmethod
    def parse(cls, environ: Mapping[str, str], pid: int) -> NotifyEnv:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as ``sd_watchdog_enabled``
        does; :class:`NotifySetupError` for values systemd never writes (someone set them by hand)."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address: bytes | None = None
        if raw:
            if raw.startswith("@") and len(raw) > 1:
                address = b"\0" + os.fsencode(raw[1:])
            elif raw.startswith("/"):
                address = os.fsencode(raw)
            else:
                raise NotifySetupError(
                    f"NOTIFY_SOCKET={raw!r}: not an absolute path or an abstract '@name' "
                    "(vsock addresses need systemd 254 tooling the agent does not speak)"
                )
        watchdog_s: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        if usec:
            if not usec.isdigit() or int(usec) == 0:
                raise NotifySetupError(f"WATCHDOG_USEC={usec!r}: not a positive number of microseconds")
            owner = environ.get("WATCHDOG_PID", "")
            # A watchdog meant for another pid was inherited from a parent: pinging for it would lie.
            watchdog_s = None if owner and owner != str(pid) else int(usec) / 1e6
        return cls(address, watchdog_s)


class Notifier:
    """Sends notify messages; a no-op without an address."""

    def __init__(self, env: NotifyEnv) -> None:
        self.address = env.address
        self.watchdog_s = env.watchdog_s if env.address is not None else None
        self._failed: set[str] = set()
        """Kinds of send failure already logged (each once, until a send succeeds again)."""
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for this process; a bad environment is logged and leaves notification off
        (the agent runs as it would without systemd rather than not at all)."""
        try:
            env = NotifyEnv.parse(os.environ if environ is None else environ, os.getpid())
        except NotifySetupError as exc:
            log.warning("systemd notification off: %s", exc)
            env = NotifyEnv(None, None)
        return cls(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when the socket took it. Never blocks: a
        manager too busy to read its queue costs a message, not a stalled event loop."""
        if self.address is None:
            return False
        try:
            # A socket per message, as sd_notify does: nothing to close, whoever owns the notifier.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if kind not in self._failed:
                self._failed.add(kind)
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False
        self._failed.clear()
        return True

    def ready(self, status: str) -> bool:
        self._last_status = status
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping: committing, delivering what the broker takes") -> bool:
        self._last_status = status
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        """``STATUS=``, sent only when it changed (the watchdog asks for it on every ping)."""
        if status == self._last_status:
            return True
        self._last_status = status
        return self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _one_line(text: str) -> str:
    """A status is one line of the datagram: a newline in it would start a bogus assignment."""
    return " ".join(text.split())


class Watchdog:
    """Pings every ``interval_s`` while the event loop runs (this is a task on it) and ``probe``
    (a round trip through the buffer's commit thread) has answered within ``stall_after_s``.

    One probe is outstanding at a time: a stuck thread is asked once, not once per tick, and
    when it comes back the pings resume by themselves. A thread stuck for about ``WatchdogSec``
    therefore gets the agent restarted, a slow commit shorter than that does not."""

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float,
        probe: Callable[[], Awaitable[object]],
        describe: Callable[[], str] = lambda: "running",
        stall_after_s: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.stall_after_s = interval_s if stall_after_s is None else stall_after_s
        self._probe = probe
        self._describe = describe
        self._probe_task: asyncio.Future[object] | None = None
        self._asked_at = 0.0
        self._answered_at = time.monotonic()
        self.pings = 0
        self.withheld = 0
        self.stalled = False

    async def run(self) -> None:
        next_ping = time.monotonic()
        try:
            while True:
                self._ask()
                now = time.monotonic()
                if now >= next_ping:
                    self._tick(now)
                    next_ping += self.interval_s
                    if next_ping <= now:  # the loop was blocked past a whole interval: no catch-up burst
                        next_ping = now + self.interval_s
                await asyncio.sleep(min(self.interval_s / PROBES_PER_PING, max(0.0, next_ping - now)))
        finally:
            if self._probe_task is not None:
                self._probe_task.cancel()

    def _ask(self) -> None:
        """Start a probe unless one is still out."""
        if self._probe_task is not None and not self._probe_task.done():
            return
        self._asked_at = time.monotonic()
        self._probe_task = asyncio.ensure_future(self._probe())
        self._probe_task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Future[object]) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            self._answered_at = time.monotonic()
        # a probe that raised (the buffer closed, its thread gone) is no answer: the stall grows

    def _tick(self, now: float) -> None:
        waiting = now - self._answered_at
        if waiting < self.stall_after_s:
            if self.stalled:
                log.warning("buffer thread answers again: systemd watchdog pings resumed")
                self.stalled = False
            self.notifier.status(self._describe())
            self.notifier.watchdog()
            self.pings += 1
            return
        self.withheld += 1
        if not self.stalled:
            self.stalled = True
            log.error(
                "buffer thread has not answered for %.1f s: systemd watchdog pings withheld "
                "(systemd restarts the agent if it stays stuck)",
                waiting,
            )
        self.notifier.status(f"buffer thread stuck for {waiting:.0f} s: watchdog pings withheld")

    @classmethod
    def for_agent(cls, notifier: Notifier, agent: Agent) -> Watchdog | None:
        """The agent's watchdog at half ``WatchdogSec``; None when systemd asked for none. The
        probe and the summary look the buffer and scheduler up on every call, so a reload that
        replaces them is followed."""
        if notifier.watchdog_s is None:
            return None

        async def probe() -> object:
            return await agent.buffer.on_buffer_thread(_nothing)

        return cls(notifier, notifier.watchdog_s / 2, probe, lambda: summary(agent))


def _nothing() -> None:
    """The probe's work on the buffer thread: reaching it is the answer."""


def summary(agent: Agent) -> str:
    """One ``STATUS=`` line: counts only, cheap enough for every ping (no percentiles, no disk)."""
    runners = agent.scheduler.runners if agent.scheduler is not None else []
    up = sum(1 for r in runners if r.connected)
    broker = "no broker configured"
    if agent.forwarder is not None:
        broker = "broker connected" if agent.forwarder.stats()["connected"] else "broker unreachable"
    return f"running: {up}/{len(runners)} devices connected, {broker}"
