"""The LM head runs only at labelled positions (pipeline.training.sft.lm_head_at_labels_only): same loss, same
gradients, same logged entropy and token accuracy as TRL's head over every position, on the real trainer."""

from __future__ import annotations

import pytest


def one_batch_loss(trainer, batch, compact: bool):
    import torch

    from pipeline.training.sft import lm_head_at_labels_only

    lm_head_at_labels_only(compact)
    model = trainer.model
    model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, dict(batch))
    value = loss.detach().item()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items() if k in ("entropy", "mean_token_accuracy")}
    return value, grads, metrics, torch


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_compact_head_gives_the_loss_gradients_and_logs_of_the_full_head(tiny, tmp_path, method):
    import trl.trainer.utils as trl_utils

    from pipeline.data.formats import to_example
    from pipeline.data.readers import read_records
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.training.sft import sft_trainer, training_datasets, training_model

    root, params = tiny
    params = params.model_copy(update={"sft": params.sft.model_copy(update={"method": method, "quantization": "none"})})
    tokenizer = chat_tokenizer(root / "base")
    examples = [to_example(r, "mcq", params.task) for r in read_records(root / "data/train.jsonl")][:6]
    dataset, _ = training_datasets(examples, None, tokenizer)
    model = training_model(root / "base", params.sft)
    trainer = sft_trainer(model, root / "base", tokenizer, dataset, None, params, tmp_path / "work", None)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() / 4  # answers only: most positions carry no label

    try:
        full_loss, full_grads, full_metrics, torch = one_batch_loss(trainer, batch, compact=False)
        assert not trl_utils._use_triton(torch.device("cpu"))  # TRL alone: every position on a CPU
        loss, grads, metrics, _ = one_batch_loss(trainer, batch, compact=True)
        assert trl_utils._use_triton(torch.device("cpu"))  # the labelled rows only
    finally:
        from pipeline.training.sft import lm_head_at_labels_only

        lm_head_at_labels_only(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert grads.keys() == full_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics["mean_token_accuracy"] == pytest.approx(full_metrics["mean_token_accuracy"])
    assert metrics["entropy"] == pytest.approx(full_metrics["entropy"], rel=1e-5)
