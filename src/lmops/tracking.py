"""MLflow tracking: one parent run per pipeline execution, one nested run per stage.

How stages of one execution find their common parent run:

1. ``LMOPS_PARENT_RUN_ID`` (set by the Prefect flow, or by hand) names it.
2. Otherwise, under ``dvc repro`` / ``dvc exp run``, every stage is a child
   process of the same ``dvc`` process; its pid and start time form a key that
   the first stage stores as a tag on a new parent run and later stages look up.
3. A stage run on its own gets a parent run of its own.

The parent is marked FINISHED (or FAILED) after every stage, so the UI never
shows a run stuck in RUNNING once the pipeline stops, and the next stage
reopens it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from lmops.config import DEFAULT_PARAMS, flatten
from lmops.errors import DataError, LmopsError

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
PARENT_ENV = "LMOPS_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "lmops"
KEY_TAG = "lmops.pipeline_key"
DVC_ENV_TAGS = ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")
# the params file of this process (stage.run sets it from --params); params.yaml otherwise
_params_file: Path | None = None


def project_root() -> Path:
    """The DVC root: ``DVC_ROOT`` when DVC runs us, else the nearest dir with dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    return here


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store under mlruns/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    mlruns = project_root() / "mlruns"
    mlruns.mkdir(exist_ok=True)
    return f"sqlite:///{mlruns / 'mlflow.db'}"


