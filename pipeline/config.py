"""Typed params: `params.yaml` is validated here before any data or model is touched.

An unknown key, a wrong type or an invalid combination is an error that names the key.

Over 300 lines because it is the whole schema, one pydantic model per params.yaml section with its checks;
split, a section's rules would sit away from the others they combine with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ParamsError
from pipeline.metric_catalog import PERTURBATIONS, metric_direction

BUILTIN_TINY = "builtin-tiny"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


CHAT_FORMATS = ("mcq", "messages", "alpaca", "sharegpt")


class DatasetParams(Strict):
    path: str  # a file (.jsonl, .json, .parquet, .txt for text) or a directory of such shards
    format: Literal["mcq", "messages", "alpaca", "sharegpt", "text"]


class DataParams(Strict):
    train: DatasetParams
    # SFT's held-out loss (eval_steps, early stopping, best checkpoint). None, or train's own path (the
    # spelling dvc.yaml can interpolate): the validate stage carves validate.validation_fraction of train.
    validation: DatasetParams | None = None
    eval: DatasetParams
    domain_corpus: DatasetParams
    domain_eval: DatasetParams
    general_eval: DatasetParams

    @model_validator(mode="after")
    def _formats_fit_their_use(self):
        for name in ("train", "eval") + (() if self.validation is None else ("validation",)):
            if getattr(self, name).format not in CHAT_FORMATS:
                raise ValueError(f"data.{name}.format must be one of {', '.join(CHAT_FORMATS)} (a chat-like format)")
        for name in ("domain_corpus", "domain_eval", "general_eval"):
            if getattr(self, name).format != "text":
                raise ValueError(f"data.{name}.format must be text (raw text for DAPT and perplexity)")
        if self.carves_validation and self.validation is not None and self.validation.format != self.train.format:
            raise ValueError("data.validation.path is data.train.path (carve validation from train): "
                             f"data.validation.format must then be data.train.format ({self.train.format})")
        return self

    @property
    def carves_validation(self) -> bool:
        """True when the validation split is carved from train (validation null or pointing at train's path)."""
        return self.validation is None or os.path.normpath(self.validation.path) == os.path.normpath(self.train.path)

    def chat_sets(self) -> dict[str, DatasetParams]:
        """The chat datasets read from files; a carved validation split is not one (it comes out of train)."""
        return {"train": self.train, **({} if self.carves_validation else {"validation": self.validation}),
                "eval": self.eval}

    def text_sets(self) -> dict[str, DatasetParams]:
        return {"domain_corpus": self.domain_corpus, "domain_eval": self.domain_eval, "general_eval": self.general_eval}


class SampleDataParams(Strict):
    out_dir: str = "data/sample"
    n_train: int = Field(ge=1)
    n_eval: int = Field(ge=1)
    n_validation: int = Field(default=60, ge=1)
    n_domain_lines: int = Field(ge=1)
    n_heldout_lines: int = Field(ge=1)
    num_choices: int = Field(ge=2, le=10)
    type_mix: dict[Literal["explicit", "ordinal", "lookup"], float]

    @model_validator(mode="after")
    def _mix_sums_to_one(self):
        if abs(sum(self.type_mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"sample_data.type_mix must sum to 1, got {sum(self.type_mix.values())}")
        return self


class TaskParams(Strict):
    system_prompt: str
    user_template: str
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's own chat template
    # mcq: the assistant answers with the option's number (the seed task's 정답) or its words (`text`: scoring
    # then compares what the options say; pipeline/data/formats.py answer_content)
    answer_format: Literal["number", "text"] = "number"

    @model_validator(mode="after")
    def _template_fields(self):
        # {passage} is optional: a template without it is for closed-book items (ARC, MMLU), whose mcq
        # records may then leave `passage` empty (formats.needs_passage). {choices} is optional when the
        # answer is the option's words (cloze scoring: each option's words scored after the question alone);
        # an option number means nothing without the numbered list.
        for field in ("{question}",) + (("{choices}",) if self.answer_format == "number" else ()):
            if field not in self.user_template:
                raise ValueError(f"task.user_template must contain {field}")
        return self


class TinyModelParams(Strict):
    hidden_size: int = Field(ge=16)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=16)
    vocab_size: int = Field(ge=300)
    max_position_embeddings: int = Field(ge=64)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError("base.tiny.hidden_size must be divisible by base.tiny.num_heads")
        return self


class BaseParams(Strict):
    model: str  # "builtin-tiny", a packaged model (pipeline/modeling/packaged.py), a Hugging Face id or a local model dir
    revision: str | None = None
    out_dir: str = "models/base"
    tiny: TinyModelParams


# Rules whose failure leaves no training example to build: always errors.
STRUCTURAL_RULES = ("required", "type", "non_empty", "utf8", "choices_count", "choices_non_empty", "answer_in_range",
                    "answer_unambiguous", "turns_schema", "roles_known", "system_first", "alternation",
                    "ends_with_assistant", "assistant_non_empty", "template_renders")
ADJUSTABLE_RULES = ("choices_distinct", "unique_id", "duplicate_exact", "duplicate_normalised", "leakage",
                    "trainable_tokens", "stop_token", "prompt_consistent", "pii", "heldout_overlap")
WARN_BY_DEFAULT = ("duplicate_normalised", "prompt_consistent", "pii")
Severity = Literal["error", "warn", "off"]


class ValidateParams(Strict):
    out_dir: str = "data/processed"
    report_dir: str = "reports/validation"
    max_record_bytes: int = Field(ge=1000)
    min_choices: int = Field(ge=2, le=10)
    max_choices: int = Field(ge=2, le=10)
    overlong: Literal["error", "drop"]
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # train share carved out (data.validation null/train)
    severity: dict[str, Severity] = {}
    audit_examples: int = Field(ge=0)

    @model_validator(mode="after")
    def _rules(self):
        for rule, level in self.severity.items():
            if rule not in STRUCTURAL_RULES + ADJUSTABLE_RULES:
                raise ValueError(f"validate.severity.{rule}: unknown rule; known: {', '.join(STRUCTURAL_RULES + ADJUSTABLE_RULES)}")
            if rule in STRUCTURAL_RULES and level != "error":
                raise ValueError(f"validate.severity.{rule}: a structural rule is always `error` (no example can be built)")
        if self.min_choices > self.max_choices:
            raise ValueError("validate.min_choices must not exceed validate.max_choices")
        return self

    def level(self, rule: str) -> str:
        return self.severity.get(rule, "warn" if rule in WARN_BY_DEFAULT else "error")


class DaptParams(Strict):
    enabled: bool
    method: Literal["full", "lora"]
    tapt: bool
    out_dir: str = "models/dapt"
    max_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    block_size: int = Field(ge=8)
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)


