"""Reading the model registry: a version by URI, the base it was trained on, its own task params.

Shared by everything that loads a registered adapter (predict, chat, evaluate's champion, reproduce)
and by register, which adopts a version already made for the same adapter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from pipeline.config import TaskParams
from pipeline.errors import DataError
from pipeline.modeling.loading import (
    load_causal_lm,
    local_base,
    model_fingerprint,
    template_fingerprint,
)


# Registry answers that are final: asking again gets the same answer. Any other failure (a 5xx, a refused or
# dropped connection, a timeout) says nothing about the registry, so the call is retried with backoff and, if it
# keeps failing, the stage fails: it never reads "no champion" or "no such version" out of an outage.
FINAL_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE"}
RETRY_ATTEMPTS_ENV = "PIPELINE_REGISTRY_RETRIES"  # attempts per registry call (default 6: ~1 min of backoff)
RETRY_WAIT_ENV = "PIPELINE_REGISTRY_RETRY_WAIT_S"  # first backoff wait, doubling up to 30 s (default 1)


def transient(exc: BaseException) -> bool:
    """Whether a failed registry call may succeed when asked again."""
    import requests

    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in FINAL_ERRORS
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                            TimeoutError))


def registry_call(fn, *args, **kwargs):
    """fn(*args, **kwargs), retried with exponential backoff (and jitter) while it fails transiently; the last
    error is raised when the attempts run out."""
    import os

    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

    def say(state) -> None:
        print(f"registry: {getattr(fn, '__name__', 'call')} failed ({str(state.outcome.exception()).splitlines()[0][:160]}); "
              f"retry {state.attempt_number} in {state.next_action.sleep:.1f} s", file=sys.stderr)

    first = float(os.environ.get(RETRY_WAIT_ENV, "1"))
    attempts = int(os.environ.get(RETRY_ATTEMPTS_ENV, "6"))
    retrying = Retrying(retry=retry_if_exception(transient), reraise=True, before_sleep=say,
                        stop=stop_after_attempt(attempts), wait=wait_exponential_jitter(initial=first, max=30,
                                                                                       jitter=first))
    try:
        return retrying(fn, *args, **kwargs)
    except Exception as exc:
        if not transient(exc):
            raise
        raise DataError(f"registry: {getattr(fn, '__name__', 'a call')} still failing after {attempts} attempts "
                        f"({str(exc).splitlines()[0][:300]}); stopping before any further registry change. Run the "
                        "stage again when the tracking server answers: a version already made is adopted") from exc


def champion_version(client, name: str):
    """The version `name@champion` points at, None when the model has no such alias (or is not registered
    yet); any other failure is retried, then raised."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = registry_call(client.get_registered_model, name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get("champion")
    return None if version is None else registry_call(client.get_model_version, name, str(version))


def existing_version(client, name: str, adapter_sha256: str):
    """The registered version of this very adapter, if an earlier (or interrupted) registration made one.

    Searched by the adapter's sha256 tag (hex: nothing to quote), then matched on the name in Python, so any
    model name works; a registry that cannot be read fails the stage instead of passing for "none"."""
    versions = registry_call(client.search_model_versions, f"tags.adapter_sha256 = '{adapter_sha256}'")
    same = [v for v in versions if v.name == name and v.tags.get("adapter_sha256") == adapter_sha256]
    return min(same, key=lambda v: int(v.version)) if same else None


def model_version(client, model_uri: str):
    """The registry entry of models:/<name>@<alias> or models:/<name>/<version>."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.partition("/")
    if not version:
        raise DataError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, version)


def version_task(version) -> TaskParams | None:
    """The `task` params the version was trained with (how an MCQ item becomes a prompt), from its params_json."""
    return tags_task(version.tags)


def tags_task(tags: dict) -> TaskParams | None:
    raw = tags.get("params_json")
    return TaskParams.model_validate(json.loads(raw)["task"]) if raw else None


def registered_base(version, local: Path) -> tuple[str, str | None]:
    return tagged_base(version.tags, local, f"models:/{version.name}/{version.version}")


def tagged_base(tags: dict, local: Path, where: str) -> tuple[str, str | None]:
    """(local directory or hub id, revision) of the base the version's adapter sits on, checked by sha256.

    A logged base artifact (`runs:/...`) is the version's own copy; a hub base comes with the revision it
    was trained on (never the hub's latest). Versions registered before bases were logged point at the
    path MLflow recorded, which must still hash to the registered sha256."""
    uri, expected = tags.get("adapter_base_uri"), tags.get("adapter_base_sha256")
    revision = tags.get("adapter_base_revision")
    revision = None if revision in (None, "None") else revision
    if uri and uri.startswith("runs:/"):
        try:
            return str(local_base(uri, expected)), None
        except (ValueError, OSError) as exc:
            raise DataError(f"{where}: its base artifact cannot be used: {exc}") from None
    if uri and uri.startswith("hub:"):
        return uri.removeprefix("hub:"), revision
    flavor = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))["flavors"]["transformers"]
    base = flavor.get("local_base_model_path") or flavor["source_model_name"]
    if expected and Path(base).is_dir() and model_fingerprint(base) != expected:
        raise DataError(f"{where}: the base model at {base} changed since the version was registered (sha256 "
                        f"{expected[:12]}...); restore it (git checkout + dvc checkout of the version's commit "
                        f"{tags.get('git_commit', '?')[:12]}) or reproduce the version")
    return base, revision


class Loaded(NamedTuple):
    model: object  # base + adapter (peft), in eval mode
    tokenizer: object  # the adapter's, with the chat template it was trained with
    version: object  # the registry's ModelVersion
    base: str  # local directory or hub id of the base
    revision: str | None  # the hub revision of the base (None for a local one)


def load_registered(model_uri: str) -> Loaded:
    """A registered adapter on its own base, quantized as it was trained."""
    import mlflow
    from mlflow import MlflowClient

    try:
        version = model_version(MlflowClient(), model_uri)
    except mlflow.exceptions.MlflowException as exc:
        raise DataError(f"{model_uri}: not in the registry ({exc.message})") from None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    model, tokenizer, base, revision = load_adapter(local, version.tags, model_uri)
    return Loaded(model, tokenizer, version, base, revision)


def load_adapter(local: Path, tags: dict, where: str) -> tuple[object, object, str, str | None]:
    """(model, tokenizer, base, revision) of a downloaded version's model directory `local` (the transformers
    flavor's layout: components/tokenizer, peft/) described by the version's tags; `where` names it in errors."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, revision = tagged_base(tags, local, where)
    tokenizer = AutoTokenizer.from_pretrained(local / "components" / "tokenizer")
    expected = tags.get("chat_template_sha256")
    if expected and template_fingerprint(tokenizer) != expected:
        raise DataError(f"{where}: the tokenizer's chat template or special tokens differ from the ones the "
                        f"adapter was trained with (fingerprint {expected[:12]}...); prompts would not match training")
    model = load_causal_lm(base, tags.get("sft.quantization", "none"), tags.get("sft.double_quant", "True") == "True",
                           tags.get("sft.compute_dtype", "float32"), revision=revision)
    model = PeftModel.from_pretrained(model, str(local / "peft")).eval()
    return model, tokenizer, base, revision
