"""Pipeline runs side by side: ``lmops compare``.

A pipeline run is its MLflow parent run and the stage runs nested under it. The parent
holds the whole params file flattened (``finetune.lr``, ``model.n_layer``) and the metrics
of the whole pipeline state, whichever stages DVC reran (those it did not rerun come from
their metrics files: :func:`lmops.tracking.runs.inherit_metrics`); metrics are named
``<stage>/<name>`` (``evaluate/bleu``) in every run and are read from the parent and its
stage runs, so one key means the same thing in every run. The table has one column per
run and one row per key: the headline figures (:data:`HEADLINE_METRICS`) first, then the
params that differ; every other row with ``--all``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from lmops.errors import LmopsError
from lmops.tracking import runs as tracking
from lmops.tracking import tags as tag
from lmops.tracking.system import is_system_metric

# The figures a comparison opens with, in this order, whether or not they differ: the
# translator's quality (BLEU, chrF, perplexity and bits per byte per language), what the
# distilled student keeps and its size, the shipped int8 model's cost in BLEU, its size and
# its speed-up, and the training stages' wall time. Patterns (fnmatch) over metric keys,
# as the stages log them (data/metrics/<stage>.json, flattened).
HEADLINE_METRICS = (
    "evaluate/bleu",
    "evaluate/chrf",
    "evaluate/ppl_*",
    "evaluate/bpb_*",
    "distil/bleu",
    "distil/chrf",
    "distil/bleu_retained",
    "distil/param_ratio",
    "quantise/shipped_bleu_delta",
    "quantise/shipped_size_ratio",
    "quantise/*.file_mb",
    "quantise/shipped_speedup_b*",
    "pretrain/wall_seconds",
    "finetune/wall_seconds",
    "distil/wall_seconds",
)

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
    # the stages it did not rerun: their hardware, from their metrics files
    inherited = set(out.tags.get(tag.STAGES_INHERITED, "").split(","))
    for key, value in out.tags.items():
        stage, _, name = key.removeprefix(tracking.HARDWARE_TAG).partition(".")
        if key.startswith(tracking.HARDWARE_TAG) and stage in inherited and name:
            out.hardware[f"{stage}.hardware.{name}"] = value
    # the pipeline run holds the whole params file, whichever stages ran; runs logged
    # before it did have only their stages' params
    own_params = bool(out.params)
    for child in children:
        # a stage that ran twice under one parent (a retry): the later run wins
        if not own_params:
            out.params.update(child.data.params)
        # a stage's own figures; its system use (system/...) is per run, not the pipeline's
        out.metrics.update({k: v for k, v in child.data.metrics.items() if not is_system_metric(k)})
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


def headline(keys: Iterable[str]) -> list[str]:
    """The headline metrics among ``keys``, in :data:`HEADLINE_METRICS` order (the keys of
    one pattern sorted)."""
    keys = set(keys)
    out: list[str] = []
    for pattern in HEADLINE_METRICS:
        out += sorted(k for k in keys if fnmatchcase(k, pattern) and k not in out)
    return out


def table(
    runs: Sequence[RunSummary], all_rows: bool = False, volatile: bool = False
) -> list[tuple[str, str, list[Any]]]:
    """Rows ``(kind, key, values per run)``: the headline metrics (:func:`headline`), every
    one a run has, equal or not; then the params and the hardware that differ (every one
    with ``all_rows``, or for a single run), sorted by key; then, with ``all_rows``, every
    other metric. Timing metrics other than the headline's only with ``volatile``, and
    then those that differ even without ``all_rows``.

    A key a run lacks (its stage never ran, or failed) is ``None`` there and counts as
    differing.
    """
    all_rows = all_rows or len(runs) < 2
    metric_keys = set().union(*(r.metrics for r in runs))
    top = headline(metric_keys)
    rows = [("metric", key, [r.metrics.get(key) for r in runs]) for key in top]
    for kind, attr in (("param", "params"), ("hardware", "hardware"), ("metric", "metrics")):
        for key in sorted(set().union(*(getattr(r, attr) for r in runs)) - set(top)):
            timing = kind == "metric" and key.endswith(VOLATILE_SUFFIXES)
            if (timing and not volatile) or (kind == "metric" and not (all_rows or timing)):
                continue
            values = [getattr(r, attr).get(key) for r in runs]
            if all_rows or not _same(values):
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
    stages = ["reran", *[",".join(r.stages) or "-" for r in runs]]
    inherited = ["inherited", *[r.tags.get(tag.STAGES_INHERITED) or "-" for r in runs]]
    commits = ["git.commit", *[r.tags.get("git.commit", "-")[:10] for r in runs]]
    lines = [header, commits, stages, inherited, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        text.append("(no headline metrics and no differing params; --all shows every row)")
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
