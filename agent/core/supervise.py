"""Long-lived tasks that cannot die silently, and failures reported once, not once per retry.

A task that raises and is never awaited leaves a log line at garbage collection, if that,
and whatever it did (drain a counter, poll a group, publish) stops for good while the rest
of the agent looks healthy. So every task that runs for the agent's lifetime is spawned
through a :class:`Supervisor`: when one raises, the supervisor counts the failure, logs it
through a :class:`FailureLog`, tells the task's owner (``on_failure``: the scheduler turns a
device task's failure into bad-quality readings and a reconnect) and, unless the owner
restarts the task itself, starts it again after a backoff delay. A task that returns has
finished its job and is not restarted.

:class:`FailureLog` is also what code that isolates failures per record (the transforms'
listeners) reports through: the first failure of a kind is logged with its traceback, the
same failure again is only counted, and logged again at most every ``relog_s`` with how
often it happened meanwhile; a device that fails every second must not fill the disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from agent.core.backoff import backoff_delay

RELOG_INTERVAL_S = 600.0
"""The same failure (same place, same exception type) is logged again at most this often."""
HEALTHY_RUN_S = 60.0
"""A task that ran this long before it failed starts its backoff afresh: it was not failing in a loop."""
STOP_TIMEOUT_S = 5.0
"""How long tasks may take to wind down on stop before they are abandoned (a protocol stack
that swallows cancellation must not hang the agent's shutdown)."""

OnFailure = Callable[[str, Exception], None]
Factory = Callable[[], Coroutine[Any, Any, None]]


class FailureLog:
    """Failures counted by place and exception type; each kind logged once, then rarely."""

    def __init__(self, logger: logging.Logger, relog_s: float = RELOG_INTERVAL_S) -> None:
        self._log = logger
        self._relog_s = relog_s
        self.counts: Counter[tuple[str, str]] = Counter()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}
        """When each kind was last logged, and its count then."""

    def record(self, where: str, exc: BaseException) -> None:
        """Count ``exc`` raised at ``where`` (a task, a listener and device); log it if it is new
        or was last logged long ago."""
        key = (where, type(exc).__name__)
        self.counts[key] += 1
        now = time.monotonic()
        last = self._logged.get(key)
        if last is None:
            self._log.error("%s failed: %r", where, exc, exc_info=exc)
        elif now - last[0] >= self._relog_s:
            self._log.error(
                "%s failed again: %r (%d times since last logged)", where, exc, self.counts[key] - last[1]
            )
        else:
            return
        self._logged[key] = (now, self.counts[key])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Supervised:
    """One supervised task: its asyncio task and how it fared."""

    name: str
    restart: bool
    factory: Factory
    task: asyncio.Task[None] = field(init=False)
    failures: int = 0
    restarts: int = 0
    failure: Exception | None = None
    """The last exception the task raised (None while it never failed)."""

    def done(self) -> bool:
        return self.task.done()

    def raise_failure(self) -> None:
        """Re-raise what ended the task, if a failure ended it (an owner's liveness check)."""
        if self.done() and self.failure is not None:
            raise self.failure

    def status(self) -> dict[str, Any]:
        return {
            "running": not self.done(),
            "failures": self.failures,
            "restarts": self.restarts,
            "last_error": None if self.failure is None else repr(self.failure),
        }


class Supervisor:
    """Owns a set of long-lived tasks; see the module docstring.

    ``expected`` exception types are failures the owner reports itself (a device's
    ``DeviceError``: the scheduler logs a lost link once per outage); they are handed to
    ``on_failure`` and counted, but not logged here as unexpected. Supervisors of one owner
    may share a ``failures`` log.
    """

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        *,
        on_failure: OnFailure | None = None,
        expected: tuple[type[Exception], ...] = (),
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        failures: FailureLog | None = None,
    ) -> None:
        self.name = name
        self.failures = failures if failures is not None else FailureLog(logger)
        self._on_failure = on_failure
        self._expected = expected
        self._backoff = (backoff_min, backoff_max)
        self._rng = random.Random(name)
        self._tasks: dict[str, Supervised] = {}
        self._history: dict[str, Supervised] = {}

    def spawn(self, name: str, factory: Factory, *, restart: bool = True) -> Supervised:
        """Run ``factory()`` as the task ``name``. With ``restart`` a failed run is started
        again after a backoff delay; without, the task ends with its failure (for tasks the
        owner starts again itself, as a device's are on reconnect). A task spawned again under
        the name of a finished one takes its place and keeps its counts."""
        known = self._history.get(name)
        sup = Supervised(name, restart, factory)
        if known is not None:
            sup.failures, sup.restarts = known.failures, known.restarts
        sup.task = asyncio.create_task(self._run(sup), name=name)
        self._tasks[name] = self._history[name] = sup
        return sup

    async def _run(self, sup: Supervised) -> None:
        streak = 0
        while True:
            started = time.monotonic()
            try:
                await sup.factory()
                return
            except Exception as exc:
                sup.failures += 1
                sup.failure = exc
                if not isinstance(exc, self._expected):
                    self.failures.record(sup.name, exc)
                self._tell_owner(sup.name, exc)
            if not sup.restart:
                return
            streak = 1 if time.monotonic() - started >= HEALTHY_RUN_S else streak + 1
            await asyncio.sleep(backoff_delay(streak, *self._backoff, self._rng))
            sup.restarts += 1

    def _tell_owner(self, name: str, exc: Exception) -> None:
        if self._on_failure is None:
            return
        try:
            self._on_failure(name, exc)
        except Exception as handler_exc:  # the handler must not take the supervision down with it
            self.failures.record(f"{name} failure handler", handler_exc)

    async def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        """Cancel every task and wait for them, at most ``grace_s``; the supervisor can spawn again."""
        tasks = [s.task for s in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=grace_s)
        for t in stuck:
            self.failures.record(
                f"{self.name}: task {t.get_name()}",
                TimeoutError(f"did not stop within {grace_s:.0f} s; abandoned"),
            )

    def status(self) -> dict[str, Any]:
        """Every task spawned so far, by name, with its failures."""
        return {name: s.status() for name, s in sorted(self._history.items())}
