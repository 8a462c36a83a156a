"""Stage `validate`: a Great Expectations suite over the raw train/eval MCQ items, before any training.

Malformed files (missing, empty, bad UTF-8, a line that is not a JSON object) are caught by
`read_jsonl` first. Every content rule is one GX expectation on a column of a per-split pandas frame;
rules that need a derived value (choice count, answer as an integer, the normalised prompt) run on
helper columns computed here. Row i of the frame is record i of the file, so GX's unexpected indices
map straight back to a line number and id.

Outputs: GX Data Docs plus `summary.json` in reports/validation/, metrics/validation.json, and a nested
MLflow run. Any violation exits 1 with lines such as
`error: data/x/train.jsonl:17 (id mcq-00016): expect_column_values_to_be_between on answer: value 7 not in 1..5`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import load_params, run_cli
from pipeline.data import DataError, read_jsonl
from pipeline.tracking import stage_run

REPORT_DIR = Path("reports/validation")
METRICS_FILE = Path("metrics/validation.json")
SITE_NAME = "validation_report"
MAX_PRINTED = 20  # keeps stderr readable on a badly broken file; summary.json lists every violation
FIELD_TYPES = {"id": "string", "passage": "string", "question": "string", "choices": "array", "answer": "integer"}
TEXT_FIELDS = ("id", "passage", "question")


def json_type(value) -> str | None:
    """JSON type name of a parsed value; None for null, which the not-null rule reports instead."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is an int subclass in Python
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array"}.get(type(value), "object")


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def prompt_key(row: dict) -> str | None:
    passage, question = row.get("passage"), row.get("question")
    if not (isinstance(passage, str) and isinstance(question, str)):
        return None
    # A short hash rather than the text: the overlap rule's value set is stored in the suite.
    return hashlib.sha1(f"{normalise(passage)}\n{normalise(question)}".encode()).hexdigest()[:16]


def short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Split:
    name: str
    path: Path
    rows: list[dict]
    lines: list[int]  # lines[i]: line number of rows[i] in the file

    def where(self, i: int) -> str:
        rid = self.rows[i].get("id")
        return f"{self.path}:{self.lines[i]} (id {rid if isinstance(rid, str) and rid.strip() else '?'})"


def read_split(name: str, path: str | Path) -> Split:
    rows = read_jsonl(path)  # raises DataError naming file and line
    with Path(path).open("rb") as f:
        # The same blank-line skipping as read_jsonl, so rows[i] sits on lines[i].
        lines = [n for n, raw in enumerate(f, start=1) if raw.decode("utf-8").strip()]
    return Split(name, Path(path), rows, lines)


def helper_frame(split: Split):
    """The raw fields (None when missing) plus the derived columns the rules check."""
    import pandas as pd

    def ints(values):  # nullable integers: None stays missing (GX skips it) instead of turning floats
        return pd.Series(values, dtype="Int64")

    values = {f: [row.get(f) for row in split.rows] for f in FIELD_TYPES}
    columns = {f: pd.Series(v, dtype=object) for f, v in values.items()}
    for f in FIELD_TYPES:
        columns[f"{f}_type"] = pd.Series([json_type(v) for v in values[f]], dtype=object)
    for f in TEXT_FIELDS:
        columns[f"{f}_chars"] = ints([len(v.strip()) if isinstance(v, str) else None for v in values[f]])
    columns["id_key"] = pd.Series([v if isinstance(v, str) else None for v in values["id"]], dtype=object)
    lists = [v if isinstance(v, list) else None for v in values["choices"]]
    columns["n_choices"] = ints([len(c) if c is not None else None for c in lists])
    columns["n_bad_choices"] = ints([None if c is None else sum(not (isinstance(x, str) and x.strip()) for x in c)
                                     for c in lists])
    columns["answer_int"] = ints([v if json_type(v) == "integer" else None for v in values["answer"]])
    columns["prompt_key"] = pd.Series([prompt_key(row) for row in split.rows], dtype=object)
    return pd.DataFrame(columns)


@dataclass
class Rule:
    record_field: str  # the JSONL field the rule is about: messages name it, not the helper column
    expectation: object
    detail: Callable[[int], str]  # row index -> why that record fails


