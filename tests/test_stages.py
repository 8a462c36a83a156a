"""Each model stage on a tiny model built offline (smaller than the default), called as the stages call it."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.modeling.tiny import build_tiny_base
from pipeline.config import TinyModelParams, load_params
from pipeline.data.readers import read_records
from pipeline.data.formats import Example, to_example


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_world):
    """Sample data and a tiny base model (the shared ones, linked), and params pointing at them."""
    root = tiny_world.link_into(tmp_path_factory.mktemp("tiny"))
    params = load_params()
    tiny = TinyModelParams(**tiny_world.tiny)
    params = params.model_copy(update={
        "base": params.base.model_copy(update={"out_dir": str(root / "base"), "tiny": tiny}),
        "dapt": params.dapt.model_copy(update={"out_dir": str(root / "dapt"), "max_steps": 20, "batch_size": 4}),
        "sft": params.sft.model_copy(update={"out_dir": str(root / "adapter"), "max_steps": 8, "batch_size": 4,
                                             "logging_steps": 2}),
        "evaluate": params.evaluate.model_copy(update={"max_eval_items": 10}),
    })
    return root, params


def examples(path, params) -> list[Example]:
    return [to_example(r, "mcq", params.task) for r in read_records(path)]


def lines(path) -> list[str]:
    return [r.value["text"] for r in read_records(path)]


def test_base_is_an_ordinary_hf_model_with_a_hangul_tokenizer(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, params = tiny
    assert (root / "base/model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    text = "지문을 읽고 질문의 답을 구하세요. 정답은 3번이다."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: any Hangul round-trips
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    example = examples(root / "data/train.jsonl", params)[0]
    out = tokenizer.apply_chat_template(example.messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(trained) == f"{example.answer}<|eot_id|>"  # the loss falls on the answer only


def tree_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_base_build_is_deterministic(tiny, tmp_path):
    """A second process (another hash seed: tokenizer training and dict order must not depend on it) writes the
    same bytes, every file of the directory."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, venv_env

    root, params = tiny
    texts = lines(root / "data/domain_train.txt")
    build_tiny_base(texts, params.base.tiny, params.seed, tmp_path / "a")
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    script = ("import json, sys; from pathlib import Path; from pipeline.base import build_tiny_base; "
              "from pipeline.config import TinyModelParams; "
              "build_tiny_base(json.loads(Path(sys.argv[1]).read_text(encoding='utf-8')), "
              "TinyModelParams.model_validate_json(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "texts.json"), params.base.tiny.model_dump_json(),
                    str(params.seed), str(tmp_path / "b")], cwd=REPO_ROOT, env=venv_env(PYTHONHASHSEED="12345"),
                   check=True, capture_output=True)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_base_weights_are_numpys_stream_in_llamas_distribution(tiny):
    """The saved weights are exactly numpy's PCG64 stream in sorted-name order (the same on every CPU, unlike
    torch's init kernels), shaped as Llama's init: normal(0, initializer_range), padding row zero, norms one."""
    import numpy as np
    from safetensors.numpy import load_file

    root, params = tiny
    weights = load_file(root / "base/model.safetensors")
    config = json.loads((root / "base/config.json").read_text(encoding="utf-8"))
    assert "lm_head.weight" not in weights  # tied: saved once, as the embedding
    rng = np.random.Generator(np.random.PCG64(params.seed))
    for name in sorted(weights):
        if name.endswith("norm.weight"):
            expected = np.ones(weights[name].shape)
        else:
            expected = rng.normal(0.0, config["initializer_range"], size=weights[name].shape)
            if name == "model.embed_tokens.weight":
                expected[config["pad_token_id"]] = 0.0
        assert weights[name].dtype == np.float32 and np.array_equal(weights[name], expected.astype(np.float32)), name
    assert abs(float(weights["model.layers.0.mlp.up_proj.weight"].std()) - config["initializer_range"]) < 0.002


def base_md5(lock) -> str:
    import yaml

    stages = yaml.safe_load(lock.read_text(encoding="utf-8"))["stages"]
    return next(out["md5"] for out in stages["base"]["outs"] if out["path"] == "models/base")


