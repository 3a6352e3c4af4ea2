"""The MLflow model registry entry of the translator: champion and challenger.

A retraining run (lmops.retrain) registers the fine-tuned model it evaluated (the model
directory and its vocabulary, as artifacts of the pipeline's parent run) as a new version
of ``lmops-translator`` with the alias ``challenger``, and promotes it to ``champion``
when it beats the current one (``models:/lmops-translator@champion`` downloads it).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmops import tracking
from lmops.errors import LmopsError

MODEL_NAME = "lmops-translator"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
MD5_TAG = "lmops.model_md5"
# the stage whose outputs are the candidate: its cmd line names the model, vocab, metrics
EVALUATE_STAGE = "evaluate"


@dataclass(frozen=True)
class Candidate:
    model_dir: Path
    vocab_dir: Path
    metrics: dict[str, Any]


def cmd_args(dvc_yaml: Mapping[str, Any], stage: str) -> dict[str, str]:
    """``--flag value`` pairs of a stage's cmd in dvc.yaml (so paths live there only)."""
    spec = (dvc_yaml.get("stages") or {}).get(stage)
    if spec is None:
        raise LmopsError(f"dvc.yaml has no stage {stage!r}")
    words = shlex.split(" ".join(spec["cmd"]) if isinstance(spec["cmd"], list) else spec["cmd"])
    return {w[2:]: v for w, v in zip(words, words[1:], strict=False)
            if w.startswith("--") and not v.startswith("--")}


def candidate(root: str | Path, dvc_yaml: Mapping[str, Any]) -> Candidate:
    """The evaluated translator in the workspace: model dir, vocab dir, test metrics."""
    args = cmd_args(dvc_yaml, EVALUATE_STAGE)
    root = Path(root)
    paths = {k: root / args[k] for k in ("model", "vocab", "metrics")}
    for key, path in paths.items():
        if not path.exists():
            raise LmopsError(f"{args[key]}: not found (run the pipeline up to "
                             f"{EVALUATE_STAGE} first)")
    metrics = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    return Candidate(paths["model"], paths["vocab"], metrics)


def _client():
    from mlflow.tracking import MlflowClient

    tracking.setup()
    return MlflowClient()


def version_by_alias(name: str, alias: str) -> Any | None:
    """The version ``alias`` points at, or None (no such model or alias yet)."""
    client = _client()
    found = client.search_registered_models(filter_string=f"name = '{name}'")
    if not found or alias not in found[0].aliases:
        return None
    return client.get_model_version(name, found[0].aliases[alias])


def register(cand: Candidate, run_id: str, name: str = MODEL_NAME,
             extra_tags: Mapping[str, str] | None = None) -> Any:
    """Log the model and vocab to ``run_id`` and register them as a version of ``name``
    with the alias ``challenger``; test metrics and the model's md5 become version tags."""
    from mlflow.exceptions import MlflowException

    client = _client()
    client.log_artifacts(run_id, str(cand.model_dir), "translator/model")
    client.log_artifacts(run_id, str(cand.vocab_dir), "translator/vocab")
    try:
        client.create_registered_model(
            name, description="English->French translator (data/models/finetune + data/vocab)")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    md5 = tracking.dvc_md5(cand.model_dir) or tracking.file_digest(cand.model_dir)
    tags = {MD5_TAG: md5, **{f"metric.{k}": str(v) for k, v in cand.metrics.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)},
            **(extra_tags or {})}
    source = f"{client.get_run(run_id).info.artifact_uri}/translator"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def promote(name: str, version: str) -> None:
    """``champion`` moves to ``version``; the one it leaves keeps the alias ``previous``."""
    client = _client()
    old = version_by_alias(name, CHAMPION)
    if old is not None and str(old.version) != str(version):
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.delete_registered_model_alias(name, CHALLENGER)
