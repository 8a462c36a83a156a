"""Self-check of the offline tiny chat models (tests/helpers/tiny_chat_models.py): real templates, real special tokens.

The expected strings below are what the real templates render (read off the Jinja in
tests/assets/chat_templates/), including their quirks: Llama 3.1 always writes a dated system header,
Qwen2.5 injects a default system prompt, Qwen3 adds an empty <think> block to the final assistant turn and
drops reasoning from earlier ones, Gemma 3 folds the system message into the first user turn, and
Mistral v0.3 puts it into the user message only when that message is the last one, so a
[system, user, assistant] chat loses its system message.
"""

from __future__ import annotations

import hashlib
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported

import jinja2
import pytest

from tests.helpers.tiny_chat_models import FAMILIES, TEMPLATES_DIR, build_tiny_chat_model

SYS = "지문을 읽고 질문의 답을 구하세요."
USER = "지문: 철수는 사과 3개를 샀다. 질문: 철수가 산 사과는 몇 개인가?"
ANSWER = "3"
CHAT = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]

LLAMA_SYS_HEADER = ("<|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
IM = "<|im_start|>system\n" + SYS + "<|im_end|>\n<|im_start|>user\n" + USER + "<|im_end|>\n<|im_start|>assistant\n"

# apply_chat_template(CHAT, tokenize=False)
FULL = {
    "llama3_1": "<|begin_of_text|>" + LLAMA_SYS_HEADER + SYS + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n" + USER + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>",
    "qwen2_5": IM + ANSWER + "<|im_end|>\n",
    "qwen3": IM + "<think>\n\n</think>\n\n" + ANSWER + "<|im_end|>\n",  # empty think block on the last turn
    "gemma3": "<bos><start_of_turn>user\n" + SYS + "\n\n" + USER + "<end_of_turn>\n"  # system folded into user
              "<start_of_turn>model\n" + ANSWER + "<end_of_turn>\n",
    "mistral": "<s>[INST] " + USER + "[/INST] " + ANSWER + "</s>",  # the system message is dropped
    "chatml": IM + ANSWER + "<|im_end|>\n",
}
# apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
PROMPT = {
    "llama3_1": FULL["llama3_1"][: FULL["llama3_1"].rindex(ANSWER)],
    "qwen2_5": IM,
    "qwen3": IM,
    "gemma3": FULL["gemma3"][: FULL["gemma3"].rindex(ANSWER)],
    "mistral": "<s>[INST] " + SYS + "\n\n" + USER + "[/INST]",  # here the user turn is last: system kept
    "chatml": IM,
}
# Special tokens the rendered chat must contain, each encoded as one id.
MARKERS = {
    "llama3_1": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "qwen2_5": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "gemma3": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "mistral": ("<s>", "[INST]", "[/INST]", "</s>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
# Other real special tokens that must be single tokens in the vocab.
EXTRA_TOKENS = {
    "llama3_1": ("<|end_of_text|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
    "qwen2_5": ("<|endoftext|>", "<tool_call>", "</tool_call>"),
    "qwen3": ("<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    "gemma3": ("<eos>", "<pad>", "<unk>", "<start_of_image>"),
    "mistral": ("<unk>", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]"),
    "chatml": ("<s>", "</s>", "<unk>"),
}
# (bos, eos, pad) of the real instruct tokenizers
SPECIAL = {
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", None),
    "qwen2_5": (None, "<|im_end|>", "<|endoftext|>"),
    "qwen3": (None, "<|im_end|>", "<|endoftext|>"),
    "gemma3": ("<bos>", "<eos>", "<pad>"),
    "mistral": ("<s>", "</s>", None),
    "chatml": ("<s>", "<|im_end|>", None),
}
# generation_config.json of the real checkpoints: (bos, eos list, pad)
GENERATION = {
    "llama3_1": ("<|begin_of_text|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], None),
    "qwen2_5": ("<|endoftext|>", ["<|im_end|>", "<|endoftext|>"], "<|endoftext|>"),
    "qwen3": ("<|endoftext|>", ["<|im_end|>", "<|endoftext|>"], "<|endoftext|>"),
    "gemma3": ("<bos>", ["<eos>", "<end_of_turn>"], "<pad>"),
    "mistral": ("<s>", ["</s>"], None),
    "chatml": ("<s>", ["<|im_end|>"], None),
}
# The token that closes an assistant turn in the template (where generation must stop).
TURN_END = {"llama3_1": "<|eot_id|>", "qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>",
            "mistral": "</s>", "chatml": "<|im_end|>"}
# encode(add_special_tokens=True) prepends bos for these (a second one for templates that write bos_token)
PREPENDS_BOS = {"llama3_1", "gemma3", "mistral", "chatml"}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for family in FAMILIES:
        path = build_tiny_chat_model(family, tmp_path_factory.mktemp(family))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        out[family] = (path, tokenizer, model)
    return out


def template_bytes(family: str) -> bytes:
    return (TEMPLATES_DIR / f"{family}.jinja").read_bytes()


def test_sources_md_lists_every_template_with_its_sha256():
    sources = (TEMPLATES_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for family in FAMILIES:
        row = next((line for line in sources.splitlines() if f"`{family}.jinja`" in line), None)
        assert row is not None, family
        assert hashlib.sha256(template_bytes(family)).hexdigest() in re.findall(r"[0-9a-f]{64}", row), family


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_with_the_real_template_and_special_tokens(built, family):
    path, tok, model = built[family]
    assert tok.is_fast
    assert (path / "chat_template.jinja").read_bytes() == template_bytes(family)
    assert tok.chat_template == template_bytes(family).decode("utf-8")
    bos, eos, pad = SPECIAL[family]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    for token in MARKERS[family] + EXTRA_TOKENS[family]:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)], token
    # the model matches the tokenizer, and generation stops where the real checkpoint stops
    assert model.config.vocab_size == len(tok)
    gen_bos, gen_eos, gen_pad = GENERATION[family]
    ids = tok.convert_tokens_to_ids
    gc = model.generation_config
    assert gc.bos_token_id == ids(gen_bos)
    assert as_list(gc.eos_token_id) == [ids(t) for t in gen_eos]
    assert gc.pad_token_id == (ids(gen_pad) if gen_pad else None)
    assert ids(TURN_END[family]) in as_list(gc.eos_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_renders_and_tokenizes_the_chat(built, family):
    import torch

    _, tok, model = built[family]
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert full == FULL[family]
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == PROMPT[family]
    # Prefix property used for assistant masking; Mistral breaks it (system moves with the last user turn).
    assert full.startswith(prompt) == (family != "mistral")

    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    for marker in MARKERS[family]:
        assert ids.count(tok.convert_tokens_to_ids(marker)) == full.count(marker) > 0, marker
    assert tok.decode(ids) == full  # byte-level BPE: lossless, Hangul included
    start = full.rindex(ANSWER + TURN_END[family])
    assert (start, start + len(ANSWER)) in enc["offset_mapping"]  # the answer is its own token
    assert all(full[s:e] for s, e in enc["offset_mapping"])

    with_special = tok(full)["input_ids"]
    if family in PREPENDS_BOS:
        assert with_special == [tok.bos_token_id] + ids
        assert (with_special[1] == tok.bos_token_id) == full.startswith(tok.bos_token)  # double bos
    else:
        assert with_special == ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny forward pass: thread spin-up costs far more than it saves on shared cores
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (1, len(ids), len(tok))


NO_SYSTEM = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
NO_SYSTEM_START = {
    "llama3_1": "<|begin_of_text|>" + LLAMA_SYS_HEADER + "<|eot_id|><|start_header_id|>user",  # header anyway
    "qwen2_5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "qwen3": "<|im_start|>user\n",
    "gemma3": "<bos><start_of_turn>user\n" + USER,
    "mistral": "<s>[INST] " + USER + "[/INST] ",
    "chatml": "<|im_start|>user\n",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_without_a_system_message(built, family):
    _, tok, _ = built[family]
    assert tok.apply_chat_template(NO_SYSTEM, tokenize=False).startswith(NO_SYSTEM_START[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_non_alternating_roles(built, family):
    _, tok, _ = built[family]
    chat = [{"role": "user", "content": "하나"}, {"role": "user", "content": "둘"}]
    if family in ("gemma3", "mistral"):
        with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
            tok.apply_chat_template(chat, tokenize=False)
    else:  # the others render whatever they get
        assert tok.apply_chat_template(chat, tokenize=False).count("둘") == 1


def test_qwen3_rewrites_history_and_thinking_switch(built):
    _, tok, _ = built["qwen3"]
    chat = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "R1" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text  # earlier reasoning dropped
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n")
    off = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_same_seed_same_bytes(tmp_path):
    for family in FAMILIES:
        a = build_tiny_chat_model(family, tmp_path / family / "a", seed=0)
        b = build_tiny_chat_model(family, tmp_path / family / "b", seed=0)
        c = build_tiny_chat_model(family, tmp_path / family / "c", seed=1)
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (family, name)
            assert ((a / name).read_bytes() == (c / name).read_bytes()) == (name != "model.safetensors"), name
