"""The model card of a registered version: what it is, what it was trained and measured on, how to load it.

`model_card` is a pure function of the params, the version's metrics and lineage tags and the gate's
decision; it returns markdown. `attach_model_card` makes it the version's own (pipeline/stages/register.py
calls it after the gate): `README.md` beside the adapter in the version's files (and in `peft/`, in
place of the template card peft writes there), and the version's description, which the registry UI
renders. A version that already has a card keeps it.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from pipeline.config import BUILTIN_TINY, Params
from pipeline.metric_catalog import EVAL_METRICS, PAIRED_COMPARISONS, eval_kind, paired_key

CARD_TAG = "model_card_sha256"  # set last: a version without it has no complete card yet
DESCRIPTION_LIMIT = 5000  # characters: the registry's description column (enforced by PostgreSQL, not SQLite)
MODELS = ("base", "dapt", "tuned", "champion")
INTERVAL = ("_ci95_low", "_ci95_high")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def interval_of(name: str, names: set[str]) -> str | None:
    """The metric an interval bound belongs to (`acc_ci95_low` -> `accuracy`, `robust_acc_ci95_high` ->
    `robust_accuracy`), or None when `name` is no bound of a metric in `names`."""
    for suffix in INTERVAL:
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            for target in (stem, stem.removesuffix("acc") + "accuracy" if stem.endswith("acc") else None):
                if target in names:
                    return target
    return None


def metrics_table(metrics: dict, eval_format: str) -> list[str]:
    """One row per metric, one column per model that has it; a bound pair shows as `[low, high]` after its value."""
    by_model = {m: {k.removeprefix(f"{m}_"): v for k, v in metrics.items()
                    if k.startswith(f"{m}_") and not k.startswith(f"{m}_vs_")} for m in MODELS}
    by_model["champion"].pop("version", None)
    models = [m for m in MODELS if by_model[m]]
    names = {n for m in models for n in by_model[m]}
    bounds = {n: interval_of(n, names) for n in names}
    known = list(EVAL_METRICS[eval_kind(eval_format)])
    rows = sorted((n for n in names if bounds[n] is None),
                  key=lambda n: (known.index(n) if n in known else len(known), n))
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in rows:
        cells = []
        for model in models:
            values = by_model[model]
            cell = fmt(values[name]) if name in values else ""
            low, high = (next((values[b] for b in values if bounds[b] == name and b.endswith(end)), None)
                         for end in INTERVAL)
            if cell and low is not None and high is not None:
                cell += f" [{fmt(low)}, {fmt(high)}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    others = [f"`{k}` {fmt(int(v) if float(v).is_integer() else v)}" for k, v in sorted(metrics.items())
              if not any(k.startswith(f"{m}_") for m in MODELS) and k != "n_items"]
    return lines + paired_table(metrics) + ([f"\nAlso: {', '.join(others)}."] if others else [])


def paired_table(metrics: dict) -> list[str]:
    """The paired comparisons on the same items (mcq): difference, paired bootstrap interval, McNemar's p."""
    rows = []
    for first, second in PAIRED_COMPARISONS:
        get = {stat: metrics.get(paired_key(first, second, stat)) for stat in
               ("acc_diff", "acc_diff_ci95_low", "acc_diff_ci95_high", "mcnemar_p", "wins", "losses")}
        if None not in get.values():
            rows.append(f"| {first} − {second} | {get['acc_diff']:+.3f} [{get['acc_diff_ci95_low']:+.3f}, "
                        f"{get['acc_diff_ci95_high']:+.3f}] | {get['wins']:.0f} / {get['losses']:.0f} | "
                        f"{get['mcnemar_p']:.2g} |")
    if not rows:
        return []
    return ["", "Paired on the same items (accuracy difference with its paired bootstrap 95 % interval; items only "
            "the first / only the second gets right; McNemar's exact test):", "",
            "| comparison | accuracy difference | only first / only second right | McNemar p |", "|---|---|---|---|",
            *rows]


