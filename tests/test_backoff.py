"""The one retry delay: exponential, capped, jittered below its cap."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from agent.core.backoff import backoff_delay


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    for n in range(1, 12):
        d = backoff_delay(n, 1.0, 30.0, rng)
        base = min(30.0, 2 ** (n - 1))
        assert 0.5 * base <= d <= base


def test_without_rng_the_delay_is_the_plain_doubling() -> None:
    assert [backoff_delay(n, 0.2, 5.0) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


@given(
    failures=st.integers(0, 10**6),
    lo=st.floats(1e-3, 1e4),
    spread=st.floats(1.0, 1e4),
    seed=st.integers(0, 2**32),
)
def test_the_delay_jitter_included_never_exceeds_its_maximum(
    failures: int, lo: float, spread: float, seed: int
) -> None:
    hi = lo * spread
    d = backoff_delay(failures, lo, hi, random.Random(seed))
    assert 0 < d <= hi
    assert d >= min(lo, hi) * 0.5  # never shorter than half the first delay either
