"""Stage `validate`: the data gate. Nothing reaches a training step unless it passed here.

Every dataset in params `data` is read (`pipeline.data.readers`: file or shard directory, JSONL/JSON/Parquet/
text), checked by a Great Expectations suite built for its format (`pipeline.data.expectations`), rendered through
the chat template the `sft` stage will use, and label-audited with the trainer's own masks. Each
expectation has a severity: `error` stops the pipeline, `warn` is reported (params `validate.severity`).

Held-out sets stay held out: eval and validation share no prompt with train, nor validation with eval
(`leakage`); when `data.validation` is null or train's own path, validation is carved from train here
(`validate.validation_fraction`, by a sha256 of each normalised prompt: deterministic and disjoint). No
held-out text line (domain_eval, general_eval) may be a domain_corpus line (`heldout_overlap`), and the
share of their word 4-grams that occur in the corpus is reported (metrics `<set>_corpus_4gram_share`).

Outputs, written only when no `error` expectation failed:
- `data/processed/`: every dataset normalised (chats as `messages`, text as `text`) plus manifest.json
  holding the chat-template fingerprint; all later stages read these files only.
Always written (so a failure can be read):
- `reports/validation/`: GX Data Docs (index.html), summary.json, label_audit.md;
- `metrics/validation.json` and a nested MLflow run with the report as artifacts.
A failure prints `error: <file>:<line> (id ...): <rule> on <field>: <detail>` lines and exits 1.

The work is pipeline/data/validation.py (suites, label audit, processed files); this module reads params,
calls it and prints the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.artifacts import VALIDATION_METRICS
from pipeline.cli import run_cli
from pipeline.config import load_params
from pipeline.data.validation import (
    ValidationOutcome,
    read_datasets,
    validate_datasets,
    write_processed,
)

MAX_PRINTED = 20  # keeps stderr readable on a badly broken file; summary.json lists every violation


def print_report(outcome: ValidationOutcome, report_dir: Path) -> None:
    from tabulate import tabulate

    if outcome.checks:
        names = list(dict.fromkeys(c["dataset"] for c in outcome.checks))
        rows: dict[tuple, dict] = {}  # one line per rule and column, a column per dataset
        for c in outcome.checks:
            cell = "ok" if c["success"] else f"{'FAIL' if c['severity'] == 'error' else c['severity'].upper()} " \
                                             f"({c['unexpected_count']})"
            rows.setdefault((c["rule"], c["field"], c["severity"]), {})[c["dataset"]] = cell
        print(tabulate([(*key, *(cells.get(n, "-") for n in names)) for key, cells in rows.items()],
                       headers=["rule", "on", "severity", *names]))
        for name, s in outcome.stats.items():
            t = s["tokens"]
            print(f"validate: {name}: tokens min {t['min']} / median {t['median']} / p95 {t['p95']} / max {t['max']}, "
                  f"trainable share {s['trainable_share']:.1%}"
                  + (f", {len(outcome.dropped[name])} overlong dropped" if outcome.dropped.get(name) else ""))
    for name, o in outcome.overlap.items():
        print(f"validate: {name} vs domain_corpus: {o['line_share']:.1%} of {o['lines']} lines are corpus lines, "
              f"{o['ngram_share']:.1%} of {o['ngrams']} word {o['n']}-grams occur in the corpus")
    m = outcome.metrics()
    print(f"validate: {', '.join(f'{k} {v}' for k, v in outcome.rows.items())}; "
          f"{m['expectations'] - m['failed']}/{m['expectations']} expectations passed, {m['errors']} errors, "
          f"{m['warnings']} warnings; report in {report_dir}/")
    for v in outcome.warnings[:MAX_PRINTED]:
        print(f"warning: {v['message']}", file=sys.stderr)
    for v in outcome.violations[:MAX_PRINTED]:
        print(f"error: {v['message']}", file=sys.stderr)
    if len(outcome.violations) > MAX_PRINTED:
        print(f"error: ... and {len(outcome.violations) - MAX_PRINTED} more (all in {report_dir / 'summary.json'})",
              file=sys.stderr)


def main() -> None:
    params = load_params()
    # Unreadable input (missing, empty, binary, truncated JSON, over-long line) stops here, before the
    # heavy imports and before anything is written: run_cli prints the DataError and exits 2.
    records = read_datasets(params)
    import mlflow
    from pipeline.tracking import stage_run

    report_dir = Path(params.validation.report_dir)
    with stage_run(params, "validate"):
        outcome, splits = validate_datasets(params, report_dir, records)
        metrics = outcome.metrics()
        VALIDATION_METRICS.parent.mkdir(parents=True, exist_ok=True)
        VALIDATION_METRICS.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        mlflow.log_metrics({f"validation_{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(report_dir), "validation_report")
        print_report(outcome, report_dir)
        if not outcome.success:
            raise SystemExit(1)  # inside the run: MLflow marks the stage run FAILED; data/processed untouched
        write_processed(splits, params, outcome, params.validation.out_dir)
    print(f"validate: processed data in {params.validation.out_dir}/ (template {outcome.fingerprint[:12]})")


if __name__ == "__main__":
    run_cli(main)
