"""The registry's champion exported (pipeline/commands/export.py) from the store of a real `dvc repro`: a q8_0 GGUF that
llama.cpp verified on the version's eval items, logged to the version (artifacts + tags whose sha256 is the
file's), with llama.cpp's metadata carrying the chat template and stop token, and weights that the pinned `gguf`
reader (an implementation other than llama.cpp's) reads back close to the merged model's; an export that fails
its verification (a pre-tokenizer that splits the prompts differently) is refused with nothing written and
nothing logged; the vLLM directory holds the adapter as registered, the version's own base and the exact
command. (The README's f16 export runs in test_readme_commands_run_as_written_without_the_venv_on_path.)
Collected through tests/integration/test_pipeline_e2e.py, on its pipeline run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.project import MODEL_NAME, venv_env

URI = f"models:/{MODEL_NAME}@champion"


def export(pipeline_run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.export", "--model-uri", URI, *args],
                          cwd=pipeline_run["project"], env=venv_env(MLFLOW_TRACKING_URI=pipeline_run["uri"]),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def q8_export(pipeline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "q8"
    proc = export(pipeline_run, "--format", "gguf", "--quant", "q8_0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "export.json").read_text())


def test_a_q8_0_export_is_verified_in_llama_cpp_and_logged_to_the_version(q8_export, client):
    import hashlib

    import mlflow

    out, report = q8_export
    gguf = out / "model-q8_0.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model-q8_0.gguf"]
    assert report["n_items"] == 150 and report["items_are_versions_eval"]
    assert report["prompts_tokenized_alike"] == 150 and report["stop_tokens_not_ending"] == []
    assert report["items_agreeing"] / 150 == report["agreement"] >= 0.95
    assert report["template_check"]["identical"] == report["template_check"]["chats"] >= 150
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert report["sha256"] == sha
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.tags["export.gguf.q8_0.sha256"] == sha
    assert float(version.tags["export.gguf.q8_0.agreement"]) == report["agreement"]
    chats = report["template_check"]["chats"]
    assert version.tags["export.gguf.q8_0.template_check"] == f"{chats}/{chats} chats rendered identically in Go"
    logged = Path(mlflow.artifacts.download_artifacts(version.tags["export.gguf.q8_0.uri"]))
    assert hashlib.sha256((logged / "model-q8_0.gguf").read_bytes()).hexdigest() == sha
    assert (logged / "Modelfile").read_text() == (out / "Modelfile").read_text()
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and 'SYSTEM """지문을 읽고 질문의 답을 구하세요."""' in modelfile


def test_the_gguf_carries_the_chat_template_and_weights_close_to_the_merged_model(q8_export, client):
    import numpy as np
    from gguf import GGUFReader, dequantize

    out, report = q8_export
    reader = GGUFReader(out / "model-q8_0.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name.startswith(("general.", "tokenizer.chat_template", "tokenizer.ggml.eos", "llama."))}
    assert fields["general.architecture"] == "llama"
    assert "<|start_header_id|>" in fields["tokenizer.chat_template"]
    assert "generation %}" not in fields["tokenizer.chat_template"]
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "<|eot_id|>"
    # The merged model (f32, as the export merged it) against the GGUF's weights, dequantized by the pinned gguf.
    from pipeline.commands.export import version_and_files
    from pipeline.modeling.merging import merged_model

    version, local, base, revision, tokenizer = version_and_files(URI)
    merged, _ = merged_model(base, local / "peft", tokenizer, [[{"role": "user", "content": "1"}]], "float32", 1e-3,
                             revision, on_cpu=True)
    want = merged.state_dict()["model.layers.0.self_attn.v_proj.weight"].numpy()
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert tensor.tensor_type.name == "Q8_0"
    got = dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
    step = np.abs(want).max() / 127  # q8_0: 8-bit steps of each 32-value block's own scale, at most this
    assert np.abs(got - want).max() <= step and not np.array_equal(got, want)
    assert report["merge_max_abs_logit_diff"] < 1e-3


def test_an_export_that_fails_verification_is_refused_and_leaves_nothing(pipeline_run, client, tmp_path):
    before = dict(client.get_model_version_by_alias(MODEL_NAME, "champion").tags)
    out = tmp_path / "refused"
    # llama.cpp told to split text as DeepSeek LLM does (its own rules for newlines, digits and Hangul): the
    # converter writes it as asked, and every prompt comes out as other tokens than the pipeline's. (Llama 3's,
    # GPT-2's, Command R's and others' rules happen to split these prompts alike; GPT-4o's differ on 17 of 150.)
    proc = export(pipeline_run, "--quant", "f16", "--out", str(out), "--pre-tokenizer", "deepseek-llm")
    assert proc.returncode != 0
    assert "fails verification, nothing kept or logged" in proc.stderr
    assert "llama.cpp tokenizes 150 of 150 prompts differently from the model's tokenizer" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".refused") for p in tmp_path.iterdir())
    after = client.get_model_version_by_alias(MODEL_NAME, "champion").tags
    assert {k: v for k, v in after.items() if k.startswith("export.gguf.f16")} == \
        {k: v for k, v in before.items() if k.startswith("export.gguf.f16")}


def test_the_vllm_export_holds_the_adapter_the_base_and_the_exact_command(pipeline_run, client, tmp_path):
    import mlflow

    from pipeline.modeling.loading import model_fingerprint

    out = tmp_path / "vllm"
    proc = export(pipeline_run, "--format", "vllm", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version.version}"))
    for f in (local / "peft").iterdir():
        assert (out / "adapter" / f.name).read_bytes() == f.read_bytes()
    assert model_fingerprint(out / "base") == version.tags["adapter_base_sha256"]
    rank = json.loads((out / "adapter" / "adapter_config.json").read_text())["r"]
    assert rank in (8, 16, 32, 64)  # a rank vLLM offers as --max-lora-rank: no rounding up
    script = (out / "serve-vllm.sh").read_text()
    # QLoRA (the default's nf4) is served as trained: vLLM quantizes the base with bitsandbytes in flight.
    quantized = " --quantization bitsandbytes" if version.tags["sft.quantization"] == "nf4" else ""
    assert (f'exec vllm serve "$here/base"{quantized} --enable-lora --max-lora-rank {rank} '
            f'--lora-modules {MODEL_NAME}-v{version.version}="$here/adapter" --chat-template "$here/chat_template.jinja" "$@"') in script
    template = (local / "components" / "tokenizer" / "chat_template.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    assert subprocess.run(["sh", "-n", str(out / "serve-vllm.sh")]).returncode == 0
