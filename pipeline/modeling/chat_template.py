"""Chats to training tokens: the chat template, the assistant-only loss mask and the template fingerprint.

Real model templates (Llama 3.x, Qwen, Gemma, Mistral, ChatML) have no `{% generation %}` markers, and
TRL cannot patch all of them. So the mask is found the same way for every template, from the rendered
text: for each assistant turn i, the chat up to turn i rendered with the generation prompt is normally
a prefix of the chat rendered up to and including turn i; the characters in between are the
assistant's answer plus the template's end-of-turn marker, and the tokens starting inside that span
are trainable (trailing whitespace after the end marker is not). A template that renders the prompt
differently once an answer follows (Mistral v0.3 drops the system message) is located with a sentinel
answer instead and flagged (`prompt_consistent`, a warning in the gate). When a template rewrites
earlier turns (Qwen3 drops `<think>` blocks from history), a multi-turn chat is split into one example
per assistant turn.

The same `encode_chat` feeds the label audit (validate) and training (sft), so the audit sees exactly
the labels the trainer gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import PROCESSED_MANIFEST
from pipeline.errors import DataError, TemplateError
from pipeline.modeling.loading import (
    load_tokenizer,
    resolve_model,
    template_fingerprint,
)


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the loss applies
    text: str
    prompt_consistent: bool = True  # False: the template renders the prompt differently once the answer follows

    @property
    def n_trainable(self) -> int:
        return sum(self.assistant_masks)


def chat_tokenizer(model_dir: str | Path, template_file: str | None = None):
    """The model's tokenizer with the chat template training will use (the params override, if any)."""
    if not Path(model_dir).is_dir():
        raise DataError(f"{model_dir}: model directory not found; run the stage that writes it first (dvc repro)")
    tokenizer = load_tokenizer(model_dir)
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise DataError(f"{path}: chat template file not found (params.yaml task.chat_template)")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise DataError(f"{model_dir}: the tokenizer has no chat template; set task.chat_template to a Jinja file")
    if not tokenizer.is_fast:
        raise DataError(f"{model_dir}: a fast tokenizer is needed to map the loss mask onto tokens")
    return tokenizer


def stop_token_ids(model_dir: str | Path, tokenizer, revision: str | None = None) -> set[int]:
    """Ids that end a generation: the tokenizer's EOS plus the model's generation_config eos ids (Gemma 3's
    `<end_of_turn>`, Llama 3's `<|eot_id|>`), for a local directory and for a hub id at its revision."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    name, ref_revision = resolve_model(model_dir)
    try:
        eos = GenerationConfig.from_pretrained(name, revision=revision or ref_revision).eos_token_id
    except OSError:  # the model ships no generation_config.json
        return ids
    return ids | (set(eos if isinstance(eos, list) else [eos]) - {None})


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's raise_exception and template errors: the message is the useful part
        raise TemplateError(f"the chat template rejects this chat: {exc}") from None


SENTINEL = "\u2042ANSWER\u2042"  # ⁂ANSWER⁂: text no template alters, to find where an answer is rendered


def answer_start(tokenizer, messages: list[dict], i: int, upto: str) -> tuple[int, bool]:
    """(character offset where assistant turn i's answer starts in `upto`, whether the prompt is consistent).

    Consistent: the generation prompt is a prefix of the chat with the answer (most templates). Otherwise
    (Mistral v0.3 drops the system message unless the last message is the user's) the answer is found by
    rendering a sentinel in its place; the answer then starts at the sentinel, with any whitespace the
    template puts before it.
    """
    before = render(tokenizer, messages[:i], generation_prompt=True)
    if upto.startswith(before):
        return len(before), True
    probe = render(tokenizer, messages[:i] + [{"role": "assistant", "content": SENTINEL}])
    k = probe.find(SENTINEL)
    if k < 0 or not upto.startswith(probe[:k]):
        raise TemplateError(f"the chat template renders assistant turn {i} in a way the answer cannot be located in "
                            "(use task.chat_template to supply a template that renders messages in order)")
    return len(probe[:k].rstrip()), False


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool] | None:
    """(full text, character spans of every assistant answer, prompt consistent), or None if the template
    rewrites earlier turns once later ones follow."""
    full = render(tokenizer, messages)
    spans, consistent = [], True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1])
        start, same_prompt = answer_start(tokenizer, messages, i, upto)
        consistent &= same_prompt
        if not full.startswith(upto):
            return None
        # A template that drops the answer gives an empty span: no trainable token, which the label audit reports.
        spans.append((start, start + len(upto[start:].rstrip())))
    return full, spans, consistent


def _tokens(tokenizer, text: str, spans: list[tuple[int, int]], consistent: bool) -> Encoded:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= s < end for start, end in spans) and e > s) for s, e in enc["offset_mapping"]]
    return Encoded(enc["input_ids"], mask, text, consistent)


def encode_chat(tokenizer, messages: list[dict]) -> list[Encoded]:
    """Token ids and assistant-only mask of a chat: one sequence, or one per assistant turn (see module doc)."""
    found = assistant_spans(tokenizer, messages)
    if found is not None:
        return [_tokens(tokenizer, *found)]
    out = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # this answer as the chat's last turn, its history as rendered then
            text = render(tokenizer, messages[: i + 1])
            start, consistent = answer_start(tokenizer, messages, i, text)
            out.append(_tokens(tokenizer, text, [(start, len(text.rstrip()))], consistent))
    return out


def span_ends(encoded: Encoded) -> list[int]:
    """Token id at the end of each trainable run: where the model learns to stop."""
    m = encoded.assistant_masks
    return [encoded.input_ids[i] for i in range(len(m)) if m[i] and (i + 1 == len(m) or not m[i + 1])]


def show_masked(tokenizer, encoded: Encoded) -> str:
    """The rendered chat with trainable tokens between ⟦ and ⟧: what a person checks in the audit artifact."""
    out, inside = [], False
    for token_id, bit in zip(encoded.input_ids, encoded.assistant_masks, strict=True):
        if bit and not inside:
            out.append("⟦")
        if not bit and inside:
            out.append("⟧")
        inside = bool(bit)
        out.append(tokenizer.decode([token_id]))
    return "".join(out) + ("⟧" if inside else "")


def require_fingerprint(processed_dir: str | Path, tokenizer, who: str) -> None:
    """Refuse to train or evaluate with a template other than the one the data was validated with."""
    manifest = Path(processed_dir) / PROCESSED_MANIFEST
    expected = json.loads(manifest.read_text(encoding="utf-8"))["template_fingerprint"]
    if template_fingerprint(tokenizer) != expected:
        raise DataError(f"{who}: the chat template (or bos/eos/pad ids) differs from the one {manifest} was validated "
                        f"with ({expected[:12]}); rerun the validate stage (dvc repro) after changing the template")
