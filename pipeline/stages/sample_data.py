"""Stage `sample_data`: the shipped demo data, made by a deterministic generator.

Korean multiple-choice reading comprehension (지문/질문/선택지 → 정답) in three item types of graded
difficulty (`explicit`, `ordinal`, `lookup`), a validation split for SFT's held-out loss, a raw-text domain
corpus for DAPT, held-out domain text and general text (the forgetting check), all from `seed` and params
`sample_data`. What each item type tests and why the held-out text never repeats the corpus:
pipeline/data/synthetic.py.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import run_cli
from pipeline.config import load_params
from pipeline.data.synthetic import generate


def main() -> None:
    params = load_params()
    counts = generate(params.sample_data, params.sample_data.num_choices, params.seed, Path(params.sample_data.out_dir))
    print("sample data:", ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
