"""Stage `sft` in depth on a tiny model: every method yields an adapter plain peft loads, the stage is
deterministic, a SIGKILLed run resumes to the same adapter bytes, preflight refuses an over-budget config,
and two gloo processes (`accelerate launch` with configs/accelerate/ddp.yaml) train data-parallel with the
same params."""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.data.formats import Example, to_example
from pipeline.data.readers import read_records
from pipeline.env import interpreter_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_world) -> Path:
    """A project dir with a tiny base, validated data (data/processed) and params for short SFT runs."""
    from pipeline.stages import validate

    root = tiny_world.link_into(tmp_path_factory.mktemp("sft"), data="data/sample", base="models/base")
    (root / "data").mkdir(exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"] = {n: {"path": f"data/sample/{f}", "format": fmt} for n, f, fmt in (
        ("train", "train.jsonl", "mcq"), ("validation", "validation.jsonl", "mcq"), ("eval", "eval.jsonl", "mcq"),
        ("domain_corpus", "domain_train.txt", "text"),
        ("domain_eval", "domain_eval.txt", "text"), ("general_eval", "general_eval.txt", "text"))}
    raw["base"]["tiny"] = tiny_world.tiny
    raw["dapt"]["out_dir"] = "models/base"  # DAPT off: train on the base directly
    raw["sft"] |= {"max_steps": 24, "batch_size": 4, "logging_steps": 4, "eval_steps": 8, "save_steps": 8}
    raw["mlflow"] |= {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "artifacts")}
    write_params(root, raw)
    (root / "params.base.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        os.environ["PIPELINE_RUN_KEY"] = "sft-tests"
        validate.main()
    finally:
        os.chdir(cwd)
        os.environ.pop("PIPELINE_RUN_KEY", None)
    return root


def write_params(root: Path, raw: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")


def params_with(root: Path, **sft) -> dict:
    """The module's params (never the last run's) with sft overrides."""
    raw = yaml.safe_load((root / "params.base.yaml").read_text(encoding="utf-8"))
    raw["sft"] |= sft
    return raw


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage(root: Path, *launcher: str, out: str = "models/adapter", stage: str = "sft", **sft) -> subprocess.Popen:
    """`python -m pipeline.stages.<stage>` (or under a launcher such as `accelerate launch`) in a copy of the project's
    params."""
    write_params(root, params_with(root, out_dir=out, checkpoint_dir=f"checkpoints/{Path(out).name}", **sft))
    env = interpreter_env(PYTHONPATH=str(REPO), PIPELINE_RUN_KEY="sft-tests")
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own store (params), never one another test left behind
    module = f"pipeline.stages.{stage}"
    cmd = [*launcher, "-m", module] if launcher else [sys.executable, "-m", module]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


# The four ways to train: plain, NEFTune (random noise), FGM and PGD (gradient-directed, pipeline/training/adversarial.py).
# The plain run also lets the stage choose its precision (`auto`, pipeline/modeling/precision.py): exact resume must
# hold with whatever it picks on the machine that runs the test; the others train in params.yaml's nf4 / float32.
TRAINING_METHODS = {
    "plain": {"compute_dtype": "auto", "quantization": "auto"},
    "neftune": {"neftune_noise_alpha": 5.0},
    "fgm": {"adversarial": {"method": "fgm", "epsilon": 0.1}},
    "pgd": {"adversarial": {"method": "pgd", "epsilon": 0.1, "steps": 2, "alpha": 0.06}},
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.extended) if n == "neftune" else n
                                  for n in TRAINING_METHODS])  # NEFTune's own variant test stays in the default tier
