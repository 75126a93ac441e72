"""Whether each device runs with a profile written for it: said once per change, shown in ``status``.

Devices report their identity on every connect, and most reconnects change nothing: a device that
reconnects every minute with the same wrong firmware must not bury the event stream in identical
warnings. The watch remembers what it last said and raises a ``profile_mismatch`` event only when
that changes (:class:`~agent.core.events.ProfileMismatch`), and keeps one line in the device's
status warnings while it does not match.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.core.compat import Outcome
from agent.core.driver import DeviceContext, DeviceIdentity
from agent.core.events import ProfileMismatch
from agent.core.records import Event

log = logging.getLogger("cleanroom.agent")

WARNING_PREFIX = "profile "
"""How the watch's line in the device's status warnings begins (the one line it replaces)."""


class ProfileWatch:
    """One device's identity reports compared with its profile's ``device:`` block."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx
        self._said: dict[str, Any] | None = None
        """The data of the last event raised while not matching; None while the device matches
        (or before the first report), so a first match says nothing."""

    def report(self, identity: DeviceIdentity) -> Event | None:
        """The event to commit now that the device reported ``identity``, or None when what it
        would say was said already (or the device matches, as it did)."""
        expected = self.ctx.profile.device
        if expected is None:
            return None
        change = ProfileMismatch.of(self.ctx.profile.profile, expected, identity)
        data = None if change.compat.outcome is Outcome.MATCH else change.data()
        if data == self._said:
            return None
        self._said = data
        self._flag(change)
        return change.event(self.ctx.id)

    def _flag(self, change: ProfileMismatch) -> None:
        """Log the change and put it in the device's status warnings (``status`` and its page)."""
        warnings = self.ctx.stats.warnings
        warnings[:] = [w for w in warnings if not w.startswith(WARNING_PREFIX)]
        profile, detail = change.profile, change.compat.detail
        if change.compat.outcome is Outcome.MISMATCH:
            line = f"{WARNING_PREFIX}{profile} was not written for this device ({detail}): readings go on"
            log.warning("%s: %s", self.ctx.id, line, extra={"device": self.ctx.id})
            warnings.append(line)
        elif change.compat.outcome is Outcome.UNKNOWN:
            line = f"{WARNING_PREFIX}{profile}: whether it fits this device is unknown ({detail})"
            log.info("%s: %s", self.ctx.id, line, extra={"device": self.ctx.id})
            warnings.append(line)
        else:
            log.info(
                "%s: the device matches profile %s again", self.ctx.id, profile, extra={"device": self.ctx.id}
            )
