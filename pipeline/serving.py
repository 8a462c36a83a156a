"""A registered version as a REST endpoint: `mlflow models serve -m "models:/<name>@champion" --env-manager local`.

register logs every version's MLflow model with this module as its pyfunc loader (`python_function.loader_module`),
a `serving.json` (the version's lineage tags: which base, at which revision and sha256, quantized how, the task
params) and a signature with an input example, so MLflow's scoring server loads exactly what `predict` loads:
the version's own base plus the adapter, quantized as trained, prompts rendered with the version's task params.

Requests use MLflow's scoring protocol (`POST /invocations`, `{"dataframe_records": [...]}` or
`{"inputs": [...]}`), one record per item:
- MCQ, `{"passage": ..., "question": ..., "choices": [...]}` -> `{"prediction": k, "option": "...",
  "logprobs": [...]}`: k is the 1-based option with the highest log-likelihood, as `predict` and evaluate
  choose it; `logprobs` are every option's summed log-probabilities.
- chat, `{"messages": [{"role": "user", "content": "..."}]}` -> `{"generation": "..."}`: greedy, rendered with the
  adapter's chat template (the task's system prompt first unless the messages bring one), until a stop token
  or the `max_new_tokens` param (default 128).
A record that is neither, or breaks the MCQ rules validate applies, is refused with a 400 naming the record
and the rule; the model is never called on it.
"""

from __future__ import annotations

import json
from pathlib import Path

SERVING_CONFIG = "serving.json"
# The version tags the loader needs (registry/lineage.py writes them; registry/read.py reads them).
SERVING_TAGS = ("adapter_base_uri", "adapter_base_sha256", "adapter_base_revision", "sft.quantization",
                "sft.double_quant", "sft.compute_dtype", "params_json", "chat_template_sha256", "git_commit")
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 2048


def signature_and_example():
    """The request shape the MLflow UI shows ("how to call it"): every field optional, MCQ or chat per record."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    inputs = Schema([ColSpec("string", "passage", required=False), ColSpec("string", "question", required=False),
                     ColSpec(Array("string"), "choices", required=False),
                     ColSpec(Array(message), "messages", required=False)])
    outputs = Schema([ColSpec("long", "prediction", required=False), ColSpec("string", "option", required=False),
                      ColSpec(Array("double"), "logprobs", required=False),
                      ColSpec("string", "generation", required=False)])
    params = ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)])
    example = [{"passage": "The Han river flows through Seoul.", "question": "Which city does the Han flow through?",
                "choices": ["Busan", "Seoul", "Daegu", "Incheon"]}]
    return ModelSignature(inputs=inputs, outputs=outputs, params=params), example


def refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def records_of(data) -> list[dict]:
    """The request's records as plain dicts (the scoring server hands a DataFrame; a missing optional column
    comes as NaN/None and is dropped)."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        rows = data.to_dict(orient="records")
    elif isinstance(data, dict):
        rows = [data]
    elif isinstance(data, list):
        rows = data
    else:
        raise refuse(f"expected records of MCQ items or chats, got {type(data).__name__}")

    def present(v) -> bool:
        return v is not None and not (isinstance(v, float) and v != v)

    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise refuse(f"record {i}: expected an object, got {type(row).__name__}")
        out.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items() if present(v)})
    return out