class LoraParams(Strict):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"]
    use_rslora: bool = False


class PromptTuningParams(Strict):
    num_virtual_tokens: int = Field(ge=1)
    init_text: str | None = None


class AdversarialParams(Strict):
    """Adversarial training on the input embeddings (pipeline/training/adversarial.py)."""

    method: Literal["fgm", "pgd"] | None = None
    epsilon: float = Field(default=0.05, gt=0, le=1)  # per-token L2 radius, a fraction of that token's embedding norm
    steps: int = Field(default=3, ge=1, le=20)  # PGD ascent steps (each one more forward/backward)
    alpha: float = Field(default=0.02, gt=0)  # PGD step, same unit as epsilon

    @model_validator(mode="after")
    def _reaches(self):
        if self.method == "pgd" and self.alpha * self.steps < self.epsilon:
            raise ValueError(f"sft.adversarial: PGD's {self.steps} steps of alpha {self.alpha} cannot reach epsilon "
                             f"{self.epsilon} (alpha * steps < epsilon); raise alpha or steps, or lower epsilon")
        return self


class SftParams(Strict):
    out_dir: str = "models/adapter"
    method: Literal["lora", "dora", "prompt_tuning"] = "lora"
    quantization: Literal["nf4", "fp4", "int8", "none", "auto"]  # auto: pipeline/modeling/precision.py
    double_quant: bool
    compute_dtype: Literal["float32", "bfloat16", "float16", "auto"]
    lora: LoraParams
    prompt_tuning: PromptTuningParams = PromptTuningParams(num_virtual_tokens=20)
    neftune_noise_alpha: float | None = Field(default=None, gt=0)
    adversarial: AdversarialParams = AdversarialParams()
    packing: bool = False
    packing_strategy: Literal["bfd", "wrapped"] = "bfd"
    eval_steps: int | None = Field(default=None, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    save_steps: int | None = Field(default=None, ge=1)
    checkpoint_dir: str = "checkpoints/sft"
    resume: Literal["auto", "fresh"] = "auto"
    max_memory_gb: float = Field(default=16.0, gt=0)
    max_steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    max_length: int = Field(ge=16)
    warmup_ratio: float = Field(ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    gradient_checkpointing: bool
    logging_steps: int = Field(ge=1)

    @model_validator(mode="after")
    def _combinations(self):
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ValueError("sft.early_stopping_patience needs sft.eval_steps (it stops on the eval loss)")
            if self.save_steps is None or self.save_steps % self.eval_steps:
                raise ValueError("sft.early_stopping_patience needs sft.save_steps, a multiple of sft.eval_steps "
                                 "(the best checkpoint is restored at the end)")
        if self.method == "prompt_tuning" and self.packing:
            raise ValueError("sft.packing does not work with sft.method prompt_tuning (virtual tokens per sequence)")
        if self.adversarial.method and self.neftune_noise_alpha is not None:
            # NEFTune draws new noise in every forward: the attack would be computed at one noisy input and
            # trained at another, so neither method is what its name says.
            raise ValueError("sft.adversarial.method and sft.neftune_noise_alpha both perturb the input embeddings "
                             "(NEFTune redraws its noise in every pass the attack makes); set one of them to null")
        return self




class RobustnessParams(Strict):
    """Accuracy on perturbed copies of an mcq eval set (pipeline/data/perturb.py); an empty list turns it off."""

    perturbations: list[str] = []
    typo_rate: float = Field(default=0.05, gt=0, le=0.3)  # share of the editable letters edited (non-adjacent: <= 0.3)

    @model_validator(mode="after")
    def _known(self):
        unknown = [p for p in self.perturbations if p not in PERTURBATIONS]
        if unknown:
            raise ValueError(f"evaluate.robustness.perturbations: unknown {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(PERTURBATIONS)} (or [] for none)")
        if len(set(self.perturbations)) < len(self.perturbations):
            raise ValueError("evaluate.robustness.perturbations: a perturbation is listed twice")
        return self


class EvaluateParams(Strict):
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    max_eval_items: int | None = Field(default=None, ge=1)
    generation_items: int | None = Field(default=None, ge=1)  # mcq: greedy generation on the first N items only
    ppl_block_size: int = Field(ge=8)
    robustness: RobustnessParams = RobustnessParams()


class GuardParams(Strict):
    metric: str
    higher_is_better: bool | None = None  # optional: the metric's own direction (EVAL_METRICS); a contradiction is refused
    tolerance: float = Field(ge=0)  # largest allowed regression against the champion, relative


class CardParams(Strict):
    """The model card's own words (pipeline/registry/model_card.py); None: a default written for the task."""

    intended_use: str | None = Field(default=None, min_length=1)
    limitations: str | None = Field(default=None, min_length=1)


class RegisterParams(Strict):
    model_name: str = Field(min_length=1)
    gate_metric: str = Field(min_length=1)
    min_improvement: float = Field(ge=0)
    # point: the gate metric's values must differ by min_improvement. paired_bootstrap (mcq, tuned_accuracy):
    # the low end of the paired 95 % interval of tuned − base, and of tuned − champion, must exceed it
    evidence: Literal["point", "paired_bootstrap"] = "point"
    guards: list[GuardParams] = []
    card: CardParams = CardParams()


class MlflowParams(Strict):
    tracking_uri: str
    artifact_root: str
    experiment: str


class Params(Strict):
    seed: int
    data: DataParams
    sample_data: SampleDataParams
    task: TaskParams
    base: BaseParams
    validation: ValidateParams = Field(alias="validate")
    dapt: DaptParams
    sft: SftParams
    evaluate: EvaluateParams
    # `validate`/`register` would shadow BaseModel attributes; the YAML keys stay `validate`/`register`.
    registry: RegisterParams = Field(alias="register")
    mlflow: MlflowParams

    @model_validator(mode="after")
    def _gate_metrics_exist(self):
        """The gate and every guard name a metric the chosen eval format produces, before any compute."""
        fmt = self.data.eval.format
        try:
            metric_direction(self.registry.gate_metric, fmt)
        except ValueError as exc:
            raise ValueError(f"register.gate_metric: {exc}") from None
        for i, guard in enumerate(self.registry.guards):
            try:
                higher = metric_direction(guard.metric, fmt)
            except ValueError as exc:
                raise ValueError(f"register.guards[{i}].metric: {exc}") from None
            if guard.higher_is_better is not None and guard.higher_is_better != higher:
                raise ValueError(f"register.guards[{i}].higher_is_better: {guard.metric} is "
                                 f"{'higher' if higher else 'lower'}-is-better; drop the key or set it to {higher}")
        if self.registry.evidence == "paired_bootstrap" and (fmt != "mcq" or self.registry.gate_metric != "tuned_accuracy"):
            raise ValueError("register.evidence: paired_bootstrap compares accuracy item by item: it needs "
                             "data.eval.format mcq and register.gate_metric tuned_accuracy (or set evidence: point)")
        metrics = {"register.gate_metric": self.registry.gate_metric,
                   **{f"register.guards[{i}].metric": g.metric for i, g in enumerate(self.registry.guards)}}
        kinds = self.evaluate.robustness.perturbations
        for key, metric in metrics.items():
            kind = metric.removeprefix("tuned_robust_accuracy_") if metric.startswith("tuned_robust_accuracy_") else None
            if metric.startswith("tuned_robust_") and (not kinds or (kind is not None and kind not in kinds)):
                raise ValueError(f"{key}: {metric} is measured only when evaluate.robustness.perturbations lists "
                                 f"{kind or 'a perturbation'}")
        return self

    def gate_higher_is_better(self) -> bool:
        return metric_direction(self.registry.gate_metric, self.data.eval.format)

    def guard_higher_is_better(self, guard: GuardParams) -> bool:
        return metric_direction(guard.metric, self.data.eval.format)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid params:"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ParamsError("\n".join(lines)) from None


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(by_alias=True), sort_keys=True).encode()).hexdigest()[:16]
