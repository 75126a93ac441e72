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
import contextlib
import ctypes
import dataclasses
import difflib
import gc
import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from agent import __version__
from agent.app.batchcommands import BatchCommand, CommandRefusals, MqttBatchCommands, Outcome, apply_command
from agent.app.batches import BatchRegistry
from agent.app.catalog import build_catalog
from agent.app.compat import ProfileWatch
from agent.app.config import ConfigError, LoadedConfig, load_config
from agent.app.control import ControlEndpoint, token_path
from agent.app.devicebatch import DeviceBatches, declared_batches
from agent.app.health import HealthWatch, assess, certificates_of
from agent.app.metrics import render as render_metrics
from agent.app.notify import Notifier, Watchdog, summary
from agent.app.referencecommands import REFERENCE_PATH, ReferenceChecks
from agent.app.reload import ReloadOutcome, ReloadPlan, ReloadRefused, plan
from agent.app.status import StatusServer, security_report
from agent.app.trend import TrendRecorder
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.buffer.lock import BufferInUse
from agent.core.batch import BatchSource
from agent.core.clock import ClockMonitor, read_clock
from agent.core.device import ResolvedDevice
from agent.core.driver import BatchTags, DeviceContext, DeviceIdentity
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
        self.batches = BatchRegistry(
            [d.id for d in loaded.devices], cfg.batch.groups, self._submit_event, self.auditor
        )
        """Which batch each device holds: every assignment source changes it here, and the buffer
        stamps every record with its device's ref at acquisition (restored from the buffer at start)."""
        self.buffer.set_batch_resolver(self.batches.resolve)
        profiles = {d.id: d.profile for d in loaded.devices}
        self.limits = (
            LimitMonitor(cfg.limits, profiles, self._submit_event, self.auditor) if cfg.limits else None
        )
        self.inference = (
            InferenceEngine(cfg.models, profiles, self._submit_event, self.auditor) if cfg.models else None
        )
        self.batch_commands = MqttBatchCommands(
            self.batches, self.auditor, lambda: self.loaded.config.batch.groups
        )
        """The MES's batch commands on the MQTT command topic (with ``batch.mqtt_commands``)."""
        self.device_batches = DeviceBatches(self.batches, _declared(loaded))
        """Batches the devices report themselves (profile ``batch:``), followed on committed blocks."""
        self.control = ControlEndpoint(
            token_path(cfg.buffer.path),
            self._cli_command,
            self.batches.snapshot,
            CommandRefusals(self.auditor),
        )
        """``cleanroom-agent batch``'s endpoint on the status listener, behind its token."""
        self.reference = ReferenceChecks(
            self.buffer,
            self.auditor,
            self._submit_event,
            lambda: {d.id: d for d in self.loaded.devices},
            lambda: self.loaded.config.reference,
        )
        """Offline reference samples against the online probes (``cleanroom-agent sample``, the LIMS)."""
        self.control.add_post(REFERENCE_PATH, self._cli_sample)
        self.forwarder = self._make_forwarder()
        self.scheduler: Scheduler | None = None
        self.trend = TrendRecorder()
        """The last hour per tag and the recent events, for the status page."""
        self.status_server = StatusServer(
            cfg.agent.status_listen,
            self.status,
            trend=self.trend,
            metrics=lambda: render_metrics(self),
            control=self.control,
        )
        self.started_ns: int | None = None
        self.clock_monitor = ClockMonitor(threshold_s=cfg.integrity.clock_step_threshold)
        """Its own attribute so that a test drives a step through the real task on a fake clock."""
        self.health_watch = HealthWatch(cfg.health, certificates_of(cfg.mqtt, loaded.devices))
        self.tasks = Supervisor("agent", log)
        self.notifier = Notifier.from_environ()
        """systemd's notify socket (READY, WATCHDOG, STOPPING, STATUS); a no-op outside systemd."""
        self._sources = {d.id: _device_source(d, loaded.sha256) for d in loaded.devices}
        """Each device's attribution from the configuration (profile, hashes)."""
        self._reported: dict[str, dict[str, Any]] = {}
        """Each device's attribution as last handed to the buffer, with what the device reported."""
        self.reload_state = ReloadOutcome(generation=0, outcome="none", at_ns=None)
        self._reload_lock = asyncio.Lock()

    def _make_forwarder(self, attempts: int = 0, previous: Forwarder | None = None) -> Forwarder | None:
        """The sink of the configured payload format, told the devices' tags (what a Sparkplug
        DBIRTH declares) and the auditor (where refused commands are recorded). ``attempts`` and
        ``previous`` (the stopped forwarder it replaces) carry the numbering of sessions over."""
        cfg = self.loaded.config.mqtt
        if cfg is None:
            return None
        catalog = build_catalog(self.loaded.devices)
        forwarder = Forwarder(
            cfg,
            self.buffer,
            self.identity,
            attempts,
            catalog=catalog,
            auditor=self.auditor,
            previous=None if previous is None else previous.encoder,
        )
        batch = self.loaded.config.batch
        if batch.mqtt_commands:
            forwarder.add_command_handler(
                batch.topic(cfg.topic_prefix, self.identity.agent_id), self.batch_commands
            )
        reference = self.loaded.config.reference
        if reference.mqtt_commands:
            forwarder.add_command_handler(
                reference.topic(cfg.topic_prefix, self.identity.agent_id), self.reference.on_mqtt
            )
        return forwarder

    async def _cli_sample(self, body: bytes) -> tuple[dict[str, Any], int]:
        entered = await self.reference.enter_payload(body, "cli", REFERENCE_PATH)
        return entered.as_dict(), 200 if entered.ok else 400

    def _cli_command(self, command: BatchCommand) -> Outcome:
        return apply_command(self.batches, command, BatchSource.CLI, self.loaded.config.batch.groups)

    def _security_warnings(self) -> list[str]:
        """The agent's own warnings beyond the broker's and the listener's."""
        mqtt, agent_id = self.loaded.config.mqtt, self.identity.agent_id
        if mqtt is None:
            return []
        cfg = self.loaded.config
        return [
            *cfg.batch.security_warnings(mqtt.topic_prefix, agent_id),
            *cfg.reference.security_warnings(mqtt.topic_prefix, agent_id),
        ]

    def _submit(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        self.buffer.submit(blocks, events)

    def _submit_event(self, event: Event) -> None:
        self.buffer.submit((), (event,))

    async def start(self) -> None:
        self.started_ns = now_ns()
        self.notifier.status("starting: checking the buffer")
        self._set_sources()
        try:
            await self.buffer.open(on_state=self.batches.restore)
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
        # One listener for the transforms, whichever are current: a reload replaces them, and a
        # replaced one must not go on evaluating (it would raise its alarms twice).
        self.buffer.add_listener(self._to_transforms)
        self.buffer.add_listener(self.trend.on_committed)
        self.buffer.add_listener(self.device_batches.on_committed)
        for transform in (self.limits, self.inference):
            if transform is not None:
                await transform.start()
        if self.forwarder is not None:
            await self.forwarder.start()
        else:
            log.warning("no mqtt section: readings are buffered only, nothing is forwarded")
        self.scheduler = Scheduler(self.loaded.devices, self._submit, self.buffer.state())
        self.scheduler.polls.on_idle = self.buffer.sources_idle
        for runner in self.scheduler.runners:
            runner.ctx.on_identity = self._identity_listener(runner.ctx)
        # What exists by now (modules, configuration, profiles, drivers: some 85,000 objects for
        # a plant of 88 devices) lives as long as the agent: frozen out of the garbage collector,
        # a full collection walks only what was made since (a few ms) instead of stopping the
        # loop for 50-70 ms, which landed on the first poll ticks as jitter (bench.plant p99).
        # Collected first, or the cycles the configuration load left behind would be frozen for
        # good; then the freed heap goes back to the OS (a 10,000-tag profile peaks tens of MB
        # above what it keeps).
        gc.collect()
        gc.freeze()
        _return_free_heap()
        self.scheduler.start()
        self.tasks.spawn("health-watch", lambda: self.health_watch.run(self))
        for warning in self._security_warnings():
            log.warning("%s", warning)
        await self.control.start()
        await self.status_server.start()
        log.info(
            "agent %s started: %d devices, config sha256 %s",
            self.identity.agent_id,
            len(self.scheduler.runners),
            self.loaded.sha256[:12],
        )
        self.notifier.ready(summary(self))
        if (watchdog := Watchdog.for_agent(self.notifier, self)) is not None:
            self.tasks.spawn("systemd-watchdog", watchdog.run)

    def _to_transforms(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        for transform in (self.limits, self.inference):
            if transform is not None:
                try:
                    transform.on_committed(blocks, events)
                except Exception:  # as when each was a listener of its own: one failing spares the other
                    log.exception("%s failed on committed records", type(transform).__name__)

    def _set_sources(self) -> None:
        """What every segment of each stream names as its source (attribution): set before the
        buffer opens, so even the first segment it commits carries it."""
        self.buffer.set_source(AGENT_DEVICE, {"config_sha256": self.loaded.sha256, "version": __version__})
        for device, source in self._sources.items():
            self.buffer.set_source(device, dict(source))

    def _identity_listener(self, ctx: DeviceContext) -> Callable[[DeviceIdentity], None]:
        device = ctx.id
        watch = ProfileWatch(ctx)

        def on_identity(identity: DeviceIdentity) -> None:
            """The device said what it is (on every connect): its next segments name it. What it
            said replaces what an earlier connection said, so an instrument swapped for another
            never inherits its predecessor's serial number. Compared with the profile's
            ``device:`` block, a change in how it fits is committed as an event (in the device's
            stream, through the buffer like every record)."""
            source = {**self._sources[device], **identity.as_dict()}
            if source != self._reported.get(device):
                self._reported[device] = source
                self.buffer.set_source(device, dict(source))
            if (event := watch.report(identity)) is not None:
                self._submit_event(event)

        return on_identity

    def _audit_config_change(
        self,
        old_hash: str | None = None,
        old_text: str | None = None,
        applied: dict[str, Any] | None = None,
    ) -> None:
        """Record how the configuration differs from the last start's (by default) or from the one
        a reload replaces, with the masked texts' diff when the last start kept its text (agents
        before issue 12 kept only the hash). A reload's record also moves the buffer state the next
        start diffs against."""
        if applied is None:
            state = self.buffer.state()
            old_hash, old_text = state.get(CONFIG_HASH_KEY), state.get(CONFIG_TEXT_KEY)
        if old_hash is None or old_hash == self.loaded.sha256:
            return
        extra: dict[str, Any] = {"hashes": {"old": old_hash, "new": self.loaded.sha256}}
        if old_text is not None:
            extra["diff"] = "".join(
                difflib.unified_diff(
                    old_text.splitlines(keepends=True),
                    self.loaded.masked_text.splitlines(keepends=True),
                    fromfile="previous",
                    tofile=str(self.loaded.path),
                )
            )
        if applied is not None:
            extra["applied"] = applied
        self.auditor.record(
            "config_change",
            str(self.loaded.path),
            old={"config_sha256": old_hash},
            new={"config_sha256": self.loaded.sha256},
            extra=extra,
            reason="the configuration (file or a profile it uses) differs from the last run's"
            if applied is None
            else "configuration reloaded",
            state=None
            if applied is None
            else {CONFIG_HASH_KEY: self.loaded.sha256, CONFIG_TEXT_KEY: self.loaded.masked_text},
        )

    async def reload(self) -> ReloadOutcome:
        """Load the configuration file again and apply what changed (:mod:`agent.app.reload`). An
        invalid configuration, or one that needs a restart, is refused (logged, audited) and the
        agent runs on with the one it has: everything that can fail is built before anything is
        stopped. Requests are handled one at a time."""
        async with self._reload_lock:
            generation = self.reload_state.generation + 1
            try:
                new = await asyncio.to_thread(load_config, self.loaded.path)
                changes = plan(self.loaded, new)
                sources = {d.id: _device_source(d, new.sha256) for d in new.devices}
                limits, inference = self._new_transforms(new, changes)
                # what a new forwarder fails on
                if (changes.mqtt or changes.catalog) and new.config.mqtt is not None:
                    new.config.mqtt.resolve_password()
                    if new.config.mqtt.tls.enabled:
                        new.config.mqtt.tls.context()
            except ConfigError as exc:
                return self._refuse(
                    generation, "the configuration is invalid", [str(p) for p in exc.problems]
                )
            except ReloadRefused as exc:
                return self._refuse(generation, f"needs a restart: {exc}", [])
            except (OSError, ValueError) as exc:  # e.g. a file it names went away since validation
                return self._refuse(generation, f"cannot apply: {exc}", [])
            await self._apply(new, changes, sources, limits, inference)
            self.reload_state = ReloadOutcome(
                generation,
                "applied",
                now_ns(),
                reason=f"config sha256 {new.sha256[:12]}",
                applied=changes.summary(),
            )
            log.info("configuration reloaded (generation %d): %s", generation, changes.summary())
            return self.reload_state

    def _new_transforms(
        self, new: LoadedConfig, changes: ReloadPlan
    ) -> tuple[LimitMonitor | None, InferenceEngine | None]:
        profiles = {d.id: d.profile for d in new.devices}
        cfg = new.config
        limits = self.limits
        if changes.limits:
            limits = (
                LimitMonitor(cfg.limits, profiles, self._submit_event, self.auditor) if cfg.limits else None
            )
        inference = self.inference
        if changes.models:
            inference = (
                InferenceEngine(cfg.models, profiles, self._submit_event, self.auditor)
                if cfg.models
                else None
            )
        return limits, inference

    def _refuse(self, generation: int, reason: str, errors: list[str]) -> ReloadOutcome:
        for error in errors:
            log.error("reload: %s", error)
        log.error("configuration reload refused: %s; running on with config sha256 %s",
                  reason, self.loaded.sha256[:12])  # fmt: skip
        self.auditor.record(
            "config_reload_refused",
            str(self.loaded.path),
            old={"config_sha256": self.loaded.sha256},
            extra={"errors": errors} if errors else None,
            reason=reason,
            severity=Severity.WARNING,
        )
        self.reload_state = ReloadOutcome(
            generation, "refused", now_ns(), reason=reason, errors=tuple(errors)
        )
        return self.reload_state

    async def _apply(
        self,
        new: LoadedConfig,
        changes: ReloadPlan,
        sources: dict[str, dict[str, Any]],
        limits: LimitMonitor | None,
        inference: InferenceEngine | None,
    ) -> None:
        old = self.loaded
        self.loaded = new
        self.identity = dataclasses.replace(self.identity, config_hash=new.sha256)
        self._sources = sources
        self.batches.configure([d.id for d in new.devices], new.config.batch.groups)
        self.device_batches.configure(_declared(new))
        for device, reported in list(self._reported.items()):  # what a device said stays said
            self._reported[device] = {**reported, **sources.get(device, {})}
        self.buffer.set_source(AGENT_DEVICE, {"config_sha256": new.sha256, "version": __version__})
        for device, source in sources.items():
            self.buffer.set_source(device, dict(self._reported.get(device, source)))
        self._audit_config_change(old.sha256, old.masked_text, changes.summary())
        if new.config.integrity.clock_step_threshold != old.config.integrity.clock_step_threshold:
            self.clock_monitor = ClockMonitor(threshold_s=new.config.integrity.clock_step_threshold)
        # The watch keeps what it noted (since when each device and the broker are down).
        self.health_watch.cfg = new.config.health
        self.health_watch.certificates = certificates_of(new.config.mqtt, new.devices)
        if self.scheduler is not None and (changes.stop or changes.start):
            runners = await self.scheduler.replace(changes.stop, changes.start)
            for runner in runners:
                runner.ctx.on_identity = self._identity_listener(runner.ctx)
                runner.start()
        if limits is not self.limits:
            old_limits, self.limits = self.limits, limits
            if old_limits is not None:
                await old_limits.stop()
            if limits is not None:
                await limits.start()
        if inference is not self.inference:
            old_inference, self.inference = self.inference, inference
            if old_inference is not None:
                await old_inference.stop()
            if inference is not None:
                await inference.start()
        await self._reload_forwarder(changes)

    async def _reload_forwarder(self, changes: ReloadPlan) -> None:
        """A changed broker section, or changed devices a payload format declares (Sparkplug births):
        the old forwarder delivers what it has in flight for a moment, says ``offline`` (and
        Sparkplug's NDEATH) and disconnects; what it had not had acknowledged is sent again by the new
        one, whose sessions are newer and whose births declare the devices as they are now."""
        cfg = self.loaded.config
        if not (changes.mqtt or changes.catalog):
            if self.forwarder is not None:
                self.forwarder.republish_online(self.identity)
            return
        attempts = 0
        previous = self.forwarder
        if previous is not None:
            attempts = previous.attempts
            await previous.stop(grace_s=min(1.0, cfg.agent.shutdown_grace))
        self.forwarder = self._make_forwarder(attempts, previous)
        if self.forwarder is not None:
            await self.forwarder.start()
        else:
            log.warning("no mqtt section: readings are buffered only, nothing is forwarded")

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
        self.notifier.stopping()
        if self.scheduler is not None:
            await self.scheduler.stop()
            gc.unfreeze()  # collectable again: a process embedding the agent lives on
        for transform in (self.inference, self.limits):
            if transform is not None:
                await transform.stop()
        await self.tasks.stop()
        await self.reference.drain()
        self.auditor.record("agent_stop", "agent", reason="clean shutdown")
        # Bounded however the disk behaves: what it refuses past close_timeout is recorded as lost.
        close_by = asyncio.get_running_loop().time() + self.loaded.config.buffer.close_timeout
        if not await self.buffer.flush(within_s=self.loaded.config.buffer.close_timeout):
            log.error("stopping with records the disk has not taken yet")
        if self.forwarder is not None:
            await self.forwarder.stop(grace_s=self.loaded.config.agent.shutdown_grace)
        await self.buffer.close(within_s=max(0.0, close_by - asyncio.get_running_loop().time()))
        await self.status_server.stop()
        await self.control.stop()
        log.info("agent %s stopped", self.identity.agent_id)

    async def status(self) -> dict[str, Any]:
        devices = self.scheduler.status() if self.scheduler else {}
        buffer = await self.buffer.stats()
        return {
            "agent": self.identity.agent_id,
            "pid": os.getpid(),
            "version": __version__,
            "config_sha256": self.loaded.sha256,
            "started": self.started_ns,
            "devices": devices,
            "buffer": buffer,
            "health": assess(self, buffer).as_dict(),
            "broker": self.forwarder.stats() if self.forwarder else {"configured": False},
            "limits": self.limits.status() if self.limits else None,
            "models": self.inference.status() if self.inference else None,
            "security": security_report(
                self.loaded.config.mqtt, self.status_server.address, devices, self._security_warnings()
            ),
            "integrity": {
                "hmac": self.loaded.config.integrity.hmac_key_file is not None,
                "clock": read_clock().as_dict(),
            },
            "tasks": self._tasks(),
            "reload": self.reload_state.as_dict(),
            "batches": self.batches.snapshot(),
            "batch_sources": {
                "mqtt": self.batch_commands.stats() if self.loaded.config.batch.mqtt_commands else None,
                "cli": dict(self.control.counts),
                "device_conflicts": self.device_batches.conflicts,
            },
            "reference_samples": self.reference.stats(),
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


def _declared(loaded: LoadedConfig) -> dict[str, BatchTags]:
    """The devices whose profile names the tags through which they report their batch."""
    return declared_batches((d.id, d.profile.batch) for d in loaded.devices)


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


def _return_free_heap() -> None:
    """glibc keeps freed heap pages for reuse; hand them back once after startup. Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


async def run_agent(loaded: LoadedConfig, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set; each time ``reload`` is set (SIGHUP), reload the configuration."""
    try:
        agent = Agent(loaded)
    except (OSError, ValueError) as exc:  # e.g. a password file that vanished since validation
        raise StartupError(str(exc)) from exc
    await agent.start()
    reloads = reload or asyncio.Event()
    try:
        while not stop.is_set():
            stopping = asyncio.ensure_future(stop.wait())
            reloading = asyncio.ensure_future(reloads.wait())
            try:
                await asyncio.wait((stopping, reloading), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                reloading.cancel()
            if reloads.is_set() and not stop.is_set():
                reloads.clear()
                await agent.reload()
    finally:
        await agent.stop()
