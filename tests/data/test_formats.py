"""The five dataset formats: readers and rules in isolation, then each format end to end
(validate → dapt/sft → evaluate) on a tiny model, driven only by a params.yaml, through the stages' main()."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import TaskParams, load_params
from pipeline.data.formats import answer_index, structure_problems, to_example
from pipeline.data.readers import Record, read_records
from pipeline.errors import DataError
from tests.helpers.project import TINY_BASE, TINY_SAMPLE

REPO = Path(__file__).resolve().parents[2]
TASK = TaskParams(system_prompt="Answer.", user_template="{passage}\n{question}\n{choices}")


# ---------------------------------------------------------------- readers and rules, no model


def test_readers_accept_jsonl_json_parquet_text_and_shard_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "가"}, {"text": "b"}]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (shards / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), shards / "c.parquet")
    (shards / "d.txt").write_text("가\n\nb\n", encoding="utf-8")
    records = read_records(shards)
    assert [r.value["text"] for r in records] == ["가", "b"] * 4
    assert [r.where() for r in records][::2] == [f"{shards}/a.jsonl:1", f"{shards}/b.json[0]", f"{shards}/c.parquet[0]",
                                                 f"{shards}/d.txt:1"]
    assert records[-1].where() == f"{shards}/d.txt:3"  # line numbers count blank lines


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"\n\n", "no records"),
    (b'{"a": 1}\n{"a": \n', ":2: not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", ":1: not valid UTF-8 (invalid start byte at byte 0 of the line); a binary file?"),
    (b'{"a": 1}\n\x00\x00\x00\n', ":2: contains NUL bytes; this looks like a binary file"),
    (b'{"a": "\xff"}\n', ":1: not valid UTF-8"),
    (b"[1, 2]\n", ":1: each line must be a JSON object, got array"),
])
def test_unreadable_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="x.jsonl") as exc:
        read_records(path)
    assert message in str(exc.value)


def test_an_over_long_line_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:  # sparse: 2 GiB of line, no disk used
        f.write(b'{"text": "')
        f.seek(2 * 1024**3)
        f.write(b'"}\n')
    with pytest.raises(DataError, match=r"big.jsonl:1: line longer than 1,000,000 bytes"):
        read_records(path, max_record_bytes=1_000_000)


def limited(limit: int):
    """The repo's params with `validate.max_record_bytes` set to limit."""
    params = load_params(REPO / "params.yaml")
    return params.model_copy(update={"validation": params.validation.model_copy(update={"max_record_bytes": limit})})


def test_stage_readers_of_user_data_honour_the_params_limit(tmp_path):
    """base (the shipped text its tokenizer learns from) and predict (a user's items file) read with
    `validate.max_record_bytes`: refused at the params' limit, accepted once the limit is raised."""
    from pipeline.commands.predict import mcq_examples
    from pipeline.modeling.tiny import tokenizer_texts

    item = {"passage": "가" * 1000, "question": "q", "choices": ["a", "b"], "answer": 1}  # a 3 kB line
    (tmp_path / "train.jsonl").write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "domain_train.txt").write_text("short line\n", encoding="utf-8")
    params = limited(1000)
    params = params.model_copy(update={"sample_data": params.sample_data.model_copy(update={"out_dir": str(tmp_path)})})
    over = r"train.jsonl:1: line longer than 1,000 bytes \(validate.max_record_bytes\)"
    with pytest.raises(DataError, match=over):
        tokenizer_texts(params)
    with pytest.raises(DataError, match=over):
        mcq_examples(tmp_path / "train.jsonl", params.task, params.validation.max_record_bytes)
    raised = params.model_copy(update={"validation": limited(10_000).validation})
    assert tokenizer_texts(raised)[-1] == "short line" and "가" * 1000 in tokenizer_texts(raised)[0]
    assert mcq_examples(tmp_path / "train.jsonl", raised.task, raised.validation.max_record_bytes)[0].answer == 1


