"""The promotion gate (pipeline/registry/gate.py): base, champion, margin, guards, metric directions."""

import pytest

from pipeline.config import load_params
from pipeline.registry.gate import promotion_decision
from tests.helpers.params import chat_params

METRICS = {"tuned_accuracy": 0.8, "base_accuracy": 0.2, "tuned_eos_rate": 1.0, "tuned_ppl_general": 100.0}


LOSSES = {"tuned_answer_loss": 1.0, "base_answer_loss": 3.0}


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


def test_a_loss_gate_is_lower_is_better_against_the_base(params):
    strict = chat_params(params, "tuned_answer_loss")
    assert promotion_decision(strict, LOSSES, None)[0]  # the tuned loss is lower than the base's: promoted
    promoted, reason = promotion_decision(strict, {**LOSSES, "tuned_answer_loss": 4.0}, None)
    assert not promoted and "does not beat the base" in reason and "lower is better" in reason


def test_a_worse_loss_never_becomes_champion(params):
    strict = chat_params(params, "tuned_answer_loss")
    promoted, reason = promotion_decision(strict, LOSSES, {"tuned_answer_loss": 0.8})  # champion's loss is lower
    assert not promoted and "does not beat the champion" in reason
    assert promotion_decision(strict, LOSSES, {"tuned_answer_loss": 1.2})[0]  # a lower loss than the champion's


def test_perplexity_guard_direction_comes_from_the_metric(params):
    guarded = chat_params(params, "tuned_rougeL", [{"metric": "tuned_ppl_general", "tolerance": 0.1}])
    metrics = {"tuned_rougeL": 0.6, "base_rougeL": 0.2, "tuned_ppl_general": 100.0}
    assert promotion_decision(guarded, metrics, {"tuned_rougeL": 0.5, "tuned_ppl_general": 105.0})[0]
    promoted, reason = promotion_decision(guarded, metrics, {"tuned_rougeL": 0.5, "tuned_ppl_general": 80.0})
    assert not promoted and "guard tuned_ppl_general regressed" in reason


@pytest.mark.parametrize("gate, guards, message", [
    ("tuned_acuracy", [], "register.gate_metric: 'tuned_acuracy' is not a metric"),
    ("tuned_rougeL", [], "register.gate_metric: 'tuned_rougeL' is not a metric"),  # chat metric, mcq eval set
    ("tuned_accuracy", [{"metric": "tuned_eos_rat", "tolerance": 0.1}], "register.guards[0].metric"),
    ("tuned_accuracy", [{"metric": "tuned_ppl_general", "higher_is_better": True, "tolerance": 0.1}],
     "tuned_ppl_general is lower-is-better"),
])
def test_a_gate_or_guard_typo_is_refused_when_params_load(params, gate, guards, message):
    from pydantic import ValidationError

    from pipeline.config import Params

    raw = params.model_dump(by_alias=True)
    raw["register"]["gate_metric"], raw["register"]["guards"] = gate, guards
    with pytest.raises(ValidationError) as exc:
        Params.model_validate(raw)
    assert message in str(exc.value)
    if "is not a metric" in message:
        assert "valid: tuned_accuracy, tuned_acc_ci95_low, tuned_acc_ci95_high, tuned_generation_em, tuned_eos_rate" \
            in str(exc.value)
