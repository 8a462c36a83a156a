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


# register.evidence: paired_bootstrap: the low ends of the paired intervals decide, not the point values.
def paired(second: str, diff: float, low: float, high: float, p: float, wins: int, losses: int) -> dict:
    return {f"tuned_vs_{second}_acc_diff": diff, f"tuned_vs_{second}_acc_diff_ci95_low": low,
            f"tuned_vs_{second}_acc_diff_ci95_high": high, f"tuned_vs_{second}_mcnemar_p": p,
            f"tuned_vs_{second}_wins": float(wins), f"tuned_vs_{second}_losses": float(losses)}


def evidence_params(params, margin: float = 0.0):
    raw = params.model_dump(by_alias=True)
    raw["register"] |= {"evidence": "paired_bootstrap", "min_improvement": margin}
    return type(params).model_validate(raw)


SURE = paired("base", 0.6, 0.5, 0.7, 1e-20, 92, 2)


def test_evidence_gate_promotes_a_sure_gain_and_names_the_test_and_its_numbers(params):
    promoted, reason = promotion_decision(evidence_params(params), {**METRICS, **SURE}, None)
    assert promoted
    assert reason.startswith("paired_bootstrap: tuned − base accuracy +0.6000 [+0.5000, +0.7000] (paired bootstrap 95 %)")
    assert "McNemar exact p 1e-20 (92 items only tuned right, 2 only base)" in reason
    champion = {**METRICS, "tuned_accuracy": 0.7, **paired("champion", 0.1, 0.02, 0.18, 0.004, 20, 5)}
    promoted, reason = promotion_decision(evidence_params(params), {**METRICS, **SURE}, champion)
    assert promoted and "tuned − champion accuracy +0.1000 [+0.0200, +0.1800]" in reason


def test_evidence_gate_refuses_a_gain_its_interval_does_not_carry(params):
    """A point gain over the base (0.8 vs 0.2 passes the point gate) whose paired interval reaches 0 is refused,
    and so is one whose low end is above 0 but not above min_improvement."""
    unsure = paired("base", 0.6, 0.0, 0.9, 0.06, 5, 1)
    assert promotion_decision(params, {**METRICS, **unsure}, None)[0]  # the point gate would promote it
    promoted, reason = promotion_decision(evidence_params(params), {**METRICS, **unsure}, None)
    assert not promoted and "its lower bound does not exceed min_improvement 0.0" in reason
    promoted, reason = promotion_decision(evidence_params(params, margin=0.55), {**METRICS, **SURE}, None)
    assert not promoted and "does not exceed min_improvement 0.55" in reason


def test_evidence_gate_refuses_without_a_paired_comparison_with_the_champion(params):
    """A champion known only by its registered tags (not re-scored on these items) cannot be paired; one whose
    paired interval against the new version reaches 0 is not beaten."""
    registered_only = {**METRICS, "tuned_accuracy": 0.5}
    promoted, reason = promotion_decision(evidence_params(params), {**METRICS, **SURE}, registered_only)
    assert not promoted and "no paired comparison with the current champion" in reason
    tie = {**registered_only, **paired("champion", 0.02, -0.03, 0.07, 0.6, 6, 3)}
    promoted, reason = promotion_decision(evidence_params(params), {**METRICS, **SURE}, tie)
    assert not promoted and "tuned − champion accuracy +0.0200 [-0.0300, +0.0700]" in reason
    promoted, reason = promotion_decision(evidence_params(params), METRICS, None)
    assert not promoted and "no paired tuned − base comparison" in reason


def test_evidence_gate_is_only_for_mcq_accuracy(params):
    from pydantic import ValidationError

    raw = params.model_dump(by_alias=True)
    raw["register"] |= {"evidence": "paired_bootstrap", "gate_metric": "tuned_eos_rate"}
    with pytest.raises(ValidationError, match="paired_bootstrap compares accuracy item by item"):
        type(params).model_validate(raw)
    raw = chat_params(params, "tuned_rougeL").model_dump(by_alias=True)
    raw["register"]["evidence"] = "paired_bootstrap"
    with pytest.raises(ValidationError, match="needs data.eval.format mcq"):
        type(params).model_validate(raw)


def test_the_champions_paired_numbers_count_only_while_it_is_the_champion():
    """champion_metrics_for passes the re-scored tuned-vs-champion comparison only for that very version."""
    from types import SimpleNamespace

    from pipeline.registry.gate import champion_metrics_for

    champion = SimpleNamespace(version="2", tags={"adapter_sha256": "a" * 64, "metric.tuned_accuracy": "0.5"})
    scored = {"scored": True, "version": "2", "adapter_sha256": "a" * 64, "n_items": 150,
              "metrics": {"champion_accuracy": 0.5}, "paired": paired("champion", 0.1, 0.02, 0.18, 0.004, 20, 5)}
    numbers, source = champion_metrics_for(champion, scored)
    assert numbers["tuned_vs_champion_acc_diff_ci95_low"] == 0.02 and "re-scored in this run" in source
    numbers, _ = champion_metrics_for(champion, {**scored, "version": "1"})
    assert "tuned_vs_champion_acc_diff_ci95_low" not in numbers