def test_processed_readers_accept_what_validate_wrote_even_past_the_limit(tmp_path):
    """Normalised, an MCQ line outgrows its input (template, choices twice): validate records each dataset's
    longest processed line in manifest.json and read_examples/read_texts accept up to it, so a user who
    raised the limit just enough for their documents is not refused by dapt/sft/evaluate/merge. A line
    longer than both is still refused unread, and without the manifest entry the params' limit alone holds."""
    from pipeline.data.formats import processed_record_limit, read_examples, read_texts
    from pipeline.data.readers import write_jsonl as write_processed_jsonl

    record = Record("in.jsonl", 1, True, {"passage": "p" * 700, "question": "q", "choices": ["x" * 60, "y" * 60],
                                          "answer": 1})
    raw = len(json.dumps(record.value).encode()) + 1
    task = TaskParams(system_prompt="S" * 100, user_template="{passage}\n{question}\n{choices}")
    example = to_example(record, "mcq", task)
    longest = write_processed_jsonl(tmp_path / "train.jsonl", [example.to_json()])
    text_longest = write_processed_jsonl(tmp_path / "domain_corpus.jsonl", [{"text": "t" * 1200}])
    assert raw < 1000 < longest  # the input fit a 1000-byte limit, its processed line does not
    assert longest == len((tmp_path / "train.jsonl").read_bytes())  # the returned length is the line's bytes

    with pytest.raises(DataError, match=r"train.jsonl:1: line longer than 1,000 bytes"):
        read_examples(tmp_path, "train", 1000)  # no manifest: the params' limit alone
    (tmp_path / "manifest.json").write_text(json.dumps({"max_line_bytes": {"train": longest,
                                                                           "domain_corpus": text_longest}}))
    assert processed_record_limit(tmp_path, "train", 1000) == longest
    assert processed_record_limit(tmp_path, "train", 50_000) == 50_000  # a higher params limit wins
    assert read_examples(tmp_path, "train", 1000)[0].answer == 1
    assert read_texts(tmp_path, "domain_corpus", 1000) == ["t" * 1200]
    with (tmp_path / "train.jsonl").open("a", encoding="utf-8") as f:  # a line validate did not write
        f.write(json.dumps({**example.to_json(), "id": "z" * 2000}) + "\n")
    with pytest.raises(DataError, match=rf"train.jsonl:2: line longer than {longest:,} bytes"):
        read_examples(tmp_path, "train", 1000)


@pytest.mark.parametrize(("answer", "choices", "expected"), [
    (2, ["a", "b"], (2, None)),
    ("b", ["a", "b"], (2, None)),
    (" 1 ", ["a", "b"], (1, None)),
    (3, ["a", "b"], (None, "answer 3 not in 1..2")),
    ("c", ["a", "b"], (None, "answer 'c' is neither")),
    ("2", ["2", "x"], (None, "ambiguous")),  # choice 1's text and the number of choice 2
])
def test_answer_is_an_index_or_exactly_one_choice_text(answer, choices, expected):
    index, problem = answer_index(answer, choices)
    assert index == expected[0]
    assert (problem is None) if expected[1] is None else expected[1] in problem


@pytest.mark.parametrize(("fmt", "value", "rule"), [
    ("mcq", {"passage": "p", "question": "q", "choices": ["a"], "answer": 1}, "choices_count"),
    ("mcq", {"passage": "p", "question": "q", "choices": ["a", "A "], "answer": 1}, "choices_distinct"),
    ("mcq", {"passage": "p", "question": "q", "choices": "a,b", "answer": 1}, "type"),
    ("mcq", {"passage": " ", "question": "q", "choices": ["a", "b"], "answer": 1}, "non_empty"),
    ("mcq", {"passage": "p", "question": "q", "choices": ["a", "b"], "answer": float("nan")}, "type"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "roles_known"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "ends_with_assistant"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                               {"role": "assistant", "content": "x"}]}, "system_first"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                               {"role": "assistant", "content": "x"}]}, "alternation"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     "assistant_non_empty"),
    ("messages", {"messages": [{"role": "user", "content": "a\udc80"}, {"role": "assistant", "content": "x"}]}, "utf8"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "x"}]}, "roles_known"),
    ("alpaca", {"instruction": "do"}, "required"),
])
def test_structure_rules(fmt, value, rule):
    assert rule in structure_problems(value, fmt).found