def training_rows(params: Params, tags: dict) -> list[tuple[str, str]]:
    sft = params.sft
    if sft.method == "prompt_tuning":
        method = f"prompt tuning ({sft.prompt_tuning.num_virtual_tokens} virtual tokens)"
    else:
        lora = sft.lora
        method = (f"{sft.method} (r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, target "
                  f"{lora.target_modules if isinstance(lora.target_modules, str) else ', '.join(lora.target_modules)}"
                  f"{', rsLoRA' if lora.use_rslora else ''})")
    quant = ("none (full-precision base)" if sft.quantization == "none" else
             f"{sft.quantization}{', double quant' if sft.double_quant else ''}")
    rows = [("method", method), ("quantization", f"{quant}, compute {sft.compute_dtype}"),
            ("steps", f"{sft.max_steps} (batch {sft.batch_size} x {sft.gradient_accumulation_steps} accumulation, "
                      f"max_length {sft.max_length}{', packed' if sft.packing else ''})"),
            ("learning rate", f"{sft.learning_rate:g} ({sft.lr_scheduler}, warmup {sft.warmup_ratio:g})"),
            ("NEFTune", "off" if sft.neftune_noise_alpha is None else f"noise alpha {sft.neftune_noise_alpha:g}")]
    # sft.adversarial (FGM/PGD) is read generically: a card for a version trained before it existed still builds.
    adversarial = getattr(sft, "adversarial", None)
    method_name = getattr(adversarial, "method", None)
    if adversarial is not None:
        settings = adversarial.model_dump() if hasattr(adversarial, "model_dump") else dict(adversarial)
        settings.pop("method", None)
        if method_name != "pgd":  # steps and alpha are PGD's only
            settings = {k: v for k, v in settings.items() if k not in ("steps", "alpha")}
        shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())
        rows.append(("adversarial", f"{method_name} ({shown})" if method_name else "off"))
    dapt = params.dapt
    rows.append(("DAPT", f"{dapt.method}, {dapt.max_steps} steps{', with TAPT' if dapt.tapt else ''}"
                 if dapt.enabled else "off"))
    rows.append(("seed", str(params.seed)))
    libraries = ", ".join(f"{k.removeprefix('lib.')} {v}" for k, v in sorted(tags.items()) if k.startswith("lib."))
    if libraries:
        rows.append(("libraries", libraries))
    return rows


def default_intended_use(params: Params) -> str:
    if params.data.eval.format == "mcq":
        return ("Answering multiple-choice questions shaped like the training items (passage, question, numbered "
                "options in this version's `task` prompt) with an option number; for evaluation in this pipeline "
                "and comparison with later versions.")
    return (f"Answering prompts like the training conversations (`{params.data.train.path}`) with this version's "
            "chat template; for evaluation in this pipeline and comparison with later versions.")


def default_limitations(params: Params, metrics: dict) -> str:
    n = int(metrics["n_items"]) if "n_items" in metrics else "the"
    lines = [f"- Measured only on {n} held-out items from the training data's source; the intervals are "
             "sampling uncertainty on that set, not performance on other data."]
    if params.base.model == BUILTIN_TINY:
        lines.append("- The base is the built-in tiny demo model (random init, trained on the shipped text only), "
                     "not a usable language model.")
    base_ppl, tuned_ppl = metrics.get("base_ppl_general"), metrics.get("tuned_ppl_general")
    if base_ppl and tuned_ppl and tuned_ppl > 1.1 * base_ppl:
        lines.append(f"- Perplexity on general text is {tuned_ppl / base_ppl:.3g}x the base's: it forgets general text.")
    if params.sft.quantization != "none":
        lines.append(f"- Scored on the base loaded in {params.sft.quantization}, as trained; loaded otherwise it "
                     "can answer slightly differently.")
    lines.append("- Not evaluated for safety, bias or factual accuracy.")
    return "\n".join(lines)