def build_rules(split: Split, num_choices: int, train: Split | None) -> list[Rule]:
    """The suite of one split; `train` is given for the eval split (overlap rule)."""
    import great_expectations as gx

    ex = gx.expectations
    rows = split.rows
    rules = []
    # The schema is checked per record (present and not null, then JSON type): a JSONL file has no header,
    # and ExpectColumnToExist would pass as soon as one record had the key. Per-record rules name the line.
    for f, expected in FIELD_TYPES.items():
        present = ex.ExpectColumnValuesToNotBeNull(column=f, description=f"every record has `{f}`, not null")
        rules.append(Rule(f, present, lambda i, f=f: "field missing" if f not in rows[i] else "value is null"))
        rules.append(Rule(f, ex.ExpectColumnValuesToBeInSet(column=f"{f}_type", value_set=[expected],
                                                            description=f"`{f}` is a JSON {expected}"),
                          lambda i, f=f, t=expected: f"expected {t}, got {json_type(rows[i][f])} {short(rows[i][f])}"))
    for f in TEXT_FIELDS:
        rules.append(Rule(f, ex.ExpectColumnValuesToBeBetween(column=f"{f}_chars", min_value=1,
                                                              description=f"`{f}` is not empty or whitespace"),
                          lambda i: "empty or whitespace-only string"))
    by_id: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if isinstance(row.get("id"), str):
            by_id.setdefault(row["id"], []).append(split.lines[i])
    rules += [
        Rule("choices", ex.ExpectColumnValuesToBeBetween(column="n_choices", description=f"exactly {num_choices} choices",
                                                         min_value=num_choices, max_value=num_choices),
             lambda i: f"{len(rows[i]['choices'])} choices, expected {num_choices}"),
        Rule("choices", ex.ExpectColumnValuesToBeBetween(column="n_bad_choices", max_value=0,
                                                         description="every choice is a non-empty string"),
             lambda i: f"every choice must be a non-empty string, got {short(rows[i]['choices'])}"),
        Rule("answer", ex.ExpectColumnValuesToBeBetween(column="answer_int", min_value=1, max_value=num_choices,
                                                        description=f"`answer` is in 1..{num_choices} (1-based)"),
             lambda i: f"value {rows[i]['answer']} not in 1..{num_choices}"),
        Rule("id", ex.ExpectColumnValuesToBeUnique(column="id_key", description="no duplicate ids in the split"),
             lambda i: "duplicate id, on lines " + ", ".join(map(str, by_id[rows[i]["id"]]))),
    ]
    if train is not None:
        # An eval item seen in training inflates the accuracy the evaluate stage reports.
        seen = {}
        for i, row in enumerate(train.rows):
            seen.setdefault(prompt_key(row), train.where(i))
        seen.pop(None, None)
        no_overlap = ex.ExpectColumnValuesToNotBeInSet(column="prompt_key", value_set=sorted(seen),
                                                       description="no normalised passage+question is also in train")
        rules.append(Rule("passage+question", no_overlap,
                          lambda i: f"normalised passage+question also in train at {seen[prompt_key(rows[i])]}"))
    for n, rule in enumerate(rules):
        rule.expectation.meta = {"rule": n}  # survives into the result: maps it back to its Rule
    return rules


@dataclass
class ValidationOutcome:
    rows: dict[str, int]
    checks: list[dict] = field(default_factory=list)  # one per expectation and split
    violations: list[dict] = field(default_factory=list)  # one per failing record (or unreadable file)

    def add(self, file, line: int | None, record_id, rule: str, message: str) -> None:
        self.violations.append({"file": str(file), "line": line, "id": record_id, "rule": rule, "message": message})

    @property
    def success(self) -> bool:
        return not self.violations

    def metrics(self) -> dict:
        return {"train_rows": self.rows.get("train", 0), "eval_rows": self.rows.get("eval", 0),
                "expectations": len(self.checks), "failed": sum(not c["success"] for c in self.checks),
                "violations": len(self.violations), "success": self.success}


