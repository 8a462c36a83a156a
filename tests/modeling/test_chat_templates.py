"""Assistant-only loss masks for the real chat templates of common families (Llama 3.1, Qwen2.5, Qwen3,
Gemma 3, Mistral v0.3, ChatML), on tiny offline models that carry those templates and special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.modeling.chat_template import chat_tokenizer, encode_chat, span_ends, stop_token_ids
from tests.helpers.tiny_chat_models import FAMILIES, build_tiny_chat_model

REPO = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "지문을 읽고 질문의 답을 구하세요."}
USER = {"role": "user", "content": "지문:\n민준의 직업은 교사다.\n\n질문:\n민준의 직업은?\n\n선택지:\n1. 의사\n2. 교사\n3. 가수\n\n정답:"}
ANSWER = {"role": "assistant", "content": "2"}

# What the loss must cover: the answer and the template's end-of-turn token, nothing of the prompt.
# (Qwen3 writes an empty think block before the final answer; Mistral writes a space before it.)
EXPECTED = {
    "llama3_1": "2<|eot_id|>",
    "qwen2_5": "2<|im_end|>",
    "qwen3": "<think>\n\n</think>\n\n2<|im_end|>",
    "gemma3": "2<end_of_turn>",
    "mistral": " 2</s>",
    "chatml": "2<|im_end|>",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_tiny_chat_model(family, root / family) for family in FAMILIES}


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_masks, strict=True) if m])


@pytest.mark.parametrize("family", FAMILIES)
def test_single_turn_mask_is_the_answer_and_its_stop_token(family, models):
    tokenizer = chat_tokenizer(models[family])
    [encoded] = encode_chat(tokenizer, [SYSTEM, USER, ANSWER])
    assert trained_text(tokenizer, encoded) == EXPECTED[family]
    assert span_ends(encoded)[-1] in stop_token_ids(models[family], tokenizer)  # the model learns to stop
    # Mistral v0.3 drops the system turn once an answer follows: located anyway, and flagged for the gate.
    assert encoded.prompt_consistent is (family != "mistral")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(family, models):
    tokenizer = chat_tokenizer(models[family])
    chat = [USER, ANSWER, {"role": "user", "content": "다시 답하세요."}, {"role": "assistant", "content": "교사"}]
    encoded = encode_chat(tokenizer, chat)
    texts = [trained_text(tokenizer, e) for e in encoded]
    if family == "qwen3":  # rewrites earlier turns once later ones follow: one sequence per answer
        assert len(encoded) == 2 and texts[0].endswith("2<|im_end|>") and texts[1].endswith("교사<|im_end|>")
    else:
        [text] = texts
        assert text == EXPECTED[family] + EXPECTED[family].replace("2", "교사"), text
    stops = stop_token_ids(models[family], tokenizer)
    assert all(t in stops for e in encoded for t in span_ends(e))


def test_the_gate_passes_each_family_and_warns_about_mistral(models, tmp_path):
    import json

    import yaml

    from pipeline.config import Params
    from pipeline.data.validation import validate_datasets

    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    rows = [{"id": f"m{i}", "messages": [SYSTEM, {"role": "user", "content": f"질문 {i}: 2 더하기 {i}는?"},
                                         {"role": "assistant", "content": str(2 + i)}]} for i in range(6)]
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:4]), encoding="utf-8")
    eval_.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[4:]), encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text("문서 하나.\n문서 둘.\n", encoding="utf-8")
    held_out = tmp_path / "held_out.txt"  # not a corpus line (heldout_overlap)
    held_out.write_text("문서 셋.\n", encoding="utf-8")
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"] = {"train": {"path": str(train), "format": "messages"}, "eval": {"path": str(eval_), "format": "messages"},
                   "domain_corpus": {"path": str(text), "format": "text"},
                   **{k: {"path": str(held_out), "format": "text"} for k in ("domain_eval", "general_eval")}}
    raw["register"]["gate_metric"] = "tuned_rougeL"
    for family in FAMILIES:
        raw["base"]["out_dir"] = str(models[family])
        outcome, _ = validate_datasets(Params.model_validate(raw), tmp_path / f"report-{family}")
        assert outcome.success, (family, outcome.violations)
        warned = {w["rule"] for w in outcome.warnings}
        assert warned == ({"prompt_consistent"} if family == "mistral" else set()), (family, outcome.warnings)


@pytest.mark.parametrize("family", ["llama3_1", "gemma3"])
def test_a_real_template_trains_a_loadable_adapter(family, models, tmp_path):
    """QLoRA on a template without {% generation %} markers (TRL cannot patch Llama 3.1's): the pre-tokenized
    masks train, and the adapter carries the template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_params
    from pipeline.data.formats import Example
    from pipeline.modeling.loading import template_fingerprint
    from pipeline.training.sft import train_adapter

    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"sft": params.sft.model_copy(update={"max_steps": 2, "batch_size": 2,
                                                                            "logging_steps": 1})})
    tokenizer = chat_tokenizer(models[family])
    examples = [Example(id=str(i), source=f"x:{i}", messages=[SYSTEM, USER, {"role": "assistant", "content": str(i)}])
                for i in range(1, 5)]
    log = train_adapter(models[family], examples, tokenizer, params, tmp_path / "adapter")["train"]
    assert log and all(entry["loss"] > 0 for entry in log)
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert template_fingerprint(saved) == template_fingerprint(tokenizer)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models[family]), tmp_path / "adapter")


def test_eos_label_survives_when_pad_is_eos(models, tmp_path):
    """Llama 3.1 has no pad token, so pad = EOS: padding must not mask the EOS labels (models that never stop)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipeline.data.formats import Example
    from pipeline.training.sft import training_rows

    tokenizer = chat_tokenizer(models["llama3_1"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    examples = [Example(id="a", source="x:1", messages=[USER, ANSWER]),
                Example(id="b", source="x:2", messages=[SYSTEM, USER, {"role": "assistant", "content": "긴 답 " * 5}])]
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(models["llama3_1"]),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                        per_device_train_batch_size=2, dataloader_drop_last=False),
                         train_dataset=Dataset.from_list(training_rows(examples, tokenizer)), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and (batch["attention_mask"] == 0).any()  # one row is padded with EOS ids
    for row in range(2):
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels[-1] == tokenizer.eos_token_id  # the answer's EOS is still a label
        assert labels.count(tokenizer.eos_token_id) == 1  # and the EOS-valued padding is not
