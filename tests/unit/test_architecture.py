"""The package's layers and the DVC deps rule (tests/support/imports.py states both)."""

from __future__ import annotations

import ast

import pytest
import yaml

from tests.conftest import REPO
from tests.support import imports

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("module", imports.all_modules())
def test_each_module_imports_only_the_layers_below_it(module):
    own = imports.layer(module)
    for dep in imports.imports(imports.module_path(module)):
        theirs = imports.layer(dep)
        assert theirs == "base" or theirs in imports.ALLOWED[own], (
            f"{module} ({own}) imports {dep} ({theirs}); {own} may import only "
            f"{sorted(imports.ALLOWED[own]) + ['base']}"
        )


def _third_party(module: str) -> set[str]:
    tree = ast.parse(imports.module_path(module).read_text())
    names = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    return names | {
        n.module.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }


@pytest.mark.parametrize("module", imports.all_modules())
def test_mlflow_is_imported_only_by_tracking_and_prefect_by_no_module(module):
    """One MLflow layer; Prefect stays in flows/, DVC's CLI is run, never imported."""
    found = _third_party(module)
    if imports.layer(module) != "tracking":
        assert "mlflow" not in found, f"{module} imports mlflow: go through lmops.tracking"
    assert not found & {"prefect", "dvc"}, f"{module} imports {found & {'prefect', 'dvc'}}"


def test_the_rule_leaves_tracking_and_orchestration_out_of_every_stage():
    """The rule has teeth: every stage script imports tracking, none of it is a dep."""
    for name in STAGES:
        script = REPO / "stages" / f"{name}.py"
        assert any(m.startswith("lmops.tracking") for m in imports.imports(script)), name
        assert not any(
            m.startswith(imports.CANNOT_CHANGE_OUTPUTS) for m in imports.output_closure(script)
        ), name


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_the_modules_that_can_change_its_outputs(name):
    stage = STAGES[name]
    assert f"stages/{name}.py" in stage["deps"]
    listed = {d for d in stage["deps"] if d.startswith("src/")}
    wanted = {imports.dep_path(m) for m in imports.output_closure(REPO / "stages" / f"{name}.py")}
    assert wanted - listed == set(), f"{name}: can be changed by, but does not list"
    assert listed - wanted == set(), f"{name}: lists what cannot change its outputs"
