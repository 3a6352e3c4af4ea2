"""Scheduled retraining: rebuild when the source data changed, then champion/challenger.

    python flows/retrain.py                      # once, on Prefect's temporary server
    python flows/retrain.py --force              # even if the source data is unchanged
    prefect deploy --all                         # nightly (prefect.yaml, docs/orchestration.md)

A digest of the raw corpora is compared with the last completed retraining's; unchanged
data records a skipped run and stops. Otherwise the pipeline runs up to evaluate as a
DVC experiment, the evaluated translator becomes a `challenger` version of the registered
model, and it takes the `champion` alias only if data validation passed, test BLEU rose
by `retrain.min_bleu_gain` and no perplexity rose by more than `retrain.max_ppl_increase`
(params.yaml), the champion evaluated again on the same test set. The logic lives in
lmops.orchestrate.retrain.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

# flows/ is on sys.path: Prefect and python both put it there
from pipeline import TASK_OPTIONS, pipeline
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from lmops.config import load_params
from lmops.orchestrate import retrain as rt
from lmops.tracking import registry


@task(name="source-digest", **TASK_OPTIONS)
def source_digest(repo: str) -> str:
    return rt.source_digest(load_params(Path(repo) / "params.yaml").clean)


@task(name="champion-challenger", **TASK_OPTIONS)
def champion_challenger(repo: str, run_id: str, digest: str) -> dict[str, Any]:
    decision = rt.champion_challenger(
        repo, run_id, digest, extra_tags={"prefect.flow_run_id": str(runtime.flow_run.id)}
    )
    get_run_logger().info("%s: %s", decision["action"], decision["reason"])
    return decision


def _report(decision: dict[str, Any]) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in decision.items())
    create_markdown_artifact(
        key="lmops-retrain-decision",
        markdown=f"## Retraining: {decision['action']}\n\n| | |\n|---|---|\n{rows}\n",
        description="What this retraining run did, and why.",
    )


@flow(name="lmops-retrain")
def retrain(
    repo: str = ".", params: list[str] | dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Retrain if the source data changed; register the challenger, promote it if it wins.

    Args:
        repo: the project checkout.
        params: overrides for this run (`dvc exp run -S`); a run with overrides always runs.
        force: run even if the source data is unchanged since the last retraining.
    """
    logger = get_run_logger()
    root = str(Path(repo).resolve())
    digest = source_digest(root)
    last = rt.last_completed(root)
    if (
        last is not None
        and not force
        and not params
        and last.data.tags.get(rt.DIGEST_TAG) == digest
    ):
        decision = rt.record_skip(
            root, digest, last, {"prefect.flow_run_id": str(runtime.flow_run.id)}
        )
        logger.info("skipped: %s", decision["reason"])
        _report(decision)
        return decision
    run = pipeline(
        repo=root,
        target=registry.EVALUATE_STAGE,
        params=params,
        experiment=time.strftime("retrain-%Y%m%d-%H%M%S"),
    )
    decision = {
        **champion_challenger(root, run["mlflow_run_id"], digest),
        "mlflow_run_id": run["mlflow_run_id"],
    }
    _report(decision)
    return decision


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=".")
    p.add_argument(
        "-S",
        "--set-param",
        action="append",
        dest="params",
        metavar="KEY=VALUE",
        help="a params override for this run, as for `dvc exp run -S` (repeatable)",
    )
    p.add_argument(
        "--force", action="store_true", help="retrain even if the source data is unchanged"
    )
    args = p.parse_args(argv)
    retrain(repo=args.repo, params=args.params, force=args.force)


if __name__ == "__main__":
    main()