class Service:
    """What the scoring server calls: one loaded version."""

    def __init__(self, model, tokenizer, task, stops: set[int], batch_size: int):
        self.model, self.tokenizer, self.task, self.stops, self.batch_size = model, tokenizer, task, stops, batch_size

    def predict(self, data, params: dict | None = None) -> list[dict]:
        from pipeline.data.formats import needs_passage, structure_problems, to_example
        from pipeline.data.readers import Record
        from pipeline.evaluation.scoring import choose, option_logprobs

        max_new = (params or {}).get("max_new_tokens")
        max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else int(max_new)
        if not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
            raise refuse(f"params.max_new_tokens: {max_new} is outside 1..{MAX_NEW_TOKENS_LIMIT}")
        rows = records_of(data)
        if not rows:
            raise refuse("no records: send at least one MCQ item or chat")
        mcq, chats = {}, {}
        for i, row in enumerate(rows):
            if "messages" in row:
                chats[i] = self.checked_messages(i, row["messages"])
                continue
            value = {**row, "answer": 1}  # the answer is what is asked for; 1 only satisfies the item rules
            problems = structure_problems(value, "mcq", passage=needs_passage(self.task)).found
            if problems:
                rule, message = next(iter(problems.items()))
                raise refuse(f"record {i}: {rule}: {message} (an MCQ item needs `question` and `choices`"
                             f"{' and `passage`' if needs_passage(self.task) else ''}; a chat needs `messages`)")
            mcq[i] = to_example(Record("request", i, False, value), "mcq", self.task)
        out: list[dict] = [{} for _ in rows]
        if mcq:
            scores = option_logprobs(self.model, self.tokenizer, list(mcq.values()), self.batch_size)
            for (i, example), k, s in zip(mcq.items(), choose(scores), scores, strict=True):
                out[i] = {"prediction": k, "option": example.choices[k - 1], "logprobs": [float(x) for x in s]}
        for i, messages in chats.items():
            out[i] = {"generation": self.generate(messages, max_new)}
        return out

    def checked_messages(self, i: int, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise refuse(f"record {i}: `messages` must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise refuse(f"record {i}: messages[{j}] must be {{\"role\": system|user|assistant, "
                             f"\"content\": string}}, got {m!r}"[:400])
        if messages[-1]["role"] != "user":
            raise refuse(f"record {i}: the last message must be the user's (the reply is generated after it)")
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.task.system_prompt}, *messages]
        return messages

    def generate(self, messages: list[dict], max_new_tokens: int) -> str:
        import torch

        from pipeline.modeling.chat_template import render
        from pipeline.modeling.loading import device_of

        prompt = render(self.tokenizer, messages, generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device_of(self.model))
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=sorted(self.stops), pad_token_id=self.tokenizer.pad_token_id)
        reply = out[0, inputs["input_ids"].shape[1]:].tolist()
        end = next((k for k, t in enumerate(reply) if t in self.stops), len(reply))
        return self.tokenizer.decode(reply[:end], skip_special_tokens=True).strip()


def _load_pyfunc(path: str, model_config: dict | None = None) -> Service:
    """MLflow's pyfunc entry point: `path` is the version's downloaded model directory."""
    from pipeline.modeling.chat_template import stop_token_ids
    from pipeline.registry.read import load_adapter, tags_task

    local = Path(path)
    tags = json.loads((local / SERVING_CONFIG).read_text(encoding="utf-8"))
    model, tokenizer, base, revision = load_adapter(local, tags, f"{local} ({SERVING_CONFIG})")
    raw = json.loads(tags.get("params_json") or "{}")
    batch_size = int(raw.get("evaluate", {}).get("batch_size", 8))
    return Service(model, tokenizer, tags_task(tags), stop_token_ids(base, tokenizer, revision), batch_size)


def make_servable(client, model_id: str, tags: dict) -> None:
    """Turn a logged (transformers-flavor, PEFT) model into this module's pyfunc: its MLmodel's loader becomes
    pipeline.serving, with a signature and an input example, and serving.json carries the tags the loader needs.
    The transformers flavor and its files stay as they are (predict, chat and merge read them)."""
    import tempfile

    from mlflow.models import Model
    from mlflow.models.utils import _save_example

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        meta = Model.load(f"models:/{model_id}")  # the logged model's MLmodel
        meta.flavors["python_function"]["loader_module"] = __name__
        signature, example = signature_and_example()
        meta.signature = signature
        _save_example(meta, example, str(out))
        (out / SERVING_CONFIG).write_text(json.dumps({k: tags[k] for k in SERVING_TAGS if k in tags}, indent=2) + "\n",
                                          encoding="utf-8")
        meta.save(str(out / "MLmodel"))
        for path in sorted(out.iterdir()):
            if path.is_file():
                client.log_model_artifact(model_id, str(path))
