"""The `base` stage's builder (pipeline/modeling/tiny.py) and the stage itself: an ordinary HF model, the same bytes on every machine."""

from __future__ import annotations

import json

from pipeline.data.formats import Example, to_example
from pipeline.data.readers import read_records
from pipeline.modeling.tiny import build_tiny_base


def lines(path) -> list[str]:
    return [r.value["text"] for r in read_records(path)]


def examples(path, params) -> list[Example]:
    return [to_example(r, "mcq", params.task) for r in read_records(path)]


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

    from tests.helpers.project import REPO_ROOT, venv_env

    root, params = tiny
    texts = lines(root / "data/domain_train.txt")
    build_tiny_base(texts, params.base.tiny, params.seed, tmp_path / "a")
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    script = ("import json, sys; from pathlib import Path; from pipeline.modeling.tiny import build_tiny_base; "
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
    from tests.helpers.project import REPO_ROOT, dvc, make_project_copy

    project = make_project_copy(tmp_path / "project")
    dvc(project, "repro", "sample_data", "base")
    assert base_md5(project / "dvc.lock") == base_md5(REPO_ROOT / "dvc.lock"), (
        "models/base differs from the committed dvc.lock: if sample_data or base changed on purpose, rerun "
        "`dvc repro` and commit dvc.lock; otherwise the build depends on the machine")
