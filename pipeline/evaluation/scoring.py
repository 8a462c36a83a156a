"""Scoring a model on held-out items: option log-likelihoods, perplexity (packed and per document), greedy generation.

MCQ accuracy is by log-likelihood: each option's answer tokens (exactly the tokens the trainer learned,
see `option_sequences`) are scored after the chat prompt, in batched forward passes that share the
prompt's KV cache across options; the most likely option is the prediction. The LM head runs only at
the scored positions (`logits_to_keep`). Used by the `evaluate` stage and by `pipeline.commands.predict`.
"""

from __future__ import annotations

import math
import re

from pipeline.config import Params
from pipeline.data.formats import Example, answer_content, normalised, prompt_of
from pipeline.modeling.chat_template import Encoded, encode_chat, render
from pipeline.modeling.loading import device_of, document_ids, no_grad


def option_sequences(tokenizer, example: Example) -> list[Encoded]:
    """The chat answered with each option number; the trainable tokens are what gets scored.

    Scoring exactly the tokens the trainer learned (answer plus the template's end-of-turn marker, and
    whatever a template puts before the answer, like Qwen3's empty think block) keeps the comparison
    right for every template, and the end marker keeps "1" and "10" apart.
    """
    prompt = prompt_of(example)
    return [encode_chat(tokenizer, prompt + [{"role": "assistant",
                                              "content": answer_content(k, example.choices, example.answer_format)}])[-1]
            for k in range(1, len(example.choices) + 1)]


@no_grad
def masked_logprobs(model, tokenizer, sequences: list[Encoded], batch_size: int) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of the masked tokens of each sequence, in right-padded batches.

    Batches are formed longest first (the results come back in the input order), so a batch holds sequences
    of similar length and little of each forward pass is spent on padding. The LM head runs only at the
    positions that predict a scored token (`logits_to_keep` with those positions, the union over the
    batch): an answer is a few tokens, so this skips almost all of the vocabulary projection and softmax,
    and the model's own head (Gemma's logit soft-capping included) still computes them."""
    import torch

    device = device_of(model)
    scored = [[i for i, bit in enumerate(s.assistant_masks) if bit and i > 0] for s in sequences]
    config = getattr(model, "active_peft_config", None)
    offset = config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [sequences[i] for i in rows]
        width = max(len(s.input_ids) for s in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in chunk], device=device)
        attention = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in chunk],
                                 device=device)
        # A prompt-tuning adapter prepends its virtual tokens: its outputs are that many positions later.
        keep = sorted({p - 1 + offset for i in rows for p in scored[i]}) or [0]  # (a chunk with nothing to score)
        column = {p: j for j, p in enumerate(keep)}
        logits = model(input_ids=input_ids, attention_mask=attention,
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [batch, len(keep), vocab]
        for row, index in enumerate(rows):
            positions = torch.tensor(scored[index], device=device, dtype=torch.long)
            columns = torch.tensor([column[p - 1 + offset] for p in scored[index]], device=device, dtype=torch.long)
            out[index] = (logprobs[row, columns, input_ids[row, positions]].sum().item(), len(scored[index]))
    return out


def shared_prefix(sequences: list[Encoded]) -> int:
    """How many leading tokens all options of an item share, stopping before the first scored token."""
    first = min(next(i for i, bit in enumerate(s.assistant_masks) if bit and i > 0) for s in sequences)
    for n, column in enumerate(zip(*(s.input_ids[:first] for s in sequences))):
        if len(set(column)) > 1:
            return n
    return first


def prefix_sharing_fits(model, per_item: list[list[Encoded]]) -> bool:
    """Whether the KV-cached scorer gives the plain scorer's numbers for this model: not for a prompt-learning
    adapter (its virtual tokens come before the cache), and only while a sliding-window model's window covers
    every sequence (the cache's padding gap would otherwise shift the window)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if window is None or not per_item:
        return True
    prefixes = [shared_prefix(seqs) for seqs in per_item]
    tails = max(len(s.input_ids) - n for seqs, n in zip(per_item, prefixes, strict=True) for s in seqs)
    return max(prefixes) + tails <= window  # the widest cache a batch can have


@no_grad
def shared_prompt_logprobs(model, tokenizer, per_item: list[list[Encoded]], batch_size: int) -> list[list[float]]:
    """Per item, each option's summed log-prob of its scored tokens, with the prompt run once for all options.

    The options of an item differ only after the prompt: one forward pass over `batch_size` prompts (right
    padded, longest first) fills a KV cache, which is then repeated once per option, and a second pass runs just
    the options' own few tokens on it (their position ids continue each prompt; the padding gap stays masked).
    The first answer token is predicted by the prompt pass's last position. For BoolQ's two options that halves
    the tokens through the model, for ARC's four it quarters them, and the numbers are the plain scorer's."""
    import torch
    from transformers import DynamicCache

    device = device_of(model)
    pad = tokenizer.pad_token_id
    prefix = [shared_prefix(seqs) for seqs in per_item]
    scored = [[[p for p, bit in enumerate(s.assistant_masks) if bit and p > 0] for s in seqs] for seqs in per_item]
    order = sorted(range(len(per_item)), key=lambda i: -prefix[i])
    out: list[list[float]] = [[] for _ in per_item]
    for start in range(0, len(order), batch_size):
        items = order[start:start + batch_size]
        width = max(prefix[i] for i in items)
        prompt_mask = torch.tensor([[1] * prefix[i] + [0] * (width - prefix[i]) for i in items], device=device)
        prompt_ids = torch.tensor([per_item[i][0].input_ids[:prefix[i]] + [pad] * (width - prefix[i]) for i in items],
                                  device=device)
        last = sorted({prefix[i] - 1 for i in items})
        cache = DynamicCache()  # plain layers: a config-made cache would crop a sliding window's layers
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=torch.tensor(last, device=device)).logits
        columns = torch.tensor([last.index(prefix[i] - 1) for i in items], device=device)
        first = torch.log_softmax(logits[torch.arange(len(items), device=device), columns].float(), dim=-1)
        rows = [(b, i, k) for b, i in enumerate(items) for k in range(len(per_item[i]))]
        # Each option's tokens after the prompt, up to its last scored token.
        tails = [per_item[i][k].input_ids[prefix[i]:scored[i][k][-1]] for _, i, k in rows]
        length = max(1, max(len(t) for t in tails))
        cache.batch_select_indices(torch.tensor([b for b, _, _ in rows], device=device))
        tail_ids = torch.tensor([t + [pad] * (length - len(t)) for t in tails], device=device)
        tail_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in tails], device=device)
        positions = torch.tensor([[prefix[i] + j for j in range(length)] for _, i, _ in rows], device=device)
        keep = sorted({p - 1 - prefix[i] for _, i, k in rows for p in scored[i][k] if p > prefix[i]}) or [0]
        logits = model(input_ids=tail_ids, attention_mask=torch.cat([prompt_mask[[b for b, _, _ in rows]], tail_mask], 1),
                       position_ids=positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=torch.tensor(keep, device=device)).logits
        rest = torch.log_softmax(logits.float(), dim=-1)  # [option rows, len(keep), vocab]
        for r, (b, i, k) in enumerate(rows):
            ids = per_item[i][k].input_ids
            out[i].append(sum((first[b, ids[p]] if p == prefix[i] else rest[r, keep.index(p - 1 - prefix[i]), ids[p]]).item()
                              for p in scored[i][k]))
    return out


