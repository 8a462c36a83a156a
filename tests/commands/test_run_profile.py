"""`pipeline.commands.run_profile`: a params profile (params-real.yaml) reaches params exactly as `dvc exp run -S` would."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]




PROFILES = sorted(p.name for p in REPO.glob("params-*.yaml"))


def test_every_shipped_profile_is_tested():
    assert PROFILES == ["params-real-arc.yaml", "params-real-gemma-ko.yaml", "params-real-sciq.yaml",
                        "params-real.yaml"]


@pytest.mark.parametrize("name", PROFILES)
def test_the_real_profile_reaches_params_exactly_through_dvcs_override_parser(tmp_path, name):
    """`pipeline.commands.run_profile` turns a profile into `-S` overrides; DVC's own parser (what `dvc exp run -S`
    calls) applied to a copy of params.yaml gives exactly params.yaml merged with the profile, multi-line
    prompts included, and the result is valid params."""
    import shutil

    import yaml
    from dvc.utils.hydra import apply_overrides

    from pipeline.commands.run_profile import merged, overrides
    from pipeline.config import Params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    sets = overrides(REPO / name, tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", sets)
    applied = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    profile = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    assert applied == merged(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")), profile)
    params = Params.model_validate(applied)
    assert params.base.model in ("smollm2-135m-instruct", "gemma3-270m")
    assert params.registry.model_name != Params.model_validate(
        yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))).registry.model_name


def test_a_misspelt_profile_key_stops_before_anything_runs(tmp_path):
    from pipeline.commands.run_profile import overrides
    from pipeline.errors import DataError

    (tmp_path / "bad.yaml").write_text("sft:\n  max_stpes: 10\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.yaml: sft.max_stpes: Extra inputs are not permitted"):
        overrides(tmp_path / "bad.yaml", REPO / "params.yaml")


def test_a_profiles_recipe_carries_to_another_set_by_its_data_paths_alone(tmp_path):
    from pipeline.commands.run_profile import overrides
    from pipeline.errors import DataError

    sets = [f"data.{split}.path=data/real/openbookqa/{split}.jsonl" for split in ("train", "validation", "eval")]
    found = overrides(REPO / "params-real-sciq.yaml", REPO / "params.yaml", sets)
    for split in ("train", "validation", "eval"):
        assert f"data.{split}.path='data/real/openbookqa/{split}.jsonl'" in found
        assert f"data.{split}.path='data/real/sciq/{split}.jsonl'" not in found
    assert "sft.learning_rate=0.0005" in found and "data.train.format='mcq'" in found  # the rest of the recipe
    with pytest.raises(DataError, match="sft.max_stpes: Extra inputs"):
        overrides(REPO / "params-real-sciq.yaml", REPO / "params.yaml", ["sft.max_stpes=3"])
    with pytest.raises(DataError, match="expected key=value"):
        overrides(REPO / "params-real-sciq.yaml", REPO / "params.yaml", ["data.train.path"])
