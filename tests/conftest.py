"""Shared fixtures: an isolated MLflow store per test, the repo's paths, and a throwaway
git + DVC workspace on the tiny profile for tests that run the real `dvc` CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.support import workspace

REPO = Path(__file__).resolve().parents[1]

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
    """This environment without MLflow/DVC/Prefect/lmops settings (the workspace's own store
    is used unless ``extra`` names one), with this venv's tools first on PATH."""
    return workspace.clean_env(**(extra or {}))


def dvc(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run the `dvc` CLI in ``root``; fails the test with its output if it fails."""
    out = subprocess.run(
        ["dvc", *args], cwd=root, env=dvc_env(env), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def make_tiny_repo(root: Path) -> Path:
    """A fresh git + DVC repo in ``root`` holding the project's pipeline, code and the tiny
    profile as its params.yaml."""
    return workspace.make(root, "params.tiny.yaml", source=REPO)


@pytest.fixture
def flow_repo(tmp_path) -> Path:
    """A git + DVC repo with the project's pipeline, flows, prefect.yaml and tiny params."""
    return workspace.make(tmp_path / "repo", "params.tiny.yaml", source=REPO)


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1 with its own home and database; stopped after."""
    with workspace.prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as env:
        yield {
            **env,
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
