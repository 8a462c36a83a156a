"""Training-token throughput, counted the same way for the pipeline stage and the plain TRL script.

A forward pre-hook on the trained model counts, for every training forward call (one per micro-batch):
- `tokens`: the real (non-pad) tokens: the sum of `attention_mask` for a padded batch; every token of a
  padding-free (packed, `bfd`) batch, whose sequences TRL concatenates into one row without pads;
- `padded_tokens`: every position the model computes (`input_ids.numel()`), pads included;
- `sum_sq`: the sum over sequences of length², for the attention term of the FLOP count (a packed row
  holds several sequences; their boundaries come from `cu_seq_lens_q`, which TRL's collator adds).
The clock is read at every `on_step_end`. Throughput is measured between the end of step `warmup` and the
end of the last step, so the first steps (allocator growth, lazy initialisation) are left out and
everything else in a step (data loading and collation, forward, backward, optimizer, logging) is in.
With `budget_s`, training stops at the first step end past that many seconds once at least one step
after the warm-up is timed, or earlier if the warm-up alone would take over 3x the budget (then the
window starts at the beginning of training, and the result says `warmup_included`): a very slow case
(bf16 on a CPU without bf16 instructions) still ends in bounded time.

Why not the Trainer's `train_tokens_per_second`: it needs `include_num_input_tokens_seen`, which the
pipeline's `train_adapter` does not set (and this benchmark must not change it), and it divides by the
whole `train()` call, first steps included. The plain script turns it on anyway as a cross-check of the
token count (`trainer_num_input_tokens_seen` in its result).
"""

from __future__ import annotations

import resource
import time

from transformers import TrainerCallback


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Throughput(TrainerCallback):
    def __init__(self, warmup: int, budget_s: float | None = None):
        self.warmup, self.budget_s = warmup, budget_s
        self.model_info: dict = {}
        self.tokens = self.padded = self.sum_sq = self.sequences = 0
        self.marks: list[tuple[float, int, int, int]] = []
        self.handle = None

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask, cu = kwargs.get("attention_mask"), kwargs.get("cu_seq_lens_q")
        if mask is not None:
            lengths = mask.sum(dim=1).tolist()
        elif cu is not None:
            lengths = cu.diff().tolist()
        else:
            lengths = [ids.shape[1]] * ids.shape[0]
        self.tokens += int(sum(lengths))
        self.padded += int(ids.numel())
        self.sum_sq += int(sum(n * n for n in lengths))
        self.sequences += len(lengths)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.model_info = {"trainable_params": sum(p.numel() for p in trainable),
                           "adapter_dtype": str(trainable[0].dtype) if trainable else None}
        self.marks = [(time.perf_counter(), 0, 0, 0)]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), self.tokens, self.padded, self.sum_sq))
        steps = len(self.marks) - 1
        elapsed = self.marks[-1][0] - self.marks[0][0]
        if self.budget_s is not None and elapsed >= self.budget_s and (
                steps > self.warmup or elapsed / steps * (self.warmup + 1) > 3 * self.budget_s):
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()

    def result(self) -> dict:
        steps = len(self.marks) - 1
        start = self.marks[min(self.warmup, steps - 1)]
        end = self.marks[-1]
        seconds = end[0] - start[0]
        tokens, padded, sum_sq = (end[i] - start[i] for i in (1, 2, 3))
        return {
            "steps": steps, "warmup_included": steps <= self.warmup, "timed_steps": steps - min(self.warmup, steps - 1), "seconds": seconds,
            "tokens": tokens, "padded_tokens": padded, "sum_sq": sum_sq,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "padded_tokens_per_s": padded / seconds if seconds > 0 else float("nan"),
            "total_tokens": self.tokens, "total_sequences": self.sequences,
            "seconds_per_step": seconds / max(1, steps - min(self.warmup, steps - 1)),
            "peak_rss_mb": peak_rss_mb(), **self.model_info,
        }
