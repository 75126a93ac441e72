"""The block's canonical text: the fast path (cached tag and unit columns) must produce exactly the
bytes of the plain encoding, since those bytes are what the chain hashes and a verifier reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.records import Block, Quality, dumps

names = st.text(min_size=1, max_size=12)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    names,
)


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    n = draw(st.integers(0, 8))
    tags = tuple(draw(st.lists(names, min_size=n, max_size=n)))
    units = tuple(draw(st.lists(st.one_of(st.none(), names), min_size=n, max_size=n)))
    block = Block(
        device=draw(names),
        group=draw(names),
        acq_ts_ns=draw(st.integers(0, 2**63)),
        tags=draw(st.sampled_from([tags, list(tags)])),
        units=units,
        values=draw(st.lists(values, min_size=n, max_size=n)),
        seq_first=draw(st.integers(0, 2**62)),
        batch=draw(st.one_of(st.none(), names)),
    )
    if draw(st.booleans()):
        block.quality = draw(st.lists(st.sampled_from(list(Quality)), min_size=n, max_size=n))
        block.reasons = draw(st.lists(st.one_of(st.none(), names), min_size=n, max_size=n))
    if draw(st.booleans()):
        block.raw = draw(
            st.lists(st.one_of(values, st.lists(st.integers(0, 65535), max_size=4)), min_size=n, max_size=n)
        )
    block.source_ts_ns = draw(
        st.one_of(
            st.none(),
            st.integers(0, 2**63),
            st.lists(st.one_of(st.none(), st.integers(0, 2**63)), min_size=n, max_size=n),
        )
    )
    return block


@given(blocks())
def test_the_fast_text_is_the_plain_encoding(block: Block) -> None:
    assert block.body_text() == dumps(block.body())
    assert block.body_text() == dumps(block.body())  # again, from the cached columns


def test_a_value_that_is_not_json_fails_both_ways() -> None:
    block = Block("d", "g", 1, ("a",), (None,), [float("nan")], seq_first=1)
    for encode in (block.body_text, lambda: dumps(block.body())):
        with pytest.raises(ValueError):
            encode()
