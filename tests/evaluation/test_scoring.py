"""The evaluate stage's scoring (pipeline/evaluation/): option log-likelihoods, perplexity and intervals against hand-computed values."""

from __future__ import annotations

import pytest

from pipeline.data.formats import Example, to_example
from pipeline.data.readers import read_records


def examples(path, params) -> list[Example]:
    return [to_example(r, "mcq", params.task) for r in read_records(path)]


def lines(path) -> list[str]:
    return [r.value["text"] for r in read_records(path)]


def test_option_scoring_and_perplexity(tiny):
    from pipeline.evaluation.scoring import (
        choose,
        masked_logprobs,
        option_logprobs,
        option_sequences,
        perplexity,
        prefix_sharing_fits,
    )
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    root, params = tiny
    tokenizer, model = load_tokenizer(root / "base"), load_causal_lm(root / "base").eval()
    items = examples(root / "data/eval.jsonl", params)[:6]
    scores = option_logprobs(model, tokenizer, items, 16)
    assert len(scores) == 6 and all(len(s) == 5 and all(v < 0 for v in s) for s in scores)
    # Batched scoring (longest first, results back in input order) equals scoring one sequence at a time.
    single = [option_logprobs(model, tokenizer, [item], 1)[0] for item in items]
    assert len({len(s.input_ids) for i in items for s in option_sequences(tokenizer, i)}) > 1  # lengths differ
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(single, scores, strict=True))
    # The prompt runs once per item (KV cache repeated per option) and gives every full sequence's own number.
    assert prefix_sharing_fits(model, [option_sequences(tokenizer, i) for i in items])
    flat = masked_logprobs(model, tokenizer, [s for i in items for s in option_sequences(tokenizer, i)], 16)
    assert [v for s in scores for v in s] == pytest.approx([total for total, _ in flat], abs=1e-4)
    # ... and the textbook computation: log-softmax of the full logits, summed at the masked tokens.
    import torch

    seq = option_sequences(tokenizer, items[0])[2]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    reference = sum(full[i - 1, seq.input_ids[i]].item() for i, bit in enumerate(seq.assistant_masks) if bit and i)
    assert scores[0][2] == pytest.approx(reference, abs=1e-4)
    assert all(1 <= p <= 5 for p in choose(scores))
    ppl = perplexity(model, tokenizer, lines(root / "data/domain_eval.txt"), 32)
    assert 1 < ppl < 10 * len(tokenizer)


def test_document_perplexity_scores_each_document_alone_from_its_start(tiny):
    import math

    import torch

    from pipeline.evaluation.scoring import document_perplexity, perplexity
    from pipeline.modeling.loading import document_ids, load_causal_lm, load_tokenizer

    root, _ = tiny
    tokenizer, model = load_tokenizer(root / "base"), load_causal_lm(root / "base").eval()
    docs = lines(root / "data/domain_eval.txt")[:5]
    block = 6
    assert max(len(document_ids(tokenizer, d)) for d in docs) > block + 1  # some documents span several windows
    nll, count = 0.0, 0
    with torch.no_grad():  # by hand: one unpadded window at a time, never across a document's end
        for doc in docs:
            ids = document_ids(tokenizer, doc)
            for start in range(0, len(ids) - 1, block):
                window = torch.tensor([ids[start:start + block + 1]])
                logits = model(input_ids=window[:, :-1]).logits[0].float()
                nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
                count += window.shape[1] - 1
    assert document_perplexity(model, tokenizer, docs, block, 4) == pytest.approx(math.exp(nll / count), rel=1e-4)
    # Packing runs documents into each other's blocks: another number on the same text.
    assert perplexity(model, tokenizer, docs, block) != pytest.approx(math.exp(nll / count), rel=1e-3)


def test_accuracy_interval_is_the_wilson_score_interval():
    from pipeline.evaluation.statistics import accuracy_ci95

    low, high = accuracy_ci95(119, 150)  # the reference run's tuned accuracy, 0.7933 of 150 items
    assert (round(low, 4), round(high, 4)) == (0.7216, 0.8504)  # Wilson: (p + z²/2n ± z√(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert accuracy_ci95(0, 10)[0] == 0.0 and accuracy_ci95(10, 10)[1] == 1.0  # never outside [0, 1]


