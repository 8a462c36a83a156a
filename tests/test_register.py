"""The promotion gate: beat base and champion on the gate metric, no guard regressing past tolerance."""

import pytest

from pipeline.config import load_params
from pipeline.register import promotion_decision

METRICS = {"tuned_accuracy": 0.8, "base_accuracy": 0.2, "tuned_eos_rate": 1.0, "tuned_ppl_general": 100.0}


@pytest.fixture(scope="module")
def params():
    return load_params()


def test_first_version_is_promoted_when_it_beats_the_base(params):
    promoted, reason = promotion_decision(params, METRICS, None)
    assert promoted and "no champion yet" in reason


def test_not_promoted_when_it_does_not_beat_the_base(params):
    promoted, reason = promotion_decision(params, {**METRICS, "tuned_accuracy": 0.2}, None)
    assert not promoted and "does not beat the base" in reason


def test_better_than_champion_is_promoted(params):
    champion = {**METRICS, "tuned_accuracy": 0.7}
    assert promotion_decision(params, METRICS, champion)[0]


def test_equal_or_worse_than_champion_is_not_promoted(params):
    for value in (0.8, 0.9):
        promoted, reason = promotion_decision(params, METRICS, {**METRICS, "tuned_accuracy": value})
        assert not promoted and "does not beat the champion" in reason


def test_min_improvement_is_required(params):
    strict = params.model_copy(update={"registry": params.registry.model_copy(update={"min_improvement": 0.2})})
    promoted, reason = promotion_decision(strict, METRICS, {**METRICS, "tuned_accuracy": 0.7})
    assert not promoted and "by 0.2" in reason


@pytest.mark.parametrize("guard, value", [("tuned_eos_rate", 0.9), ("tuned_ppl_general", 130.0)])
def test_guard_regression_blocks_promotion(params, guard, value):
    champion = {**METRICS, "tuned_accuracy": 0.7}
    promoted, reason = promotion_decision(params, {**METRICS, guard: value}, champion)
    assert not promoted and f"guard {guard}" in reason


def test_guard_within_tolerance_allows_promotion(params):
    champion = {**METRICS, "tuned_accuracy": 0.7}
    assert promotion_decision(params, {**METRICS, "tuned_eos_rate": 0.97, "tuned_ppl_general": 110.0}, champion)[0]
