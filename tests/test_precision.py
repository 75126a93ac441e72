"""Readings carry the decimals the device meant: ``95.1``, never ``95.10000000000001`` (scaled
registers) nor ``95.0999984741211`` (a widened float32); the device's own value stays in ``raw``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest
from asyncua import ua
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.driver import GroupSpec, PollGroup, TagBase
from agent.core.precision import (
    MAX_DECIMALS,
    decimals_of,
    derived_precision,
    shortest_float32,
    shortest_float32_one,
)
from agent.core.records import Quality, Reason
from cleanroom_common.codec import DataType, encode
from drivers.modbus.config import Connection, Tag
from drivers.modbus.plan import Outcome, build_plan, decode_plan, raw_values
from drivers.opcua.values import Converted

f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def group(*tags: TagBase) -> PollGroup:
    return PollGroup("dev", "g", GroupSpec(), tags, 1.0)


def text(values: Sequence[object]) -> str:
    return json.dumps(values)


@settings(max_examples=300, deadline=None)
@given(st.lists(f32, min_size=1, max_size=40))
def test_a_float32_becomes_its_shortest_round_tripping_decimal(xs: list[float]) -> None:
    out = shortest_float32(np.array(xs, dtype=np.float32))
    for x, y in zip(xs, out.tolist(), strict=True):
        assert np.float32(y) == np.float32(x)  # the same float32: nothing of the device's value lost
        assert repr(y) == repr(float(str(np.float32(x)))), x  # numpy's shortest form, to the digit


@pytest.mark.parametrize("x", [95.1, 0.1, 37.02, -7.21, 1e-20, 3.4e38, 1.5e25, 16777217.0, 1e-45])
def test_shortest_float32_at_the_edges(x: float) -> None:
    y = shortest_float32(np.array([x], dtype=np.float32))[0]
    assert y == shortest_float32_one(x) and np.float32(y) == np.float32(x)
    assert shortest_float32_one(float(np.float32(95.1))) == 95.1


def test_non_finite_and_zero_pass_unchanged() -> None:
    out = shortest_float32(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], dtype=np.float32))
    assert math.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert out[3] == 0.0 and math.copysign(1, out[4]) == -1


@pytest.mark.parametrize(
    ("scale", "offset", "decimals"),
    [
        (1.0, 0.0, None),
        (0.1, 0.0, 1),
        (0.05, 0.0, 2),
        (0.001, 0.0, 3),
        (1.0, 0.5, 1),
        (0.01, -40.25, 2),
        (10.0, 0.0, 0),
        (1e-5, 0.0, 5),
        (1 / 3, 0.0, MAX_DECIMALS),
    ],
)
def test_the_derived_precision_is_the_decimals_of_scale_and_offset(
    scale: float, offset: float, decimals: int | None
) -> None:
    assert derived_precision(scale, offset) == decimals


def test_decimals_of() -> None:
    assert [decimals_of(x) for x in (0.1, 0.05, 2.0, 1e-05, 123.456, math.inf)] == [1, 2, 0, 5, 3, 0]


def test_scaled_registers_publish_the_decimals_of_their_scale() -> None:
    g = group(
        TagBase(name="t", scale=0.1),
        TagBase(name="ph", scale=0.001),
        TagBase(name="d", scale=0.05, offset=-20),
        TagBase(name="r"),
    )
    block = g.finish(np.array([951, 7213, 1203, 7], dtype=np.int64), acq_ts_ns=1)
    assert block.values == [95.1, 7.213, 40.15, 7]
    assert text(block.values) == "[95.1, 7.213, 40.15, 7.0]"  # a scaled group is a float array
    assert 951 * 0.1 != 95.1  # what the rounding is there for


def test_an_explicit_precision_rounds_any_value_and_a_derived_one_only_whole_raw_values() -> None:
    g = group(
        TagBase(name="a", scale=0.1),
        TagBase(name="b", scale=0.1, precision=2),
        TagBase(name="c", precision=1),
    )
    block = g.finish(np.array([9.57, 9.57, 3.14159]), acq_ts_ns=1)
    assert block.values[0] == 9.57 * 0.1  # fractional raw: the scale's decimals would lose digits
    assert block.values[1:] == [0.96, 3.1]
    whole = g.finish(np.array([951.0, 951.0, 2.0]), acq_ts_ns=1)
    assert whole.values == [95.1, 95.1, 2.0]


def test_the_per_value_path_rounds_alike() -> None:
    """Mixed groups (numbers beside strings, or readings a driver already marked) go value by value."""
    g = group(
        TagBase(name="a", scale=0.1),
        TagBase(name="b", precision=1),
        TagBase(name="s"),
        TagBase(name="f", scale=0.1),
        TagBase(name="i"),
    )
    block = g.finish([951, 3.14159, "text", 9.57, 5], acq_ts_ns=1)
    assert block.values == [95.1, 3.1, "text", 9.57 * 0.1, 5]
    vec = g.finish(np.array([951, 3.14159, 0, 9.57, 5], dtype=np.float64), acq_ts_ns=1)
    assert [vec.values[i] for i in (0, 1, 3)] == [block.values[i] for i in (0, 1, 3)]


def test_the_range_is_checked_on_the_rounded_value_and_odd_values_stay_as_they_were() -> None:
    g = group(TagBase(name="t", scale=0.1, range=(0, 60)), TagBase(name="big", scale=0.1))
    block = g.finish(np.array([600.0, 1e300]), acq_ts_ns=1)
    assert block.values == [60.0, 1e299] and block.quality is None
    bad = g.finish(np.array([np.nan, np.inf]), acq_ts_ns=1)
    assert bad.values == [None, None] and bad.reasons == [Reason.DECODE_ERROR, Reason.DECODE_ERROR]


def test_an_unscaled_integer_group_is_not_touched() -> None:
    g = group(TagBase(name="a"), TagBase(name="b"))
    assert g._rounding is None
    assert g.finish(np.array([2**62, 3], dtype=np.int64), acq_ts_ns=1).values == [2**62, 3]


@pytest.mark.parametrize("bad", [-1, 13, 1.5, "two"])
def test_a_bad_precision_is_a_clear_config_error(bad: object) -> None:
    with pytest.raises(ValidationError) as err:
        TagBase(name="t", precision=bad)
    assert "precision" in str(err.value)


def test_modbus_float32_registers_publish_the_shortest_decimal_and_raw_keeps_the_words() -> None:
    tags = [
        Tag(name="flow", table="input", address=30001, type="float32"),
        Tag(name="temp", table="input", address=30003, type="uint16", scale=0.01),
        Tag(name="name", table="input", address=30004, type="string", length=2),
    ]
    conn = Connection(host="127.0.0.1")
    plan = build_plan(tags, conn)
    words = [*encode(95.1, DataType.FLOAT32), 3702, *encode("ab", DataType.STRING, length=2)]
    regs = np.array(words, dtype=np.uint16)
    values, _, _ = decode_plan(plan, regs, np.zeros(0, dtype=np.bool_), {})
    assert values[0] == 95.1 and values[1] == 3702
    g = PollGroup("dev", "g", GroupSpec(), tags, 1.0)
    block = g.finish(
        values, acq_ts_ns=1, device_raw=raw_values(plan, Outcome(regs, np.zeros(0, dtype=np.bool_)))
    )
    assert block.values == [95.1, 37.02, "ab"]
    assert block.raw is not None and block.raw[0] == words[:2]
    fast = build_plan(tags[:1], conn)
    out, _, _ = decode_plan(fast, regs[:2], np.zeros(0, dtype=np.bool_), {})
    assert isinstance(out, np.ndarray) and out.tolist() == [95.1]


def test_opcua_float_values_publish_the_shortest_decimal_and_raw_keeps_the_servers_value() -> None:
    conv = Converted(2)
    now = datetime.now(UTC)
    widened = float(np.float32(95.1))
    conv.set(0, ua.DataValue(ua.Variant(widened, ua.VariantType.Float), SourceTimestamp=now))
    conv.set(1, ua.DataValue(ua.Variant(widened, ua.VariantType.Double), SourceTimestamp=now))
    block = conv.finish(group(TagBase(name="f"), TagBase(name="d")), 1, record_raw=True)
    assert block.values == [95.1, widened]  # a Double is the server's exact value
    assert block.raw == [widened, widened]
    assert block.quality is None or all(q is Quality.GOOD for q in block.quality)


def test_a_double_beyond_float32_stays_itself_not_infinity() -> None:
    """A server may hand over a Float variant holding a double no float32 can hold."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        assert shortest_float32_one(1e300) == 1e300
        assert shortest_float32_one(-3.5e38) == -3.5e38
