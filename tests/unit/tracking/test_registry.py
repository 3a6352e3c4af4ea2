"""Champion/challenger in a real MLflow registry (sqlite), and the retraining flow's wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmops.config import ModelConfig
from lmops.core.model import Transformer
from lmops.core.translation import save_model
from lmops.errors import LmopsError
from lmops.tracking import registry
from tests.conftest import REPO

SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_the_candidate_paths_come_from_dvc_yaml(tmp_path):
    args = registry.cmd_args(SPEC, "evaluate")
    assert args["model"] == "data/models/finetune" and args["vocab"] == "data/vocab"
    with pytest.raises(LmopsError, match="data/models/finetune: not found"):
        registry.candidate(tmp_path, SPEC)


def _workspace(root: Path, seed: int, bleu: float, chrf: float) -> None:
    """A workspace after evaluate: a real (tiny, random) model directory, which registering
    loads for its ONNX export, a vocabulary stand-in and the metrics."""
    args = registry.cmd_args(SPEC, "evaluate")
    model, vocab, metrics = (root / args[k] for k in ("model", "vocab", "metrics"))
    vocab.mkdir(parents=True, exist_ok=True)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tiny = Transformer(ModelConfig(n_layer=1, n_embd=16, n_head=1, block_size=16), 600)
    save_model(tiny, model, {"target_lang": "fr"})
    (vocab / "meta.json").write_text('{"vocab_size": 600}')
    metrics.write_text(json.dumps({"bleu": bleu, "chrf": chrf, "bleu_signature": "nrefs:1"}))


def _parent_run() -> str:
    from mlflow.tracking import MlflowClient

    from lmops.tracking import runs as tracking

    return MlflowClient().create_run(tracking.setup()).info.run_id


def test_register_and_promote(mlflow_store, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = registry.MODEL_NAME
    aliases = lambda: client.get_registered_model(name).aliases  # noqa: E731

    _workspace(tmp_path, 1, bleu=10.0, chrf=30.0)
    v1 = registry.register(registry.candidate(tmp_path, SPEC), _parent_run())
    assert str(v1.version) == "1" and aliases() == {"challenger": 1}
    assert v1.tags["metric.bleu"] == "10.0" and v1.tags[registry.MD5_TAG]
    registry.promote(name, "1")
    assert aliases() == {"champion": 1}
    assert str(registry.version_by_alias(name, "champion").version) == "1"

    _workspace(tmp_path, 2, bleu=12.0, chrf=30.5)
    v2 = registry.register(registry.candidate(tmp_path, SPEC), _parent_run())
    assert v2.tags[registry.MD5_TAG] != v1.tags[registry.MD5_TAG]
    assert aliases() == {"champion": 1, "challenger": 2}
    registry.promote(name, "2")
    assert aliases() == {"champion": 2, "previous": 1}

    # the champion downloads by alias: a pyfunc model holding the model directory and
    # its vocabulary
    got = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}@champion", dst_path=str(tmp_path / "dl")
        )
    )
    weights = tmp_path / registry.cmd_args(SPEC, "evaluate")["model"] / "model.safetensors"
    assert (got / "artifacts/model/model.safetensors").read_bytes() == weights.read_bytes()
    assert (got / "artifacts/onnx/model.onnx").is_file()
    assert (got / "artifacts/vocab/meta.json").is_file()
    assert "python_function" in (got / "MLmodel").read_text()
