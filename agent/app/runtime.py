"""The running agent: wires sources (scheduler/drivers) → buffer → transforms and sinks.

Data path, and the only one: drivers produce blocks, the scheduler submits them to the
buffer (seq numbers assigned on submit), the buffer commits them and then tells its listeners —
the transforms (limits, inference), which may submit events back into the buffer — and
wakes the forwarder, which publishes committed rows and marks them delivered when the
broker acknowledges them.

Every long-lived task on that path (device loops and drivers' own tasks, the buffer's
committer, the forwarder's loops, the inference worker) runs under a supervisor
(:mod:`agent.core.supervise`): none can die silently, and ``status`` shows each one's
failures and restarts.

Every record is attributable (issue 12): the buffer puts each device's source (profile, its hash,
the configuration hash, and the serial number and firmware the device reports) and the clock's
state at commit into the segments it commits. The agent audits its own start and stop and every
change of configuration since the last start (as a diff with secrets masked), watches the wall
clock for steps, and records a start after a crash as an ``agent_restart`` event naming the
interval no record covers.
"""

from __future__ import annotations

import asyncio
import difflib
import gc
import hashlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from agent import __version__
from agent.app.config import LoadedConfig
from agent.app.status import StatusServer, security_report
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.buffer.lock import BufferInUse
from agent.core.clock import ClockMonitor, read_clock
from agent.core.device import ResolvedDevice
from agent.core.driver import DeviceIdentity
from agent.core.records import AGENT_DEVICE, Block, Event, Severity, now_ns
from agent.core.supervise import Supervisor
from agent.sinks.forwarder import AgentIdentity, Forwarder
from agent.sources.scheduler import Scheduler
from agent.transforms.inference import InferenceEngine
from agent.transforms.limits import LimitMonitor

log = logging.getLogger("cleanroom.agent")

CONFIG_HASH_KEY = "agent:config_sha256"
"""Buffer state: the config hash of the last start (device ids cannot be ``agent``)."""
CONFIG_TEXT_KEY = "agent:config_masked"
"""Buffer state: the last start's configuration as masked text (:attr:`LoadedConfig.masked_text`),
what the next start diffs against."""
CLOCK_CHECK_S = 1.0
"""How often the wall clock is compared with the monotonic clock."""


class StartupError(Exception):
    """The agent cannot start (its buffer cannot be opened); the message says why."""


