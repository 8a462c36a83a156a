"""Nothing goes stale: every DVC stage lists, as deps, every project module that running it executes.

A stage's cmd `bin/stage <module>` runs `python -m pipeline.stages.<module>`; the modules that run are the
import closure of that module over the project's own packages (`pipeline`, `flows`), computed
here from the code with `ast` (so an import added later is caught): `import x`, `from x import y`
(y a name or a submodule), relative imports and imports anywhere in a module (inside functions, under
`if TYPE_CHECKING:`: counted too, a superset is safe), and the `__init__.py` of every package on the
way (importing `pipeline.x` runs `pipeline/__init__.py` and what it imports). A module missing from
the stage's deps means DVC would not rerun the stage after that module changed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.helpers.imports import PACKAGES, REPO, import_closure, imported_modules, module_file

STAGE_CMD = re.compile(r"^\s*(?:bin/stage\s+(?P<stage>[\w.]+)(?:\s+\S.*)?|\S*python\S*\s+-m\s+(?P<module>[\w.]+))\s*$")


def stage_module(name: str, stage: dict) -> str:
    match = STAGE_CMD.match(stage.get("cmd", "")) if isinstance(stage.get("cmd"), str) else None
    assert match, (f"dvc.yaml stage {name}: cmd {stage.get('cmd')!r} is neither `bin/stage <stage>` nor "
                   "`python -m <module>`; teach tests/stages/test_dvc_deps.py what it runs")
    module = f"pipeline.stages.{match['stage']}" if match["stage"] else match["module"]
    assert module_file(module) is not None, f"dvc.yaml stage {name}: runs {module}, which has no module file"
    return module


def dep_paths(stage: dict) -> list[str]:
    """The stage's deps as written (a dep may be a plain path or a one-key mapping path -> options)."""
    deps = []
    for dep in stage.get("deps") or []:
        deps.extend(dep if isinstance(dep, dict) else [dep])
    return [str(d) for d in deps]


# Every pipeline file: the root dvc.yaml and the real-data imports (data/real/dvc.yaml), whose paths are
# relative to their own directory (then to `wdir`).
DVC_FILES = (REPO / "dvc.yaml", REPO / "data/real/dvc.yaml")
STAGES = {(name if f.parent == REPO else f"{f.relative_to(REPO).as_posix()}:{name}"): stage | {"_dir": f.parent}
          for f in DVC_FILES for name, stage in yaml.safe_load(f.read_text(encoding="utf-8"))["stages"].items()}


def test_the_closure_follows_every_kind_of_import():
    """The walker itself: function-level, relative, aliased and submodule imports, and the package __init__."""
    closure = import_closure("pipeline.stages.evaluate")
    assert {"pipeline", "pipeline.env",  # the package __init__ and what it imports
            "pipeline.stages", "pipeline.stages.evaluate",  # the subpackage's __init__ too
            "pipeline.registry.read",  # imported inside a function
            "pipeline.config", "pipeline.errors"} <= set(closure)  # errors: run_cli imports it inside a function
    assert all(f.is_file() and REPO in f.parents for f in closure.values())
    source = ("from . import env\nfrom .config import run_cli\nfrom pipeline import data\n"
              "def f():\n    import pipeline.formats as fm\n")
    found = imported_modules("pipeline.probe", source)
    assert {"pipeline", "pipeline.env", "pipeline.config", "pipeline.data", "pipeline.formats"} <= found
    assert "pipeline.config.run_cli" not in found  # a name, not a submodule
    assert "pipeline.env" in imported_modules("pipeline", "from . import env\n", is_package=True)
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        imported_modules("pipeline.probe", "from .. import outside\n")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_list_every_module_it_imports(name):
    stage = STAGES[name]
    wdir = (stage["_dir"] / stage.get("wdir", ".")).resolve()
    deps = [(wdir / d).resolve() for d in dep_paths(stage) if "${" not in d]
    closure = import_closure(stage_module(name, stage))
    missing = sorted(f.relative_to(REPO).as_posix() for f in closure.values()
                     if not any(f == d or d in f.parents for d in deps))  # a listed directory covers its files
    assert not missing, (f"dvc.yaml stage {name}: deps miss {len(missing)} module(s) that `{stage['cmd']}` imports "
                         f"(DVC would not rerun it when they change): {', '.join(missing)}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_source_dep_exists(name):
    """The reverse: a dep that names project source (pipeline/, flows/, bin/ or a .py file) is a real path."""
    stage = STAGES[name]
    wdir = (stage["_dir"] / stage.get("wdir", ".")).resolve()
    source = [d for d in dep_paths(stage) if "${" not in d
              and (d.endswith(".py") or Path(d).parts[0] in (*PACKAGES, "bin"))]
    absent = [d for d in source if not (wdir / d).exists()]
    assert not absent, f"dvc.yaml stage {name}: source deps that do not exist: {', '.join(absent)}"
