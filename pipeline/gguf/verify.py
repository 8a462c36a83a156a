"""Verifying a GGUF export against the merged model it came from (pipeline/commands/export.py runs it).

`write_gguf` converts a merged model (convert.py), loads the file in llama.cpp (runtime.py) and checks it against
the merged model on MCQ items: each rendered prompt's tokens, the end-of-turn tokens, each item's chosen option by
log-likelihood as evaluate scores it, greedy generations; then writes the Ollama Modelfile and renders its
template in Go (ollama.py). `refusals` says what in a report makes the export wrong.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

def greedy_pairs(merged, tokenizer, gguf, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int) -> dict:
    """Greedy generations of the merged model and of the GGUF on the same prompt tokens, token for token."""
    import torch

    same, prefix = 0, []
    for ids in prompts:
        with torch.no_grad():
            out = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                                  pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        reference = out[:next((i for i, t in enumerate(out) if t in stop_ids), len(out))]
        got = gguf.greedy(ids, max_new_tokens)
        same += got == reference
        prefix.append(next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), min(len(got), len(reference))))
    return {"greedy_items": len(prompts), "greedy_identical": same,
            "greedy_mean_common_prefix": sum(prefix) / max(1, len(prefix))}


def verify_gguf(gguf_path: Path, merged, tokenizer, examples, stop_ids: set[int], batch_size: int, greedy_items: int,
                max_new_tokens: int) -> dict:
    """The llama.cpp checks of the module docstring; returns their numbers (answers: both chosen-option lists)."""
    from tqdm import tqdm

    from pipeline.data.formats import prompt_of
    from pipeline.evaluation.scoring import choose, option_logprobs, option_sequences
    from pipeline.gguf import runtime
    from pipeline.modeling.chat_template import render

    started = time.monotonic()
    reference = choose(option_logprobs(merged, tokenizer, examples, batch_size))
    gguf = runtime.load(gguf_path)
    try:
        bos_text = tokenizer.bos_token if gguf.add_bos() and tokenizer.bos_token else ""
        texts = [render(tokenizer, prompt_of(e), generation_prompt=True) for e in examples]
        pipeline_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        llama_ids = [gguf.tokenize(t.removeprefix(bos_text) if bos_text and t.startswith(bos_text) else t)
                     for t in texts]
        tokens_same = sum(a == b for a, b in zip(pipeline_ids, llama_ids, strict=True))
        not_stopping = sorted(t for t in stop_ids if not gguf.is_end_of_turn(t))
        if tokens_same < len(texts):  # the answers of other prompts than the pipeline's say nothing: stop here
            return {"agreement": None, "items_agreeing": None, "tokenizer_agreement": tokens_same / len(texts),
                    "prompts_tokenized_alike": tokens_same, "stop_tokens_not_ending": not_stopping,
                    "bos_text": bos_text}
        scores = []
        for e in tqdm(examples, desc="llama.cpp: scoring options", unit="item"):
            sequences = option_sequences(tokenizer, e)
            scores.append(gguf.option_logprobs([(s.input_ids, [p for p, bit in enumerate(s.assistant_masks)
                                                               if bit and p > 0]) for s in sequences]))
        chosen = choose(scores)
        generations = greedy_pairs(merged, tokenizer, gguf, pipeline_ids[:greedy_items], stop_ids, max_new_tokens)
    finally:
        gguf.close()
    agree = sum(a == b for a, b in zip(chosen, reference, strict=True))
    return {"agreement": agree / len(examples), "items_agreeing": agree, "tokenizer_agreement": tokens_same / len(texts),
            "prompts_tokenized_alike": tokens_same, "stop_tokens_not_ending": not_stopping, "bos_text": bos_text,
            "accuracy_merged": _accuracy(reference, examples), "accuracy_gguf": _accuracy(chosen, examples),
            **generations, "verify_s": round(time.monotonic() - started, 1)}


def _accuracy(chosen: list[int], examples) -> float | None:
    if any(e.answer is None for e in examples):
        return None
    return sum(c == e.answer for c, e in zip(chosen, examples, strict=True)) / len(examples)


def template_chats(examples, system_prompt: str | None) -> list[list[dict]]:
    """The eval prompts, plus chats of the other shapes a Modelfile serves: no system turn, several turns."""
    from pipeline.data.formats import prompt_of

    chats = [prompt_of(e) for e in examples]
    user = [m for m in chats[0] if m["role"] == "user"][0]["content"]
    chats.append([{"role": "user", "content": user}])
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": "1"},
             {"role": "user", "content": "Why?"}]
    chats.append(turns)
    if system_prompt:
        chats.append([{"role": "system", "content": system_prompt}, *turns])
    return chats


def write_gguf(tmp: Path, merged, tokenizer, examples, stop_ids: set[int], system_prompt: str | None, quant: str,
               batch_size: int, *, greedy_items: int = 4, max_new_tokens: int = 16, num_ctx: int = 2048,
               pre_tokenizer: str | None = None, template_check: bool = True) -> dict:
    """Into tmp: the merged model as a `quant` GGUF and its Modelfile, verified (verify_gguf, the Modelfile in Go);
    returns the report, to be judged by `refusals`."""
    from pipeline.artifacts import file_sha256
    from pipeline.gguf import convert, ollama

    name = f"model-{quant}.gguf"
    hf_dir = tmp / "merged"
    merged.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    convert.strip_training_markers(hf_dir)
    convert.convert(hf_dir, tmp / name, quant, pre_tokenizer)
    shutil.rmtree(hf_dir)
    report = verify_gguf(tmp / name, merged, tokenizer, examples, stop_ids, batch_size, greedy_items, max_new_tokens)
    stop_texts = sorted({tokenizer.convert_ids_to_tokens(t) for t in stop_ids})
    template = ollama.derive_template(tokenizer, report["bos_text"])
    text = ollama.modelfile(name, template, system_prompt or None, stop_texts, num_ctx)
    (tmp / "Modelfile").write_text(text, encoding="utf-8")
    if not template_check:
        checked = "skipped (--skip-template-check)"
    elif shutil.which("go") is None:
        checked = "not run: no Go toolchain to render it with (Debian: apt-get install golang-go)"
        print(f"export: warning: the Modelfile's template was {checked}", file=sys.stderr)
    else:
        checked = ollama.check_template(text, tokenizer, template_chats(examples, system_prompt), report["bos_text"])
    return {**report, "format": "gguf", "quant": quant, "file": name, "sha256": file_sha256(tmp / name),
            "size_bytes": (tmp / name).stat().st_size, "stop_tokens": stop_texts, "n_items": len(examples),
            "template_check": checked}


def refusals(report: dict) -> list[str]:
    out = []
    if report["prompts_tokenized_alike"] < report["n_items"]:
        out.append(f"llama.cpp tokenizes {report['n_items'] - report['prompts_tokenized_alike']} of "
                   f"{report['n_items']} prompts differently from the model's tokenizer")
    if report["stop_tokens_not_ending"]:
        out.append(f"tokens {report['stop_tokens_not_ending']} end the pipeline's generations but not llama.cpp's")
    if report["agreement"] is not None and report["agreement"] < report["min_agreement"]:
        out.append(f"chosen options agree with the merged model's on {report['items_agreeing']}/{report['n_items']} "
                   f"items ({report['agreement']:.3f} < --min-agreement {report['min_agreement']})")
    return out
