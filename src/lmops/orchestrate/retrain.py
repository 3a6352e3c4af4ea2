"""Scheduled retraining: skip when the source data is unchanged, promote a better model.

flows/retrain.py wires these steps into a Prefect flow:

1. ``source_digest`` of the raw corpora ``clean.sources`` names, compared with the digest
   of the last completed retraining (``last_completed``); equal means nothing to learn,
   and the skip is recorded as a run of its own (``record_skip``).
2. The pipeline runs up to ``evaluate`` as a DVC experiment.
3. ``champion_challenger`` registers the evaluated model (the challenger), evaluates the
   registered champion again on the same held-out test set and text, and moves the
   ``champion`` alias only if ``decide`` says so: data validation passed, test BLEU rose
   by ``retrain.min_bleu_gain`` and no language's perplexity rose by more than
   ``retrain.max_ppl_increase``. The decision and its reason become tags and metrics of
   the pipeline's MLflow parent run.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmops.config import CleanConfig, Params, RetrainConfig, SourceConfig, load_params
from lmops.core.checkpoint import sha256
from lmops.data import sources
from lmops.errors import DataError, LmopsError
from lmops.orchestrate.dag import load_dvc_yaml
from lmops.orchestrate.repro import in_dir
from lmops.tracking import registry
from lmops.tracking import runs as tracking
from lmops.tracking import tags as tag

DIGEST_TAG = tag.SOURCE_DIGEST
ACTION_TAG = tag.RETRAIN_ACTION
REASON_TAG = tag.RETRAIN_REASON
DONE_TAG = tag.RETRAIN_DONE
VALIDATE_STAGE = "validate"


# ----------------------------------------------------------------- source data


def _hub_revision(src: SourceConfig) -> str:
    """The commit a hub dataset's main branch is at now (needs the network)."""
    assert src.dataset is not None  # SourceConfig requires it for type hub
    try:
        from huggingface_hub import HfApi

        return str(HfApi().dataset_info(src.dataset).sha)
    except Exception as err:  # offline, unknown dataset, auth: all end the same way
        raise DataError(
            f"clean.sources[{src.name}]: cannot read the revision of hub "
            f"dataset {src.dataset!r}: {type(err).__name__}: {err}"
        ) from None


def _source_identity(src: SourceConfig) -> list[str]:
    if src.type == "embedded":
        assert src.dataset is not None
        return [sha256(sources.embedded_path(src.dataset))]
    if src.type == "hub":
        return [_hub_revision(src)]
    out = []
    for path in sources.source_files(src):
        if not path.is_file():
            raise DataError(f"{path}: not found (clean.sources[{src.name}])")
        out.append(sha256(path))
    return out


def source_digest(cfg: CleanConfig) -> str:
    """sha256 over each source's settings and the bytes of its files (embedded corpora
    too); a hub dataset counts by its current revision."""
    h = hashlib.sha256()
    for src in cfg.sources:
        h.update(json.dumps(src.model_dump(), sort_keys=True).encode())
        for ident in _source_identity(src):
            h.update(ident.encode())
    return h.hexdigest()


