"""Communication faults the protocol front ends inject: the link misbehaves, the process
does not change.

Faults come from two places: CLI flags (``--fault comm_timeout@60s+30s``) parsed here,
and the scenario engine, whose models report the comm fault active at the current
simulated time (``model.comm_fault()``). Both are answered the same way by every front
end, so a test can provoke a fault without writing a scenario file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from cleanroom_common.fields import parse_duration


class CommFault(StrEnum):
    TIMEOUT = "comm_timeout"
    """No reply at all: the client must time out."""
    GARBLED = "comm_garbled"
    """A reply arrives but is corrupt (bad CRC / checksum / inconsistent lengths)."""
    EXCEPTION = "comm_exception"
    """A protocol-level error reply (Modbus exception, ``ERR BUSY``, OPC UA Bad status)."""
    DISCONNECT = "comm_disconnect"
    """The connection is dropped (TCP closed; on a serial line: silence, input discarded)."""


DEFAULT_EXCEPTION_CODE = 4
"""Modbus exception for ``comm_exception`` unless the spec gives one: 4 = slave device failure."""

_SPEC_RE = re.compile(r"^(?P<kind>comm_[a-z]+)(?:=(?P<code>\d+))?@(?P<start>[^+]+)(?:\+(?P<dur>.+))?$")


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """One fault over ``[start_s, end_s)`` of simulated time since the simulator started."""

    kind: CommFault
    start_s: float
    end_s: float = math.inf
    code: int = DEFAULT_EXCEPTION_CODE
    """Modbus exception code returned during a ``comm_exception`` window."""

    @classmethod
    def parse(cls, spec: str) -> FaultWindow:
        """``kind[=code]@start[+duration]``, durations as in configs (``90s``, ``5m``);
        without a duration the fault lasts until the simulator stops."""
        m = _SPEC_RE.match(spec.strip())
        if not m:
            raise ValueError(
                f"{spec!r} is not a fault; write kind[=code]@start[+duration], e.g. comm_timeout@60s+30s"
            )
        try:
            kind = CommFault(m["kind"])
        except ValueError:
            kinds = ", ".join(k.value for k in CommFault)
            raise ValueError(f"{spec!r}: unknown fault {m['kind']!r}; known: {kinds}") from None
        start = parse_duration(m["start"])
        end = start + parse_duration(m["dur"]) if m["dur"] else math.inf
        code = int(m["code"]) if m["code"] else DEFAULT_EXCEPTION_CODE
        if m["code"] and kind is not CommFault.EXCEPTION:
            raise ValueError(f"{spec!r}: only comm_exception takes a code")
        if not 1 <= code <= 255:
            raise ValueError(f"{spec!r}: exception code must be 1..255")
        return cls(kind, start, end, code)


class FaultSchedule:
    """The fault windows of one device; ``active(elapsed_s)`` answers which applies now.

    Scheduled windows take precedence over what the scenario reports, so a CLI flag can
    always force a fault on top of a scenario.
    """

    def __init__(self, windows: list[FaultWindow] | None = None) -> None:
        self.windows = list(windows or [])

    @classmethod
    def parse(cls, specs: list[str] | None) -> FaultSchedule:
        return cls([FaultWindow.parse(s) for s in specs or []])

    def active(self, elapsed_s: float) -> FaultWindow | None:
        for w in self.windows:
            if w.start_s <= elapsed_s < w.end_s:
                return w
        return None

    def force(self, kind: CommFault | None, code: int = DEFAULT_EXCEPTION_CODE) -> None:
        """Switch a fault on now, until further notice (``None`` clears all windows);
        tests and the plant use it to flip faults without timing games."""
        self.windows = [] if kind is None else [FaultWindow(kind, -math.inf, math.inf, code)]