def test_stage_is_deterministic_and_a_killed_run_resumes_to_the_same_adapter(project, name):
    method = TRAINING_METHODS[name]
    first = finish(run_stage(project, out=f"models/{name}-a", **method))
    assert "preflight: estimated total" in first and "held-out loss" in first
    reference = sha256(project / f"models/{name}-a/adapter_model.safetensors")
    assert not (project / f"checkpoints/{name}-a").exists()  # a finished run leaves no checkpoints
    if "adversarial" in method:
        passes = {"fgm": 2, "pgd": 3}[name]
        assert f"{passes} forward/backward passes per micro-batch" in first, first[-2000:]

    # The same stage again, SIGKILLed after its second checkpoint and rerun: it resumes, and both runs end
    # with the same adapter bytes (determinism and exact resume in one).
    proc = run_stage(project, out=f"models/{name}-c", **method)
    deadline = time.monotonic() + 240
    while not list(project.glob(f"checkpoints/{name}-c/*/checkpoint-16/trainer_state.json")):  # written last
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / f"models/{name}-c").exists()  # nothing half-written
    resumed = finish(run_stage(project, out=f"models/{name}-c", **method))
    assert re.search(rf"resuming from checkpoints/{name}-c/[0-9a-f]{{16}}/checkpoint-16", resumed), resumed[-2000:]
    assert sha256(project / f"models/{name}-c/adapter_model.safetensors") == reference
    # The whole directory is the same bytes too (DVC hashes it), across processes with other hash seeds.
    assert {p.name: sha256(p) for p in (project / f"models/{name}-c").iterdir()} == \
        {p.name: sha256(p) for p in (project / f"models/{name}-a").iterdir()}
    if name != "plain" and (project / "models/plain-a").is_dir():  # another objective: other adapter bytes than a plain run from the same seed
        assert reference != sha256(project / "models/plain-a/adapter_model.safetensors")

    # ... and the adapter goes through evaluate and register (the gate) like a plain one.
    for stage in ("evaluate", "register"):
        finish(run_stage(project, f"{sys.executable}", stage=stage, out=f"models/{name}-c", **method))
    registry = json.loads((project / "reports/registry.json").read_text(encoding="utf-8"))
    assert registry["adapter_sha256"] == reference and registry["alias"] in ("champion", "challenger")
    from mlflow import MlflowClient

    version = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version(registry["model_name"],
                                                                                    registry["version"])
    trained = json.loads(version.tags["params_json"])["sft"]
    precision = json.loads((project / f"models/{name}-c/precision.json").read_text(encoding="utf-8"))
    if name == "plain":  # what it chose is said, kept beside the adapter, and tagged on the version
        assert f"sft: compute {precision['compute_dtype']}, quantization {precision['quantization']} (" in first
        assert precision["compute_dtype_param"] == "auto" and "measured once for this machine class" in precision["reason"]
    assert (version.tags["sft.compute_dtype"], version.tags["sft.quantization"]) == \
        (precision["compute_dtype"], precision["quantization"])
    assert version.tags["precision.reason"] == precision["reason"]
    assert trained["adversarial"]["method"] == method.get("adversarial", {}).get("method")
    assert trained["neftune_noise_alpha"] == method.get("neftune_noise_alpha")


class Interrupt(Exception):
    pass


def test_a_run_with_other_params_starts_beside_a_killed_runs_checkpoints(project, tmp_path):
    from transformers import TrainerCallback

    from pipeline.config import Params
    from pipeline.data.formats import read_examples
    from pipeline.errors import DataError
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.training.sft import STALE_CHECKPOINTS_S, resume_point, run_checkpoint_dir, run_identity, train_adapter

    class StopAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Interrupt

    params = Params.model_validate(params_with(project, max_steps=16))
    processed = project / "data/processed"
    data = [processed / "train.jsonl", processed / "eval.jsonl"]
    identity = run_identity(params, project / "models/base", data)
    with pytest.raises(Interrupt):  # as if killed right after the first checkpoint
        train_adapter(project / "models/base", read_examples(processed, "train"), chat_tokenizer(project / "models/base"),
                      params, tmp_path / "adapter", None, tmp_path / "ckpt", identity, [StopAfterFirstCheckpoint()])
    mine = run_checkpoint_dir(tmp_path / "ckpt", identity)
    assert (mine / "checkpoint-8").is_dir() and not (tmp_path / "adapter").exists()
    assert resume_point(mine, identity, "auto").endswith("checkpoint-8")
    (mine / "checkpoint-16").mkdir()  # as if killed while saving the next one: skipped
    (mine / "checkpoint-16/adapter_model.safetensors").write_bytes(b"partial")
    assert resume_point(mine, identity, "auto").endswith("checkpoint-8")
    # Another run (other params) gets a directory of its own: it starts fresh, and the killed run's stays.
    other = run_identity(Params.model_validate(params_with(project, max_steps=16, learning_rate=0.001)),
                         project / "models/base", data)
    theirs = run_checkpoint_dir(tmp_path / "ckpt", other)
    assert theirs != mine and resume_point(theirs, other, "auto") is None and (mine / "checkpoint-8").is_dir()
    # A directory whose identity file says otherwise (copied by hand) is still refused, never mixed.
    (mine / "run_identity.json").write_text(json.dumps(other), encoding="utf-8")
    with pytest.raises(DataError, match=r"the checkpoints were written by a run with different params; .*"
                                        r"Set sft.resume: fresh"):
        resume_point(mine, identity, "auto")
    # Checkpoints of another run untouched for longer than the limit are pruned; recent ones are kept.
    old = time.time() - STALE_CHECKPOINTS_S - 60
    for path in [mine, *mine.rglob("*")]:
        os.utime(path, (old, old))
    assert run_checkpoint_dir(tmp_path / "ckpt", other) == theirs and not mine.exists()
    assert resume_point(theirs, other, "fresh") is None and not theirs.exists()


