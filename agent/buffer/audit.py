"""The one place every auditable action passes through (21 CFR 11.10(e), Annex 11 §9).

An audit record says who did what to which object, when, the old and new values, and
why. It is an :class:`~agent.core.records.Event` of kind ``audit``: committed to the buffer
(stream ``agent/audit``, chained like the data) and forwarded like any other event, so the
trail is as durable as the data and never edited in place. Configuration loads and changes,
model loads and mode changes, start and stop, clock steps and operator actions through the CLI
all call :meth:`Auditor.record`.

*Who* is a person or the agent itself, never merely the operating-system account a process
runs under: the service account that runs the agent is not the person who changed its
configuration. The agent's own actions carry ``agent:<agent id>``; an operator's action carries
the ``--actor`` they gave, and a reason is always required. The OS account is kept beside it
(``os_user``) as a corroborating fact.
"""

from __future__ import annotations

import argparse
import getpass
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.records import AGENT_DEVICE, Event, Severity

log = logging.getLogger("cleanroom.audit")

CORE_KEYS = frozenset({"action", "target", "actor", "reason", "old", "new", "os_user", "device"})
"""The members an audit record has (``device`` only when it concerns one); ``extra`` members
(``diff``, ``hashes``) may not replace them."""


def os_user() -> str:
    """The account this process runs under (``unknown`` without a passwd entry, as in some containers)."""
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def agent_actor(agent_id: str) -> str:
    """The actor of what the agent does by itself."""
    return f"agent:{agent_id}"


class Auditor:
    """Turns actions into audit events and hands them to ``sink`` (the buffer)."""

    def __init__(self, sink: Callable[[Event], None], agent_id: str) -> None:
        self._sink = sink
        self.actor = agent_actor(agent_id)
        self.os_user = os_user()

    def record(
        self,
        action: str,
        target: str,
        *,
        reason: str,
        actor: str | None = None,
        device: str = AGENT_DEVICE,
        old: Any = None,
        new: Any = None,
        extra: Mapping[str, Any] | None = None,
        severity: Severity = Severity.INFO,
        state: dict[str, str] | None = None,
    ) -> Event:
        """Record ``action`` on ``target``. ``device``: the device it concerns, named in the data as
        ``device`` (every audit record is in the agent's one trail, whose segments name no device).
        ``actor`` defaults to the agent itself; ValueError when
        the actor or the reason is blank or ``extra`` would replace a member every record has
        (a programming error: an audit record that says less than it must is never written)."""
        who = self.actor if actor is None else actor
        if not who.strip() or not reason.strip():
            raise ValueError(f"audit {action} of {target}: an actor and a reason are required")
        if extra and (clash := CORE_KEYS.intersection(extra)):
            raise ValueError(f"audit {action}: extra members {sorted(clash)} would replace the record's own")
        data: dict[str, Any] = {
            "action": action,
            "target": target,
            "actor": who,
            "reason": reason,
            "old": old,
            "new": new,
            "os_user": self.os_user,
            **({} if device == AGENT_DEVICE else {"device": device}),
            **(extra or {}),
        }
        event = Event(device=device, kind="audit", severity=severity, data=data, state=state)
        log.info("audit %s %s by %s: %s", action, target, who, reason)
        self._sink(event)
        return event


# --------------------------------------------------------------------------- operators on the CLI


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who asked for a change from the command line, and why (``--actor``, ``--reason``)."""

    actor: str
    reason: str


class AttributionMissing(ValueError):
    """A command that changes data or configuration was given no ``--actor`` or no ``--reason``."""


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be blank")
    return value.strip()


def add_attribution_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--actor`` and ``--reason`` on a command that changes data or configuration. ``required=False``
    where only some uses change anything (check those with :func:`attribution_of`)."""
    parser.add_argument(
        "--actor",
        type=_text,
        required=required,
        help="who asks for this change (a person's name or user id), for the audit trail",
    )
    parser.add_argument(
        "--reason", type=_text, required=required, help="why the change is made, for the audit trail"
    )


def attribution_of(args: argparse.Namespace, what: str) -> Attribution:
    """The ``--actor`` and ``--reason`` given for ``what`` (e.g. ``evaluate --record``), or
    :class:`AttributionMissing` saying which are missing."""
    actor, reason = getattr(args, "actor", None), getattr(args, "reason", None)
    if not actor or not reason:
        missing = " and ".join(
            flag for flag, value in (("--actor", actor), ("--reason", reason)) if not value
        )
        raise AttributionMissing(
            f"{what} changes data: give {missing} (who asks and why, for the audit trail)"
        )
    return Attribution(actor, reason)
