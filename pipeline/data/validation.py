"""The data gate's work: read every dataset, run its GX suite, audit the labels, write the processed data.

The `validate` stage (pipeline/stages/validate.py, whose docstring describes the gate and its outputs)
calls `validate_datasets` and `write_processed`; tests call them the same way.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import PROCESSED_MANIFEST, replaced_whole
from pipeline.config import Params
from pipeline.data.formats import CHAT_SUFFIXES, SUFFIXES
from pipeline.data.readers import Record, read_records, write_jsonl
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.splits import Split

SITE_NAME = "validation_report"
LEAKAGE_REFERENCES = {"eval": ("train",), "validation": ("train", "eval")}  # split -> splits its prompts must avoid


@dataclass
class ValidationOutcome:
    rows: dict[str, int] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # one per expectation and dataset
    violations: list[dict] = field(default_factory=list)  # `error` failures: one per record (or unreadable file)
    warnings: list[dict] = field(default_factory=list)  # `warn` failures
    stats: dict[str, dict] = field(default_factory=dict)  # per chat dataset: token lengths, trainable share
    dropped: dict[str, list[str]] = field(default_factory=dict)  # overlong records left out (validate.overlong=drop)
    overlap: dict[str, dict] = field(default_factory=dict)  # per held-out text: how much of it the corpus holds
    fingerprint: str | None = None

    def add(self, severity: str, file, where: str | None, record_id, rule: str, message: str) -> None:
        target = self.violations if severity == "error" else self.warnings
        target.append({"file": str(file), "where": where, "id": record_id, "rule": rule, "message": message})

    @property
    def success(self) -> bool:
        return not self.violations

    def metrics(self) -> dict:
        out = {f"{name}_rows": n for name, n in self.rows.items()}
        out |= {"expectations": len(self.checks), "failed": sum(not c["success"] for c in self.checks),
                "errors": len(self.violations), "warnings": len(self.warnings), "success": self.success}
        for name, s in self.stats.items():
            out |= {f"{name}_tokens_p95": s["tokens"]["p95"], f"{name}_trainable_share": s["trainable_share"]}
        for name, o in self.overlap.items():
            out |= {f"{name}_corpus_line_share": o["line_share"], f"{name}_corpus_{o['n']}gram_share": o["ngram_share"]}
        return out


def token_stats(split: Split) -> dict:
    lengths = sorted(max(len(x.input_ids) for x in e) for e in split.encoded if e)
    trainable = sum(x.n_trainable for e in split.encoded if e for x in e)
    total = sum(len(x.input_ids) for e in split.encoded if e for x in e)
    if not lengths:
        return {"tokens": {"min": 0, "median": 0, "p95": 0, "max": 0}, "trainable_share": 0.0}
    p95 = lengths[min(len(lengths) - 1, round(0.95 * (len(lengths) - 1)))]
    return {"tokens": {"min": lengths[0], "median": statistics.median(lengths), "p95": p95, "max": lengths[-1]},
            "trainable_share": trainable / total if total else 0.0}


def run_suites(splits: list[Split], params: Params, tokenizer, stop_ids: set[int], report_dir: Path,
               outcome: ValidationOutcome) -> None:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from pipeline.data.expectations import build_rules, frame

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise on stderr
    ctx.add_data_docs_site(SITE_NAME, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = ctx.data_sources.add_pandas("datasets")
    by_name = {s.name: s for s in splits}
    for split in splits:
        references = [by_name[r] for r in LEAKAGE_REFERENCES.get(split.name, ()) if r in by_name]
        rules = build_rules(split, params, references, stop_ids, tokenizer)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{split.name}_{split.fmt}"))
        for rule in rules:
            suite.add_expectation(rule.expectation)
        batch = source.add_dataframe_asset(split.name).add_batch_definition_whole_dataframe("whole_dataset")
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{split.name}_{split.fmt}", data=batch, suite=suite))
        # COMPLETE: every unexpected row index, not just a sample of 20.
        result = definition.run(batch_parameters={"dataframe": frame(split, stop_ids)}, result_format="COMPLETE")
        for res in sorted(result.results, key=lambda r: r.expectation_config.meta["rule"]):
            config, rule = res.expectation_config, rules[res.expectation_config.meta["rule"]]
            outcome.checks.append({"dataset": split.name, "rule": rule.name, "expectation": config.type,
                                   "column": config.kwargs["column"], "field": rule.field, "severity": rule.severity,
                                   "description": rule.expectation.description,
                                   "success": bool(res.success), "unexpected_count": res.result.get("unexpected_count", 0)})
            on = f"{rule.name} on {rule.field}"
            if res.exception_info.get("raised_exception"):  # a rule GX could not evaluate is a failure too
                outcome.add("error", split.path, None, None, rule.name,
                            f"{split.path}: {on}: could not be evaluated ({res.exception_info['exception_message']})")
            for i in res.result.get("unexpected_index_list") or []:
                record = split.records[i]
                rid = record.value.get("id") if isinstance(record.value, dict) else None
                outcome.add(rule.severity, record.file, record.where(), rid, rule.name,
                            f"{split.where(i)}: {on}: {rule.detail(i)}")
                if rule.name == "max_length" and params.validation.overlong == "drop":
                    outcome.dropped.setdefault(split.name, []).append(record.where())
        if split.is_chat:
            outcome.stats[split.name] = token_stats(split)
    ctx.build_data_docs(site_names=[SITE_NAME])


def label_audit(splits: list[Split], tokenizer, stop_ids: set[int], outcome: ValidationOutcome, n: int) -> str:
    """A page a person reads: rendered examples with the trainable tokens between ⟦ ⟧, and the numbers."""
    from pipeline.modeling.chat_template import show_masked

    names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(stop_ids)))
    lines = ["# Label audit", "", f"Chat template fingerprint: `{outcome.fingerprint}`  ",
             f"Stop tokens: `{names}`  ", "Trainable tokens (the loss) are between ⟦ and ⟧.", ""]
    for split in splits:
        if not split.is_chat:
            continue
        s = outcome.stats.get(split.name)
        if s:
            t = s["tokens"]
            lines += [f"## {split.name} ({split.fmt}, {split.path})", "",
                      (f"Tokens per example: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}; "
                       f"trainable share {s['trainable_share']:.1%}."), ""]
        shown = [(i, e) for i, e in enumerate(split.encoded) if e][:n]
        shown += [(i, e) for i, e in enumerate(split.encoded) if e and not all(x.n_trainable for x in e)][:n]
        for i, encodings in shown:
            for x in encodings:
                lines += [f"### {split.where(i)}: {x.n_trainable} of {len(x.input_ids)} tokens trainable", "",
                          "```", show_masked(tokenizer, x), "```", ""]
    return "\n".join(lines)


def read_datasets(params: Params) -> dict[str, list[Record]]:
    """Every dataset's records; one DataError naming every unreadable file (each is tried)."""
    found, errors = {}, []
    for name, ds in {**params.data.chat_sets(), **params.data.text_sets()}.items():
        try:
            found[name] = read_records(ds.path, SUFFIXES.get(ds.format, CHAT_SUFFIXES), params.validation.max_record_bytes)
        except DataError as exc:
            errors.append(f"data.{name}: {exc}")
    if errors:
        raise DataError("\nerror: ".join(errors))
    return found