def test_a_prompt_tuning_adapter_is_scored_at_the_answer_not_at_its_virtual_tokens(tiny):
    """PEFT prepends the soft prompt's virtual tokens, so the model's outputs for the answer come that many
    positions later: option scoring through the adapter equals scoring its own forward by hand."""
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from pipeline.evaluation.scoring import option_logprobs, option_sequences
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    root, params = tiny
    tokenizer = load_tokenizer(root / "base")
    model = get_peft_model(load_causal_lm(root / "base"), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=5)).eval()
    item = examples(root / "data/eval.jsonl", params)[0]
    scores = option_logprobs(model, tokenizer, [item], 4)[0]
    seq = option_sequences(tokenizer, item)[1]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    assert full.shape[0] == len(seq.input_ids) + 5
    reference = sum(full[i - 1 + 5, seq.input_ids[i]].item() for i, bit in enumerate(seq.assistant_masks) if bit and i)
    assert scores[1] == pytest.approx(reference, abs=1e-4)


def test_text_answers_are_trained_scored_and_parsed_as_the_options_words(tiny):
    """task.answer_format: text — the assistant turn is the option's words; each option is scored as its own words
    (the answer tokens, nothing of the others), and a generation names the option whose words it is."""
    from pipeline.evaluation.scoring import option_logprobs, option_sequences, parse_option
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    root, params = tiny
    text = params.model_copy(update={"task": params.task.model_copy(update={"answer_format": "text"})})
    item, numbered = examples(root / "data/eval.jsonl", text)[0], examples(root / "data/eval.jsonl", params)[0]
    assert item.messages[-1]["content"] == item.choices[item.answer - 1] and item.answer_format == "text"
    assert numbered.messages[-1]["content"] == str(numbered.answer) and numbered.answer_format is None
    assert item.messages[:-1] == numbered.messages[:-1]  # the same prompt
    tokenizer = load_tokenizer(root / "base")
    for k, seq in enumerate(option_sequences(tokenizer, item), start=1):
        answer = tokenizer.decode([t for t, bit in zip(seq.input_ids, seq.assistant_masks, strict=True) if bit])
        assert answer.startswith(item.choices[k - 1])
    model = load_causal_lm(root / "base").eval()
    assert option_logprobs(model, tokenizer, [item], 4)[0] != option_logprobs(model, tokenizer, [numbered], 4)[0]
    assert parse_option(f"  {item.choices[1].upper()}.", item) == 2
    assert parse_option("none of these", item) is None
    assert parse_option("2", numbered) == 2 and parse_option("answer: 3", None) == 3


def test_scoring_in_bfloat16_reports_the_items_that_change_against_float32(tiny, tmp_path, capsys):
    """The evaluate stage scores in the dtype sft trained in (bfloat16 where `auto` found it faster) and counts the
    items whose chosen option differs from float32 scoring of the same adapter."""
    from pipeline.evaluation.scoring import choose, option_logprobs
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.modeling.loading import load_causal_lm
    from pipeline.stages.evaluate import float32_agreement
    from pipeline.training.sft import train_adapter

    root, params = tiny
    params = params.model_copy(update={"sft": params.sft.model_copy(update={
        "quantization": "none", "out_dir": str(tmp_path / "adapter"), "max_steps": 4})})
    tokenizer = chat_tokenizer(root / "base")
    train_adapter(root / "base", examples(root / "data/train.jsonl", params), tokenizer, params, tmp_path / "adapter")
    items = examples(root / "data/eval.jsonl", params)[:12]
    load = {"quantization": "none", "double_quant": False, "compute_dtype": "bfloat16"}
    from peft import PeftModel

    bf16 = PeftModel.from_pretrained(load_causal_lm(root / "base", **load), tmp_path / "adapter").eval()
    chosen = choose(option_logprobs(bf16, tokenizer, items, 4))
    bf16_params = params.model_copy(update={"sft": params.sft.model_copy(update={"compute_dtype": "bfloat16"})})
    found = float32_agreement(root / "base", bf16_params, load, tokenizer, items, chosen)
    fp32 = PeftModel.from_pretrained(load_causal_lm(root / "base"), tmp_path / "adapter").eval()
    float32 = choose(option_logprobs(fp32, tokenizer, items, 4))
    expected = sum(a != b for a, b in zip(chosen, float32, strict=True))
    assert found == {"tuned_float32_changed_choices": expected}
    assert f"scored in bfloat16, {expected} of 12 items choose another option than in float32" in capsys.readouterr().out
    # A different choice list is counted as different: the count is of this run's choices, not a constant.
    flipped = [c % 5 + 1 for c in chosen]
    assert float32_agreement(root / "base", bf16_params, load, tokenizer, items, flipped)[
        "tuned_float32_changed_choices"] == sum(a != b for a, b in zip(flipped, float32, strict=True)) > 0
