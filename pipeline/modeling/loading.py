"""Loading models and tokenizers the same way for every stage, for the tiny default and real models.

A stage output that hands a model on without copying it (the `base` stage for a hub model, `dapt`
when disabled) is a directory holding only `model_ref.json`; `resolve_model` follows such refs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pipeline.artifacts import MODEL_REF, replaced_whole

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, not here: every stage imports this module, and `--help` of a
# stage or tool (or the DVC deps test) should not pay for loading torch.


DTYPES = ("float32", "bfloat16", "float16")  # params `sft.compute_dtype`: names of torch dtypes


def torch_dtype(name: str):
    """The torch dtype of a `sft.compute_dtype` name (float32, bfloat16, float16)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def no_grad(fn):
    """`@torch.no_grad()` without importing torch when the decorated function is defined."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


def write_model_ref(out_dir: Path, name_or_path: str, revision: str | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_REF).write_text(
        json.dumps({"name_or_path": name_or_path, "revision": revision}, indent=2) + "\n", encoding="utf-8"
    )


def resolve_model(path: str | Path) -> tuple[str, str | None]:
    """(name_or_path, revision) to hand to from_pretrained, following model_ref.json chains."""
    current, revision = str(path), None
    for _ in range(10):
        ref = Path(current) / MODEL_REF
        if not ref.is_file():
            return current, revision
        data = json.loads(ref.read_text(encoding="utf-8"))
        current, revision = data["name_or_path"], data.get("revision")
    raise ValueError(f"{path}: model_ref.json chain is longer than 10 links")


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """sha256 over a local model directory's weight and config files; id@revision for a hub model
    (a hub commit is content-addressed; an unpinned one says `@None`, i.e. whatever is latest)."""
    root = Path(name_or_path)
    if not root.is_dir():
        return f"hub:{name_or_path}@{revision}"
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def template_fingerprint(tokenizer) -> str:
    """sha256 of what decides how chats become tokens: the chat template and the bos/eos/pad ids."""
    payload = {"chat_template": tokenizer.chat_template, "bos": tokenizer.bos_token_id,
               "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def quantization_config(quantization: str, double_quant: bool, compute_dtype: str):
    """BitsAndBytesConfig for nf4/fp4 (QLoRA) or int8 (LLM.int8); None for plain LoRA."""
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    name, revision = resolve_model(path)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    if tokenizer.pad_token is None:
        # Safe with TRL's collator: it builds labels from the attention/assistant masks, not from the
        # pad id, so the EOS label stays trainable and the model still learns to stop.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def document_ids(tokenizer, text: str) -> list[int]:
    """A raw-text document's tokens as pretraining fed them: with the tokenizer's own special tokens (Gemma's and
    Llama 3's BOS; none for the built-in tiny tokenizer or SmolLM2), then EOS to end it. Packing documents
    without the BOS a model always saw first makes it relearn the format, which then looks like a domain gain."""
    ids = tokenizer(text)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def load_causal_lm(path: str | Path, quantization: str = "none", double_quant: bool = True,
                   compute_dtype: str = "float32", revision: str | None = None, on_cpu: bool = False):
    """The model at path (following model_ref.json); `revision` pins a hub id given directly; `on_cpu` keeps it
    off every GPU (for work that needs no accelerator and holds no training slot)."""
    from transformers import AutoModelForCausalLM

    name, ref_revision = resolve_model(path)
    revision = revision or ref_revision
    kwargs = {"revision": revision, "dtype": torch_dtype(compute_dtype)}
    qconfig = quantization_config(quantization, double_quant, compute_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    placement = None if on_cpu else device_map()
    if placement is not None:
        kwargs["device_map"] = placement
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


def device_map(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> str | dict[str, int] | None:
    """Where from_pretrained puts the weights, from the process environment (`env`, else os.environ) and
    whether CUDA is present (`cuda`, else asked of torch).

    None without CUDA. "auto" for a single process: the layers spread over every visible GPU. Under a
    launcher (torchrun, `accelerate launch`: LOCAL_RANK set or WORLD_SIZE > 1) each data-parallel process
    holds a whole copy on its own GPU, `{"": LOCAL_RANK}` (the documented way for QLoRA + DDP): with "auto"
    every rank would spread its copy over all the GPUs, which DDP cannot train. None again under FSDP or
    DeepSpeed ZeRO-3 (or DeepSpeed with no stage in the environment), which place and shard the weights
    themselves; transformers refuses a device_map under ZeRO-3.
    """
    env = os.environ if env is None else env
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return None
    if "LOCAL_RANK" not in env and int(env.get("WORLD_SIZE", "1")) <= 1:
        return "auto"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    if _flag(env, "ACCELERATE_USE_DEEPSPEED") and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") not in ("0", "1", "2"):
        return None
    return {"": int(env.get("LOCAL_RANK", "0"))}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def cache_dir() -> Path:
    """Where downloaded registry artifacts are kept (PIPELINE_CACHE_DIR, else the user's cache)."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "llm-finetune-pipeline")


def local_base(artifact_uri: str, sha256: str) -> Path:
    """A local directory holding a registered base artifact (`runs:/<id>/base`), checked against its sha256.

    An artifact store on this file system is read in place (it is written once and never changed); a
    remote one is downloaded once into the cache, keyed by the sha256."""
    from mlflow.artifacts import download_artifacts

    import mlflow

    run_id, _, sub = artifact_uri.removeprefix("runs:/").partition("/")
    root = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    scheme = urlsplit(root).scheme  # "mlflow-artifacts:/..." (a proxying server) has no "//" but is remote
    if scheme in ("", "file"):
        path = Path(unquote(urlsplit(root).path) if scheme == "file" else root) / sub
    else:
        path = cache_dir() / "bases" / sha256
        if not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent))
            try:
                download_artifacts(artifact_uri, dst_path=str(tmp))
                (tmp / sub).rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    found = model_fingerprint(str(path))
    if found != sha256:
        raise ValueError(f"{artifact_uri} at {path}: sha256 {found[:12]}... is not the registered {sha256[:12]}...")
    return path


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def save_atomically(out_dir: Path, *objects) -> None:
    """save_pretrained every object into a fresh dir beside out_dir, then swap it in (pipeline.artifacts)."""
    with replaced_whole(out_dir) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