def _is_default_store() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def setup() -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = experiment_name()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_default_store():
        location = (project_root() / "mlruns" / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
            text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _dvc_process_key() -> str | None:
    """pid and start time of the ``dvc`` process that runs this stage, if any."""
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(part).name == "dvc" for part in cmd[:2]) or (
                len(cmd) > 2 and cmd[1] == "-m" and cmd[2].startswith("dvc")
            ):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def base_tags() -> dict[str, str]:
    tags = {f"dvc.{k.removeprefix('DVC_').lower()}": os.environ[k]
            for k in DVC_ENV_TAGS if os.environ.get(k)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["DVC_EXP_NAME"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def _find_or_create_parent(client: Any, experiment_id: str) -> str:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_process_key()
    if key is not None:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{stamp}"
    tags = {**base_tags(), "lmops.kind": "pipeline"}
    if key is not None:
        tags[KEY_TAG] = key
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id


def is_worker_rank() -> bool:
    """True in a torchrun process other than rank 0: it trains but never tracks."""
    return int(os.environ.get("RANK", "0")) != 0


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Run a stage inside a nested MLflow run; failures are recorded, never left RUNNING.

    ``params`` are logged flattened with the stage name as prefix (``vocab.vocab_size``).
    Under torchrun only rank 0 opens a run; the other ranks get ``None``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if is_worker_rank():
        yield None
        return
    experiment_id = setup()
    client = MlflowClient()
    parent_id = _find_or_create_parent(client, experiment_id)
    client.update_run(parent_id, status="RUNNING")
    tags = {**base_tags(), "lmops.stage": stage, "lmops.kind": "stage"}
    status = "FAILED"
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags
    ) as run:
        try:
            if params:
                mlflow.log_params({f"{stage}.{k}": _param(v) for k, v in params.items()})
            log_pipeline_params(parent_id, client)
            log_run_files(parent_id, client)
            started = time.perf_counter()
            yield run
            mlflow.log_metric(f"{stage}/wall_seconds", time.perf_counter() - started)
            roll_up(client, run.info.run_id, parent_id)
            status = "FINISHED"
        except BaseException as err:
            mlflow.set_tag("lmops.error", f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            client.set_terminated(parent_id, status=status)


@contextlib.contextmanager
def using_params_file(path: str | Path | None) -> Iterator[None]:
    """The params file a stage runs with (``stage.run`` passes ``--params``)."""
    global _params_file
    before, _params_file = _params_file, (Path(path) if path else None)
    try:
        yield
    finally:
        _params_file = before


def params_file() -> Path:
    if _params_file is not None:
        return _params_file if _params_file.is_absolute() else Path.cwd() / _params_file
    return project_root() / DEFAULT_PARAMS


def log_run_files(run_id: str, client: Any = None, root: str | Path | None = None) -> None:
    """The params file and ``dvc.lock``, as artifacts of ``run_id``.

    A stage logs them to its parent as it starts (DVC has by then locked every stage
    before it); whoever ends a pipeline run logs them once more, complete.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    files = [params_file(), project_root() / "dvc.lock"] if root is None else [
        Path(root) / DEFAULT_PARAMS, Path(root) / "dvc.lock"]
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))


def _batches(client: Any, run_id: str, metrics: list, params: list) -> None:
    for lo in range(0, max(len(params), len(metrics)), 100):  # log_batch: 100 params a call
        client.log_batch(run_id, metrics=metrics[lo:lo + 100], params=params[lo:lo + 100])


def log_pipeline_params(run_id: str, client: Any = None) -> None:
    """Every param of the params file, resolved and flattened (``finetune.lr``), on ``run_id``.

    The pipeline run so holds the whole configuration whichever stages DVC reran, and two
    pipeline runs line up key by key in the MLflow compare view. A key the run already
    has with another value (a parent reused by hand across param changes) keeps its first
    value, with a warning: MLflow params cannot change.
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from lmops.config import load_params

    client = client or MlflowClient()
    if not params_file().is_file():  # a stage run outside a project
        return
    try:
        flat = flatten(load_params(params_file()))
    except LmopsError as err:  # the stage itself reports a bad params file
        warnings.warn(f"pipeline params not logged: {err}", stacklevel=2)
        return
    had = client.get_run(run_id).data.params
    wanted = {k: _param(v) for k, v in flat.items()}
    clashes = sorted(k for k, v in wanted.items() if k in had and had[k] != v)
    if clashes:
        warnings.warn(f"MLflow run {run_id} already has other values for {clashes}; "
                      "they keep their first values", stacklevel=2)
    _batches(client, run_id, [], [Param(k, v) for k, v in wanted.items() if k not in had])


def roll_up(client: Any, child_id: str, parent_id: str) -> None:
    """Copy a stage run's latest metrics onto the pipeline run.

    Their names carry the stage (``evaluate/bleu``), so in the MLflow UI's compare view
    the pipeline runs line up key by key; the curves stay on the stage runs.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in client.get_run(child_id).data.metrics.items()]
    _batches(client, parent_id, metrics, [])


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:6000]


def dvc_md5(path: str | Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for an output path, if it has one."""
    root = project_root()
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    rel = os.path.relpath(Path(path).resolve(), root)
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == rel:
                return out.get("md5")
    return None


def file_digest(path: str | Path) -> str:
    """md5 of a file, or of a directory's sorted (name, md5) listing."""
    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def digest(path: str | Path) -> str:
    """The DVC md5 of a tracked output, or our own md5 of anything else."""
    return dvc_md5(path) or file_digest(path)


def log_data_input(path: str | Path, name: str, context: str = "input") -> str:
    """Reference data by its DVC md5 (no copy): ``mlflow.log_input`` with that digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if not Path(path).exists():
        raise DataError(f"{path}: not found (run the stage that writes it: dvc repro)")
    md5 = digest(path)
    if mlflow.active_run() is None:
        return md5
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the URI is ambiguous.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    mlflow.log_input(MetaDataset(source=source, name=name, digest=md5), context=context)
    mlflow.set_tag(f"data.{name}.md5", md5)
    return md5


def log_stage_outputs(stage: str, metrics: dict[str, Any], model_dir: str | Path | None = None,
                      files: tuple[str | Path, ...] = ()) -> None:
    """Numeric metrics as ``<stage>/<name>``, string ones as tags, a model dir and files as
    artifacts, to the active stage run (nothing without one, e.g. on a torchrun worker)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    # a metric the training loop logged step by step keeps its history, not an extra point
    logged = mlflow.get_run(run.info.run_id).data.metrics
    flat = {k: v for k, v in flatten(metrics).items() if v is not None}
    mlflow.log_metrics({f"{stage}/{k}": float(v) for k, v in flat.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                        and f"{stage}/{k}" not in logged})
    for k, v in flat.items():
        if isinstance(v, str):
            mlflow.set_tag(f"{stage}.{k}", v[:5000])
    if model_dir is not None:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    for f in files:
        mlflow.log_artifact(str(f))