def test_default_base_is_the_committed_bytes(tmp_path):
    """The real `base` stage with the default params writes the models/base that the committed dvc.lock names,
    on whatever machine runs this: the built-in base no longer depends on the CPU generation."""
    from tests.conftest import REPO_ROOT, dvc, make_project_copy

    project = make_project_copy(tmp_path / "project")
    dvc(project, "repro", "sample_data", "base")
    assert base_md5(project / "dvc.lock") == base_md5(REPO_ROOT / "dvc.lock"), (
        "models/base differs from the committed dvc.lock: if sample_data or base changed on purpose, rerun "
        "`dvc repro` and commit dvc.lock; otherwise the build depends on the machine")


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


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_sft_writes_an_adapter_plain_peft_loads(tiny, tmp_path, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.training.sft import train_adapter

    root, params = tiny
    params = params.model_copy(update={"sft": params.sft.model_copy(update={"quantization": quantization})})
    tokenizer = chat_tokenizer(root / "base")
    log = train_adapter(root / "base", examples(root / "data/train.jsonl", params), tokenizer, params,
                        tmp_path / "adapter")["train"]
    assert log and all(math.isfinite(e["loss"]) for e in log)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == params.sft.lora.r
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved the zero-initialised B


def test_sft_batches_carry_exactly_the_masked_answer_tokens(tiny, tmp_path):
    """The trainer's labels are the answer and its end-of-turn token, also for a template without
    {% generation %} markers (real model templates), since the masks come from pipeline.chat."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.training.sft import training_rows

    root, params = tiny
    tokenizer = chat_tokenizer(root / "base")
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    example = examples(root / "data/train.jsonl", params)[0]
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(root / "base"),
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                        per_device_train_batch_size=1),
                         train_dataset=Dataset.from_list(training_rows([example], tokenizer)),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0]
    trained = tokenizer.decode(batch["input_ids"][0][labels != -100])
    assert trained == f"{example.answer}<|eot_id|>", trained  # the answer and EOS, no prompt token


def test_option_scoring_and_perplexity(tiny):
    from pipeline.evaluation.scoring import choose, masked_logprobs, option_logprobs, option_sequences, perplexity, prefix_sharing_fits
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    root, params = tiny
    tokenizer, model = load_tokenizer(root / "base"), load_causal_lm(root / "base").eval()
    items = examples(root / "data/eval.jsonl", params)[:6]
    scores = option_logprobs(model, tokenizer, items, 16)
    assert len(scores) == 6 and all(len(s) == 5 and all(v < 0 for v in s) for s in scores)
    # Batched scoring (longest first, results back in input order) equals scoring one sequence at a time.
    single = [option_logprobs(model, tokenizer, [item], 1)[0] for item in items]
    assert len({len(s.input_ids) for i in items for s in option_sequences(tokenizer, i)}) > 1  # lengths differ
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(single, scores, strict=True))
    # The prompt runs once per item (KV cache repeated per option) and gives every full sequence's own number.
    assert prefix_sharing_fits(model, [option_sequences(tokenizer, i) for i in items])
    flat = masked_logprobs(model, tokenizer, [s for i in items for s in option_sequences(tokenizer, i)], 16)
    assert [v for s in scores for v in s] == pytest.approx([total for total, _ in flat], abs=1e-4)
    # ... and the textbook computation: log-softmax of the full logits, summed at the masked tokens.
    import torch

    seq = option_sequences(tokenizer, items[0])[2]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    reference = sum(full[i - 1, seq.input_ids[i]].item() for i, bit in enumerate(seq.assistant_masks) if bit and i)
    assert scores[0][2] == pytest.approx(reference, abs=1e-4)
    assert all(1 <= p <= 5 for p in choose(scores))
    ppl = perplexity(model, tokenizer, lines(root / "data/domain_eval.txt"), 32)
    assert 1 < ppl < 10 * len(tokenizer)


def test_accuracy_interval_is_the_wilson_score_interval():
    from pipeline.evaluation.statistics import accuracy_ci95

    low, high = accuracy_ci95(119, 150)  # the reference run's tuned accuracy, 0.7933 of 150 items
    assert (round(low, 4), round(high, 4)) == (0.7216, 0.8504)  # Wilson: (p + z²/2n ± z√(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    assert accuracy_ci95(0, 10)[0] == 0.0 and accuracy_ci95(10, 10)[1] == 1.0  # never outside [0, 1]


def test_a_prompt_tuning_adapter_is_scored_at_the_answer_not_at_its_virtual_tokens(tiny):
    """PEFT prepends the soft prompt's virtual tokens, so the model's outputs for the answer come that many
    positions later: option scoring through the adapter equals scoring its own forward by hand."""
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from pipeline.evaluation.scoring import option_logprobs, option_sequences
    from pipeline.modeling.loading import load_causal_lm, load_tokenizer

    root, params = tiny
    tokenizer = load_tokenizer(root / "base")
    model = get_peft_model(load_causal_lm(root / "base"), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=5)).eval()
    item = examples(root / "data/eval.jsonl", params)[0]
    scores = option_logprobs(model, tokenizer, [item], 4)[0]
    seq = option_sequences(tokenizer, item)[1]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].float(), dim=-1)
    assert full.shape[0] == len(seq.input_ids) + 5
    reference = sum(full[i - 1 + 5, seq.input_ids[i]].item() for i, bit in enumerate(seq.assistant_masks) if bit and i)
    assert scores[1] == pytest.approx(reference, abs=1e-4)
