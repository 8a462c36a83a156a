"""Time our option scorer alone on a run's eval split, against the harness seconds of an earlier
bench/lm_eval_agreement.py result (same items, same model): the evaluation speed ratio of the current code.

    cd <real run> && .venv/bin/python bench/score_time.py [bench/results-lm-eval.json]
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.modeling.chat_template import chat_tokenizer
from pipeline.config import load_params
from pipeline.evaluation.scoring import choose, option_logprobs
from pipeline.data.formats import read_examples
from pipeline.modeling.loading import load_causal_lm

previous = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results-lm-eval.json").read_text())
params = load_params(Path("params.yaml"))
tokenizer = chat_tokenizer("models/base", params.task.chat_template)
model = load_causal_lm("models/base").eval()
examples = read_examples("data/processed", "eval", params.validation.max_record_bytes)
start = time.perf_counter()
scores = option_logprobs(model, tokenizer, examples, 8)
seconds = time.perf_counter() - start
accuracy = sum(c == e.answer for c, e in zip(choose(scores), examples)) / len(examples)
print(json.dumps({"n": len(examples), "seconds": seconds, "items_per_s": len(examples) / seconds, "accuracy": accuracy,
                  "ratio_vs_harness": previous["boolq_agreement"]["harness_seconds"] / seconds,
                  "load_average": os.getloadavg()[0]}))
