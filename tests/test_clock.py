"""The clock's state and its steps (agent.core.clock): read from the real kernel, steps found through
an injected clock."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from agent.core import clock
from agent.core.clock import (
    STA_NANO,
    STA_UNSYNC,
    TIME_ERROR,
    UNKNOWN,
    ClockMonitor,
    ClockState,
    ClockStep,
    read_clock,
    state_from_timex,
)
from agent.core.records import AGENT_DEVICE, Severity

S = 1_000_000_000
T0 = 1_767_225_600 * S


@dataclass
class FakeClock:
    """A wall and a monotonic clock the test moves by hand."""

    wall: int = T0
    mono: int = 5 * S

    def tick(self, ns: int, *, drift_ns: int = 0) -> None:
        self.mono += ns
        self.wall += ns + drift_ns

    def monitor(self, threshold_s: float = 1.0) -> ClockMonitor:
        return ClockMonitor(threshold_s, wall_ns=lambda: self.wall, mono_ns=lambda: self.mono)


# --------------------------------------------------------------------------- reading the clock


def test_the_real_clock_reads_without_root_into_the_payload_shape() -> None:
    state = read_clock()
    assert isinstance(state, ClockState)
    assert set(state.as_dict()) == {"synced", "offset_s", "max_error_s"}
    json.dumps(state.as_dict(), allow_nan=False)  # a payload member: strict JSON
    assert state.synced in (True, False, None)
    if sys.platform.startswith("linux") and state.synced is not None:
        # the kernel caps maxerror at 16 s (NTP_PHASE_LIMIT): garbage here means a wrong struct layout
        assert isinstance(state.max_error_s, float)
        assert isinstance(state.est_error_s, float)
        assert 0.0 <= state.max_error_s <= 16.0
        assert 0.0 <= state.est_error_s <= 16.0
        if state.synced:
            assert isinstance(state.offset_s, float)
            assert abs(state.offset_s) < 16.0
        else:
            assert state.offset_s is None
    if state.synced is None:
        assert state == UNKNOWN


def test_a_refused_or_missing_call_is_unknown_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_ADJTIMEX", None)
    assert read_clock() == UNKNOWN
    assert read_clock().as_dict() == {"synced": None, "offset_s": None, "max_error_s": None}
    monkeypatch.setattr(clock, "_ADJTIMEX", lambda _buf: -1)  # a sandbox: EPERM / ENOSYS
    assert read_clock() == UNKNOWN


def test_an_unsynchronised_clock_has_no_offset_and_the_kernels_error_ceiling() -> None:
    state = state_from_timex(TIME_ERROR, STA_UNSYNC, 0, 16_000_000, 16_000_000)
    assert state == ClockState(synced=False, offset_s=None, max_error_s=16.0, est_error_s=16.0)


def test_the_error_state_alone_means_unsynchronised() -> None:
    assert state_from_timex(TIME_ERROR, 0, 1000, 5000, 100).synced is False


@pytest.mark.parametrize(
    ("status", "offset", "offset_s"),
    [(0, -250, -250e-6), (STA_NANO, -250, -250e-9), (STA_NANO, 1_500_000, 1.5e-3)],
)
def test_a_synchronised_clock_reports_its_offset_in_seconds(
    status: int, offset: int, offset_s: float
) -> None:
    state = state_from_timex(0, status, offset, 12_345, 678)
    assert state.synced is True
    assert state.offset_s == pytest.approx(offset_s)
    assert state.max_error_s == pytest.approx(0.012345)
    assert state.est_error_s == pytest.approx(0.000678)
    assert state.as_dict() == {"synced": True, "offset_s": state.offset_s, "max_error_s": state.max_error_s}


def test_a_failed_call_is_unknown() -> None:
    assert state_from_timex(-1, 0, 0, 0, 0) == UNKNOWN


# --------------------------------------------------------------------------- steps


def test_a_steady_clock_has_no_step() -> None:
    c = FakeClock()
    monitor = c.monitor()
    for _ in range(100):
        c.tick(S)
        assert monitor.check() is None


def test_a_step_forward_is_found_with_both_wall_times() -> None:
    c = FakeClock()
    monitor = c.monitor()
    c.tick(2 * S)
    c.wall += 5 * S
    step = monitor.check()
    assert step == ClockStep(step_s=5.0, wall_before_ns=T0 + 2 * S, wall_after_ns=T0 + 7 * S)
    c.tick(S)
    assert monitor.check() is None, "the step is reported once; checks go on from the new time"


def test_a_step_backward_is_negative() -> None:
    c = FakeClock()
    monitor = c.monitor()
    c.tick(S)
    c.wall -= 3_600 * S
    step = monitor.check()
    assert step is not None
    assert step.step_s == -3600.0
    assert step.wall_after_ns - step.wall_before_ns == -3_600 * S


def test_drift_below_the_threshold_never_adds_up_to_a_step() -> None:
    """A daemon slewing at its 500 ppm maximum for hours moves the clock by seconds in total,
    but never by a step between two checks."""
    c = FakeClock()
    monitor = c.monitor(threshold_s=1.0)
    for _ in range(20_000):
        c.tick(S, drift_ns=500_000)
        assert monitor.check() is None
    assert c.wall - (T0 + 20_000 * S) == 10 * S  # 10 s of drift went by unreported


def test_the_threshold_is_the_boundary() -> None:
    c = FakeClock()
    monitor = c.monitor(threshold_s=0.5)
    c.tick(S, drift_ns=S // 2)
    assert monitor.check() is None
    c.tick(S, drift_ns=-(S // 2 + 1))
    step = monitor.check()
    assert step is not None
    assert step.step_s == pytest.approx(-0.5, abs=1e-8)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_a_threshold_that_is_not_positive_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        FakeClock().monitor(threshold)


def test_a_step_is_the_agents_clock_step_warning() -> None:
    step = ClockStep(step_s=-2.5, wall_before_ns=T0, wall_after_ns=T0 - 5 * S // 2)
    event = step.event()
    assert event.device == AGENT_DEVICE
    assert event.kind == "clock_step"
    assert event.severity is Severity.WARNING
    assert event.ts_ns == T0 - 5 * S // 2
    assert event.data == {"step_s": -2.5, "wall_before_ns": T0, "wall_after_ns": T0 - 5 * S // 2}
    event.seq = 7
    assert json.loads(json.dumps(event.body()))["data"]["step_s"] == -2.5