class Agent:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        cfg = loaded.config
        self.identity = AgentIdentity(agent_id=cfg.agent.id, version=__version__, config_hash=loaded.sha256)
        self.buffer = AsyncBuffer(cfg.buffer, cfg.agent.id, key=loaded.hmac_key())
        self.buffer.clock = _clock_state
        self.auditor = Auditor(self._submit_event, cfg.agent.id)
        profiles = {d.id: d.profile for d in loaded.devices}
        self.limits = (
            LimitMonitor(cfg.limits, profiles, self._submit_event, self.auditor) if cfg.limits else None
        )
        self.inference = (
            InferenceEngine(cfg.models, profiles, self._submit_event, self.auditor) if cfg.models else None
        )
        self.forwarder = Forwarder(cfg.mqtt, self.buffer, self.identity) if cfg.mqtt else None
        self.scheduler: Scheduler | None = None
        self.status_server = StatusServer(cfg.agent.status_listen, self.status)
        self.started_ns: int | None = None
        self.clock_monitor = ClockMonitor(threshold_s=cfg.integrity.clock_step_threshold)
        """Its own attribute so that a test drives a step through the real task on a fake clock."""
        self.tasks = Supervisor("agent", log)
        self._sources = {d.id: _device_source(d, loaded.sha256) for d in loaded.devices}
        """Each device's attribution from the configuration (profile, hashes)."""
        self._reported: dict[str, dict[str, Any]] = {}
        """Each device's attribution as last handed to the buffer, with what the device reported."""

    def _submit(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        self.buffer.submit(blocks, events)

    def _submit_event(self, event: Event) -> None:
        self.buffer.submit((), (event,))

    async def start(self) -> None:
        self.started_ns = now_ns()
        self._set_sources()
        try:
            await self.buffer.open()
        except BufferInUse as exc:
            raise StartupError(str(exc)) from exc
        except (OSError, sqlite3.Error, RuntimeError, ValueError) as exc:
            raise StartupError(f"buffer {self.loaded.config.buffer.path}: {exc}") from exc
        if (replaced := self.buffer.replaced) is not None:
            self.auditor.record(
                "buffer_replaced",
                str(self.loaded.config.buffer.path),
                old=replaced.problem,
                new=str(replaced.moved_to),
                reason="the buffer file failed its integrity check: moved aside, a fresh buffer started",
            )
        if (previous_run := self.buffer.previous_run) is not None:
            self._submit_event(
                Event(
                    AGENT_DEVICE,
                    "agent_restart",
                    Severity.WARNING,
                    {
                        "unclean": True,
                        "from_ts": previous_run.last_ts_ns,
                        "until_ts": self.started_ns,
                        "last_seq": previous_run.last_seq,
                    },
                )
            )
        self._audit_config_change()
        self.auditor.record(
            "agent_start",
            "agent",
            new={
                "version": __version__,
                "config_sha256": self.loaded.sha256,
                "config": str(self.loaded.path),
                "after_unclean_stop": previous_run is not None,
            },
            reason="agent process started",
            state={CONFIG_HASH_KEY: self.loaded.sha256, CONFIG_TEXT_KEY: self.loaded.masked_text},
        )
        self.tasks.spawn("clock-monitor", self._watch_clock)
        for transform in (self.limits, self.inference):
            if transform is not None:
                self.buffer.add_listener(transform.on_committed)
                await transform.start()
        if self.forwarder is not None:
            await self.forwarder.start()
        else:
            log.warning("no mqtt section: readings are buffered only, nothing is forwarded")
        self.scheduler = Scheduler(self.loaded.devices, self._submit, self.buffer.state())
        for runner in self.scheduler.runners:
            runner.ctx.on_identity = self._identity_listener(runner.id)
        # What exists by now (modules, configuration, profiles, drivers: some 85,000 objects for
        # a plant of 88 devices) lives as long as the agent: frozen out of the garbage collector,
        # a full collection walks only what was made since (a few ms) instead of stopping the
        # loop for 50-70 ms, which landed on the first poll ticks as jitter (bench.plant p99).
        gc.freeze()
        self.scheduler.start()
        await self.status_server.start()
        log.info(
            "agent %s started: %d devices, config sha256 %s",
            self.identity.agent_id,
            len(self.scheduler.runners),
            self.loaded.sha256[:12],
        )

    def _set_sources(self) -> None:
        """What every segment of each stream names as its source (attribution): set before the
        buffer opens, so even the first segment it commits carries it."""
        self.buffer.set_source(AGENT_DEVICE, {"config_sha256": self.loaded.sha256, "version": __version__})
        for device, source in self._sources.items():
            self.buffer.set_source(device, dict(source))

    def _identity_listener(self, device: str) -> Callable[[DeviceIdentity], None]:
        def on_identity(identity: DeviceIdentity) -> None:
            """The device said what it is (on every connect): its next segments name it. What it
            said replaces what an earlier connection said, so an instrument swapped for another
            never inherits its predecessor's serial number."""
            source = {**self._sources[device], **identity.as_dict()}
            if source != self._reported.get(device):
                self._reported[device] = source
                self.buffer.set_source(device, dict(source))

        return on_identity

    def _audit_config_change(self) -> None:
        """Record how the configuration differs from the last start's, with the masked texts'
        diff when the last start kept its text (agents before issue 12 kept only the hash)."""
        state = self.buffer.state()
        old_hash = state.get(CONFIG_HASH_KEY)
        if old_hash is None or old_hash == self.loaded.sha256:
            return
        extra: dict[str, Any] = {"hashes": {"old": old_hash, "new": self.loaded.sha256}}
        old_text = state.get(CONFIG_TEXT_KEY)
        if old_text is not None:
            extra["diff"] = "".join(
                difflib.unified_diff(
                    old_text.splitlines(keepends=True),
                    self.loaded.masked_text.splitlines(keepends=True),
                    fromfile="previous",
                    tofile=str(self.loaded.path),
                )
            )
        self.auditor.record(
            "config_change",
            str(self.loaded.path),
            old={"config_sha256": old_hash},
            new={"config_sha256": self.loaded.sha256},
            extra=extra,
            reason="the configuration (file or a profile it uses) differs from the last run's",
        )

    async def _watch_clock(self) -> None:
        """Compare the wall clock with the monotonic clock every :data:`CLOCK_CHECK_S`: a step
        (an operator setting the time, NTP stepping instead of slewing) is an event in the
        agent's stream and an audit record. Records keep their order by seq, not by time."""
        while True:
            step = self.clock_monitor.check()
            if step is not None:
                log.warning("wall clock stepped by %+.3f s", step.step_s)
                self._submit_event(step.event())
                self.auditor.record(
                    "clock_step",
                    "clock",
                    old={"wall_ns": step.wall_before_ns},
                    new={"wall_ns": step.wall_after_ns},
                    reason=f"the wall clock stepped by {step.step_s:+.3f} s against the monotonic clock",
                    severity=Severity.WARNING,
                )
            await asyncio.sleep(CLOCK_CHECK_S)

    async def stop(self) -> None:
        """Clean stop: stop polling, let transforms finish, commit everything, deliver
        what can be delivered within the grace period, close. Nothing committed is lost
        whether or not the broker is reachable: undelivered rows stay in the buffer."""
        if self.scheduler is not None:
            await self.scheduler.stop()
            gc.unfreeze()  # collectable again: a process embedding the agent lives on
        for transform in (self.inference, self.limits):
            if transform is not None:
                await transform.stop()
        await self.tasks.stop()
        self.auditor.record("agent_stop", "agent", reason="clean shutdown")
        # Bounded however the disk behaves: what it refuses past close_timeout is recorded as lost.
        close_by = asyncio.get_running_loop().time() + self.loaded.config.buffer.close_timeout
        if not await self.buffer.flush(within_s=self.loaded.config.buffer.close_timeout):
            log.error("stopping with records the disk has not taken yet")
        if self.forwarder is not None:
            await self.forwarder.stop(grace_s=self.loaded.config.agent.shutdown_grace)
        await self.buffer.close(within_s=max(0.0, close_by - asyncio.get_running_loop().time()))
        await self.status_server.stop()
        log.info("agent %s stopped", self.identity.agent_id)

    async def status(self) -> dict[str, Any]:
        devices = self.scheduler.status() if self.scheduler else {}
        return {
            "agent": self.identity.agent_id,
            "version": __version__,
            "config_sha256": self.loaded.sha256,
            "started": self.started_ns,
            "devices": devices,
            "buffer": await self.buffer.stats(),
            "broker": self.forwarder.stats() if self.forwarder else {"configured": False},
            "limits": self.limits.status() if self.limits else None,
            "models": self.inference.status() if self.inference else None,
            "security": security_report(self.loaded.config.mqtt, self.status_server.address, devices),
            "integrity": {
                "hmac": self.loaded.config.integrity.hmac_key_file is not None,
                "clock": read_clock().as_dict(),
            },
            "tasks": self._tasks(),
        }

    def _tasks(self) -> dict[str, Any]:
        """The agent's own long-lived tasks (a device's are in its status), each with its failures
        and restarts, and the records a transform could not evaluate: nothing fails unseen."""
        out: dict[str, Any] = {**self.buffer.tasks.status(), **self.tasks.status()}
        if self.forwarder is not None:
            out.update(self.forwarder.tasks.status())
        if self.inference is not None:
            out.update(self.inference.tasks.status())
            out.setdefault("inference", {})["failed_records"] = self.inference.failed_records
        return out


def _clock_state() -> dict[str, Any]:
    """The clock's state each segment records at commit."""
    return read_clock().as_dict()


def _device_source(device: ResolvedDevice, config_sha256: str) -> dict[str, Any]:
    """A device's attribution before it has said what it is: its profile, by name and content
    (OSError when the profile file went away since the configuration was loaded)."""
    return {
        "profile": device.profile.profile,
        "profile_sha256": hashlib.sha256(device.profile_path.read_bytes()).hexdigest(),
        "config_sha256": config_sha256,
    }


async def run_agent(loaded: LoadedConfig, stop: asyncio.Event) -> None:
    try:
        agent = Agent(loaded)
    except (OSError, ValueError) as exc:  # e.g. a password file that vanished since validation
        raise StartupError(str(exc)) from exc
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()
