"""The one percentile rule of reported figures (agent.core.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.stats import percentile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0.0, max_value=1.0))
def test_matches_numpys_default_quantile(values: list[float], q: float) -> None:
    got = percentile(values, q)
    assert got is not None
    assert got == pytest.approx(float(np.quantile(values, q)), rel=1e-9, abs=1e-6)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert percentile([30.0, 90.0, 10.0, 50.0], 0.5) == 40.0
    assert percentile([5.0], 0.99) == 5.0


def test_an_infinite_value_stays_infinite_never_nan() -> None:
    assert percentile([10.0, math.inf], 0.5) == math.inf
    assert percentile([math.inf, math.inf], 0.5) == math.inf


def test_no_values_is_none_and_a_bad_quantile_is_an_error() -> None:
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        percentile([1.0], 99)
