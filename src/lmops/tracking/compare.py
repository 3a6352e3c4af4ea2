"""Pipeline runs side by side: ``lmops compare``.

A pipeline run is its MLflow parent run and the stage runs nested under it. The parent
holds the whole params file flattened (``finetune.lr``, ``model.n_layer``) whichever
stages DVC reran; metrics are named ``<stage>/<name>`` (``evaluate/bleu``) in every run
and are read from the parent and its stage runs, so one key means the same thing in
every run. The table has one column per run and
one row per key; by default only the keys whose values differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmops.errors import LmopsError
from lmops.tracking import runs as tracking
from lmops.tracking import tags as tag

# values that change on every run, hidden unless asked for: they would make every row differ
VOLATILE_SUFFIXES = (
    "/wall_seconds",
    "/decode_seconds",
    "/ms_per_sentence",
    "/tok_s",
    "/tokens_per_sec",
    "/seconds",
)


@dataclass
class RunSummary:
    run_id: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    # what each stage ran on (device, precision, compile, CPU, GPUs): explains speed and
    # last digits; from the stage runs' lmops.hardware.* tags, as <stage>.hardware.<key>
    hardware: dict[str, str] = field(default_factory=dict)


def summarise(run_id: str, client: Any = None) -> RunSummary:
    """A pipeline run's params and latest metrics, its own and its nested stage runs'."""
    client = client or tracking.client()
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise LmopsError(f"MLflow run {run_id}: not found ({err.error_code})") from None
    out = RunSummary(
        run_id,
        run.info.run_name or run_id,
        dict(run.data.params),
        dict(run.data.metrics),
        dict(run.data.tags),
    )
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    # the pipeline run holds the whole params file, whichever stages ran; runs logged
    # before it did have only their stages' params
    own_params = bool(out.params)
    for child in children:
        # a stage that ran twice under one parent (a retry): the later run wins
        if not own_params:
            out.params.update(child.data.params)
        out.metrics.update(child.data.metrics)
        stage = child.data.tags.get(tag.STAGE)
        out.hardware.update(
            {
                f"{stage}.hardware.{k.removeprefix(tracking.HARDWARE_TAG)}": v
                for k, v in child.data.tags.items()
                if stage and k.startswith(tracking.HARDWARE_TAG)
            }
        )
        if stage and stage not in out.stages:
            out.stages.append(stage)
    return out


def recent_runs(n: int, experiment: str | None = None, client: Any = None) -> list[str]:
    """Ids of the last ``n`` pipeline (parent) runs of the experiment, newest first."""
    client = client or tracking.client()
    exp_id = tracking.setup() if experiment is None else None
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise LmopsError(f"MLflow experiment {experiment!r}: not found")
        exp_id = exp.experiment_id
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tag.KIND}` = '{tag.KIND_PIPELINE}'",
        order_by=["attributes.start_time DESC"],
        max_results=n,
    )
    return [r.info.run_id for r in runs]


def _same(values: Sequence[Any]) -> bool:
    first = values[0]
    for v in values[1:]:
        if isinstance(first, float) and isinstance(v, float):
            if not (first == v or (math.isnan(first) and math.isnan(v))):
                return False
        elif v != first:
            return False
    return True


def table(
    runs: Sequence[RunSummary], all_rows: bool = False, volatile: bool = False
) -> list[tuple[str, str, list[Any]]]:
    """Rows ``(kind, key, values per run)``: params, hardware, then metrics, sorted by key.

    A key a run lacks (its stage did not run) is ``None`` there and counts as differing.
    """
    rows: list[tuple[str, str, list[Any]]] = []
    for kind, attr in (("param", "params"), ("hardware", "hardware"), ("metric", "metrics")):
        keys = sorted(set().union(*(getattr(r, attr) for r in runs)))
        for key in keys:
            if kind == "metric" and not volatile and key.endswith(VOLATILE_SUFFIXES):
                continue
            values = [getattr(r, attr).get(key) for r in runs]
            if all_rows or len(runs) < 2 or not _same(values):
                rows.append((kind, key, values))
    return rows


def format_value(value: Any, width: int | None = 40) -> str:
    """A metric or param for a table: floats to 4 significant digits, None as "-", text
    cut to ``width`` characters (None: never cut)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def render(runs: Sequence[RunSummary], rows: Sequence[tuple[str, str, list[Any]]]) -> str:
    """A plain-text table: one column per run."""
    header = ["", *[f"{r.name} ({r.run_id[:8]})" for r in runs]]
    body = [[key, *[format_value(v) for v in values]] for _, key, values in rows]
    stages = ["stages", *[",".join(r.stages) or "-" for r in runs]]
    commits = ["git.commit", *[r.tags.get("git.commit", "-")[:10] for r in runs]]
    lines = [header, commits, stages, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        text.append("(no differing params or metrics; --all shows every row)")
    return "\n".join(text)


def compare(
    run_ids: Sequence[str] = (),
    last: int = 2,
    experiment: str | None = None,
    all_rows: bool = False,
    volatile: bool = False,
) -> str:
    """The comparison table of the given runs, or of the last ``last`` pipeline runs."""
    client = tracking.client()
    ids = list(run_ids) or recent_runs(last, experiment, client)
    if not ids:
        raise LmopsError(
            f"no pipeline runs in MLflow at {tracking.tracking_uri()} "
            f"(experiment {experiment or tracking.experiment_name()!r})"
        )
    runs = [summarise(i, client) for i in ids]
    return render(runs, table(runs, all_rows, volatile))
