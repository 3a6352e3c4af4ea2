"""Shared fixtures: an isolated MLflow store per test, the repo's paths, and a throwaway
git + DVC workspace on the tiny profile for tests that run the real `dvc` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The code under test is this tree's, also where the installed lmops is another checkout's
# (a git worktree sharing a virtualenv): here first, and (dvc_env) for the stage scripts
# that tests start as subprocesses.
sys.path.insert(0, str(REPO / "src"))

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_MININTERVAL", "5")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store: creating one costs seconds, copying it does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, mlflow_template):
    """Point MLflow at a fresh sqlite store in tmp_path and run the test from there."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lmops-test")
    for var in ("LMOPS_PARENT_RUN_ID", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def dvc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without MLflow/DVC/lmops settings (the workspace's own store is
    used unless ``extra`` names one), with this venv's tools first on PATH and this tree's
    ``src`` first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "LMOPS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["GX_ANALYTICS_ENABLED"] = "false"
    env.update(extra or {})
    return env


def dvc(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run the `dvc` CLI in ``root``; fails the test with its output if it fails."""
    out = subprocess.run(["dvc", *args], cwd=root, env=dvc_env(env), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def make_tiny_repo(root: Path) -> Path:
    """A fresh git + DVC repo in ``root`` holding the project's pipeline, code and the tiny
    profile as its params.yaml."""
    from lmops.config import load_profile

    shutil.copy(REPO / "dvc.yaml", root)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = load_profile(REPO / "params.tiny.yaml", REPO / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=dvc_env())
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
                   cwd=root, check=True)
    return root
