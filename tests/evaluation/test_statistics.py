"""The interval estimates and tests of pipeline/evaluation/statistics.py against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.statistics import accuracy_ci95, clustered_ci95, mcnemar_exact_p, paired_comparison


@pytest.mark.parametrize("wins, losses, expected", [
    (1, 6, 2 * (1 + 7) / 2**7),  # two-sided: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (C(7,0) + C(7,1)) / 128
    (0, 5, 2 / 2**5),
    (3, 3, 1.0),
    (10, 0, 2 / 2**10),
    (0, 0, 1.0),  # no discordant item: no evidence either way
])
def test_mcnemar_exact_p_is_the_two_sided_binomial_on_discordant_items(wins, losses, expected):
    assert mcnemar_exact_p(wins, losses) == pytest.approx(expected, rel=1e-12)


def test_paired_comparison_counts_and_difference_by_hand():
    first = [True] * 8 + [False] * 2 + [True] * 1 + [False] * 4   # 9 of 15 right
    second = [True] * 8 + [False] * 2 + [False] * 1 + [True] * 4  # 12 of 15 right
    stats = paired_comparison(first, second, seed=42)
    assert stats["diff"] == pytest.approx(9 / 15 - 12 / 15)
    assert (stats["wins"], stats["losses"]) == (1.0, 4.0)
    assert stats["mcnemar_p"] == pytest.approx(2 * (1 + 5) / 2**5)  # 2 * P(X <= 1), X ~ Bin(5, 1/2)
    assert stats["diff_ci95_low"] <= stats["diff"] <= stats["diff_ci95_high"]
    assert paired_comparison(first, second, seed=42) == stats  # a seeded rerun reports the same interval


def test_paired_bootstrap_interval_matches_the_normal_approximation_on_many_items():
    """At n=400 the percentile bootstrap interval of a mean difference is close to mean ± 1.96 s/√n."""
    rng = np.random.default_rng(0)
    first = list(rng.random(400) < 0.7)
    second = [f if rng.random() < 0.8 else not f for f in first]  # correlated, as two models on one item set are
    stats = paired_comparison(first, second, seed=7)
    diff = np.asarray(first, float) - np.asarray(second, float)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert stats["diff_ci95_low"] == pytest.approx(diff.mean() - half, abs=0.01)
    assert stats["diff_ci95_high"] == pytest.approx(diff.mean() + half, abs=0.01)


def test_identical_differences_give_a_point_interval():
    stats = paired_comparison([True] * 5, [False] * 5, seed=1)
    assert (stats["diff"], stats["diff_ci95_low"], stats["diff_ci95_high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same non-empty items"):
        paired_comparison([True], [True, False], seed=1)


def test_a_pooled_interval_over_copies_resamples_items_not_copies():
    """Three copies per item that always agree carry one item's worth of evidence: the item-resampled interval
    is as wide as the one of the items themselves, wider than a Wilson interval over every copy."""
    rng = np.random.default_rng(3)
    items = list(rng.random(100) < 0.6)
    groups = [[ok] * 3 for ok in items]
    low, high = clustered_ci95(groups, seed=5)
    naive_low, naive_high = accuracy_ci95(3 * sum(items), 300)
    item_low, item_high = accuracy_ci95(sum(items), 100)
    assert high - low > 1.3 * (naive_high - naive_low)
    assert high - low == pytest.approx(item_high - item_low, abs=0.03)
    assert low < sum(items) / 100 < high
    assert clustered_ci95([[True, True], [True]], seed=5) == (1.0, 1.0)