def option_logprobs(model, tokenizer, examples: list[Example], batch_size: int) -> list[list[float]]:
    """Per MCQ example, the log-likelihood of each option's answer: the prompt shared by all options of an item
    is run once (`shared_prompt_logprobs`) where that gives the same numbers, else every option is a full
    sequence in the batched scorer."""
    per_item = [option_sequences(tokenizer, e) for e in examples]
    if prefix_sharing_fits(model, per_item):
        return shared_prompt_logprobs(model, tokenizer, per_item, batch_size)
    flat = masked_logprobs(model, tokenizer, [s for seqs in per_item for s in seqs], batch_size)
    scores, start = [], 0
    for seqs in per_item:
        scores.append([total for total, _ in flat[start:start + len(seqs)]])
        start += len(seqs)
    return scores


@no_grad
def perplexity(model, tokenizer, lines: list[str], block_size: int) -> float:
    """exp(mean token NLL) over the text packed into blocks of block_size tokens."""
    import torch

    device = device_of(model)
    ids: list[int] = []
    for line in lines:
        ids.extend(document_ids(tokenizer, line))  # as DAPT packs them
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, block_size):
        block = torch.tensor([ids[start:start + block_size + 1]], device=device)
        if block.shape[1] < 2:
            break
        logits = model(input_ids=block[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum")
        nll += loss.item()
        count += block.shape[1] - 1
    return math.exp(nll / count)


def document_perplexity(model, tokenizer, lines: list[str], block_size: int, batch_size: int) -> float:
    """exp(mean token NLL) with each document scored on its own from its first token (BOS where the tokenizer
    adds one), in windows of block_size tokens that never reach into another document.

    `perplexity` packs documents into blocks as DAPT trains on them, so most blocks start mid-document without
    the BOS the base always saw first: DAPT lowers that number partly by learning the packing (format), not the
    domain. This one keeps every document in the shape pretraining gave it, so a drop here is domain gain."""
    windows = []
    for line in lines:
        ids = document_ids(tokenizer, line)
        for start in range(0, len(ids) - 1, block_size):
            window = ids[start:start + block_size + 1]
            windows.append(Encoded(input_ids=window, assistant_masks=[0] + [1] * (len(window) - 1), text=""))
    scored = masked_logprobs(model, tokenizer, windows, batch_size)
    return math.exp(-sum(total for total, _ in scored) / sum(count for _, count in scored))


@no_grad
def generate(model, tokenizer, examples: list[Example], stop_ids: set[int], params: Params) -> list[dict]:
    """Greedy generation after each chat prompt within `evaluate.max_new_tokens`: the text, and whether it stopped."""
    device = device_of(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    results = []
    try:
        for start in range(0, len(examples), params.evaluate.batch_size):
            chunk = examples[start:start + params.evaluate.batch_size]
            prompts = [render(tokenizer, prompt_of(e), generation_prompt=True) for e in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=params.evaluate.max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                end = next((i for i, t in enumerate(row) if t in stop_ids), None)
                text = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
                results.append({"text": text.strip(), "stopped": end is not None})
    finally:
        tokenizer.padding_side = side
    return results


def parse_option(text: str, example: Example | None = None) -> int | None:
    """The option a generated answer names: its first number, or for `text` answers the option whose words it
    is (case, spacing and a final full stop aside)."""
    if example is not None and example.answer_format == "text":
        said = normalised(text).rstrip(".")
        return next((k for k, c in enumerate(example.choices, start=1) if normalised(c).rstrip(".") == said), None)
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def choose(scores: list[list[float]]) -> list[int]:
    """The 1-based option with the highest log-likelihood, per item."""
    return [max(range(len(s)), key=s.__getitem__) + 1 for s in scores]
