"""The `dapt` stage's continued pretraining (pipeline/training/dapt.py) on the tiny model, called as the stage calls it."""

from __future__ import annotations

from pipeline.data.readers import read_records


def lines(path) -> list[str]:
    return [r.value["text"] for r in read_records(path)]


def test_dapt_full_training_lowers_domain_loss(tiny):
    from pipeline.training.dapt import continued_pretraining

    root, params = tiny
    log = continued_pretraining(root / "base", lines(root / "data/domain_train.txt"), params.dapt, params.seed,
                                root / "dapt")
    assert log[-1]["loss"] < log[0]["loss"]
    assert (root / "dapt/model.safetensors").exists()


def test_dapt_lora_is_merged_into_a_plain_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.training.dapt import continued_pretraining

    root, params = tiny
    dapt = params.dapt.model_copy(update={"method": "lora", "max_steps": 4})
    continued_pretraining(root / "base", lines(root / "data/domain_train.txt"), dapt, params.seed, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in name for name, _ in model.named_parameters())
