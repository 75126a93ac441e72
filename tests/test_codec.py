"""Register codec: every type in every word order round-trips, vectorised and scalar
decoding agree, and the word orders put bytes where the vendors' manuals say."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.driver import GroupSpec, PollGroup, TagBase
from agent.core.records import Quality
from cleanroom_common.codec import (
    CodecError,
    DataType,
    WordOrder,
    as_registers,
    decode,
    decode_many,
    encode,
    register_count,
)
from cleanroom_common.modbus import TABLE_OF_FUNCTION, TABLES, AddressError, locate
from drivers.modbus.config import Connection, Tag
from drivers.modbus.plan import build_plan, decode_plan

_INT_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}
orders = st.sampled_from(list(WordOrder))


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[DataType, float | int]:
    dtype = draw(st.sampled_from([*_INT_RANGES, DataType.FLOAT32, DataType.FLOAT64]))
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        return dtype, draw(st.integers(lo, hi))
    width = 32 if dtype is DataType.FLOAT32 else 64
    return dtype, draw(st.floats(width=width, allow_nan=False))


@given(typed_values(), orders)
def test_numeric_round_trip(tv: tuple[DataType, float | int], order: WordOrder) -> None:
    dtype, value = tv
    regs = encode(value, dtype, order)
    assert len(regs) == register_count(dtype)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert decode(regs, dtype, order) == value


@given(st.lists(typed_values(), min_size=1, max_size=20), orders)
def test_vectorised_decode_matches_scalar(
    items: list[tuple[DataType, float | int]], order: WordOrder
) -> None:
    """decode_many over a packed register image gives what decode gives one by one."""
    for dtype in {d for d, _ in items}:
        values = [v for d, v in items if d is dtype]
        image: list[int] = [0xDEAD]  # an unrelated register first: starts are offsets, not 0
        starts = []
        for v in values:
            starts.append(len(image))
            image += encode(v, dtype, order)
        out = decode_many(as_registers(image), np.array(starts, dtype=np.intp), dtype, order)
        assert out.tolist() == values


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20), orders)
def test_string_round_trip(text: str, order: WordOrder) -> None:
    length = max(1, len(text) + 1)  # odd and even lengths, always with padding room
    regs = encode(text, DataType.STRING, order, length=length)
    assert len(regs) == (length + 1) // 2
    assert decode(regs, DataType.STRING, order, length=length) == text


@given(st.integers(0, 0xFFFF), st.integers(0, 15), orders)
def test_bit_fields(word: int, bit: int, order: WordOrder) -> None:
    regs = encode(word, DataType.UINT16, order)
    assert decode(regs, DataType.BOOL, order, bit=bit) is bool((word >> bit) & 1)


@given(st.integers(-(2**15), 2**15 - 1), st.floats(-100, 100), st.floats(-1000, 1000))
def test_scale_offset_applied_after_decoding(raw: int, scale: float, offset: float) -> None:
    regs = encode(raw, DataType.INT16)
    decoded = decode_many(as_registers(regs), np.zeros(1, dtype=np.intp), DataType.INT16)
    group = PollGroup("d", "g", GroupSpec(), [TagBase(name="t", scale=scale, offset=offset)], 1.0)
    value = group.finish(decoded).values[0]
    assert isinstance(value, float | int)
    assert math.isclose(value, raw * scale + offset, rel_tol=1e-12, abs_tol=1e-9)


def test_word_orders_match_vendor_layouts() -> None:
    """0x41C80000 is 25.0 as float32: the four orders put its bytes where manuals show them."""
    assert encode(25.0, DataType.FLOAT32, WordOrder.ABCD) == [0x41C8, 0x0000]
    assert encode(25.0, DataType.FLOAT32, WordOrder.CDAB) == [0x0000, 0x41C8]  # BINDER: low word first
    assert encode(25.0, DataType.FLOAT32, WordOrder.BADC) == [0xC841, 0x0000]
    assert encode(25.0, DataType.FLOAT32, WordOrder.DCBA) == [0x0000, 0xC841]
    assert decode([0x0001, 0x0000], DataType.UINT32, WordOrder.ABCD) == 65536
    assert decode([0x0001, 0x0000], DataType.UINT32, WordOrder.CDAB) == 1
    assert decode([0xFFFF], DataType.BOOL) is True and decode([2], DataType.BOOL) is True
    assert decode([0], DataType.BOOL) is False and decode([2], DataType.BOOL, bit=0) is False
    assert decode([0x4142], DataType.STRING, length=2) == "AB"
    assert decode([0x4142], DataType.STRING, WordOrder.BADC, length=2) == "BA"


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (70000, DataType.INT16, "does not fit"),
        (-1, DataType.UINT32, "does not fit"),
        (1.5, DataType.INT32, "not an integer"),
        (1e39, DataType.FLOAT32, "does not fit"),
        ("x", DataType.UINT16, "needs a number"),
    ],
)
def test_encode_refuses_values_the_type_cannot_hold(
    value: float | str, dtype: DataType, message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        encode(value, dtype)


def test_decode_rejects_wrong_register_count_and_non_ascii() -> None:
    with pytest.raises(CodecError, match="needs 2 register"):
        decode([1], DataType.FLOAT32)
    with pytest.raises(CodecError, match="not ASCII"):
        decode([0xC3A9], DataType.STRING, length=2)
    with pytest.raises(CodecError, match="longer than"):
        encode("ABCDE", DataType.STRING, length=4)


# --------------------------------------------------------------------------- addressing


@pytest.mark.parametrize(
    ("address", "kwargs", "expected"),
    [
        (40001, {}, ("holding", 0)),
        (30010, {}, ("input", 9)),
        (10001, {}, ("discrete", 0)),
        (17, {}, ("coil", 16)),
        (400001, {}, ("holding", 0)),
        (465536, {}, ("holding", 65535)),
        (310000, {}, ("input", 9999)),
        (40001, {"table": "holding"}, ("holding", 0)),
        (40001, {"address_base": 0}, ("holding", 1)),
        (307, {"table": "holding", "vendor_notation": False, "address_base": 0}, ("holding", 307)),
        (307, {"table": "input", "vendor_notation": False}, ("input", 306)),
    ],
)
def test_vendor_and_plain_addresses_locate_their_register(
    address: int, kwargs: dict[str, Any], expected: tuple[str, int]
) -> None:
    assert locate(address, **kwargs) == expected


@pytest.mark.parametrize(
    ("address", "kwargs", "message"),
    [
        (25001, {}, "not in vendor notation"),
        (40001, {"table": "input"}, "is a holding address"),
        (5, {"vendor_notation": False}, "needs an explicit table"),
        (40000, {}, "below the first register"),
        (465536, {"address_base": 0}, "past the last register"),
    ],
)
def test_addresses_that_name_no_register_are_refused(
    address: int, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(AddressError, match=message):
        locate(address, **kwargs)


def test_every_function_code_names_the_table_of_its_read() -> None:
    reads = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
    assert {fc: TABLE_OF_FUNCTION[fc] for fc in reads} == reads
    assert set(TABLE_OF_FUNCTION.values()) == set(TABLES)


@given(st.integers(0, 0xFFFF), orders, st.booleans())
def test_a_read_plan_decodes_a_status_words_flags_as_decode_does(
    word: int, order: WordOrder, coil: bool
) -> None:
    """Every bit of a status word, and the register read as a bool, from a plan's one gather of
    plain ints: the same booleans as :func:`decode`, in both byte orders; a coil beside them keeps
    its own path, and a failed read leaves its flags bad, not decoded from stale words."""
    tags = [Tag(name=f"b{bit}", table="input", address=30010, bit=bit, word_order=order) for bit in range(16)]
    tags.append(Tag(name="any", table="input", address=30010, type="bool", word_order=order))
    tags.append(Tag(name="level", table="input", address=30011, type="uint16"))
    if coil:
        tags.append(Tag(name="pump", table="coil", address=1))
    plan = build_plan(tags, Connection(host="127.0.0.1"))
    assert len(plan.flags) == 17 and plan.fast is None
    regs = np.array([*encode(word, DataType.UINT16, order), 7], dtype=np.uint16)
    bits = np.array([True] if coil else [], dtype=np.bool_)
    values, quality, _ = decode_plan(plan, regs, bits, {})
    expected = [decode(regs[:1], DataType.BOOL, order, bit=bit) for bit in range(16)]
    assert values[:18] == [*expected, decode(regs[:1], DataType.BOOL, order), 7]
    assert all(type(v) is bool for v in values[:17])
    assert values[18:] == ([True] if coil else [])
    failed = {i: "timeout" for i in range(17)}
    values, quality, reasons = decode_plan(plan, regs, bits, failed)
    assert values[:17] == [None] * 17 and reasons is not None and reasons[:17] == ["timeout"] * 17
    assert quality is not None and quality[17] is Quality.GOOD
