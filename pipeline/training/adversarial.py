"""Adversarial training on the input embeddings (`sft.adversarial`): FGM and PGD for SFT.

Each micro-batch is trained on twice: as it is, and with its token embeddings moved in the direction
that raises the loss most (Goodfellow et al. 2015; Miyato et al. 2017 for text; Madry et al. 2018 for
PGD). The gradient of both losses is summed (weight 1 each), so the model learns to give the same
answer to a slightly changed input.

- The perturbation is added to the output of the model's input-embedding layer by a forward hook, so it
  works on any base (quantized or not), with LoRA and DoRA, and with prompt tuning, where it moves the
  token embeddings and never the soft prompt (peft concatenates the virtual tokens after that layer).
- Its size is per token and relative: token t moves by at most `epsilon * ||e_t||` (L2 over the hidden
  dimension). One epsilon then means the same for every model (Gemma scales its embeddings by
  sqrt(hidden), SmolLM2 does not), every sequence length and every batch layout, padding-free packing
  included, where one row holds several examples. A token whose loss gradient is zero (padding, text
  after the last answer) is not moved.
- FGM: one step of size epsilon along the per-token normalised gradient: 2 forward/backward passes per
  micro-batch (about 2x a plain step). PGD: `steps` ascent steps of size `alpha`, each projected back
  into the epsilon ball, from zero (no random start: nothing is drawn from an RNG, so a resumed run
  stays byte-identical): steps + 1 passes (about (steps + 1)x).
- Every pass goes through Trainer.training_step, so gradient accumulation, loss scaling, mixed precision
  and DDP behave as in a plain step; the probe passes run without DDP gradient sync and their parameter
  gradients are put back as they were, so only the clean and the final adversarial loss train the model.
- The logged `adversarial_loss_increase` is the adversarial loss over the clean loss of each micro-batch
  (above 1: the attack found a worse input).
"""

from __future__ import annotations

from trl import SFTTrainer

from pipeline.config import AdversarialParams


class EmbeddingPerturbation:
    """A forward hook on the input-embedding layer that adds `delta` while armed.

    probe(): the next forward adds `start` (zeros by default) as a leaf that requires grad, so a backward
    leaves d loss / d embeddings in `delta.grad`. attack(): the next forwards add the fixed `delta`."""

    def __init__(self, module):
        self.mode: str | None = None
        self.delta = None
        self.start = None
        self.norms = None  # ||e_t|| of the clean embeddings, shape (batch, seq, 1)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        import torch

        if self.mode == "probe":
            if self.norms is None:
                self.norms = output.detach().float().norm(dim=-1, keepdim=True)
            start = torch.zeros_like(output, dtype=torch.float32) if self.start is None else self.start
            self.delta = start.detach().clone().requires_grad_(True)
            return output + self.delta.to(output.dtype)
        if self.mode == "attack":
            return output + self.delta.detach().to(output.dtype)
        return output

    def reset(self) -> None:
        self.mode, self.delta, self.start, self.norms = None, None, None, None

    def remove(self) -> None:
        self.handle.remove()


def unit_per_token(grad):
    """grad / ||grad|| over the hidden dimension, zero where the gradient is zero."""
    norm = grad.norm(dim=-1, keepdim=True)
    return grad / norm.clamp(min=1e-12) * (norm > 0)


def project(delta, radius):
    """delta with each token's vector scaled back into the ball of its own radius."""
    norm = delta.norm(dim=-1, keepdim=True)
    return delta * (radius / norm.clamp(min=1e-12)).clamp(max=1.0)


class AdversarialSFTTrainer(SFTTrainer):
    """SFTTrainer whose training step adds an FGM or PGD adversarial pass on the input embeddings."""

    def __init__(self, *args, adversarial: AdversarialParams, **kwargs):
        super().__init__(*args, **kwargs)
        self.adversarial = adversarial
        self.perturbation = None

    def _embedding_layer(self):
        return self.accelerator.unwrap_model(self.model).get_input_embeddings()

    def _side_effects(self):
        """TRL's per-pass bookkeeping (token count, metric lists) that only the clean pass may leave."""
        return self._total_train_tokens, {k: len(v) for k, v in self._metrics["train"].items()}

    def _undo(self, saved) -> None:
        self._total_train_tokens, lengths = saved
        for key in list(self._metrics["train"]):
            if key in lengths:
                del self._metrics["train"][key][lengths[key]:]
            else:
                del self._metrics["train"][key]  # an empty list would be averaged as 0 / 0 when TRL logs

    def _probe(self, model, inputs, num_items_in_batch, start):
        """Loss gradient w.r.t. the embeddings at `start`, leaving the parameters' gradients untouched."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = [None if p.grad is None else p.grad.clone() for p in trainable]
        self.perturbation.mode, self.perturbation.start = "probe", start
        with self.accelerator.no_sync(model):
            super().training_step(model, inputs, num_items_in_batch)
        for p, g in zip(trainable, grads):
            p.grad = g
        return self.perturbation.delta.grad

    def training_step(self, model, inputs, num_items_in_batch=None):
        settings = self.adversarial
        if self.perturbation is None:
            self.perturbation = EmbeddingPerturbation(self._embedding_layer())
        perturbation = self.perturbation
        saved = self._side_effects()
        try:
            # clean pass: trains the parameters and measures d loss / d embeddings on the way
            perturbation.mode = "probe"
            with self.accelerator.no_sync(model):
                clean = super().training_step(model, inputs, num_items_in_batch)
            saved = self._side_effects()  # what the clean pass logged stays; the extra passes' is undone
            grad, radius = perturbation.delta.grad, settings.epsilon * perturbation.norms
            if settings.method == "fgm":
                delta = radius * unit_per_token(grad)
            else:
                step = settings.alpha * perturbation.norms
                delta = project(step * unit_per_token(grad), radius)
                for _ in range(settings.steps - 1):
                    grad = self._probe(model, inputs, num_items_in_batch, delta)
                    delta = project(delta + step * unit_per_token(grad), radius)
            # adversarial pass: trains the parameters on the perturbed embeddings (DDP syncs here)
            perturbation.mode, perturbation.delta = "attack", delta
            adversarial = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._undo(saved)
            perturbation.reset()
        self._metrics["train"]["adversarial_loss_increase"].append(
            (adversarial / clean.clamp(min=1e-12)).item())
        return clean
