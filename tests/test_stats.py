"""Paired differences against hand-computed intervals."""

import math

import pytest

from fisherkd.stats import paired_difference, t_quantile_975


def test_paired_difference_matches_a_hand_computed_t_interval():
    a, b = [71.0, 74.0, 70.0, 73.0, 72.0], [70.0, 71.0, 69.0, 70.0, 70.0]
    # differences 1, 3, 1, 3, 2: mean 2, sample std sqrt(1/... ) = sqrt(((1+1+1+1+0)/4)) = 1
    d = paired_difference(a, b)
    half = 2.776 * 1.0 / math.sqrt(5)
    assert (d.mean, d.n) == (2.0, 5)
    assert d.low == pytest.approx(2 - half) and d.high == pytest.approx(2 + half)
    assert d.excludes_zero and str(d) == "+2.00 [+0.76, +3.24]"


def test_pairing_removes_what_the_seed_puts_into_both_arms():
    seed_effect = [0.0, 10.0, -10.0, 5.0]
    a = [s + 1.0 + e for s, e in zip(seed_effect, [0.1, -0.1, 0.0, 0.05])]
    b = list(seed_effect)
    assert paired_difference(a, b).excludes_zero  # unpaired, the seed's ±10 would swamp the +1


def test_quantiles_and_errors():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776 and t_quantile_975(100) == 1.96
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [0.0])
