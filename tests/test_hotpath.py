"""The hot path between a driver's values and the buffer, and what runs on every commit: record
building (:meth:`PollGroup.finish`), float32 decimals, JSON encoding and limit evaluation. Each
fast path must give exactly what the general one gives, bit for bit (a ``-0.0`` is not a ``0.0``:
the body is hashed into the integrity chain)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer.audit import Auditor
from agent.core.driver import SMALL_GROUP, GroupSpec, PollGroup, ProfileBase, TagBase
from agent.core.precision import SMALL_FLOAT32, Rounding, rint_one, shortest_float32
from agent.core.records import Block, Event, Quality, Reason, Value, dumps
from agent.transforms.limits import LimitMonitor, LimitsConfig


def group(tags: list[TagBase]) -> PollGroup:
    return PollGroup("dev", "g", GroupSpec(), tags, 1.0)


def profile(*tags: str) -> ProfileBase:
    return ProfileBase(profile="p", protocol="test", tags=[TagBase(name=t) for t in tags])


def exact(values: list[Any]) -> list[tuple[str, str]]:
    """Values with their type and their exact text: ``-0.0`` and ``0.0``, ``7`` and ``7.0`` differ."""
    return [(type(v).__name__, repr(v)) for v in values]


SPECIAL = [0.0, -0.0, -0.01, -0.04, 0.05, -0.05, 95.1, 2.5, -2.5, 1e300, -1e300, 2.0**53 + 2, 1e-9]
numbers = st.one_of(
    st.sampled_from([*SPECIAL, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.integers(-5000, 5000).map(float),
)
tag_specs = st.fixed_dictionaries(
    {},
    optional={
        "scale": st.sampled_from([1.0, 0.1, 0.01, 0.05, 2.0, 1 / 3, -1.0, 10.0]),
        "offset": st.sampled_from([0.0, -40.0, 0.5, 273.15, -0.05]),
        "precision": st.integers(0, 6),
        "range": st.tuples(st.floats(-500, 0), st.floats(0, 500)),
    },
)


@st.composite
def arrays(draw: st.DrawFn) -> tuple[list[TagBase], np.ndarray]:
    specs = draw(st.lists(tag_specs, min_size=1, max_size=SMALL_GROUP))
    tags = [TagBase(name=f"t{i}", **s) for i, s in enumerate(specs)]
    kind = draw(st.sampled_from(["float64", "float32", "int64", "uint16", "bool"]))
    n = len(tags)
    if kind in ("float64", "float32"):
        with np.errstate(over="ignore"):
            readings = np.array(draw(st.lists(numbers, min_size=n, max_size=n))).astype(kind)
    elif kind == "bool":
        readings = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    else:
        info = np.iinfo(kind)
        ints = st.one_of(st.integers(int(info.min), int(info.max)), st.integers(-600, 600).filter(
            lambda v: info.min <= v <= info.max))  # fmt: skip
        readings = np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=kind)
    return tags, readings


@settings(max_examples=200, deadline=None)
@given(arrays(), st.booleans())
def test_small_array_path_matches_vectorised(
    case: tuple[list[TagBase], np.ndarray], given_quality: bool
) -> None:
    tags, readings = case
    g = group(tags)
    quality = [Quality.UNCERTAIN if i % 3 == 0 else Quality.GOOD for i in range(len(tags))]
    reasons: list[str | None] = ["drift" if q is Quality.UNCERTAIN else None for q in quality]
    q_in, r_in = (quality, reasons) if given_quality else (None, None)
    small = g._array_small(readings, list(q_in) if q_in else None, list(r_in) if r_in else None)
    vector = g._array_vectorised(readings, list(q_in) if q_in else None, list(r_in) if r_in else None)
    assert exact(small[0]) == exact(vector[0])
    assert small[1:] == vector[1:]


def test_small_array_keeps_the_sign_of_a_rounded_zero() -> None:
    g = group([TagBase(name="t", precision=1)])
    block = g.finish(np.array([-0.01]))
    assert exact(block.values) == [("float", "-0.0")]
    assert math.copysign(1.0, rint_one(-0.01, 10.0)) == -1.0


def test_array_paths_chosen_by_size() -> None:
    """Both paths are taken where they should be, with the same outcome: an out-of-range reading
    keeps its value in an array (a list nulls it)."""
    for n in (SMALL_GROUP, SMALL_GROUP + 1):
        g = group([TagBase(name=f"t{i}", scale=0.1, range=(0, 10)) for i in range(n)])
        block = g.finish(np.array([5] * (n - 1) + [500], dtype=np.int64))
        assert block.values[0] == 0.5 and block.values[-1] == 50.0
        assert block.quality is not None and block.quality[-1] is Quality.BAD
        assert block.reasons is not None and block.reasons[-1] == Reason.OUT_OF_RANGE
        assert block.quality.count(Quality.BAD) == 1


def test_per_value_path() -> None:
    tags = [
        TagBase(name="count"),
        TagBase(name="temp", scale=0.1, range=(-50, 150)),
        TagBase(name="flag"),
        TagBase(name="text"),
        TagBase(name="hot", scale=0.1, range=(-50, 150)),
        TagBase(name="nan"),
        TagBase(name="failed"),
        TagBase(name="fine", precision=2),
        TagBase(name="wide", scale=2.0),
    ]
    g = group(tags)
    quality = [Quality.GOOD] * 6 + [Quality.BAD, Quality.UNCERTAIN, Quality.GOOD]
    reasons: list[str | None] = [None] * 6 + ["timeout", "BadDrift", None]
    block = g.finish(
        [7, 951, True, "on", 9999, math.nan, 3.0, 1.23456, 1e308], quality=quality, reasons=reasons
    )
    assert exact(block.values[:6]) == exact([7, 95.1, True, "on", None, None])
    assert block.values[6:8] == [None, 1.23]
    assert block.quality is not None and block.reasons is not None
    assert block.quality[4:8] == [Quality.BAD, Quality.BAD, Quality.BAD, Quality.UNCERTAIN]
    assert block.reasons[4:8] == [Reason.OUT_OF_RANGE, Reason.DECODE_ERROR, "timeout", "BadDrift"]
    assert block.values[8] is None and block.reasons[8] == Reason.DECODE_ERROR  # 2 × 1e308: inf
    assert quality[4] is Quality.GOOD, "the caller's quality list is not modified"


def test_all_good_drops_quality_columns() -> None:
    g = group([TagBase(name="a"), TagBase(name="b")])
    for readings in ([1.0, 2.0], np.array([1.0, 2.0])):
        block = g.finish(readings, quality=[Quality.GOOD, Quality.GOOD], reasons=[None, None])
        assert block.quality is None and block.reasons is None


@pytest.mark.parametrize("readings", [[1.0], np.array([1.0, 2.0, 3.0]), np.array([1.0] * (SMALL_GROUP + 3))])
def test_wrong_length_is_refused(readings: Any) -> None:
    with pytest.raises(ValueError, match="driver produced"):
        group([TagBase(name="a"), TagBase(name="b")]).finish(readings)


def test_rounding_per_tag() -> None:
    rounding = Rounding([2, None, None], [None, 1, None])
    assert rounding.per_tag() == [(100.0, False), (10.0, True), (None, False)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_dumps_is_the_compact_strict_encoder(obj: Any) -> None:
    assert dumps(obj) == json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@pytest.mark.parametrize(
    ("obj", "error"), [([1.0, math.nan], ValueError), (math.inf, ValueError), ([object()], TypeError)]
)
def test_dumps_refuses_what_is_not_json(obj: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        dumps(obj)


def test_dumps_enums_as_their_text() -> None:
    assert dumps([Quality.BAD, Reason.TIMEOUT, None]) == '["bad","timeout",null]'
    assert dumps(Quality.GOOD) == '"good"'


def test_limits_resolve_each_block_shape_once() -> None:
    """A poll group's tags tuple is resolved once; another tuple of the same device (an OPC UA
    subset, tags in another order) gets its own plan, and every reading is read at its index."""
    events: list[Event] = []
    monitor = LimitMonitor(
        LimitsConfig.model_validate(
            {
                "tags": [{"tag": "T", "action_high": 1}],
                "particles": [{"device": "pc", "grade": "B", "tag_0_5": "n05", "state_tag": "op"}],
            }
        ),
        {"d": profile("A", "T"), "pc": profile("op", "n05")},
        events.append,
        Auditor(events.append, "gw"),
    )
    monitor._started = True

    def block(device: str, tags: tuple[str, ...], values: list[Value], seq: int) -> Block:
        return Block(
            device, "g", 1_700_000_000 * 10**9 + seq, tags, [None] * len(tags), values, seq_first=seq
        )

    full, subset = ("A", "T"), ("T",)
    for _ in range(2):  # the second pass takes the resolved plans
        events.clear()
        monitor.on_committed([block("d", full, [9.0, 0.5], 0), block("d", subset, [5.0], 2)], [])
        monitor.on_committed([block("d", full, [5.0, 0.5], 3)], [])
        # 200 per 28.3 L is 7,067/m³: over grade B's at-rest limit, inside its in-operation one
        monitor.on_committed([block("pc", ("op", "n05"), [1, 200], 10)], [])
        monitor.on_committed([block("pc", ("n05", "op"), [200, 0], 12)], [])
        monitor.on_committed([block("pc", ("n05", "op"), [0, 0], 14)], [])
        excursions = [(e.device, e.data["tag"], e.data["phase"], e.data.get("seq", e.data.get("end_seq")))
                      for e in events if e.kind == "excursion"]  # fmt: skip
        assert excursions == [("d", "T", "start", 2), ("d", "T", "end", 4), ("pc", "n05", "start", 12),
                              ("pc", "n05", "end", 14)]  # fmt: skip
    assert len(monitor._plans) == 4
    assert monitor.status()["failed_records"] == 0


BOUNDARY_F32 = [1.5474251e26, -1.2379401e27, 95.1, 0.1, 1e-45, 3.4028235e38, -3.4028235e38, 1e10, 9.99e26,
                1e-14, 9.9e-15, 16777217.0, 0.0, -0.0, math.inf, -math.inf, math.nan]  # fmt: skip
"""Values at the edges of the search: powers of two where the nearest decimal does not read back,
magnitudes at the ends of the exact powers of ten, float32's extremes, zeros and non-finite."""


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 2**32 - 1).map(
                lambda b: float(np.array([b], dtype=np.uint32).view(np.float32)[0])
            ),
            st.sampled_from(BOUNDARY_F32),
            st.floats(-1000, 1000, width=32),
        ),
        min_size=1,
        max_size=SMALL_FLOAT32,
    )
)
def test_small_float32_path_matches_vectorised(values: list[float]) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        xs = np.array(values, dtype=np.float32)
    small = shortest_float32(xs)
    vector = shortest_float32(np.concatenate([xs, np.ones(SMALL_FLOAT32, dtype=np.float32)]))[: len(xs)]
    same = (small.view(np.uint64) == vector.view(np.uint64)) | (np.isnan(small) & np.isnan(vector))
    assert same.all(), [(x, s, v) for x, s, v in zip(values, small.tolist(), vector.tolist(), strict=True)]
