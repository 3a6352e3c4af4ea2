"""What each module of lmops imports, read from the source: the layer and DVC-deps rules.

The rules, which tests/unit/test_architecture.py checks:

* **Layers.** Every module belongs to the layer its package names (``lmops.core``,
  ``lmops.data``, ...) or to the base (``config``, ``errors``, ``io``); it may import only
  the layers :data:`ALLOWED` lists for its own.
* **Deps.** A DVC stage's ``deps`` list its script and every module of ``src/lmops`` the
  script imports, directly or through other modules, except the packages in
  :data:`CANNOT_CHANGE_OUTPUTS`: they record, report and orchestrate, and a stage's
  outputs are the same without them, so a change to them reruns nothing. The import
  is followed into a package's ``__init__.py`` when that file holds code.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

BASE = {"lmops.config", "lmops.errors", "lmops.io"}
LAYERS = ("core", "data", "pipeline", "tracking", "orchestrate")
# layer -> the layers its modules may import (the base is always allowed)
ALLOWED = {
    "base": set(),
    "core": {"core"},
    "data": {"data"},
    "pipeline": {"core", "data", "pipeline"},
    "tracking": {"core", "tracking"},
    "orchestrate": {"core", "data", "pipeline", "tracking", "orchestrate"},
    "cli": {*LAYERS, "cli"},
}
CANNOT_CHANGE_OUTPUTS = ("lmops.tracking", "lmops.orchestrate")


def module_path(module: str) -> Path:
    base = SRC.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[str]:
    return sorted(module_name(p) for p in (SRC / "lmops").rglob("*.py"))


def layer(module: str) -> str:
    if module in BASE or module == "lmops":
        return "base"
    if module in ("lmops.cli", "lmops.__main__"):
        return "cli"
    name = module.split(".")[1]
    if name not in LAYERS:
        raise ValueError(f"{module}: in no layer; put it in a layer's package or the base")
    return name


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.is_dir() or base.with_suffix(".py").is_file()


def imports(path: Path) -> set[str]:
    """The lmops modules ``path`` imports, anywhere in the file (lazy imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "lmops"
        ):
            for alias in node.names:  # `from lmops.core import model` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lmops"}
    return {m for m in found if _exists(m)}


def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _with_packages(module: str) -> set[str]:
    """``module`` and the packages above it whose ``__init__.py`` runs code."""
    parts = module.split(".")
    out = (
        {module}
        if module_path(module).name != "__init__.py" or _has_code(module_path(module))
        else set()
    )
    for i in range(2, len(parts)):  # lmops/__init__.py holds only the version
        pkg = ".".join(parts[:i])
        if _has_code(module_path(pkg)):
            out.add(pkg)
    return out


def output_closure(script: Path) -> set[str]:
    """The modules that can change what ``script`` writes (see the module docstring)."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        for module in imports(todo.pop()):
            if module.startswith(CANNOT_CHANGE_OUTPUTS):
                continue
            for m in _with_packages(module) - seen:
                seen.add(m)
                todo.append(module_path(m))
    return seen


def dep_path(module: str) -> str:
    return module_path(module).relative_to(SRC.parent).as_posix()
