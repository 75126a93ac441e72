"""Rule-based limits: ISO 14644-1 table from its formula, Annex 1 grade limits by state,
alert/action excursions with deadband and consecutive samples (property-tested), rate of
change, the 5 µm consecutive-sample rule and room state from a polled tag."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase, TagBase
from agent.core.records import Block, Event, Quality, Severity
from agent.transforms.limits import LimitMonitor, LimitsConfig, ParticleLimits, TagLimits
from cleanroom_common.particle_limits import iso_class_limit

# shared/domain.md §1, ISO 14644-1:2015 Table 1 (None = "–")
ISO_TABLE = {
    1: (10, None, None, None, None, None),
    2: (100, 24, 10, None, None, None),
    3: (1_000, 237, 102, 35, None, None),
    4: (10_000, 2_370, 1_020, 352, 83, None),
    5: (100_000, 23_700, 10_200, 3_520, 832, None),
    6: (1_000_000, 237_000, 102_000, 35_200, 8_320, 293),
    7: (None, None, None, 352_000, 83_200, 2_930),
    8: (None, None, None, 3_520_000, 832_000, 29_300),
    9: (None, None, None, 35_200_000, 8_320_000, 293_000),
}
SIZES = (0.1, 0.2, 0.3, 0.5, 1.0, 5.0)
T0_NS = 1_767_571_200 * 10**9


@pytest.mark.parametrize("iso_class", sorted(ISO_TABLE))
def test_iso_class_table_is_reproduced_from_the_formula(iso_class: int) -> None:
    assert tuple(iso_class_limit(iso_class, d) for d in SIZES) == ISO_TABLE[iso_class]


def profile(*tags: str) -> ProfileBase:
    return ProfileBase(profile="p", protocol="test", tags=[TagBase(name=t) for t in tags])


class Run:
    """A started LimitMonitor fed one block per sample; collects what it emits."""

    def __init__(self, config: dict[str, Any], devices: dict[str, ProfileBase]) -> None:
        self.events: list[Event] = []
        self.monitor = LimitMonitor(
            LimitsConfig.model_validate(config),
            devices,
            self.events.append,
            Auditor(self.events.append, "gw"),
        )
        self.monitor._started = True
        self.seq = 0

    def feed(self, device: str, t_s: float, values: dict[str, Any], bad: tuple[str, ...] = ()) -> None:
        tags = list(values)
        quality = [Quality.BAD if t in bad else Quality.GOOD for t in tags] if bad else None
        vals = [None if t in bad else values[t] for t in tags]
        block = Block(
            device, "g", T0_NS + int(t_s * 1e9), tags, [None] * len(tags), vals, quality, seq_first=self.seq
        )
        self.seq += len(tags)
        self.monitor.on_committed([block], [])

    def excursions(self) -> list[Event]:
        return [e for e in self.events if e.kind == "excursion"]


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=60),
    limit=st.floats(min_value=2, max_value=8),
    deadband=st.floats(min_value=0, max_value=1.5),
    consecutive=st.integers(1, 4),
)
def test_high_limit_excursions_follow_their_definition(
    values: list[float], limit: float, deadband: float, consecutive: int
) -> None:
    cfg = {"tags": [{"tag": "x", "action_high": limit, "deadband": deadband, "consecutive": consecutive}]}
    run = Run(cfg, {"d": profile("x")})
    active, run_start, emitted = False, None, 0
    for i, v in enumerate(values):
        run.feed("d", i, {"x": v})
        new = run.excursions()[emitted:]
        emitted += len(new)
        if not active:
            run_start = run_start if v > limit and run_start is not None else (i if v > limit else None)
            expect_start = run_start is not None and i - run_start + 1 == consecutive
            assert [e.data["phase"] for e in new] == (["start"] if expect_start else [])
            if expect_start:
                e = new[0]
                assert e.severity is Severity.ALARM and e.data["level"] == "action"
                assert e.data["start_ts"] == T0_NS + int(run_start * 1e9)  # type: ignore[operator]
                assert e.data["start_seq"] == run_start
                active = True
        else:
            ends = v <= limit - deadband
            assert [e.data["phase"] for e in new] == (["end"] if ends else [])
            if ends:
                e = new[0]
                assert e.data["peak"] == max(values[run_start:i])  # type: ignore[misc]
                assert e.data["duration_s"] == pytest.approx(i - run_start)  # type: ignore[operator]
                active, run_start = False, None


def test_alert_and_action_levels_and_low_limits_are_independent() -> None:
    cfg = {
        "tags": [{"tag": "T", "alert_low": 36.7, "action_low": 36.5, "alert_high": 37.3, "deadband": 0.05}]
    }
    run = Run(cfg, {"inc": profile("T")})
    for i, v in enumerate([37.0, 36.6, 36.4, 36.6, 36.74, 36.76, 37.4]):
        run.feed("inc", i * 10, {"T": v})
    got = [(e.data["level"], e.data["limit_kind"], e.data["phase"], e.severity) for e in run.excursions()]
    assert got == [
        ("alert", "low", "start", Severity.WARNING),
        ("action", "low", "start", Severity.ALARM),
        ("action", "low", "end", Severity.INFO),
        ("alert", "low", "end", Severity.INFO),
        ("alert", "high", "start", Severity.WARNING),
    ]
    assert run.excursions()[3].data["peak"] == 36.4
    assert run.monitor.status()["active"][0]["kind"] == "high"


def test_bad_quality_neither_starts_nor_ends_an_excursion() -> None:
    run = Run({"tags": [{"tag": "T", "action_high": 37.5}]}, {"d": profile("T")})
    run.feed("d", 0, {"T": 38.0})
    run.feed("d", 1, {"T": None}, bad=("T",))
    run.feed("d", 2, {"T": 38.1})
    assert [e.data["phase"] for e in run.excursions()] == ["start"]


def test_rate_of_change_uses_the_configured_span() -> None:
    cfg = {"tags": [{"tag": "ph", "rate_of_change": 0.1, "rate_window": "60s"}]}
    run = Run(cfg, {"bio": profile("ph")})
    values = [7.20] * 7 + [7.20 + 0.005 * k for k in range(1, 13)] + [7.26] * 8  # 0.03 pH/min, then 0.3/min
    for i, v in enumerate(values[:19]):
        run.feed("bio", i * 10, {"ph": v})
    assert not run.excursions()
    for i, v in enumerate([7.32, 7.37, 7.42], start=19):
        run.feed("bio", i * 10, {"ph": v})
    (start,) = run.excursions()
    assert start.data["limit_kind"] == "rate_of_change" and start.data["value"] > 0.1


def pc_run(**kw: Any) -> Run:
    cfg = {"particles": [{"device": "pc", "tag_0_5": "c05", "tag_5_0": "c5", **kw}]}
    devices = {"pc": profile("c05", "c5", "vol"), "room": profile("in_op")}
    return Run(cfg, devices)


def test_grade_a_five_micron_needs_consecutive_samples() -> None:
    run = pc_run(grade="A")
    for i, c5 in enumerate([0, 1, 0, 0, 1, 0, 2, 1, 0]):
        run.feed("pc", i * 60, {"c05": 3, "c5": c5})
    got = [(e.data["limit_kind"], e.data["phase"]) for e in run.excursions()]
    assert got == [("particles_5.0um", "start"), ("particles_5.0um", "end")]
    start = run.excursions()[0]
    assert start.data["limit"] == 29 and start.data["start_ts"] == T0_NS + 6 * 60 * 10**9
    assert start.data["detected_ts"] == T0_NS + 7 * 60 * 10**9
    assert start.data["count"] == 1 and start.data["value"] == pytest.approx(1 / 0.0283)


def test_room_state_from_a_polled_tag_switches_the_grade_b_limits() -> None:
    run = pc_run(grade="B", state_tag="in_op", state_device="room", consecutive_5_0=1)
    run.feed("pc", 0, {"c05": 200, "c5": 0})  # state unknown: stricter at-rest limit 3,520/m³ = 99.6/sample
    run.feed("room", 30, {"in_op": True})
    run.feed("pc", 60, {"c05": 200, "c5": 10})  # in operation: 352,000/m³ and 2,930/m³
    run.feed("room", 90, {"in_op": 0})
    run.feed("pc", 120, {"c05": 50, "c5": 10})  # at rest again: 5 µm over 29/m³
    got = [(e.data["limit_kind"], e.data["phase"], e.data["state"]) for e in run.excursions()]
    assert got == [
        ("particles_0.5um", "start", "at_rest"),
        ("particles_0.5um", "end", "in_operation"),
        ("particles_5.0um", "start", "at_rest"),
    ]


def test_iso_class_limits_and_volume_tag() -> None:
    run = pc_run(iso_class_at_rest=5, iso_class_in_operation=7, state="at_rest", volume_tag="vol")
    run.feed("pc", 0, {"c05": 50, "c5": 0, "vol": 10.0})  # 5,000/m³ > ISO 5's 3,520
    (e,) = run.excursions()
    assert e.data["limit"] == 3520 and e.data["volume_l"] == 10.0 and e.data["value"] == pytest.approx(5000)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tag": "x", "alert_high": 5, "action_high": 4}, "alert_high must not be above action_high"),
        ({"tag": "x", "alert_low": 3, "action_low": 4}, "alert_low must not be below action_low"),
        ({"tag": "x"}, "no limit given"),
        ({"tag": "x", "action_high": 1, "consecutive": 0}, "greater than or equal to 1"),
        ({"tag": "x", "action_high": 1, "rate_window": "soon"}, "is not a duration"),
    ],
)
def test_bad_tag_limits_are_clear_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TagLimits.model_validate(config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"grade": "D", "tag_0_5": "c"}, "grade D in operation has no Annex 1 limit"),
        ({"grade": "A", "iso_class_at_rest": 5, "tag_0_5": "c"}, "either 'grade' or ISO classes"),
        ({"tag_0_5": "c"}, "give a 'grade'"),
        ({"grade": "A"}, "tag_0_5"),
        ({"grade": "E", "tag_0_5": "c"}, "Input should be 'A', 'B', 'C' or 'D'"),
    ],
)
def test_bad_particle_limits_are_clear_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ParticleLimits.model_validate({"device": "pc", **config})


def test_check_names_every_unknown_device_and_tag() -> None:
    cfg = LimitsConfig.model_validate(
        {
            "tags": [
                {"tag": "nope", "action_high": 1},
                {"tag": "T", "devices": ["d", "ghost"], "action_high": 1},
            ],
            "particles": [{"device": "d", "grade": "A", "tag_0_5": "c05", "state_tag": "door"}],
        }
    )
    assert [str(p) for p in LimitMonitor.check(cfg, {"d": profile("T")})] == [
        "limits.tags[0] (nope): no configured device has tag 'nope'",
        "limits.tags[1] (T): device 'ghost' is not configured",
        "limits.particles[0] (d): device 'd' has no tag 'c05'",
        "limits.particles[0] (d): device 'd' has no tag 'door'",
    ]


async def test_start_is_audited_and_nothing_is_evaluated_before_it() -> None:
    events: list[Event] = []
    monitor = LimitMonitor(
        LimitsConfig.model_validate({"tags": [{"tag": "T", "action_high": 1}]}),
        {"d": profile("T")},
        events.append,
        Auditor(events.append, "gw"),
    )
    monitor.on_committed([Block("d", "g", T0_NS, ["T"], [None], [5.0], seq_first=0)], [])
    assert not events
    await monitor.start()
    monitor.on_committed([Block("d", "g", T0_NS, ["T"], [None], [5.0], seq_first=1)], [])
    await monitor.stop()
    assert [e.kind for e in events] == ["audit", "excursion"]
    assert events[0].data["action"] == "limits_load" and events[1].data["seq"] == 1


@pytest.mark.parametrize(("direction", "alarms"), [("either", 2), ("falling", 1), ("rising", 1)])
def test_rate_of_change_can_watch_one_direction(direction: str, alarms: int) -> None:
    """A bag's weight may rise (feeds) but must not fall without a harvest: a falling-only
    rate limit sees the leak and stays quiet during the feed."""
    cfg = {"tags": [{"tag": "w", "rate_of_change": 0.5, "rate_window": "60s", "rate_direction": direction}]}
    run = Run(cfg, {"bio": profile("w")})
    feed = [1.0 + 1.0 * k / 6 for k in range(13)]  # +1 per minute for 2 min
    hold = [feed[-1]] * 12
    leak = [feed[-1] - 1.0 * k / 6 for k in range(1, 13)]  # -1 per minute for 2 min
    for i, v in enumerate(feed + hold + leak):
        run.feed("bio", i * 10, {"w": v})
    starts = [e for e in run.excursions() if e.data["phase"] == "start"]
    assert len(starts) == alarms
    if direction != "either":
        falling_start = 10 * (len(feed) + len(hold))
        assert (starts[0].data["detected_ts"] >= T0_NS + falling_start * 10**9) == (direction == "falling")
