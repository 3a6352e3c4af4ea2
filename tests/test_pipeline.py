"""The real `dvc` CLI on a tiny profile: data stages build, cache, rerun narrowly, track."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmops.config import load_profile
from tests.conftest import REPO

DATA_STAGES = ["clean", "validate", "vocab", "tokenise"]
pytestmark = pytest.mark.slow


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "LMOPS_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GX_ANALYTICS_ENABLED"] = "false"
    return env


def dvc(root: Path, *args: str) -> str:
    out = subprocess.run(["dvc", *args], cwd=root, env=_env(root), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding the project's pipeline and the tiny profile."""
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copy(REPO / "dvc.yaml", root)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = load_profile(REPO / "params.tiny.yaml", REPO / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, env=_env(root))
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
                   cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def first_run(repo) -> str:
    return dvc(repo, "repro", "tokenise")


def test_data_stages_build(repo, first_run):
    assert ran(first_run) == DATA_STAGES
    for split in ("mono_train", "mono_valid", "mono_test",
                  "parallel_train", "parallel_valid", "parallel_test"):
        assert (repo / "data/clean" / f"{split}.parquet").is_file()
    assert (repo / "data/validate/index.html").is_file()
    meta = json.loads((repo / "data/vocab/meta.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert meta["vocab_size"] == params["vocab"]["vocab_size"]
    sidecar = json.loads((repo / "data/tokens/pretrain_train.json").read_text())
    assert (repo / "data/tokens/pretrain_train.bin").stat().st_size == (
        sidecar["length"] * (2 if sidecar["dtype"] == "uint16" else 4))
    clean = json.loads((repo / "data/metrics/clean.json").read_text())
    for split in ("mono_train", "parallel_train", "parallel_test"):
        rows = len(pd.read_parquet(repo / "data/clean" / f"{split}.parquet"))
        assert rows > 0 and clean[f"{split}.rows"] == rows
    assert clean["leaked.total"] == 0
    metrics = dvc(repo, "metrics", "show", "--json")
    assert "data/metrics/tokenise.json" in metrics


def test_stages_are_nested_runs_of_one_pipeline_run(repo, first_run):
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlruns/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("lmops")
    parents = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    stages = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'stage'")
    assert sorted(r.data.tags["lmops.stage"] for r in stages) == sorted(DATA_STAGES)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()
    for run in stages:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dvc.stage"] == run.data.tags["lmops.stage"]
        assert run.data.tags["git.commit"] == commit
        assert run.data.metrics[f"{run.data.tags['lmops.stage']}/wall_seconds"] > 0
    vocab = next(r for r in stages if r.data.tags["lmops.stage"] == "vocab")
    assert vocab.data.params["vocab.vocab_size"] == str(
        yaml.safe_load((repo / "params.yaml").read_text())["vocab"]["vocab_size"])
    artifacts = [a.path for a in client.list_artifacts(vocab.info.run_id, "vocab")]
    assert any(p.endswith("spm.model") for p in artifacts)


def test_second_repro_does_nothing(repo, first_run):
    out = dvc(repo, "repro", "tokenise")
    assert ran(out) == []
    assert "up to date" in out or "didn't change" in out
    assert "changed" not in dvc(repo, "status")


def test_one_param_reruns_only_what_reads_it(repo, first_run):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["vocab"]["vocab_size"] += 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(repo, "repro", "tokenise")
    assert ran(out) == ["vocab", "tokenise"]
    meta = json.loads((repo / "data/vocab/meta.json").read_text())
    assert meta["vocab_size"] == params["vocab"]["vocab_size"]
