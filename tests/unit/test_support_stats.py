"""The two-sample chi-square test of ``tests/support/stats.py`` (the engine tests' distribution
checks rest on it): the survival function against tabled quantiles, a hand-worked table, the
pooling of rare categories, and its false-positive rate and power on simulated samples."""
from __future__ import annotations

import random

import pytest

from tests.support.stats import POOLED, chi2_sf, two_sample_chi2

# (df, the 0.95 quantile, the 0.999 quantile) of the chi-square distribution
QUANTILES = [(1, 3.841459, 10.827566), (2, 5.991465, 13.815511), (3, 7.814728, 16.266236),
             (4, 9.487729, 18.466827), (5, 11.070498, 20.515006), (10, 18.307038, 29.588298)]


@pytest.mark.parametrize(("df", "q95", "q999"), QUANTILES)
def test_chi2_sf_matches_the_tabled_quantiles(df, q95, q999):
    assert chi2_sf(q95, df) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(q999, df) == pytest.approx(0.001, rel=1e-3)
    assert chi2_sf(0.0, df) == 1.0


def test_chi2_sf_refuses_a_df_below_one():
    with pytest.raises(ValueError, match="df: expected an int >= 1, got 0"):
        chi2_sf(1.0, 0)


def test_a_hand_worked_two_by_two_table():
    got = two_sample_chi2(["x"] * 30 + ["y"] * 10, ["x"] * 20 + ["y"] * 20)
    # expected 25 | 25 and 15 | 15: 2 * 25/25 + 2 * 25/15
    assert got.table == (("x", 30, 20), ("y", 10, 20)) and got.df == 1
    assert got.statistic == pytest.approx(16 / 3)
    assert got.p_value == pytest.approx(0.020921, rel=1e-4)


def test_rare_categories_are_pooled_into_the_least_frequent_kept_one():
    got = two_sample_chi2(["x"] * 25 + ["y"] * 15 + ["r1", "r2"], ["x"] * 25 + ["y"] * 15 + ["r3"])
    assert got.table == (("x", 25, 25), ("y", 17, 16)) and got.df == 1  # 3 rare outcomes: expected 1.5, merged into y


def test_rare_categories_enough_together_are_one_category():
    rare = [f"r{i}" for i in range(12)]  # 12 outcomes once each: expected 6 together
    got = two_sample_chi2(["x"] * 30 + rare, ["x"] * 30 + ["y"] * 12)
    assert got.table == (("x", 30, 30), ("y", 0, 12), (POOLED, 12, 0)) and got.df == 2


def test_equal_constant_samples_have_nothing_to_compare():
    assert two_sample_chi2([7] * 10, [7] * 20).p_value == 1.0
    with pytest.raises(ValueError, match="expected two non-empty samples, got 0 and 3"):
        two_sample_chi2([], [1, 2, 3])


def test_false_positive_rate_and_power_on_simulated_samples():
    rng = random.Random(0)
    outcomes = list(range(8))
    same = [0.45, 0.2, 0.12, 0.1, 0.06, 0.04, 0.02, 0.01]
    cooler = [w ** 2 for w in same]  # as a lower temperature sharpens a distribution

    def rejection_rate(weights_b, alpha, runs=1000):
        hits = 0
        for _ in range(runs):
            a = rng.choices(outcomes, same, k=128)
            b = rng.choices(outcomes, weights_b, k=128)
            hits += two_sample_chi2(a, b).p_value < alpha
        return hits / runs

    assert 0.03 <= rejection_rate(same, 0.05) <= 0.07
    assert rejection_rate(same, 0.001) <= 0.005
    assert rejection_rate(cooler, 0.001) >= 0.8