def validate_datasets(params: Params, report_dir: str | Path,
                      records: dict[str, list[Record]] | None = None) -> tuple[ValidationOutcome, list[Split]]:
    """Check every dataset; replace report_dir with Data Docs, summary.json and the label audit. Unreadable
    files raise DataError before anything is written; every other problem is a violation in the outcome."""
    from pipeline.data.splits import (
        HELDOUT_TEXTS,
        NGRAM,
        Split,
        carve_validation,
        corpus_overlap,
        mark_corpus_copies,
        prepare,
    )
    from pipeline.modeling.chat_template import chat_tokenizer, stop_token_ids
    from pipeline.modeling.loading import template_fingerprint

    records = read_datasets(params) if records is None else records
    report_dir = Path(report_dir)
    shutil.rmtree(report_dir, ignore_errors=True)  # no stale pages from an earlier run
    report_dir.mkdir(parents=True)
    outcome = ValidationOutcome(rows={name: len(r) for name, r in records.items()})
    sets = {**params.data.chat_sets(), **params.data.text_sets()}
    splits = [Split(name, sets[name].path, sets[name].format, r) for name, r in records.items()]
    tokenizer = None
    try:
        tokenizer = chat_tokenizer(params.base.out_dir, params.task.chat_template)
    except DataError as exc:
        outcome.add("error", params.task.chat_template or params.base.out_dir, None, None, "template", str(exc))
    if outcome.success:  # the suites need every dataset (leakage) and the template
        stop_ids = stop_token_ids(params.base.out_dir, tokenizer)
        outcome.fingerprint = template_fingerprint(tokenizer)
        for split in splits:
            prepare(split, params, tokenizer)
        if params.data.carves_validation and (train := next((s for s in splits if s.name == "train"), None)):
            carved = carve_validation(train, params.validation.validation_fraction)
            splits[splits.index(train):splits.index(train) + 1] = carved
            outcome.rows = {s.name: len(s.records) for s in splits}
        corpus = next((s for s in splits if s.name == "domain_corpus"), None)
        for split in splits:
            if split.name in HELDOUT_TEXTS and corpus is not None:
                mark_corpus_copies(split, corpus)
                outcome.overlap[split.name] = {**corpus_overlap(split, corpus), "n": NGRAM}
        run_suites(splits, params, tokenizer, stop_ids, report_dir, outcome)
        (report_dir / "label_audit.md").write_text(
            label_audit(splits, tokenizer, stop_ids, outcome, params.validation.audit_examples), encoding="utf-8")
    summary = {**outcome.metrics(), "fingerprint": outcome.fingerprint, "stats": outcome.stats,
               "dropped": outcome.dropped, "checks": outcome.checks, "violations": outcome.violations,
               "warnings": outcome.warnings}
    # errors=: a lone surrogate (JSON "\udc80", the utf8 rule) in an id or message must not crash the report
    (report_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8",
                                             errors="backslashreplace")
    return outcome, splits


