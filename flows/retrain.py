"""Scheduled retraining: rebuild up to evaluate, then champion/challenger in the registry.

    python flows/retrain.py                      # once, on Prefect's temporary server
    prefect deploy --all                         # nightly, see prefect.yaml and the README

The pipeline flow runs first (DVC reruns only what new data or code changed); the
evaluated translator becomes a new version of `lmops-translator` with the alias
`challenger`, and takes the alias `champion` if it beats the current one on the held-out
test set (lmops.registry.decide). A rerun that produced the champion's model again
registers nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import pipeline  # flows/ is on sys.path: Prefect and python both put it there
from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lmops import orchestrate as orch
from lmops import registry


@task(name="champion-challenger", retries=2, retry_delay_seconds=[20, 60],
      retry_condition_fn=orch.retry_condition, cache_policy=NO_CACHE, persist_result=False)
def champion_challenger(repo: str, run_id: str, model_name: str, min_bleu_gain: float,
                        max_chrf_drop: float) -> dict[str, Any]:
    decision = registry.champion_challenger(
        repo, orch.load_dvc_yaml(repo), run_id, model_name, min_bleu_gain, max_chrf_drop,
        extra_tags={"prefect.flow_run_id": str(runtime.flow_run.id)})
    get_run_logger().info("%s: %s", decision["action"], decision["reason"])
    return decision


@flow(name="lmops-retrain")
def retrain(repo: str = ".", params: list[str] | dict[str, Any] | None = None,
            model_name: str = registry.MODEL_NAME, min_bleu_gain: float = 0.0,
            max_chrf_drop: float = 1.0) -> dict[str, Any]:
    """Retrain and evaluate, register the challenger, promote it if it wins.

    Args:
        repo: the project checkout.
        params: overrides for the retraining run (then a DVC experiment), as in the pipeline.
        model_name: the registered model.
        min_bleu_gain: BLEU the challenger must gain over the champion to replace it.
        max_chrf_drop: the most chrF it may lose while doing so.
    """
    run = pipeline(repo=repo, target=registry.EVALUATE_STAGE, params=params)
    decision = champion_challenger(repo, run["mlflow_run_id"], model_name, min_bleu_gain,
                                   max_chrf_drop)
    rows = "\n".join(f"| {k} | {v} |" for k, v in decision.items())
    create_markdown_artifact(
        key="lmops-retrain-decision",
        markdown=f"## {model_name}: {decision['action']}\n\n| | |\n|---|---|\n{rows}\n",
        description="Champion/challenger decision of this retraining run.")
    return decision


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=".")
    p.add_argument("-S", "--set-param", action="append", dest="params", metavar="KEY=VALUE")
    p.add_argument("--min-bleu-gain", type=float, default=0.0)
    p.add_argument("--max-chrf-drop", type=float, default=1.0)
    args = p.parse_args(argv)
    retrain(repo=args.repo, params=args.params, min_bleu_gain=args.min_bleu_gain,
            max_chrf_drop=args.max_chrf_drop)


if __name__ == "__main__":
    main()
