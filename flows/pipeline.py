"""The DVC pipeline as a Prefect flow: one task per stage, in dvc.yaml's DAG order.

Run once, with no server (Prefect starts a temporary local one):

    python flows/pipeline.py                          # every stage; DVC skips what is up to date
    python flows/pipeline.py --target tokenise        # one stage and what it needs
    python flows/pipeline.py -S vocab.vocab_size=4000 --experiment big-vocab   # a DVC experiment

Against a server: `prefect deploy --all` (prefect.yaml) and a worker; see
docs/orchestration.md. The logic lives in lmops.orchestrate; this file only adds
Prefect's tasks, retries, tags and artifacts: a link to the MLflow run, the run's
progress while it runs (`lmops-pipeline-progress`), and at the end the stage results and
metrics (`lmops-pipeline-metrics`, `lmops-pipeline-metrics-table`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from lmops.orchestrate import dag, progress, repro
from lmops.tracking import tags as tag

# DVC owns caching: a task never skips on Prefect's cache, every call asks `dvc repro`.
# Retries only for transient I/O (repro.retry_condition). flows/retrain.py uses these too.
TASK_OPTIONS = dict(
    retries=2,
    retry_delay_seconds=[20, 60],
    retry_condition_fn=repro.retry_condition,
    cache_policy=NO_CACHE,
    persist_result=False,
)


@task(name="dvc-repro-stage", **TASK_OPTIONS)
def run_stage(repo: str, stage: str, parent_run_id: str) -> repro.StageResult:
    logger = get_run_logger()
    return repro.repro_stage(repo, stage, parent_run_id, log=logger.info)


@task(name="dvc-status", **TASK_OPTIONS)
def check_up_to_date(repo: str, target: str | None) -> bool:
    return repro.up_to_date(repo, target)


@task(name="dvc-exp-run", **TASK_OPTIONS)
def run_experiment(
    repo: str,
    stages: list[str],
    target: str | None,
    params: list[str] | dict[str, Any] | None,
    experiment: str | None,
    parent_run_id: str,
) -> repro.RunResult:
    logger = get_run_logger()
    return repro.exp_run(repo, stages, target, params, experiment, parent_run_id, log=logger.info)


def follow(
    stages: list[str], logger: Any
) -> tuple[progress.PipelineProgress, progress.LatestSender[progress.Progress]]:
    """A progress artifact for this flow run, kept up to date from a thread of its own
    (a slow server never holds up a stage's output), and what follows the stages: it
    logs each stage's start and end, and updates the artifact when a stage starts or ends
    and, while a stage draws its progress bar, every PROGRESS_REPORT_SECONDS at most.
    Returns it and the sender to close."""
    artifact_id = create_progress_artifact(
        0.0,
        key="lmops-pipeline-progress",
        description=progress.Progress(tuple(stages), 0).describe(),
    )
    sender = progress.LatestSender(
        lambda p: update_progress_artifact(artifact_id, p.percent, description=p.describe()),
        on_error=lambda err: logger.warning("progress artifact not updated: %s", err),
    )
    return progress.PipelineProgress(stages, sender, log=logger.info), sender


@flow(name="lmops-pipeline")
def pipeline(
    repo: str = ".",
    target: str | None = None,
    params: list[str] | dict[str, Any] | None = None,
    experiment: str | None = None,
) -> dict[str, str]:
    """Run the DVC pipeline (or `target` and what it needs) under one MLflow parent run.

    Args:
        repo: the project checkout (the deployment's working directory by default).
        target: a dvc.yaml stage; only it and its upstream stages run.
        params: overrides as `dvc exp run -S` takes them: ["vocab.vocab_size=4000"] or
            {"vocab.vocab_size": 4000}. Given, the run is a DVC experiment.
        experiment: a DVC experiment name; the whole target runs as one `dvc exp run`.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    spec = dag.load_dvc_yaml(root)
    stages = dag.dag_order(spec, target)
    as_experiment = bool(params) or bool(experiment)
    logger.info(
        "stages in order: %s%s", ", ".join(stages), " (one dvc exp run)" if as_experiment else ""
    )
    tracker, sender = follow(stages, logger)
    parent_id, experiment_id = repro.start_parent_run(
        root,
        tags={
            "prefect.flow_run_id": runtime.flow_run.id,
            "prefect.flow_run_name": runtime.flow_run.name,
            "prefect.deployment": runtime.deployment.name,
            "prefect.flow_run_url": runtime.flow_run.ui_url,
            tag.TARGET: target,
            "dvc.exp_name": experiment,
        },
        params={
            "flow.target": target or "(all)",
            "flow.params": params or "",
            "flow.experiment": experiment or "",
        },
        name=experiment,
    )
    url = repro.run_url(root, experiment_id, parent_id)
    create_link_artifact(
        key="lmops-mlflow-run",
        link=url,
        link_text=f"MLflow run {parent_id}",
        description="The MLflow parent run of this flow run; each stage "
        "that ran is a nested run under it.",
    )
    results: list[repro.StageResult] = []
    status, error = "FAILED", None
    try:
        with repro.watching(tracker.output):  # every stage's output reaches the tracker
            if as_experiment:
                tags = sorted(
                    {t for s in stages for t in repro.stage_tags(s) if not t.startswith("stage:")}
                )
                run = run_experiment.with_options(tags=tags)(
                    str(root), stages, target, params, experiment, parent_id
                )
                results = run.stages
            elif check_up_to_date(str(root), target):
                logger.info("dvc status: every stage is up to date, nothing to run")
                results = [repro.StageResult(s, "skipped") for s in stages]
            else:
                for stage in stages:
                    tracker.start(stage)
                    results.append(repro.StageResult(stage, "failed"))
                    results[-1] = run_stage.with_options(
                        tags=repro.stage_tags(stage), task_run_name=f"dvc repro {stage}"
                    )(str(root), stage, parent_id)
                    tracker.end(stage, results[-1].status)
        status = "FINISHED"
    except BaseException as err:  # a cancellation's SIGTERM, Ctrl-C or a failed stage
        status, error = repro.failure(err)
        raise
    finally:
        done = {r.stage for r in results}
        results += [repro.StageResult(s, "not reached") for s in stages if s not in done]
        # the MLflow run first: a cancelled run's process has 30 s left
        repro.end_parent_run(root, parent_id, status, results, error)
        tracker.finish((r.stage, r.status) for r in results)  # logs the stages not logged yet
        tracker.close(status)
        sender.close(timeout=10)
        create_markdown_artifact(
            key="lmops-pipeline-metrics",
            markdown=(
                f"## lmops pipeline {status}\n\n"
                f"MLflow parent run: [{parent_id}]({url})\n\n"
                f"{repro.results_table(results)}\n"
                f"{repro.metrics_table(root, spec, stages, results)}"
            ),
            description="Stage results and the metrics files dvc.yaml declares.",
        )
        create_table_artifact(
            key="lmops-pipeline-metrics-table",
            table=[row._asdict() for row in repro.metrics_rows(root, spec, stages)],
            description="The metrics files dvc.yaml declares: one row per numeric metric "
            "(metric and value empty: the file is missing).",
        )
    return {"mlflow_run_id": parent_id, **{r.stage: r.status for r in results}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=".", help="the project checkout")
    p.add_argument("--target", help="run only this stage and what it needs")
    p.add_argument(
        "-S",
        "--set-param",
        action="append",
        dest="params",
        metavar="KEY=VALUE",
        help="a params override, as for `dvc exp run -S` (repeatable)",
    )
    p.add_argument("--experiment", help="run as this DVC experiment")
    p.add_argument(
        "--serve",
        metavar="NAME",
        help="instead of one run, serve the flow as deployment NAME (needs a server)",
    )
    args = p.parse_args(argv)
    if args.serve:
        pipeline.serve(name=args.serve, parameters={"repo": str(Path(args.repo).resolve())})
        return
    pipeline(repo=args.repo, target=args.target, params=args.params, experiment=args.experiment)


if __name__ == "__main__":
    main()