def load_section(params: Params, tags: dict, name: str, version: str) -> list[str]:
    uri = f"models:/{name}/{version}"
    base_uri, revision = tags.get("adapter_base_uri", ""), tags.get("adapter_base_revision", "None")
    if base_uri.startswith("runs:/"):
        base_lines = [f'base_dir = mlflow.artifacts.download_artifacts("{base_uri}")  # the version\'s own base']
        where = "base_dir"
    else:
        hub_id = base_uri.removeprefix("hub:") or tags.get("base_model", params.base.model)
        where = f'"{hub_id}"' + ("" if revision in ("", "None") else f', revision="{revision}"')
        base_lines = []
    sft = params.sft
    # The base loaded as the adapter was trained and evaluated (pipeline.modeling.loading.quantization_config).
    if sft.quantization in ("nf4", "fp4"):
        base_lines.append(f'quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{sft.quantization}", '
                          f'bnb_4bit_use_double_quant={sft.double_quant}, bnb_4bit_compute_dtype="{sft.compute_dtype}")')
    elif sft.quantization == "int8":
        base_lines.append("quant = BitsAndBytesConfig(load_in_8bit=True)")
    quant = "" if sft.quantization == "none" else ", quantization_config=quant"
    base_lines.append(f'base = AutoModelForCausalLM.from_pretrained({where}, dtype="{sft.compute_dtype}"{quant})')
    imports = "AutoModelForCausalLM, AutoTokenizer" + ("" if sft.quantization == "none" else ", BitsAndBytesConfig")
    commands = [f".venv/bin/python -m pipeline.commands.chat --model-uri {uri}   # chat, streamed"]
    if params.data.eval.format == "mcq":
        commands.insert(0, f".venv/bin/python -m pipeline.commands.predict --model-uri {uri} --input items.jsonl --output preds.jsonl")
    return ["With plain peft, on the version's own base:", "",
            "```python", "import mlflow", "from peft import PeftModel",
            f"from transformers import {imports}", "",
            f'local = mlflow.artifacts.download_artifacts("{uri}")', *base_lines,
            'tokenizer = AutoTokenizer.from_pretrained(f"{local}/components/tokenizer")',
            'model = PeftModel.from_pretrained(base, f"{local}/peft")', "```", "",
            "With this project, from its root (base checked by sha256, prompts from the version's own `task` "
            "params):", "", "```", *commands, "```"]


