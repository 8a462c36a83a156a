"""Every shipped config loads; bad params are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.base.model == "builtin-tiny"
    assert params.sft.quantization == "nf4"
    assert params.registry.model_name


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["sft"].update(lora_rank=8), "sft.lora_rank"),
        (lambda r: r["sft"].update(quantization="nf3"), "sft.quantization"),
        (lambda r: r["sft"]["lora"].update(r=0), "sft.lora.r"),
        (lambda r: r["sft"]["adversarial"].update(method="fgsm"), "sft.adversarial.method"),
        (lambda r: r["sft"].update(neftune_noise_alpha=5) or r["sft"]["adversarial"].update(method="fgm"),
         "set one of them to null"),
        (lambda r: r["sft"]["adversarial"].update(method="pgd", epsilon=0.1, steps=2, alpha=0.01),
         "cannot reach epsilon"),
        (lambda r: r["sft"]["adversarial"].update(epsilon=0), "sft.adversarial.epsilon"),
        (lambda r: r["dapt"].update(enabled="sometimes"), "dapt.enabled"),
        (lambda r: r["task"].update(user_template="no fields"), "task"),
        (lambda r: r["task"].update(user_template="{question}"), "task.user_template must contain {choices}"),
        (lambda r: r.pop("register"), "register"),
        (lambda r: r["data"]["train"].update(format="csv"), "data.train.format"),
        (lambda r: r["data"]["train"].update(format="text"), "data.train.format must be one of"),
        (lambda r: r["data"]["domain_corpus"].update(format="mcq"), "data.domain_corpus.format must be text"),
        (lambda r: r["validate"]["severity"].update(roles_known="warn"), "validate.severity.roles_known"),
        (lambda r: r["validate"]["severity"].update(spelling="warn"), "validate.severity.spelling: unknown rule"),
        (lambda r: r["validate"].update(overlong="truncate"), "validate.overlong"),
        (lambda r: r["data"]["validation"].update(format="text"), "data.validation.format must be one of"),
        (lambda r: r["data"].update(validation={"path": r["data"]["train"]["path"], "format": "messages"}),
         "data.validation.format must then be data.train.format (mcq)"),
        (lambda r: r["validate"].update(validation_fraction=1.0), "validate.validation_fraction"),
        (lambda r: r["validate"]["severity"].update(heldout_overlap="sometimes"), "validate.severity.heldout_overlap"),
        (lambda r: r["data"]["eval"].update(format="messages"),
         "register.gate_metric: 'tuned_accuracy' is not a metric the evaluate stage reports for data.eval.format messages"),
        (lambda r: r["evaluate"]["robustness"].update(perturbations=["typos", "paraphrase"]),
         "evaluate.robustness.perturbations: unknown 'paraphrase'; choose from shuffle_choices, typos, distractor"),
        (lambda r: r["evaluate"]["robustness"].update(typo_rate=0.5), "evaluate.robustness.typo_rate"),
        (lambda r: (r["evaluate"]["robustness"].update(perturbations=[]),
                    r["register"].update(gate_metric="tuned_robust_accuracy")),
         "register.gate_metric: tuned_robust_accuracy is measured only when evaluate.robustness.perturbations lists"),
        (lambda r: (r["evaluate"]["robustness"].update(perturbations=["typos"]),
                    r["register"]["guards"].append({"metric": "tuned_robust_accuracy_distractor", "tolerance": 0.1})),
         "register.guards[2].metric: tuned_robust_accuracy_distractor is measured only when "
         "evaluate.robustness.perturbations lists distractor"),
    ],
)
def test_bad_params_name_the_key(tmp_path, capsys, mutate, key):
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, mutate))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert key in err, err


def test_robust_accuracy_may_gate_and_guard_higher_is_better(tmp_path):
    def mutate(raw):
        raw["register"]["gate_metric"] = "tuned_robust_accuracy"
        raw["register"]["guards"].append({"metric": "tuned_robust_accuracy_typos", "tolerance": 0.1})

    params = load_params(_write(tmp_path, mutate))
    assert params.gate_higher_is_better() and params.guard_higher_is_better(params.registry.guards[-1])
    assert params.evaluate.robustness.perturbations == ["shuffle_choices", "typos", "distractor"]


def test_a_cloze_template_needs_no_choices_list_when_the_answer_is_the_options_words(tmp_path):
    params = load_params(_write(tmp_path, lambda r: r["task"].update(user_template="Q: {question}\nA:",
                                                                       answer_format="text")))
    assert params.task.user_template == "Q: {question}\nA:"


def test_missing_params_file(tmp_path, capsys):
    with pytest.raises(ParamsError):
        load_params(tmp_path / "nope.yaml")
    assert "params file not found" in capsys.readouterr().err
