"""The wall clock's trustworthiness, as records need it: whether it is synchronised, how far off it
may be, and whether it just jumped.

Every acquisition timestamp is the gateway's wall clock, so a reviewer judging a record's time
needs the clock's state at the moment it was committed (ALCOA+ "contemporaneous"). The kernel
knows it: NTP daemons (chrony, ntpd, systemd-timesyncd) report their discipline through
``adjtimex(2)``, which any user may call read-only (``modes = 0``), so the agent reads it without
root and without asking a daemon over a socket it may not have. Where the call is unavailable
(not Linux, no libc, a sandbox refusing the syscall) the state is *unknown* (``synced: null``),
never a guess and never an exception: a clock reading must not stop acquisition.

A clock *step* (a daemon or an operator setting the time) makes acquisition times jump while
sequence numbers keep counting; :class:`ClockMonitor` notices it by comparing the wall clock with
the monotonic clock, which steps never move, so it is recorded as a ``clock_step`` event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.core.records import AGENT_DEVICE, Event, Severity

TIME_ERROR = 5
"""``adjtimex`` return value: the clock is not synchronised (or the kernel gave up on it)."""
STA_UNSYNC = 0x0040
"""Status bit: no daemon disciplines the clock (set at boot, cleared by NTP)."""
STA_NANO = 0x2000
"""Status bit: ``offset`` is in nanoseconds rather than microseconds."""


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """glibc's ``struct timex``, with its trailing padding, so the kernel never writes past it."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


@dataclass(frozen=True, slots=True)
class ClockState:
    """The wall clock's state at one moment. ``None`` everywhere: it could not be read.

    ``offset_s`` is the kernel's estimate of the clock's remaining offset from the reference
    (only while synchronised: an undisciplined clock has no reference to be off from);
    ``max_error_s`` bounds the clock's error (16 s, the kernel's ceiling, while unsynchronised);
    ``est_error_s`` is the daemon's estimate of it.
    """

    synced: bool | None = None
    offset_s: float | None = None
    max_error_s: float | None = None
    est_error_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The payload's ``clock`` member (docs/integrity.md)."""
        return {"synced": self.synced, "offset_s": self.offset_s, "max_error_s": self.max_error_s}


UNKNOWN = ClockState()


def _load_adjtimex() -> Callable[[Any], int] | None:
    """libc's ``adjtimex``, or None where there is none (it is Linux's call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.adjtimex
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(_Timex)]
    fn.restype = ctypes.c_int
    adjtimex: Callable[[Any], int] = fn
    return adjtimex


_ADJTIMEX = _load_adjtimex()


def state_from_timex(ret: int, status: int, offset: int, maxerror: int, esterror: int) -> ClockState:
    """Interpret what ``adjtimex`` returned: synchronised when no daemon has left the clock
    unsynchronised and the kernel does not report an error state."""
    if ret < 0:
        return UNKNOWN
    synced = not (status & STA_UNSYNC) and ret != TIME_ERROR
    unit = 1e-9 if status & STA_NANO else 1e-6
    return ClockState(
        synced=synced,
        offset_s=offset * unit if synced else None,
        max_error_s=maxerror * 1e-6,
        est_error_s=esterror * 1e-6,
    )


def read_clock() -> ClockState:
    """The clock's state now; :data:`UNKNOWN` when it cannot be read. Never raises."""
    if _ADJTIMEX is None:
        return UNKNOWN
    tx = _Timex()  # modes = 0: read only, allowed without CAP_SYS_TIME
    ret = _ADJTIMEX(ctypes.byref(tx))  # -1 (errno set) where a sandbox refuses it
    return state_from_timex(ret, tx.status, tx.offset, tx.maxerror, tx.esterror)


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The wall clock jumped by ``step_s`` (negative: backwards). ``wall_before_ns`` is what it
    would show now had it not jumped (the previous reading carried forward by the monotonic
    clock), ``wall_after_ns`` what it shows: records between the two times on either side of
    the step may overlap or leave a hole in time, while their seqs stay in order."""

    KIND: ClassVar[str] = "clock_step"

    step_s: float
    wall_before_ns: int
    wall_after_ns: int

    def event(self) -> Event:
        """The agent's ``clock_step`` event (a warning: times around it need a look)."""
        data = {
            "step_s": self.step_s,
            "wall_before_ns": self.wall_before_ns,
            "wall_after_ns": self.wall_after_ns,
        }
        return Event(AGENT_DEVICE, self.KIND, Severity.WARNING, data, ts_ns=self.wall_after_ns)


class ClockMonitor:
    """Notices wall-clock steps between two :meth:`check` calls.

    Between checks the wall clock should advance as much as the monotonic clock; a difference
    beyond ``threshold_s`` (either way) is a step. A daemon slewing the clock (at most 0.5 ms/s)
    stays far below any sensible threshold, and each check starts afresh from its own readings,
    so slow drift never adds up to a false step.
    """

    def __init__(
        self,
        threshold_s: float = 1.0,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not threshold_s > 0:
            raise ValueError(f"the clock step threshold must be positive, not {threshold_s!r}")
        self._threshold_ns = threshold_s * 1e9
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._wall, self._mono = wall_ns(), mono_ns()

    def check(self) -> ClockStep | None:
        """The step since the previous check (or since construction), if any."""
        wall, mono = self._wall_ns(), self._mono_ns()
        expected = self._wall + (mono - self._mono)
        self._wall, self._mono = wall, mono
        jump = wall - expected
        if abs(jump) <= self._threshold_ns:
            return None
        return ClockStep(step_s=jump / 1e9, wall_before_ns=expected, wall_after_ns=wall)
