"""Stage `sample_data`: the shipped demo data, made by a deterministic generator.

Korean multiple-choice reading comprehension (지문/질문/선택지 → 정답) in three item types of
graded difficulty, so the README can say honestly what a tiny CPU model learns:

- `explicit`: the passage states the answer number ("이 문제의 정답은 3번이다."). A 2-layer model
  learns to copy it in a few hundred steps.
- `ordinal`: the passage names the answer as an ordinal word ("정답은 세 번째 선택지이다."); the model
  must map the word to the digit. The DAPT corpus carries that mapping.
- `lookup`: no hint; the answer is the option that matches a fact in the passage. Tiny random-init
  models stay near chance here; a real model does not.

Also written: a validation split for SFT's held-out loss (early stopping, best checkpoint), drawn
like eval and sharing no prompt with train or eval, so eval's accuracy stays untouched by model selection;
a raw-text domain corpus for DAPT (same world, same vocabulary), held-out domain text, and a
general-text held-out set on other topics (the forgetting check).

The held-out domain text must not repeat corpus lines, or its perplexity measures memorisation. The
world is small: the answer statements and fine-tuning sentences are ~30 fixed strings that the corpus
contains every one of, so they cannot be held out. Held-out lines are therefore fact sentences from a
held-out-only slice of the (relation, person, value) space (HELDOUT_FACT_SHARE, chosen from the seed):
the corpus never states those facts, so no held-out line is a corpus line, whatever n_domain_lines is.
Their words and phrases do occur in the corpus (same templates): the validate stage reports that
n-gram share.

The generator is pipeline/data/synthetic.py; this module reads params and writes the files.
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
