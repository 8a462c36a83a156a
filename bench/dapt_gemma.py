"""DAPT on real Korean text with Gemma 3 270M: the pipeline's own continued pretraining (`pipeline.training.dapt`) on the
Korean law corpus (konlpy's kolaw, imported by `data/real/dvc.yaml`), perplexity before and after on its
held-out lines (no line shared with the corpus: checked here) and on English text (BoolQ passages: forgetting).

    .venv/bin/python bench/dapt_gemma.py [--steps 30] [--method full] [--out bench/results-dapt-gemma.json]

Run from the project root after `make install-real` and `dvc repro data/real/dvc.yaml` (the imports). The
model is built the way the `base` stage builds `base.model: gemma3-270m` (the four wheel chunks assembled,
sha256 checked, dequantized to float32), into a temporary directory. Settings not given on the command line
are params.yaml's `dapt` section with a real model's learning rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import DaptParams, load_params
from pipeline.training.dapt import continued_pretraining, pack_corpus
from pipeline.evaluation.scoring import perplexity
from pipeline.modeling.loading import cache_dir, document_ids, load_causal_lm, load_tokenizer
from pipeline.modeling.packaged import build_packaged_base


def text_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--learning-rate", type=float, help="default: 2e-5 (full) / 2e-4 (lora)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--corpus", default="data/real/kolaw/domain_train.txt")
    parser.add_argument("--heldout", default="data/real/kolaw/domain_eval.txt")
    parser.add_argument("--english", default="data/real/boolq/eval.jsonl", help="passages of these items")
    parser.add_argument("--english-items", type=int, default=60)
    parser.add_argument("--out", default="bench/results-dapt-gemma.json")
    args = parser.parse_args()
    import torch

    params = load_params(Path("params.yaml"))
    corpus, heldout = text_lines(Path(args.corpus)), text_lines(Path(args.heldout))
    shared = set(corpus) & set(heldout)
    if shared:
        raise SystemExit(f"error: {len(shared)} held-out lines also occur in the corpus, e.g. {next(iter(shared))!r}")
    rows = [json.loads(line) for line in Path(args.english).read_text(encoding="utf-8").splitlines() if line]
    english = [r["passage"] for r in rows[:args.english_items]]
    dapt = DaptParams(**{**params.dapt.model_dump(), "enabled": True, "method": args.method, "tapt": False,
                         "max_steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
                         "learning_rate": args.learning_rate or (2e-5 if args.method == "full" else 2e-4)})
    result: dict = {"model": "gemma3-270m", "dapt": dapt.model_dump(), "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()[0], "corpus_lines": len(corpus), "heldout_lines": len(heldout),
                    "lines_shared": 0, "english_passages": len(english)}
    with tempfile.TemporaryDirectory(prefix="dapt-gemma-") as tmp:
        base, adapted = Path(tmp) / "base", Path(tmp) / "dapt"
        start = time.perf_counter()
        build_packaged_base("gemma3-270m", base, cache_dir() / "gguf")
        result["build_seconds"] = time.perf_counter() - start
        tokenizer = load_tokenizer(base)
        result["corpus_tokens"] = sum(len(b) for b in pack_corpus(corpus, tokenizer, args.block_size))
        result["heldout_tokens"] = sum(len(document_ids(tokenizer, line)) for line in heldout)
        model = load_causal_lm(base).eval()
        result["before"] = {"korean_heldout_ppl": perplexity(model, tokenizer, heldout, args.block_size),
                            "english_ppl": perplexity(model, tokenizer, english, args.block_size)}
        del model
        start = time.perf_counter()
        log = continued_pretraining(base, corpus, dapt, params.seed, adapted)
        result["train_seconds"] = time.perf_counter() - start
        result["loss_log"] = log
        model = load_causal_lm(adapted).eval()
        result["after"] = {"korean_heldout_ppl": perplexity(model, tokenizer, heldout, args.block_size),
                           "english_ppl": perplexity(model, tokenizer, english, args.block_size)}
    result["epochs"] = args.steps * args.batch_size * args.block_size / result["corpus_tokens"]
    result["load_average_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    b, a = result["before"], result["after"]
    print(f"| Gemma 3 270M, {args.method} DAPT {args.steps} steps ({result['epochs']:.1f} epochs, "
          f"{result['train_seconds']:.0f} s) | before | after |\n|---|---|---|\n"
          f"| Korean law, held-out lines ({len(heldout)}, {result['heldout_tokens']} tokens) | "
          f"{b['korean_heldout_ppl']:.2f} | {a['korean_heldout_ppl']:.2f} |\n"
          f"| English BoolQ passages ({len(english)}) | {b['english_ppl']:.2f} | {a['english_ppl']:.2f} |")


if __name__ == "__main__":
    main()