def test_the_stage_selects_on_validation_never_on_eval(project, monkeypatch):
    """Held-out loss, early stopping and the best checkpoint see the validation split, and the checkpoint identity
    covers it; eval (accuracy, promotion) never reaches training."""
    from pipeline.data.readers import read_jsonl
    from pipeline.stages import sft

    seen = {}

    def train_adapter(model_dir, examples, tokenizer, params, out_dir, eval_examples=None, checkpoint_dir=None,
                      identity=None, callbacks=None, precision=None):
        seen.update(train=examples, held_out=eval_examples, identity=identity)
        return {"train": [], "eval": [], "eval_accuracy": [], "adversarial": []}

    monkeypatch.setattr(sft, "train_adapter", train_adapter)
    write_params(project, params_with(project, out_dir="models/v"))
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PIPELINE_RUN_KEY", "sft-tests")
    sft.main()
    processed = project / "data/processed"
    validation = [r["id"] for r in read_jsonl(processed / "validation.jsonl")]
    assert [e.id for e in seen["held_out"]] == validation and len(validation) == 12
    eval_ids = {r["id"] for r in read_jsonl(processed / "eval.jsonl")}
    assert not eval_ids & {e.id for e in seen["held_out"] + seen["train"]}
    data = (processed / "train.jsonl").read_bytes() + (processed / "validation.jsonl").read_bytes()
    assert seen["identity"]["data_sha256"] == hashlib.sha256(data).hexdigest()


def test_preflight_refuses_an_over_budget_config(project, monkeypatch, capsys):
    from pipeline.cli import run_cli
    from pipeline.stages import sft

    write_params(project, params_with(project, out_dir="models/e", max_memory_gb=0.001))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_:
        run_cli(sft.main)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "exceeds sft.max_memory_gb=0.001" in captured.err and "lower sft.batch_size" in captured.err
    assert "preflight: parameters" in captured.out and "preflight: estimated total" in captured.out
    assert not (project / "models/e").exists()


def test_preflight_counts_match_the_real_model(project):
    from pipeline.modeling.loading import load_causal_lm
    from pipeline.training.preflight import preflight
    from pipeline.training.sft import peft_config

    params = load_params(project / "params.yaml")
    for method in ("lora", "dora", "prompt_tuning"):
        sft = params.sft.model_copy(update={"method": method})
        report = preflight(str(project / "models/base"), sft, [100, 120], [110])
        from peft import get_peft_model

        model = get_peft_model(load_causal_lm(project / "models/base"), peft_config(sft, project / "models/base"))
        trainable, total = model.get_nb_trainable_parameters()
        assert report.trainable_params == trainable, method
        assert report.total_params == total - trainable
        assert report.train_tokens == 220 and report.max_sequence == 120