def write_processed(splits: list[Split], params: Params, outcome: ValidationOutcome, out_dir: str | Path) -> None:
    """The validated datasets as the later stages read them, swapped in whole (never half-written)."""
    from pipeline.modeling.loading import resolve_model

    with replaced_whole(out_dir) as tmp:
        counts, longest = {}, {}
        for split in splits:
            dropped = set(outcome.dropped.get(split.name, ()))
            if split.is_chat:
                rows = [e.to_json() for e in split.examples if e is not None and e.source not in dropped]
            else:
                rows = [{"text": r.value["text"]} for r in split.records]
            # normalised, a record can outgrow its input line (an MCQ item as a chat): the processed-data readers
            # accept up to this (pipeline.data.formats.processed_record_limit), so nothing validated is refused later
            longest[split.name] = write_jsonl(tmp / f"{split.name}.jsonl", rows)
            counts[split.name] = len(rows)
        base, revision = resolve_model(params.base.out_dir)
        manifest = {"template_fingerprint": outcome.fingerprint, "base": base, "revision": revision,
                    "chat_template_file": params.task.chat_template, "rows": counts, "max_line_bytes": longest,
                    "dropped": outcome.dropped, "datasets": params.data.model_dump(),
                    "validation_carved_from_train": params.validation.validation_fraction
                    if params.data.carves_validation else None}
        (tmp / PROCESSED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
