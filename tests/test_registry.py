"""Champion/challenger in a real MLflow registry (sqlite), and the retraining flow's wiring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lmops import registry
from lmops.errors import LmopsError
from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_decide():
    assert registry.decide({"bleu": 1, "chrf": 1}, None) == (True, "no champion yet")
    champ = {"bleu": 20.0, "chrf": 50.0}
    assert registry.decide({"bleu": 21.0, "chrf": 49.5}, champ) == (
        True, "BLEU +1.00, chrF -0.50")
    assert registry.decide({"bleu": 19.0, "chrf": 55.0}, champ) == (
        False, "BLEU -1.00 (needs +0.00 or more)")
    assert registry.decide({"bleu": 25.0, "chrf": 48.0}, champ) == (
        False, "chrF drops by 2.00 (more than 1.0)")
    assert not registry.decide({"bleu": 20.4, "chrf": 50.0}, champ, min_bleu_gain=0.5)[0]


def test_the_candidate_paths_come_from_dvc_yaml(tmp_path):
    args = registry.cmd_args(SPEC, "evaluate")
    assert args["model"] == "data/models/finetune" and args["vocab"] == "data/vocab"
    with pytest.raises(LmopsError, match="data/models/finetune: not found"):
        registry.candidate(tmp_path, SPEC)


def _workspace(root: Path, weights: bytes, bleu: float, chrf: float) -> None:
    args = registry.cmd_args(SPEC, "evaluate")
    model, vocab, metrics = (root / args[k] for k in ("model", "vocab", "metrics"))
    model.mkdir(parents=True, exist_ok=True)
    vocab.mkdir(parents=True, exist_ok=True)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    (model / "model.safetensors").write_bytes(weights)
    (vocab / "meta.json").write_text('{"vocab_size": 600}')
    metrics.write_text(json.dumps({"bleu": bleu, "chrf": chrf, "bleu_signature": "nrefs:1"}))


def _parent_run() -> str:
    from mlflow.tracking import MlflowClient

    from lmops import tracking

    return MlflowClient().create_run(tracking.setup()).info.run_id


def test_champion_and_challenger(mlflow_store, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = registry.MODEL_NAME
    aliases = lambda: client.get_registered_model(name).aliases  # noqa: E731

    _workspace(tmp_path, b"v1", bleu=10.0, chrf=30.0)
    first = registry.champion_challenger(tmp_path, SPEC, _parent_run())
    assert first["action"] == "promoted" and first["reason"] == "no champion yet"
    assert aliases() == {"champion": 1}
    v1 = client.get_model_version(name, "1")
    assert v1.tags["metric.bleu"] == "10.0" and v1.tags[registry.MD5_TAG]

    # the pipeline rebuilt the same model: nothing new is registered
    again = registry.champion_challenger(tmp_path, SPEC, _parent_run())
    assert again["action"] == "unchanged"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    _workspace(tmp_path, b"v2", bleu=9.0, chrf=31.0)
    worse = registry.champion_challenger(tmp_path, SPEC, _parent_run())
    assert worse["action"] == "kept champion" and worse["challenger"] == "2"
    assert aliases() == {"champion": 1, "challenger": 2}

    _workspace(tmp_path, b"v3", bleu=12.0, chrf=30.5)
    better = registry.champion_challenger(tmp_path, SPEC, _parent_run())
    assert better["action"] == "promoted" and better["reason"] == "BLEU +2.00, chrF +0.50"
    assert aliases() == {"champion": 3, "previous": 1}

    # the champion downloads by alias: a pyfunc model holding the model directory and
    # its vocabulary
    got = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion",
                                                   dst_path=str(tmp_path / "dl")))
    assert (got / "artifacts/model/model.safetensors").read_bytes() == b"v3"
    assert (got / "artifacts/vocab/meta.json").is_file()
    assert "python_function" in (got / "MLmodel").read_text()


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_retrain_flow_registers_what_the_pipeline_evaluated(prefect_harness, mlflow_store,
                                                                 tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "flows"))
    try:
        import retrain as retrain_flow
    finally:
        sys.path.remove(str(REPO / "flows"))
    from prefect import flow

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(SPEC))
    calls = []

    @flow
    def fake_pipeline(repo, target, params):
        calls.append((target, params))
        _workspace(Path(repo), b"weights", bleu=5.0, chrf=20.0)
        return {"mlflow_run_id": _parent_run()}

    monkeypatch.setattr(retrain_flow, "pipeline", fake_pipeline)
    decision = retrain_flow.retrain(repo=str(tmp_path), params=["seed=1"])
    assert calls == [("evaluate", ["seed=1"])]
    assert decision["action"] == "promoted" and decision["champion"] == "1"