@pytest.mark.parametrize("variant", [
    {"method": "dora"},
    {"method": "prompt_tuning"},
    {"packing": True},
    {"neftune_noise_alpha": 5.0, "quantization": "int8"},
    # adversarial training composes with DoRA, bfd packing and gradient accumulation, and with prompt tuning
    {"adversarial": {"method": "fgm", "epsilon": 0.1}, "method": "dora", "packing": True, "gradient_accumulation_steps": 2},
    {"adversarial": {"method": "pgd", "epsilon": 0.1, "steps": 2, "alpha": 0.06}, "method": "prompt_tuning"},
    pytest.param({"adversarial": {"method": "pgd", "epsilon": 0.1, "steps": 3, "alpha": 0.04}, "quantization": "int8",
                  "gradient_checkpointing": True}, marks=pytest.mark.extended),
    pytest.param({"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                           "use_rslora": True}}, marks=pytest.mark.extended),
    pytest.param({"packing": True, "packing_strategy": "wrapped"}, marks=pytest.mark.extended),
    pytest.param({"quantization": "fp4", "double_quant": False}, marks=pytest.mark.extended),
    pytest.param({"quantization": "none", "compute_dtype": "bfloat16"}, marks=pytest.mark.extended),
    pytest.param({"gradient_checkpointing": True, "gradient_accumulation_steps": 2}, marks=pytest.mark.extended),
    pytest.param({"early_stopping_patience": 1, "eval_steps": 4, "save_steps": 4, "max_steps": 40,
                  "learning_rate": 0.05}, marks=pytest.mark.extended),
], ids=lambda v: "-".join(f"{k}={v[k]}" if not isinstance(v[k], dict) else k for k in v) if isinstance(v, dict) else None)
def test_every_method_trains_an_adapter_plain_peft_loads(project, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recorder = BatchRecorder()
    logs = train_variant(project, tmp_path / "adapter", variant, recorder)
    assert logs["train"] and logs["eval"]  # training and held-out loss were logged
    plain = plain_run(project)
    # The option took effect, seen in what the trainer ran:
    assert {s[0] for s in plain["recorder"].shapes} == {4}, plain["recorder"].shapes  # one row per example
    if variant.get("packing") and variant.get("packing_strategy", "bfd") == "bfd":
        # bfd packing is padding-free: one row of concatenated examples per batch
        assert {s[0] for s in recorder.shapes} == {1}, recorder.shapes
    elif variant.get("packing"):  # wrapped packing cuts the token stream into full max_length rows
        assert {s[1] for s in recorder.shapes} == {params_with(project)["sft"]["max_length"]}, recorder.shapes
        assert {s[1] for s in plain["recorder"].shapes} != {params_with(project)["sft"]["max_length"]}
    quantized = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}
    expected = quantized.get(variant.get("quantization", "nf4"))  # nf4 QLoRA by default
    assert ({expected} if expected else set()) == recorder.linear_types & set(quantized.values()), recorder.linear_types
    if variant.get("neftune_noise_alpha"):  # same seed and data, noise on the embeddings: another loss curve
        assert [e["loss"] for e in logs["train"]] != [e["loss"] for e in plain["logs"]["train"]]
    adversarial = variant.get("adversarial", {}).get("method")
    passes = {None: 1, "fgm": 2, "pgd": variant.get("adversarial", {}).get("steps", 0) + 1}[adversarial]
    # every micro-batch ran `passes` training forwards (optimizer steps × accumulation)
    assert recorder.steps == variant.get("max_steps", 8) or "early_stopping_patience" in variant, recorder.steps
    assert len(recorder.shapes) == recorder.steps * variant.get("gradient_accumulation_steps", 1) * passes, \
        (len(recorder.shapes), recorder.steps)
    if adversarial:  # the moved embeddings raised the loss: the attack found worse inputs, not random ones
        increases = [e["loss"] for e in logs["adversarial"]]
        assert increases and sum(increases) / len(increases) > 1.0, increases
        assert [e["loss"] for e in logs["train"]] != [e["loss"] for e in plain["logs"]["train"]]
    assert trained_away_from_init(tmp_path / "adapter", project / "models/base"), "the adapter is still its init"
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == ("PROMPT_TUNING" if variant.get("method") == "prompt_tuning" else "LORA")
    assert config.get("use_dora", False) is (variant.get("method") == "dora")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project / "models/base"), tmp_path / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "prompt" in n) > 0
    if "early_stopping_patience" in variant:  # held-out loss stops improving long before 40 steps at this lr
        assert logs["train"][-1]["step"] < 40


