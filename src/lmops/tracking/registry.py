"""The MLflow model registry entry of the translator: champion and challenger.

A retraining run (lmops.orchestrate.retrain) registers the fine-tuned model it evaluated (the model
directory and its vocabulary, as artifacts of the pipeline's parent run) as a new version
of ``lmops-translator`` with the alias ``challenger``, and promotes it to ``champion``
when it beats the current one. A version is a pyfunc model (:mod:`lmops.tracking.serving`):
``mlflow models serve -m models:/lmops-translator@champion`` answers translation
requests, ``mlflow.pyfunc.load_model`` translates in Python.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmops.errors import LmopsError
from lmops.tracking import runs as tracking

MODEL_NAME = "lmops-translator"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
MD5_TAG = "lmops.model_md5"
TRANSLATOR = "translator"  # the logged model's name in its run
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
    return {
        w[2:]: v
        for w, v in zip(words, words[1:], strict=False)
        if w.startswith("--") and not v.startswith("--")
    }


def candidate(root: str | Path, dvc_yaml: Mapping[str, Any]) -> Candidate:
    """The evaluated translator in the workspace: model dir, vocab dir, test metrics."""
    args = cmd_args(dvc_yaml, EVALUATE_STAGE)
    root = Path(root)
    paths = {k: root / args[k] for k in ("model", "vocab", "metrics")}
    for key, path in paths.items():
        if not path.exists():
            raise LmopsError(
                f"{args[key]}: not found (run the pipeline up to {EVALUATE_STAGE} first)"
            )
    metrics = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    return Candidate(paths["model"], paths["vocab"], metrics)


def version_by_alias(name: str, alias: str) -> Any | None:
    """The version ``alias`` points at, or None (no such model or alias yet)."""
    client = tracking.client()
    found = client.search_registered_models(filter_string=f"name = '{name}'")
    if not found or alias not in found[0].aliases:
        return None
    return client.get_model_version(name, found[0].aliases[alias])


def register(
    cand: Candidate,
    run_id: str,
    name: str = MODEL_NAME,
    extra_tags: Mapping[str, str] | None = None,
) -> Any:
    """Log the translator to ``run_id`` as a pyfunc model (see :mod:`lmops.tracking.serving`) and
    register it as a version of ``name`` with the alias ``challenger``; test metrics and
    the model's md5 become version tags. The run also gets the final params file and
    ``dvc.lock``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from lmops.tracking import serving

    client = tracking.client()
    try:
        client.create_registered_model(
            name,
            description="English->French translator: a pyfunc taking a 'source' "
            "column, returning a 'translation' column",
        )
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    md5 = tracking.digest(cand.model_dir)
    tags = {
        MD5_TAG: md5,
        **{
            f"metric.{k}": str(v)
            for k, v in cand.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        **(extra_tags or {}),
    }
    target_lang, decode, limits = _evaluated_settings()
    with _resumed(run_id):
        info = serving.log_translator(
            cand.model_dir,
            cand.vocab_dir,
            name=TRANSLATOR,
            target_lang=target_lang,
            decode=decode,
            metadata={MD5_TAG: md5},
            limits=limits,
        )
    tracking.log_run_files(run_id, client)
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def _evaluated_settings() -> tuple[str | None, Any, Any]:
    """Target language and decode settings the candidate was evaluated with (the params
    file), so the served model decodes as it was scored, and the request bounds it is
    served with; defaults without one."""
    from lmops.config import EvaluateConfig, ServeConfig, load_params

    path = tracking.params_file()
    if not path.is_file():
        return None, EvaluateConfig().decode, ServeConfig()
    params = load_params(path)
    return params.clean.target_lang, params.evaluate.decode, params.serve


@contextlib.contextmanager
def _resumed(run_id: str) -> Iterator[Any]:
    """``run_id`` as the active run (reopened if it ended; it ends as it was)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    status = MlflowClient().get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
        yield run
    if status != "RUNNING":
        MlflowClient().set_terminated(run_id, status=status)


def promote(name: str, version: str) -> None:
    """``champion`` moves to ``version``; the one it leaves keeps the alias ``previous``."""
    client = tracking.client()
    old = version_by_alias(name, CHAMPION)
    if old is not None and str(old.version) != str(version):
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.delete_registered_model_alias(name, CHALLENGER)


def download(version: Any, dst: str | Path) -> Path:
    """A registered model version's files, downloaded into ``dst``."""
    import mlflow

    return Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{version.name}/{version.version}", dst_path=str(dst)
        )
    )
