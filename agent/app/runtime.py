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
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.app.config import LoadedConfig
from agent.app.status import StatusServer, security_report
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.buffer.lock import BufferInUse
from agent.core.records import Block, Event, now_ns
from agent.sinks.forwarder import AgentIdentity, Forwarder
from agent.sources.scheduler import Scheduler
from agent.transforms.inference import InferenceEngine
from agent.transforms.limits import LimitMonitor

log = logging.getLogger("cleanroom.agent")

CONFIG_HASH_KEY = "agent:config_sha256"
"""Buffer state: the config hash of the last start (device ids cannot be ``agent``)."""


class StartupError(Exception):
    """The agent cannot start (its buffer cannot be opened); the message says why."""


class Agent:
    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        cfg = loaded.config
        self.identity = AgentIdentity(agent_id=cfg.agent.id, version=__version__, config_hash=loaded.sha256)
        self.buffer = AsyncBuffer(cfg.buffer, cfg.agent.id)
        self.auditor = Auditor(self._submit_event)
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

    def _submit(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        self.buffer.submit(blocks, events)

    def _submit_event(self, event: Event) -> None:
        self.buffer.submit((), (event,))

    async def start(self) -> None:
        self.started_ns = now_ns()
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
                why="the buffer file failed its integrity check: moved aside, a fresh buffer started",
            )
        previous = self.buffer.state().get(CONFIG_HASH_KEY)
        if previous is not None and previous != self.loaded.sha256:
            self.auditor.record(
                "config_changed",
                str(self.loaded.path),
                old={"config_sha256": previous},
                new={"config_sha256": self.loaded.sha256},
                why="the configuration (file or a profile it uses) differs from the last run's",
            )
        self.auditor.record(
            "agent_start",
            "agent",
            new={
                "version": __version__,
                "config_sha256": self.loaded.sha256,
                "config": str(self.loaded.path),
            },
            why="agent process started",
            state={CONFIG_HASH_KEY: self.loaded.sha256},
        )
        for transform in (self.limits, self.inference):
            if transform is not None:
                self.buffer.add_listener(transform.on_committed)
                await transform.start()
        if self.forwarder is not None:
            await self.forwarder.start()
        else:
            log.warning("no mqtt section: readings are buffered only, nothing is forwarded")
        self.scheduler = Scheduler(self.loaded.devices, self._submit, self.buffer.state())
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
        self.auditor.record("agent_stop", "agent", why="clean shutdown")
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
            "tasks": self._tasks(),
        }

    def _tasks(self) -> dict[str, Any]:
        """The agent's own long-lived tasks (a device's are in its status), each with its failures
        and restarts, and the records a transform could not evaluate: nothing fails unseen."""
        out: dict[str, Any] = {**self.buffer.tasks.status()}
        if self.forwarder is not None:
            out.update(self.forwarder.tasks.status())
        if self.inference is not None:
            out.update(self.inference.tasks.status())
            out.setdefault("inference", {})["failed_records"] = self.inference.failed_records
        return out


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