def model_card(params: Params, metrics: dict, tags: dict, decision: dict) -> str:
    """The card of version `decision["version"]` of `decision["model_name"]` as markdown.

    `metrics` are the version's eval metrics (`<model>_<metric>` for base, dapt, tuned, champion, with
    `*_ci95_low/high` bounds), `tags` its lineage tags (register.lineage_tags), `decision` the gate's
    `alias` and `reason`. `register.card` in the params replaces the default intended-use and limitations text."""
    name, version = decision["model_name"], str(decision["version"])
    registry, card = params.registry, params.registry.card
    direction = "higher" if params.gate_higher_is_better() else "lower"
    guards = ", ".join(f"`{g.metric}` (tolerance {g.tolerance:.0%})" for g in registry.guards) or "none"
    adapter = {"lora": "LoRA", "dora": "DoRA", "prompt_tuning": "prompt-tuning"}.get(params.sft.method, params.sft.method)
    base = tags.get("base_model", params.base.model)
    revision = tags.get("base_model_revision", "None")
    lines = [f"# {name}, version {version}", "",
             f"A {adapter} adapter on `{base}`, fine-tuned by this project's pipeline.", "",
             "## Promotion", "",
             f"- Alias: `@{decision['alias']}`",
             f"- Gate: `{registry.gate_metric}` must beat the base and the current champion by at least "
             f"{registry.min_improvement:g} ({direction} is better); guards: {guards}",
             f"- Decision: {decision['reason']}", "",
             "## Base model", "",
             f"- Base: `{base}`" + ("" if revision in ("", "None") else f" at revision `{revision}`"),
             f"- The adapter sits on: `{tags.get('adapter_base_uri', '?')}` (sha256 "
             f"`{tags.get('adapter_base_sha256', '?')}`)" + (", the DAPT output" if params.dapt.enabled else "")]
    if "base_package" in tags:
        lines.append(f"- Packaged weights: `{tags['base_package']}`, GGUF sha256 `{tags.get('base_gguf_sha256', '?')}`, "
                     f"upstream {tags.get('base_upstream', '?')}, licence {tags.get('base_licence', '?')}")
    data = params.data
    validation = (f"carved from train ({params.validation.validation_fraction:g})" if data.carves_validation
                  else f"`{data.validation.path}`")
    lines += ["", "## Data", "", f"md5: the validated file in `{params.validation.out_dir}/` (raw inputs: the "
              "`dvc.*` tags).", "",
              "| split | path | format | md5 |", "|---|---|---|---|",
              f"| train | `{data.train.path}` | {data.train.format} | `{tags.get('data_train_md5', '?')}` |",
              f"| validation | {validation} | {(data.validation or data.train).format} | "
              f"`{tags.get('data_validation_md5', '?')}` |",
              f"| eval | `{data.eval.path}` | {data.eval.format} | `{tags.get('data_eval_md5', '?')}` |"]
    if params.dapt.enabled:
        lines.append(f"| DAPT corpus | `{data.domain_corpus.path}` | text | |")
    lines += ["", "## Training", "", "| param | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in training_rows(params, tags)]
    n_items = f"{int(metrics['n_items'])} held-out items" if "n_items" in metrics else "the held-out items"
    lines += ["", "## Evaluation", "",
              f"On {n_items}; `[low, high]`: Wilson 95 % interval."
              + (f" `champion`: version {int(metrics['champion_version'])}, re-scored on the same items."
                 if "champion_version" in metrics else ""), "", *metrics_table(metrics, data.eval.format)]
    lines += ["", "## Intended use", "", card.intended_use or default_intended_use(params),
              "", "## Limitations", "", card.limitations or default_limitations(params, metrics),
              "", "## How to load", "", *load_section(params, tags, name, version)]
    return "\n".join(lines).rstrip() + "\n"


def description_of(card: str) -> str:
    """The card as the registry's description: whole when it fits, else cut at a section with a pointer."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    note = "\n\n(Cut to fit the registry's description; the whole card is README.md in the version's files.)\n"
    head = card[: DESCRIPTION_LIMIT - len(note)]
    cut = head.rfind("\n## ")
    return (head[:cut] if cut > 0 else head).rstrip() + note


def card_sha256(card: str) -> str:
    return hashlib.sha256(card.encode("utf-8")).hexdigest()


def attach_model_card(client, version, card: str) -> tuple[str, bool]:
    """Make `card` the model card of `version` unless it has one; returns (the version's card, attached now).

    README.md goes into the version's logged model (MLflow 3: its own artifact location, `models:/m-...`,
    written after log_model), at the top and in `peft/`; the description is set; tag CARD_TAG comes last,
    so an interrupted attempt leaves no tag and the retry attaches the card again (overwriting is harmless)."""
    import mlflow

    where = f"models:/{version.name}/{version.version}"
    if CARD_TAG in version.tags:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                kept = mlflow.artifacts.download_artifacts(f"{where}/README.md", dst_path=tmp)
                return Path(kept).read_text(encoding="utf-8"), False
            except (mlflow.exceptions.MlflowException, OSError):
                pass  # tagged but the file is gone: attach it again
    if not version.source.startswith("models:/"):
        raise ValueError(f"{where}: its source {version.source} is not a logged model (models:/m-...); "
                         "cannot add README.md to its files")
    model_id = version.source.removeprefix("models:/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "README.md"
        path.write_text(card, encoding="utf-8")
        client.log_model_artifact(model_id, str(path))
        client.log_model_artifact(model_id, str(path), "peft")  # replaces peft's template card (it names a local path)
    client.update_model_version(version.name, version.version, description=description_of(card))
    client.set_model_version_tag(version.name, version.version, CARD_TAG, card_sha256(card))
    return card, True
