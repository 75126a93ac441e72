"""The one place every auditable action passes through (21 CFR 11.10(e), Annex 11 §9).

An audit record says who did what to which object, when, the old and new values, and
why. It is an :class:`~agent.core.records.Event` of kind ``audit``: committed to the buffer
and forwarded like any other event, so the trail is as durable as the data and never
edited in place. Configuration loads, model loads and mode changes, device writes
(clearing a counter's buffer, setting its clock) all call :meth:`Auditor.record`.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable
from typing import Any

from agent.core.records import Event, Severity

log = logging.getLogger("cleanroom.audit")


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


class Auditor:
    """Turns actions into audit events and hands them to ``sink`` (the buffer)."""

    def __init__(self, sink: Callable[[Event], None], actor: str | None = None) -> None:
        self._sink = sink
        self.actor = actor or _default_actor()

    def record(
        self,
        action: str,
        target: str,
        *,
        device: str = "agent",
        old: Any = None,
        new: Any = None,
        why: str = "",
        actor: str | None = None,
        severity: Severity = Severity.INFO,
        state: dict[str, str] | None = None,
    ) -> Event:
        event = Event(
            device=device,
            kind="audit",
            severity=severity,
            data={
                "action": action,
                "target": target,
                "actor": actor or self.actor,
                "old": old,
                "new": new,
                "why": why,
            },
            state=state,
        )
        log.info("audit %s %s by %s: %s", action, target, event.data["actor"], why)
        self._sink(event)
        return event