def test_every_chat_format_normalises_to_the_same_messages():
    record = lambda value: Record("f.jsonl", 1, True, value)  # noqa: E731
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_example(record({"messages": msgs}), "messages", TASK).messages == msgs
    assert to_example(record({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
                      "sharegpt", TASK).messages == msgs
    assert to_example(record({"instruction": "q", "output": "a"}), "alpaca", TASK).messages == msgs
    assert to_example(record({"instruction": "q", "input": "x", "output": "a"}), "alpaca",
                      TASK).messages[0]["content"] == "q\n\nx"
    mcq = to_example(record({"passage": "p", "question": "q", "choices": ["a", "b"], "answer": "b"}), "mcq", TASK)
    assert mcq.messages == [{"role": "system", "content": "Answer."}, {"role": "user", "content": "p\nq\n1. a\n2. b"},
                            {"role": "assistant", "content": "2"}]
    assert mcq.answer == 2 and mcq.source == "f.jsonl:1"


# ---------------------------------------------------------------- each format end to end on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_world):
    """Sample MCQ data and a tiny base (the shared ones, linked), and one MLflow store shared by the format runs."""
    return tiny_world.link_into(tmp_path_factory.mktemp("formats"), data="sample")


def mcq_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_format(rows: list[dict], fmt: str) -> list[dict]:
    """The sample MCQ items in another chat format (the same conversations)."""
    task = load_params(REPO / "params.yaml").task
    out = []
    for row in rows:
        messages = to_example(Record("x", 1, True, row), "mcq", task).messages
        if fmt == "messages":
            out.append({"id": row["id"], "messages": messages})
        elif fmt == "sharegpt":
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            out.append({"id": row["id"], "conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                           for m in messages]})
        elif fmt == "alpaca":
            out.append({"id": row["id"], "instruction": messages[0]["content"], "input": messages[1]["content"],
                        "output": messages[2]["content"]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def project_for(fmt: str, tiny: Path, root: Path) -> dict:
    """Data files in `fmt` (and in varied file types) plus the params that point at them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample, data = tiny / "sample", root / "data"
    data.mkdir(parents=True)
    train, eval_ = mcq_rows(sample / "train.jsonl"), mcq_rows(sample / "eval.jsonl")
    datasets = {name: {"path": str(sample / f"{file}.txt"), "format": "text"}
                for name, file in (("domain_corpus", "domain_train"), ("domain_eval", "domain_eval"),
                                   ("general_eval", "general_eval"))}
    if fmt in ("mcq", "text"):
        datasets |= {"train": {"path": str(sample / "train.jsonl"), "format": "mcq"},
                     "eval": {"path": str(sample / "eval.jsonl"), "format": "mcq"}}
    if fmt == "text":  # DAPT corpus as a directory of .txt and .jsonl shards; held-out text as Parquet
        lines = (sample / "domain_train.txt").read_text(encoding="utf-8").splitlines()
        (data / "corpus").mkdir()
        (data / "corpus/part-0.txt").write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
        write_jsonl(data / "corpus/part-1.jsonl", [{"text": t} for t in lines[100:]])
        held = (sample / "domain_eval.txt").read_text(encoding="utf-8").splitlines()
        pq.write_table(pa.Table.from_pylist([{"text": t} for t in held]), data / "domain_eval.parquet")
        datasets |= {"domain_corpus": {"path": str(data / "corpus"), "format": "text"},
                     "domain_eval": {"path": str(data / "domain_eval.parquet"), "format": "text"}}
    if fmt == "messages":  # train JSONL, eval a JSON array
        write_jsonl(data / "train.jsonl", as_format(train, fmt))
        (data / "eval.json").write_text(json.dumps(as_format(eval_, fmt), ensure_ascii=False), encoding="utf-8")
        datasets |= {"train": {"path": str(data / "train.jsonl"), "format": fmt},
                     "eval": {"path": str(data / "eval.json"), "format": fmt}}
    if fmt == "alpaca":  # train Parquet
        pq.write_table(pa.Table.from_pylist(as_format(train, fmt)), data / "train.parquet")
        write_jsonl(data / "eval.jsonl", as_format(eval_, fmt))
        datasets |= {"train": {"path": str(data / "train.parquet"), "format": fmt},
                     "eval": {"path": str(data / "eval.jsonl"), "format": fmt}}
    if fmt == "sharegpt":  # train as two JSONL shards
        rows = as_format(train, fmt)
        write_jsonl(data / "train/shard-0.jsonl", rows[:20])
        write_jsonl(data / "train/shard-1.jsonl", rows[20:])
        write_jsonl(data / "eval.jsonl", as_format(eval_, fmt))
        datasets |= {"train": {"path": str(data / "train"), "format": fmt},
                     "eval": {"path": str(data / "eval.jsonl"), "format": fmt}}
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"] = datasets
    if fmt not in ("mcq", "text"):
        raw["register"]["gate_metric"] = "tuned_rougeL"
    raw["base"]["out_dir"] = str(tiny / "base")
    raw["base"]["tiny"] = TINY_BASE
    raw["dapt"] |= {"enabled": fmt == "text", "max_steps": 15, "batch_size": 4, "block_size": 32}
    raw["sft"] |= {"max_steps": 6, "batch_size": 4, "logging_steps": 2}
    raw["evaluate"] |= {"max_eval_items": 6, "max_new_tokens": 4}
    raw["mlflow"] |= {"tracking_uri": f"sqlite:///{tiny / 'mlflow.db'}", "artifact_root": str(tiny / "artifacts")}
    return raw


@pytest.mark.parametrize("fmt", ["mcq", "messages", pytest.param("alpaca", marks=pytest.mark.extended),
                                 pytest.param("sharegpt", marks=pytest.mark.extended), "text"])
def test_each_format_runs_validate_train_evaluate(fmt, tiny, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling.loading import template_fingerprint
    from pipeline.stages import dapt, evaluate, sft, validate

    raw = project_for(fmt, tiny, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PIPELINE_RUN_KEY", f"formats-{fmt}")
    for stage in (validate, dapt, sft, evaluate):
        stage.main()

    manifest = json.loads((tmp_path / "data/processed/manifest.json").read_text(encoding="utf-8"))
    rows = manifest["rows"]  # no data.validation here: validate carves validate.validation_fraction of train
    assert rows["train"] + rows["validation"] == TINY_SAMPLE["n_train"] and rows["eval"] == TINY_SAMPLE["n_eval"]
    assert rows["validation"] == round(0.1 * TINY_SAMPLE["n_train"])
    processed = [json.loads(line) for name in ("train", "validation")
                 for line in (tmp_path / f"data/processed/{name}.jsonl").open(encoding="utf-8")]
    assert processed[0]["messages"][-1]["role"] == "assistant"
    assert any(p["source"].endswith(("train.jsonl:1", "train.parquet[0]", "shard-0.jsonl:1")) for p in processed)
    adapter = tmp_path / "models/adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert template_fingerprint(tokenizer) == manifest["template_fingerprint"]  # travels with the adapter
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "base"), adapter)
    metrics = json.loads((tmp_path / "metrics/eval.json").read_text(encoding="utf-8"))
    assert metrics["n_items"] == 6
    if fmt in ("mcq", "text"):
        assert 0 <= metrics["tuned_accuracy"] <= 1 and "tuned_generation_em" in metrics
    else:
        assert metrics["tuned_answer_loss"] > 0 and 0 <= metrics["tuned_rougeL"] <= 1
        assert "tuned_answer_ppl" in metrics and "base_rougeL" in metrics
    from pipeline.metric_catalog import EVAL_METRICS, eval_kind

    reported = {k for k in metrics if k.startswith("tuned_") and not k.startswith(("tuned_accuracy_", "tuned_vs_"))}
    kind = eval_kind(raw["data"]["eval"]["format"])
    assert reported - {"tuned_general_ppl_change"} == {f"tuned_{m}" for m in EVAL_METRICS[kind]
                                                               if m != "float32_changed_choices"}, reported  # float32 here
    assert 0 <= metrics["tuned_eos_rate"] <= 1
    if fmt == "text":  # DAPT on the sharded corpus lowers held-out (Parquet) domain perplexity
        assert (tmp_path / "models/dapt/model.safetensors").is_file()
        assert metrics["dapt_ppl_domain"] < metrics["base_ppl_domain"]
    else:
        assert metrics["dapt_ppl_domain"] == metrics["base_ppl_domain"]  # DAPT off: the base is handed on
    if fmt == "mcq":
        template_mismatch_is_refused(tmp_path, raw)
    shutil.rmtree(tmp_path / "models")


def template_mismatch_is_refused(project: Path, raw: dict) -> None:
    """Training and evaluation refuse a chat template other than the one the data was validated with."""
    from pipeline.errors import DataError
    from pipeline.stages import evaluate, sft, validate

    adapter = (project / "models/adapter/adapter_model.safetensors").read_bytes()
    other = project / "other.jinja"
    other.write_text(base_template(raw["base"]["out_dir"]) + "{# edited #}", encoding="utf-8")
    raw["task"]["chat_template"] = str(other)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(DataError, match="differs from the one data/processed/manifest.json was validated with"):
        sft.main()
    validate.main()  # the data validated under the new template; the adapter still carries the old one
    with pytest.raises(DataError, match=r"evaluate \(models/adapter\): the chat template .* differs"):
        evaluate.main()
    assert (project / "models/adapter/adapter_model.safetensors").read_bytes() == adapter


def base_template(model_dir: str) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).chat_template
