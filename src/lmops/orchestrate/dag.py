"""The pipeline's DAG as ``dvc.yaml`` declares it: stage order, what a change reruns,
which files hold each stage's metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lmops.errors import LmopsError

# Stages that train a model and want an accelerator: the flows tag them "gpu". The only
# list of them; a test checks every name is a stage of dvc.yaml.
ACCELERATOR_STAGES = frozenset({"pretrain", "finetune", "distil"})


# ------------------------------------------------------------------------- the DAG


def load_dvc_yaml(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        raise LmopsError(f"{path}: not found (run from the project root or pass repo=)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _paths(entries: Iterable[Any] | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose items are a str or ``{path: opts}``."""
    out: list[str] = []
    for item in entries or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return [str(PurePosixPath(p)) for p in out]


def stage_deps(stage: Mapping[str, Any]) -> list[str]:
    return _paths(stage.get("deps"))


def stage_outputs(stage: Mapping[str, Any]) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in _paths(stage.get(key))]


def _overlaps(a: str, b: str) -> bool:
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def producers(dvc_yaml: Mapping[str, Any], path: str) -> set[str]:
    """The stages with an output that ``path`` is, holds or is in."""
    stages = dvc_yaml.get("stages") or {}
    return {
        name
        for name, spec in stages.items()
        if any(_overlaps(path, o) for o in stage_outputs(spec))
    }


def stage_graph(dvc_yaml: Mapping[str, Any]) -> dict[str, set[str]]:
    """Each stage's upstream stages: those with an output that a dep of it is, holds or is in."""
    stages = dvc_yaml.get("stages") or {}
    for name, spec in stages.items():
        if "foreach" in spec or "matrix" in spec:
            raise LmopsError(f"dvc.yaml: stage {name!r} uses foreach/matrix, not supported here")
    return {
        name: set().union(*(producers(dvc_yaml, d) for d in stage_deps(spec))) - {name}
        for name, spec in stages.items()
    }


def dag_order(dvc_yaml: Mapping[str, Any], target: str | None = None) -> list[str]:
    """Stages in an order DVC could run them (ties kept in dvc.yaml's order).

    With ``target``, only it and the stages it needs, like ``dvc repro <target>``.
    """
    graph = stage_graph(dvc_yaml)
    if target is not None:
        if target not in graph:
            raise LmopsError(f"unknown stage {target!r}; dvc.yaml has: {', '.join(graph)}")
        keep, todo = set(), [target]
        while todo:
            stage = todo.pop()
            if stage not in keep:
                keep.add(stage)
                todo.extend(graph[stage])
        graph = {s: up & keep for s, up in graph.items() if s in keep}
    position = {name: i for i, name in enumerate(dvc_yaml.get("stages") or {})}
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(graph):
        ready = [s for s, up in graph.items() if s not in done and up <= done]
        if not ready:
            cycle = sorted(set(graph) - done)
            raise LmopsError(f"dvc.yaml: the stages {', '.join(cycle)} form a cycle")
        stage = min(ready, key=position.__getitem__)
        order.append(stage)
        done.add(stage)
    return order


def _reads_param(spec: Mapping[str, Any], key: str) -> bool:
    """Whether a stage's ``params:`` (of params.yaml) include the dotted ``key``."""
    return any(
        isinstance(name, str)
        and (key == name or key.startswith(f"{name}.") or name.startswith(f"{key}."))
        for name in spec.get("params") or []
    )


def stages_to_run(
    root: str | Path, target: str | None = None, params_changed: Iterable[str] = ()
) -> list[str]:
    """The stages ``dvc repro`` would run: those ``dvc status`` reports changed, those
    that read one of ``params_changed`` (dotted keys a profile would set), and all that
    follow them (their inputs are about to change), in DAG order."""
    spec = load_dvc_yaml(root)
    order = dag_order(spec, target)
    beside = Path(sys.executable).with_name("dvc")  # this environment's dvc, activated or not
    dvc = str(beside) if beside.is_file() else "dvc"
    out = subprocess.run(
        [dvc, "status", "--json", *(["--with-deps", target] if target else [])],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise LmopsError(f"dvc status failed: {(out.stderr or out.stdout).strip()[-500:]}")
    changed = {name.split(":")[-1] for name in json.loads(out.stdout or "{}")}
    stages = spec.get("stages") or {}
    changed |= {name for name in order for key in params_changed if _reads_param(stages[name], key)}
    graph = stage_graph(spec)
    run: set[str] = set()
    for stage in order:
        if stage in changed or graph[stage] & run:
            run.add(stage)
    return [s for s in order if s in run]


# ----------------------------------------------------------------------- metrics


def metrics_files(
    dvc_yaml: Mapping[str, Any], stages: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """The metrics files each stage that declares any declares in dvc.yaml."""
    from lmops.tracking.runs import metrics_declared

    wanted = set(stages) if stages is not None else None
    return {
        name: files
        for name, files in metrics_declared(dvc_yaml).items()
        if files and (wanted is None or name in wanted)
    }