def run_suites(splits: list[Split], num_choices: int, report_dir: Path, outcome: ValidationOutcome) -> None:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise on stderr
    ctx.add_data_docs_site(SITE_NAME, {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    source = ctx.data_sources.add_pandas("raw_mcq")
    for split in splits:
        rules = build_rules(split, num_choices, splits[0] if split.name == "eval" else None)
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{split.name}_items"))
        for rule in rules:
            suite.add_expectation(rule.expectation)
        batch = source.add_dataframe_asset(split.name).add_batch_definition_whole_dataframe("whole_file")
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{split.name}_items", data=batch, suite=suite))
        # COMPLETE: every unexpected row index, not just a sample of 20.
        result = definition.run(batch_parameters={"dataframe": helper_frame(split)}, result_format="COMPLETE")
        for res in sorted(result.results, key=lambda r: r.expectation_config.meta["rule"]):
            config, rule = res.expectation_config, rules[res.expectation_config.meta["rule"]]
            outcome.checks.append({"split": split.name, "expectation": config.type, "column": config.kwargs["column"],
                                   "field": rule.record_field, "success": bool(res.success),
                                   "unexpected_count": res.result.get("unexpected_count", 0)})
            on = f"{config.type} on {rule.record_field}"
            if res.exception_info.get("raised_exception"):  # a rule GX could not evaluate is a failure too
                outcome.add(split.path, None, None, config.type,
                            f"{split.path}: {on}: could not be evaluated ({res.exception_info['exception_message']})")
            for i in res.result.get("unexpected_index_list") or []:
                outcome.add(split.path, split.lines[i], split.rows[i].get("id"), config.type,
                            f"{split.where(i)}: {on}: {rule.detail(i)}")
    ctx.build_data_docs(site_names=[SITE_NAME])


def validate_datasets(train_path: str | Path, eval_path: str | Path, num_choices: int,
                      report_dir: str | Path) -> ValidationOutcome:
    """Validate both splits; replace report_dir with the Data Docs and summary.json. Never raises on bad data."""
    report_dir = Path(report_dir)
    shutil.rmtree(report_dir, ignore_errors=True)  # no stale pages from an earlier run
    report_dir.mkdir(parents=True)
    splits, outcome = [], ValidationOutcome(rows={})
    for name, path in (("train", train_path), ("eval", eval_path)):
        try:
            splits.append(read_split(name, path))
            outcome.rows[name] = len(splits[-1].rows)
        except DataError as exc:  # both files are checked, so one run names every unreadable file
            outcome.add(path, None, None, "read_jsonl", str(exc))
    if not outcome.violations:  # the suites need both splits (overlap rule)
        run_suites(splits, num_choices, report_dir, outcome)
    outcome.violations.sort(key=lambda v: (v["file"] != str(train_path), v["line"] or 0))
    summary = {**outcome.metrics(), "checks": outcome.checks, "violations": outcome.violations}
    (report_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return outcome


def print_report(outcome: ValidationOutcome, report_dir: Path) -> None:
    from tabulate import tabulate

    if not outcome.checks:
        print(f"validate: no expectations ran (a data file could not be read); report in {report_dir}/")
    else:
        rows: dict[tuple, dict] = {}  # one line per rule, a column per split: half as long as per-split rows
        for c in outcome.checks:
            cell = "ok" if c["success"] else f"FAIL ({c['unexpected_count']})"
            rows.setdefault((c["expectation"], c["column"]), {})[c["split"]] = cell
        print(tabulate([(*key, cells.get("train", "-"), cells.get("eval", "-")) for key, cells in rows.items()],
                       headers=["expectation", "column", "train", "eval"]))
        m = outcome.metrics()
        print(f"validate: train {m['train_rows']} rows, eval {m['eval_rows']} rows, "
              f"{m['expectations'] - m['failed']}/{m['expectations']} expectations passed, report in {report_dir}/")
    for v in outcome.violations[:MAX_PRINTED]:
        print(f"error: {v['message']}", file=sys.stderr)
    if len(outcome.violations) > MAX_PRINTED:
        print(f"error: ... and {len(outcome.violations) - MAX_PRINTED} more (all in {report_dir / 'summary.json'})",
              file=sys.stderr)


def main() -> None:
    import mlflow

    params = load_params()
    with stage_run(params, "validate"):
        outcome = validate_datasets(params.data.train, params.data.eval, params.task.num_choices, REPORT_DIR)
        metrics = outcome.metrics()
        METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
        METRICS_FILE.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        mlflow.log_metrics({f"validation_{k}": float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(REPORT_DIR), "validation_report")
        print_report(outcome, REPORT_DIR)
        if not outcome.success:
            raise SystemExit(1)  # inside the run: MLflow marks the stage run FAILED


if __name__ == "__main__":
    run_cli(main)