class BatchRecorder:
    """A TrainerCallback that records the input shapes of every training forward and the base's linear layer types."""

    def __init__(self):
        from transformers import TrainerCallback

        self.shapes: list[tuple[int, ...]] = []
        self.linear_types: set[str] = set()
        self.steps = 0  # optimizer steps taken
        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                recorder.linear_types = {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}
                model.register_forward_pre_hook(recorder.record, with_kwargs=True)

            def on_step_end(self, args, state, control, **kwargs):
                recorder.steps += 1

        self.callback = Callback()

    def record(self, module, args, kwargs):
        if module.training and kwargs.get("input_ids") is not None:
            self.shapes.append(tuple(kwargs["input_ids"].shape))


def train_variant(project: Path, out: Path, variant: dict, recorder: BatchRecorder) -> dict:
    from pipeline.config import Params
    from pipeline.data.formats import read_examples
    from pipeline.modeling.chat_template import chat_tokenizer
    from pipeline.training.sft import train_adapter

    params = Params.model_validate(params_with(project, **{"max_steps": 8, "save_steps": None, **variant}))
    processed = project / "data/processed"
    return train_adapter(project / "models/base", read_examples(processed, "train"),
                         chat_tokenizer(project / "models/base"), params, out, read_examples(processed, "eval"),
                         callbacks=[recorder.callback])


_PLAIN: dict = {}


def plain_run(project: Path) -> dict:
    """The default variant (nf4 LoRA, no packing, no noise) with the same seed: what each option is compared with."""
    if not _PLAIN:
        recorder = BatchRecorder()
        _PLAIN.update(logs=train_variant(project, project / "models/plain", {}, recorder), recorder=recorder)
    return _PLAIN


def trained_away_from_init(adapter: Path, base: Path) -> bool:
    """LoRA: some lora_B is non-zero (peft initialises B to zeros). Prompt tuning: the soft prompt is no longer
    the embedding of its init text."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config["peft_type"] == "LORA":
        return any(t.abs().max() > 0 for n, t in weights.items() if "lora_B" in n)
    ids = AutoTokenizer.from_pretrained(base)(config["prompt_tuning_init_text"], add_special_tokens=False)["input_ids"]
    n = config["num_virtual_tokens"]
    ids = (ids * (n // len(ids) + 1))[:n]
    init = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight[ids].detach()
    return not torch.allclose(weights["prompt_embeddings"].float(), init.float())


def test_two_gloo_processes_train_data_parallel(project):
    """The shipped DDP launch file as a user runs it: on a machine without CUDA it starts two gloo processes."""
    accelerate = Path(sys.executable).parent / "accelerate"
    out = finish(run_stage(project, str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp.yaml"),
                           "--num_processes", "2", "--main_process_port", "0",
                           out="models/ddp", save_steps=None, max_steps=6,
                           adversarial={"method": "fgm"}), timeout=400)  # its extra passes under DDP too
    assert (project / "models/ddp/adapter_model.safetensors").is_file()
    assert out.count("preflight: estimated total") == 1  # rank 0 prints and writes; rank 1 only trains
    assert "sft: world size 2 (distributed)" in out, out[-3000:]
    assert "2 forward/backward passes per micro-batch" in out


def examples(path, params) -> list[Example]:
    return [to_example(r, "mcq", params.task) for r in read_records(path)]


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
    {% generation %} markers (real model templates), since the masks come from pipeline.modeling.chat_template."""
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


def test_validation_scores_are_the_written_adapters():
    """metrics/sft.json: the best evaluation when the best checkpoint was reloaded, else the last one."""
    from pipeline.training.sft import validation_scores

    logs = {"eval": [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}, {"step": 30, "loss": 1.7}],
            "eval_accuracy": [{"step": 10, "loss": 0.4}, {"step": 20, "loss": 0.6}, {"step": 30, "loss": 0.55}]}
    assert validation_scores(logs, best_loaded=True) == {"validation_loss": 1.5, "validation_step": 20.0,
                                                          "validation_answer_accuracy": 0.6}
    assert validation_scores(logs, best_loaded=False) == {"validation_loss": 1.7, "validation_step": 30.0,
                                                           "validation_answer_accuracy": 0.55}
    assert validation_scores({"eval": [], "eval_accuracy": []}, best_loaded=False) == {}
