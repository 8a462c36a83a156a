"""The project modules that importing a module runs, computed from the code with `ast`.

Counted: `import x`, `from x import y` (y a name or a submodule), relative imports and imports anywhere in a
module (inside functions, under `if TYPE_CHECKING:`: a superset is safe), and the `__init__.py` of every
package on the way (importing `pipeline.x` runs `pipeline/__init__.py` and what it imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "flows")


def module_file(name: str) -> Path | None:
    """The file that importing module `name` runs, for the project's own modules; None for others."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = REPO.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def with_parents(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module first imports every package above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(name: str, source: str, is_package: bool = False, filename: str = "<source>") -> set[str]:
    """Every module (project or not) an import statement anywhere in module `name`'s source may import."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                assert anchor, f"{filename}:{node.lineno}: relative import beyond the top-level package"
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            found.update(with_parents(base))
            for alias in node.names:  # `from pkg import sub` imports pkg.sub when it is a module
                if alias.name != "*" and module_file(f"{base}.{alias.name}") is not None:
                    found.add(f"{base}.{alias.name}")
    return found


def import_closure(module: str) -> dict[str, Path]:
    """Project module name -> file, for everything importing `module` runs."""
    seen: dict[str, Path] = {}
    todo = with_parents(module)
    while todo:
        name = todo.pop()
        file = module_file(name)
        if name in seen or file is None:
            continue
        seen[name] = file
        todo.extend(imported_modules(name, file.read_text(encoding="utf-8"), file.name == "__init__.py", str(file)))
    return seen