def last_completed(root: str | Path) -> Any | None:
    """The latest pipeline run whose retraining reached a decision, or None."""
    with in_dir(root):
        client, experiment_id = tracking.client_and_experiment()
        runs = client.search_runs(
            [experiment_id],
            f"tags.`{DONE_TAG}` = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    return runs[0] if runs else None


def record_skip(
    root: str | Path, digest: str, last: Any, extra_tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A finished MLflow run that says why this retraining did nothing."""
    reason = f"source data unchanged since run {last.info.run_id} (digest {digest[:12]})"
    with in_dir(root):
        client, experiment_id = tracking.client_and_experiment()
        run = client.create_run(
            experiment_id,
            run_name="retrain-skipped",
            tags={
                **tracking.base_tags(),
                tag.KIND: tag.KIND_RETRAIN,
                ACTION_TAG: "skipped",
                REASON_TAG: reason,
                DIGEST_TAG: digest,
                **(extra_tags or {}),
            },
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    return {
        "action": "skipped",
        "reason": reason,
        "mlflow_run_id": run.info.run_id,
        "last_run": last.info.run_id,
    }


# -------------------------------------------------------------------- decision


def validation_passed(root: Path, dvc_yaml: Mapping[str, Any]) -> tuple[bool, str]:
    """Did the data checks of this workspace pass? Read from the validate stage's summary."""
    rel = registry.cmd_args(dvc_yaml, VALIDATE_STAGE).get("summary")
    if rel is None:
        raise LmopsError(f"dvc.yaml: stage {VALIDATE_STAGE!r} has no --summary file")
    path = root / rel
    if not path.is_file():
        return False, f"{rel}: no data validation summary"
    summary = json.loads(path.read_text(encoding="utf-8"))
    if summary.get("success") is not True:
        return False, (
            f"data validation failed ({summary.get('failed', '?')} of "
            f"{summary.get('evaluated', '?')} expectations, see {rel})"
        )
    return True, "data validation passed"


def decide(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    validated: tuple[bool, str],
    cfg: RetrainConfig,
) -> tuple[bool, str]:
    """Promote the challenger? Both metric sets come from the same test set and text.

    Perplexity compares per byte (``bpb_<lang>``), so a new vocabulary compares fairly.
    """
    ok, why = validated
    if not ok:
        return False, why
    if champion is None:
        return True, "no champion yet"
    for key in sorted(k for k in challenger if k.startswith("bpb_") and k in champion):
        rise = 2.0 ** (float(challenger[key]) - float(champion[key])) - 1.0
        if rise > cfg.max_ppl_increase:
            return False, (
                f"perplexity ({key.removeprefix('bpb_')}) {rise:+.1%} over the "
                f"champion's (tolerance {cfg.max_ppl_increase:.1%})"
            )
    gain = float(challenger["bleu"]) - float(champion["bleu"])
    if not math.isfinite(gain) or gain < cfg.min_bleu_gain:
        return False, f"BLEU {gain:+.2f} (needs {cfg.min_bleu_gain:+.2f} or more)"
    return True, f"BLEU {gain:+.2f}, perplexity within {cfg.max_ppl_increase:.1%}"


def _find_dir(root: Path, marker: str, what: str) -> Path:
    found = sorted(p.parent for p in root.rglob(marker))
    if not found:
        raise LmopsError(f"{root}: the registered model has no {what} ({marker})")
    return found[0]


def evaluate_version(
    version: Any, root: Path, dvc_yaml: Mapping[str, Any], params: Params
) -> dict[str, Any]:
    """Score a registered version on this workspace's test set and held-out text, with
    the workspace's evaluation settings: the same yardstick as the challenger."""
    from lmops.pipeline.evaluate import evaluate

    args = registry.cmd_args(dvc_yaml, registry.EVALUATE_STAGE)
    with tempfile.TemporaryDirectory(prefix="lmops-champion-") as tmp:
        got = registry.download(version, tmp)
        model_dir = _find_dir(got, "manifest.json", "model weights")
        vocab_dir = _find_dir(got, "spm.model", "vocabulary")
        metrics, _ = evaluate(
            model_dir,
            vocab_dir,
            root / args["clean"],
            root / args["tokens"],
            params.evaluate,
            params.clean.target_lang,
            Path(tmp) / "eval",
        )
    return metrics


def _log_decision(
    run_id: str,
    decision: Mapping[str, Any],
    digest: str,
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
) -> None:
    client, _ = tracking.client_and_experiment()
    for key, value in {
        ACTION_TAG: decision["action"],
        REASON_TAG: decision["reason"],
        DIGEST_TAG: digest,
        DONE_TAG: "true",
    }.items():
        client.set_tag(run_id, key, value)
    for prefix, metrics in (("challenger", challenger), ("champion", champion or {})):
        for key in ("bleu", "chrf", *sorted(k for k in metrics if k.startswith("bpb_"))):
            if key in metrics:
                client.log_metric(run_id, f"retrain/{prefix}_{key}", float(metrics[key]))


def champion_challenger(
    root: str | Path, run_id: str, digest: str, extra_tags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Register the workspace's evaluated translator and promote it if it wins; the
    decision is recorded on ``run_id`` (the pipeline's MLflow parent run)."""
    root = Path(root).resolve()
    dvc_yaml = load_dvc_yaml(root)
    params = load_params(root / "params.yaml")
    cfg = params.retrain
    cand = registry.candidate(root, dvc_yaml)
    with in_dir(root):
        champ = registry.version_by_alias(cfg.model_name, registry.CHAMPION)
        md5 = tracking.digest(cand.model_dir)
        if champ is not None and champ.tags.get(registry.MD5_TAG) == md5:
            decision: dict[str, Any] = {
                "action": "unchanged",
                "champion": str(champ.version),
                "reason": "the pipeline produced the champion's model again",
            }
            _log_decision(run_id, decision, digest, cand.metrics, None)
            return decision
        validated = validation_passed(root, dvc_yaml)
        champ_metrics = (
            evaluate_version(champ, root, dvc_yaml, params)
            if champ is not None and validated[0]
            else None
        )
        ok, reason = decide(cand.metrics, champ_metrics, validated, cfg)
        version = registry.register(cand, run_id, cfg.model_name, extra_tags)
        if ok:
            registry.promote(cfg.model_name, str(version.version))
        decision = {
            "action": "promoted" if ok else "kept champion",
            "challenger": str(version.version),
            "champion": (
                str(version.version) if ok else str(champ.version) if champ is not None else None
            ),
            "reason": reason,
            "challenger_bleu": cand.metrics.get("bleu"),
            "champion_bleu": (champ_metrics or {}).get("bleu"),
        }
        _log_decision(run_id, decision, digest, cand.metrics, champ_metrics)
    return decision
