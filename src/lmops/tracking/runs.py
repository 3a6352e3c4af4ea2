"""MLflow tracking: one parent run per pipeline execution, one nested run per stage.

How stages of one execution find their common parent run:

1. ``LMOPS_PARENT_RUN_ID`` (set by the Prefect flow, or by hand) names it.
2. Otherwise, under ``dvc repro`` / ``dvc exp run``, every stage is a child
   process of the same ``dvc`` process; its pid and start time form a key that
   the first stage stores as a tag on a new parent run and later stages look up.
3. A stage run on its own gets a parent run of its own.

The parent is marked FINISHED (or FAILED, or KILLED) after every stage, so the UI never
shows a run stuck in RUNNING once the pipeline stops, and the next stage
reopens it. A stage stopped by Ctrl-C or SIGTERM ends both runs as KILLED. One killed
with SIGKILL cannot: every run records its host, pid and process start time, and
:func:`reconcile` (run at each pipeline start) ends the runs whose process is gone.

A tracking server that does not answer when a stage starts stops the stage at once, before
it reads or writes anything (:func:`setup`). One that goes away while a stage runs does
not stop it: everything the stage logs goes through :mod:`lmops.tracking.buffer`, which
keeps what the server does not take and sends it when the server answers again, or leaves
it in ``mlruns/spool/`` for ``lmops tracking sync`` (:func:`sync`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from lmops.config import DEFAULT_PARAMS, flatten
from lmops.errors import DataError, LmopsError, stop_reason
from lmops.io import file_digest
from lmops.tracking import buffer as tracking_buffer
from lmops.tracking import tags as tag
from lmops.tracking.buffer import SPOOL_DIR, RunBuffer, TrackingServerError, unreachable_reason
from lmops.tracking.redact import redact

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
PARENT_ENV = "LMOPS_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "lmops"
KEY_TAG = tag.PIPELINE_KEY
HARDWARE_TAG = tag.HARDWARE
DVC_ENV_TAGS = ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")
# the params file of this process (stage.run sets it from --params); params.yaml otherwise
_params_file: Path | None = None
# the buffer of the stage run in progress (stage_run sets it)
_buffer: RunBuffer | None = None


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


def check_server(uri: str | None = None) -> None:
    """Fail at once, with one line naming the URI (credentials masked), when the tracking
    URI is an http(s) server that does not answer; MLflow's own retries would wait minutes."""
    tracking_buffer.check_server(uri or tracking_uri())


def _no_url_printing(uri: str) -> None:
    # MLflow prints each ended run's URL, built on the tracking URI, credentials included
    if redact(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def setup() -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    A tracking server that does not answer raises :class:`TrackingServerError` first.
    """
    uri = tracking_uri()
    check_server(uri)
    _no_url_printing(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
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
            ["git", "rev-parse", "HEAD"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _dvc_process() -> psutil.Process | None:
    """The ``dvc`` process that runs this stage, if any."""
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            if any(Path(part).name == "dvc" for part in cmd[:2]) or (
                len(cmd) > 2 and cmd[1] == "-m" and cmd[2].startswith("dvc")
            ):
                return proc
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def _dvc_process_key(proc: psutil.Process) -> str:
    """The key that ties the stage runs of one ``dvc`` process: its pid and start."""
    return f"dvc-{proc.pid}-{start_stamp(proc)}"


def start_stamp(proc: psutil.Process) -> str:
    """When ``proc`` started, as a value that stays the same for as long as it runs.

    On Linux it is the kernel's own count, clock ticks since boot (``/proc/PID/stat``).
    psutil's ``create_time()`` adds the boot time to it, which the kernel derives from the
    wall clock: when the clock is adjusted (NTP), every process seems to have started that
    much earlier or later, seen here as 2 s within one ``dvc repro``. Elsewhere the OS keeps
    the start time itself, and ``create_time()`` is that.
    """
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return f"{proc.create_time():.2f}"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name


def process_tags(proc: psutil.Process | None = None) -> dict[str, str]:
    """Where a run's process runs (this process by default): host, pid and start time."""
    proc = proc or psutil.Process()
    return {
        tag.HOST: socket.gethostname(),
        tag.PID: str(proc.pid),
        tag.PID_START: f"{proc.create_time():.2f}",
        tag.PID_STAMP: start_stamp(proc),
    }


def base_tags() -> dict[str, str]:
    tags = {
        f"dvc.{k.removeprefix('DVC_').lower()}": os.environ[k]
        for k in DVC_ENV_TAGS
        if os.environ.get(k)
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["DVC_EXP_NAME"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def client_and_experiment() -> tuple[Any, str]:
    """The one MLflow client factory: a client on this project's store and the experiment's
    id (``setup`` runs first: it sets the URI the client reads)."""
    from mlflow.tracking import MlflowClient

    experiment_id = setup()
    return MlflowClient(), experiment_id


def client() -> Any:
    """An MLflow client on this project's store (:func:`client_and_experiment`)."""
    return client_and_experiment()[0]


OUTPUT_ARTIFACT = "output.log"


def log_stage_output(parent_id: str, stage: str | None, path: Path) -> str | None:
    """Log the file ``path``, a stage's whole output, as ``output.log`` of ``stage``'s
    newest run under the pipeline run ``parent_id`` (``stage`` None: of the pipeline run
    itself). Returns that run's id; None, logging nothing, when the stage has no run there
    (DVC found it up to date) or there is no file."""
    if not Path(path).is_file():
        return None
    c, experiment_id = client_and_experiment()
    run_id: str | None = parent_id
    if stage is not None:
        runs = c.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{tag.STAGE}` = '{stage}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / OUTPUT_ARTIFACT
        shutil.copyfile(path, named)
        c.log_artifact(run_id, str(named))
    return run_id


def create_pipeline_run(
    client: Any,
    experiment_id: str,
    name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    owner: psutil.Process | None = None,
) -> str:
    """The one place a pipeline's parent run is made (the stage runs nest under it): by a
    flow before its first stage, or by the first stage of a plain ``dvc repro``.

    ``owner`` is the process the pipeline run lives as long as (this one by default; the
    ``dvc`` process under ``dvc repro``). Runs of this experiment whose process vanished
    are ended first (:func:`reconcile`).
    """
    with _secondary("runs whose process vanished could not be reconciled"):
        reconcile(client, experiment_id)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    all_tags = {
        **base_tags(),
        **process_tags(owner),
        tag.KIND: tag.KIND_PIPELINE,
        **{k: str(v) for k, v in (tags or {}).items() if v is not None},
    }
    run = client.create_run(experiment_id, run_name=name or f"pipeline-{stamp}", tags=all_tags)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def _find_or_create_parent(client: Any, experiment_id: str) -> str:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    dvc = _dvc_process()
    key = _dvc_process_key(dvc) if dvc is not None else None
    if key is not None:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
    return create_pipeline_run(
        client, experiment_id, os.environ.get("DVC_EXP_NAME"), {KEY_TAG: key}, owner=dvc
    )


def is_worker_rank() -> bool:
    """True in a torchrun process other than rank 0: it trains but never tracks."""
    return int(os.environ.get("RANK", "0")) != 0


def _start_stage_run(stage: str) -> tuple[Any, Any, str]:
    """Open (or reopen) the parent run and start the stage's nested run: (run, client, parent).

    A server that stops answering here, before the stage has done anything, stops it like
    one that did not answer at all.
    """
    experiment_id = setup()
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        parent_id = _find_or_create_parent(client, experiment_id)
        client.update_run(parent_id, status="RUNNING")
        tags = {**base_tags(), **process_tags(), tag.STAGE: stage, tag.KIND: tag.KIND_STAGE}
        run = mlflow.start_run(  # system metrics: through the stage's buffer (stage_run)
            experiment_id=experiment_id,
            run_name=stage,
            parent_run_id=parent_id,
            tags=tags,
            log_system_metrics=False,
        )
    except Exception as err:
        reason = unreachable_reason(err)
        if reason is None:
            raise
        raise TrackingServerError(
            tracking_buffer.unreachable_message(tracking_uri(), reason)
        ) from None
    return run, client, parent_id


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Run a stage inside a nested MLflow run; failures are recorded, never left RUNNING.

    ``params`` are logged flattened with the stage name as prefix (``vocab.vocab_size``).
    Under torchrun only rank 0 opens a run; the other ranks get ``None``. Everything logged
    through this module (and the training loop) while the run is active goes through a
    :class:`~lmops.tracking.buffer.RunBuffer`: a server lost mid-run costs no metric.
    The system metrics (CPU, memory, disk, GPU: :mod:`lmops.tracking.system`) are sampled
    while the run lasts and go through it too; sampling stops before the run ends.
    """
    global _buffer

    if is_worker_rank():
        yield None
        return
    with tracking_buffer.fail_fast_http():
        run, client, parent_id = _start_stage_run(stage)
        from lmops.tracking import system  # imports MLflow

        run_id = run.info.run_id
        buffer = RunBuffer(run_id, client, project_root() / SPOOL_DIR, tracking_uri())
        outer, _buffer = _buffer, buffer
        ends_pipeline = _ends_pipeline_run()
        status = "FAILED"
        monitor = None
        try:
            monitor = system.start(buffer)
            if params:
                buffer.log_params({f"{stage}.{k}": _param(v) for k, v in params.items()})
            log_pipeline_params(parent_id, client, buffer=buffer)
            log_run_files(parent_id, client, buffer=buffer)
            started = time.perf_counter()
            yield run
            system.stop(monitor)
            if f"{stage}/wall_seconds" not in buffer.latest_metrics():  # the stage's own stands
                buffer.log_metrics({f"{stage}/wall_seconds": time.perf_counter() - started})
            roll_up(client, run_id, parent_id, buffer, result_keys(project_root(), stage))
            if ends_pipeline:
                with _secondary(f"pipeline run {parent_id} lacks the stages not rerun"):
                    _inherit_under_dvc(client, run, parent_id, stage, buffer)
            status = "FINISHED"
        except BaseException as err:
            # a second Ctrl-C only cuts short the wait for the last system metrics point
            with (
                _secondary("system metrics could not be stopped"),
                contextlib.suppress(KeyboardInterrupt),
            ):
                system.stop(monitor)
            # Ctrl-C, or SIGTERM/SIGHUP under lmops.errors.stop_on_signals
            if isinstance(err, KeyboardInterrupt):
                status, error = "KILLED", stop_reason(err)
            else:
                error = redact(f"{type(err).__name__}: {err}")[:5000]
            with _secondary("the failure could not be recorded in MLflow"):
                buffer.set_tags({tag.ERROR: error})
                buffer.set_tags({tag.ERROR: f"{stage}: {error}"[:5000]}, run_id=parent_id)
                buffer.end_active_run(status)
            if ends_pipeline:
                with _secondary(f"pipeline run {parent_id} lacks the stages not rerun"):
                    _inherit_under_dvc(client, run, parent_id, stage, buffer, failed=True)
            raise
        finally:
            _buffer = outer
            failed = status != "FINISHED"  # FAILED, or KILLED: the pipeline run ends so too
            with (
                _secondary("the runs could not be ended in MLflow")
                if failed
                else contextlib.nullcontext()
            ):
                try:
                    if not failed:
                        buffer.end_active_run(status)
                    buffer.end_run(status, run_id=parent_id)
                finally:
                    if mlflow_active_run_id() == run_id:  # left by an error above
                        tracking_buffer.leave_active_run(status)
                    buffer.close()


@contextlib.contextmanager
def _secondary(what: str) -> Iterator[None]:
    """While an exception propagates: report another one instead of replacing it."""
    try:
        yield
    except Exception as err:
        warnings.warn(f"{what}: {redact(f'{type(err).__name__}: {err}')}", stacklevel=3)


def mlflow_active_run_id() -> str | None:
    """The active MLflow run's id; None without one (mlflow is not imported for this)."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else None


def active_buffer() -> RunBuffer | None:
    """The buffer of the stage run in progress, while it is MLflow's active run."""
    if _buffer is None or mlflow_active_run_id() != _buffer.run_id:
        return None
    return _buffer


# ------------------------------------------------ logging to the active run
# Stage code logs through these rather than mlflow.log_*: inside stage_run they go through
# the run's buffer; in a run started otherwise (a test, a notebook) straight to MLflow;
# without an active run they do nothing.


def _fluent() -> Any:
    return sys.modules["mlflow"] if mlflow_active_run_id() is not None else None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if (buffer := active_buffer()) is not None:
        buffer.log_metrics(metrics, step)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_metrics(dict(metrics), step=step)


class StageLog:
    """The :class:`lmops.core.train.TrainLog` of a stage run: metrics and the loss plot go
    through the run's buffer, so a tracking server that went away loses nothing."""

    @property
    def enabled(self) -> bool:
        # mlflow_active_run_id does not import mlflow: untracked runs skip its import time
        return mlflow_active_run_id() is not None

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        log_metrics(values, step)

    def figure(self, path: Path) -> None:
        log_artifact(path)


def log_params(params: Mapping[str, str]) -> None:
    if (buffer := active_buffer()) is not None:
        buffer.log_params(params)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_params(dict(params))


def set_tags(tags: Mapping[str, str]) -> None:
    if (buffer := active_buffer()) is not None:
        buffer.set_tags(tags)
    elif (mlflow := _fluent()) is not None:
        mlflow.set_tags(dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """A file (or a directory, as a folder of that name) as an artifact of the active run."""
    if (buffer := active_buffer()) is not None:
        if Path(path).is_dir():  # mlflow.log_artifact keeps the directory's own name
            artifact_path = "/".join(p for p in (artifact_path, Path(path).name) if p)
        buffer.log_artifact(path, artifact_path)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    """The contents of a directory as artifacts of the active run."""
    if (buffer := active_buffer()) is not None:
        buffer.log_artifact(directory, artifact_path)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


def log_dict(data: Any, artifact_file: str) -> None:
    """``mlflow.log_dict``: JSON, or YAML for a .yaml/.yml name."""
    if (buffer := active_buffer()) is not None:
        folder, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            if path.suffix in (".yaml", ".yml"):
                path.write_text(yaml.safe_dump(data, default_flow_style=False), "utf-8")
            else:
                path.write_text(json.dumps(data, indent=2), "utf-8")
            buffer.log_artifact(path, folder or None)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_dict(data, artifact_file)


def log_table(data: Any, artifact_file: str) -> None:
    if (buffer := active_buffer()) is not None:
        buffer.log_table(data, artifact_file)
    elif (mlflow := _fluent()) is not None:
        mlflow.log_table(data, artifact_file)


def sync(files: list[str | Path] | None = None) -> list[str]:
    """Send spool files (default: every one under ``mlruns/spool/``) to the tracking server
    and set their runs' final status; one line per file. A file whose stage died before it
    ended its run marks that run FAILED. Raises LmopsError, keeping the file, for one the
    server does not take."""
    import mlflow
    from mlflow.tracking import MlflowClient

    folder = project_root() / SPOOL_DIR
    paths = (
        [Path(f) for f in files]
        if files
        else sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    )
    if not paths:
        return [f"nothing to sync: no spool files in {folder}", *reconcile()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LmopsError(f"no such spool file: {', '.join(missing)}")
    uri = tracking_uri()
    lines, failed = [], []
    if tracking_buffer.is_http(uri) and (reason := tracking_buffer.probe(uri)) is not None:
        raise TrackingServerError(
            f"MLflow tracking server {redact(uri)} is not answering "
            f"({reason}); the spool files stay in {folder}: run this "
            "again once it answers"
        )
    _no_url_printing(uri)
    with tracking_buffer.fail_fast_http():
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        for path in paths:
            try:
                buffer = RunBuffer.from_spool(path, client, uri)
            except tracking_buffer.SpoolBusy as err:
                lines.append(f"{err}; skipped")
                continue
            count = len(buffer.pending)
            if buffer.final_status() is None:
                buffer.end_abandoned("the stage process ended before its run did")
            status = buffer.final_status()
            if buffer.flush(force=True):
                lines.append(f"{path}: {count} entries sent to run {buffer.run_id}, now {status}")
            else:
                buffer.release()
                why = (
                    f"{buffer.rejected} (is MLFLOW_TRACKING_URI the server the stage logged to?)"
                    if buffer.rejected
                    else "the server stopped answering"
                )
                failed.append(f"{path}: {why}; {len(buffer.pending)} entries kept")
    if failed:
        raise LmopsError("\n".join([*lines, *failed]))
    return lines + reconcile()


VANISHED = "process vanished (SIGKILL or out of memory?)"


def _process_state(tags: Mapping[str, str], host: str) -> bool | None:
    """True if the process a run's tags name still runs, False if it is gone, None when
    that cannot be told here: no such tags (a run from before they were written) or
    another host."""
    if tags.get(tag.HOST) != host or not tags.get(tag.PID, "").isdigit():
        return None
    try:
        proc = psutil.Process(int(tags[tag.PID]))
        started, stamp = proc.create_time(), start_stamp(proc)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but not ours to look at
        return True
    # the same pid with another start is another process
    if tags.get(tag.PID_STAMP):
        return tags[tag.PID_STAMP] == stamp
    try:  # a run recorded before lmops.pid_stamp: its start time, which the clock can move
        return abs(started - float(tags.get(tag.PID_START, started))) < 1.0
    except ValueError:
        return True


def reconcile(
    client: Any = None,
    experiment_id: str | None = None,
    other_hosts_after: float | None = None,
    dry_run: bool = False,
) -> list[str]:
    """End as FAILED the RUNNING runs whose process no longer exists; one line for each.

    A run is judged by the host, pid and start time it records (:func:`process_tags`).
    Its process runs on this host and is gone (SIGKILL, the OOM killer, a power cut):
    the run ends with ``lmops.error`` = :data:`VANISHED`. A run of another host, or one
    without those tags, is left alone unless ``other_hosts_after`` (hours) is given and it
    started longer ago than that. A pipeline run stays while one of its stage runs lives.
    """
    if client is None:
        client, found_id = client_and_experiment()
        experiment_id = experiment_id or found_id
    elif experiment_id is None:
        experiment_id = setup()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    host, now_ms = socket.gethostname(), time.time() * 1000
    verdict: dict[str, str | None] = {}  # run id -> why it ends (None: it stays)
    for run in running:
        tags = run.data.tags
        alive = _process_state(tags, host)
        if alive is False:
            where = f"pid {tags[tag.PID]} on {host} is gone"
            verdict[run.info.run_id] = f"{VANISHED}: {where}"
        elif alive is None and other_hosts_after is not None:
            age_h = (now_ms - run.info.start_time) / 3.6e6
            if age_h > other_hosts_after:
                where = tags.get(tag.HOST, "an unknown host")
                verdict[run.info.run_id] = (
                    f"no end after {age_h:.1f} h on {where} (limit {other_hosts_after:g} h)"
                )
        verdict.setdefault(run.info.run_id, None)
    for run in running:  # a pipeline run holds on while a stage of it lives
        parent = run.data.tags.get("mlflow.parentRunId")
        if verdict[run.info.run_id] is None and verdict.get(parent) is not None:
            verdict[parent] = None
    lines = []
    for run in running:
        why = verdict[run.info.run_id]
        if why is None:
            continue
        name = run.data.tags.get("mlflow.runName", run.info.run_name)
        done = "would end" if dry_run else "ended"
        lines.append(f"run {run.info.run_id} ({name}): {why}; {done} as FAILED")
        if not dry_run:
            client.set_tag(run.info.run_id, tag.ERROR, why)
            client.set_terminated(run.info.run_id, status="FAILED")
    return lines


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


def log_run_files(
    run_id: str, client: Any = None, root: str | Path | None = None, buffer: RunBuffer | None = None
) -> None:
    """The params file and ``dvc.lock``, as artifacts of ``run_id`` (through ``buffer``).

    A stage logs them to its parent as it starts (DVC has by then locked every stage
    before it); whoever ends a pipeline run logs them once more, complete.
    """
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    files = (
        [params_file(), project_root() / "dvc.lock"]
        if root is None
        else [Path(root) / DEFAULT_PARAMS, Path(root) / "dvc.lock"]
    )
    for path in files:
        if not path.is_file():
            continue
        if buffer is not None:
            buffer.log_artifact(path, run_id=run_id)
        else:
            client.log_artifact(run_id, str(path))


def _batches(client: Any, run_id: str, metrics: list, params: list) -> None:
    for lo in range(0, max(len(params), len(metrics)), 100):  # log_batch: 100 params a call
        client.log_batch(run_id, metrics=metrics[lo : lo + 100], params=params[lo : lo + 100])


def log_pipeline_params(run_id: str, client: Any = None, buffer: RunBuffer | None = None) -> None:
    """Every param of the params file, resolved and flattened (``finetune.lr``), on ``run_id``.

    The pipeline run so holds the whole configuration whichever stages DVC reran, and two
    pipeline runs line up key by key in the MLflow compare view. A key the run already
    has with another value (a parent reused by hand across param changes) keeps its first
    value, with a warning: MLflow params cannot change. With ``buffer``, they go through it.
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
    try:
        had = client.get_run(run_id).data.params
    except Exception as err:
        if buffer is None or unreachable_reason(err) is None:
            raise
        had = {}  # the server went away: the buffer sends them once it is back
    wanted = {k: _param(v) for k, v in flat.items()}
    clashes = sorted(k for k, v in wanted.items() if k in had and had[k] != v)
    if clashes:
        warnings.warn(
            f"MLflow run {run_id} already has other values for {clashes}; "
            "they keep their first values",
            stacklevel=2,
        )
    new = {k: v for k, v in wanted.items() if k not in had}
    if buffer is not None:
        buffer.log_params(new, run_id=run_id)
    else:
        _batches(client, run_id, [], [Param(k, v) for k, v in new.items()])


def roll_up(
    client: Any,
    child_id: str,
    parent_id: str,
    buffer: RunBuffer | None = None,
    only: set[str] | None = None,
) -> None:
    """Copy a stage run's latest metrics onto the pipeline run: those in ``only``, by
    default all but its system metrics (``system/...``).

    Their names carry the stage (``evaluate/bleu``), so in the MLflow UI's compare view
    the pipeline runs line up key by key; the curves stay on the stage runs. With
    ``buffer``, they go through it, and while the server is away they are the latest
    values logged through it.
    """
    from mlflow.entities import Metric

    from lmops.tracking import system

    def wanted(key: str) -> bool:
        return not system.is_system_metric(key) and (only is None or key in only)

    now = int(time.time() * 1000)
    if buffer is None:
        metrics = client.get_run(child_id).data.metrics
        _batches(
            client, parent_id, [Metric(k, v, now, 0) for k, v in metrics.items() if wanted(k)], []
        )
        return
    metrics = None
    if buffer.flush():
        try:
            metrics = client.get_run(child_id).data.metrics
        except Exception as err:
            if unreachable_reason(err) is None:
                raise
    if metrics is None:
        metrics = buffer.latest_metrics(child_id)
    metrics = {k: v for k, v in metrics.items() if wanted(k)}
    buffer.log_metrics(metrics, step=0, run_id=parent_id, timestamp=now)


def result_keys(root: str | Path, stage: str) -> set[str] | None:
    """The keys of what ``stage``'s metrics files hold (:func:`stage_metrics`): what a
    pipeline run carries of the stage, as ``dvc exp show`` shows it, whether the stage
    reran or not; empty for a stage that declares no metrics file. None (every metric)
    for a stage ``dvc.yaml`` does not have, or without one: no pipeline state to match."""
    declared = declared_metrics(root)
    if stage not in declared:
        return None
    return set(stage_metrics(stage, read_metrics_files(root, declared.get(stage, [])) or {}))


# ------------------------------------------------ the stages a pipeline run did not rerun
# A pipeline run carries the metrics of the whole pipeline state it leaves, as `dvc exp
# show` does: the stages it reran roll up their runs' metrics (roll_up), the others get
# theirs from their metrics files, under the same keys, so two pipeline runs line up key by
# key whichever stages DVC reran in each.


def stage_metrics(stage: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """A stage's metrics under the keys its runs log them with: ``<stage>/<key>``, nested
    keys flattened (``tokenise/parallel_test.pairs``), booleans as 1 or 0
    (``validate/success``); text, None and the ``hardware`` block (params and tags instead:
    :func:`log_stage_outputs`) left out. The one key scheme of what a stage logs and of
    what a pipeline run copies from a metrics file (:func:`inherit_metrics`)."""
    if isinstance(metrics.get("hardware"), dict):
        metrics = {k: v for k, v in metrics.items() if k != "hardware"}
    return {
        f"{stage}/{k}": float(v)
        for k, v in flatten(dict(metrics)).items()
        if isinstance(v, int | float)
    }


def declared_metrics(root: str | Path) -> dict[str, list[str]]:
    """Every stage of ``root``'s ``dvc.yaml``, in its order, with the metrics files it
    declares (``[]`` for none); {} without a dvc.yaml."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return {}
    return metrics_declared(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def metrics_declared(dvc_yaml: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every stage of a parsed ``dvc.yaml``, in its order, with the metrics files it
    declares (``[]`` for none): the one reading of ``metrics:``, which
    :func:`lmops.orchestrate.dag.metrics_files` uses too."""
    stages = dvc_yaml.get("stages") or {}
    return {
        name: [
            str(p)
            for item in spec.get("metrics") or []
            for p in ([item] if isinstance(item, str) else item)
        ]
        for name, spec in stages.items()
        if isinstance(spec, dict)
    }


def read_metrics_files(root: str | Path, files: Iterable[str | Path]) -> dict[str, Any] | None:
    """What a stage's metrics files under ``root`` hold (JSON or YAML, merged in order), as
    ``dvc exp show`` reads them; None when none of them is there (the stage never ran, or
    DVC removed its outputs to rerun it and it failed). A file that cannot be read is left
    out, with a warning."""
    found: dict[str, Any] | None = None
    for rel in files:
        path = Path(root) / rel
        try:
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, yaml.YAMLError) as err:
            warnings.warn(f"{path}: not read ({type(err).__name__}: {err})", stacklevel=2)
            continue
        found = {**(found or {}), **(data if isinstance(data, dict) else {})}
    return found


def inherit_metrics(
    client: Any,
    run_id: str,
    root: str | Path,
    declared: Mapping[str, Sequence[str | Path]],
    reran: Iterable[str],
    candidates: Iterable[str],
    buffer: RunBuffer | None = None,
) -> list[str]:
    """Give pipeline run ``run_id`` the metrics of the ``candidates`` (stages it did not
    rerun) from their metrics files under ``root``, under the keys a stage run logs
    (:func:`stage_metrics`), and tag it with the stages it reran
    (:data:`~lmops.tracking.tags.STAGES_RERAN`) and those it inherited
    (:data:`~lmops.tracking.tags.STAGES_INHERITED`), comma-separated in pipeline order.

    ``declared`` is every stage in pipeline order with its metrics files. A candidate none
    of whose files exists (:func:`read_metrics_files`) inherits nothing; nor does a stage
    in ``reran``. The ``hardware`` block of an inherited stage's file becomes tags
    ``lmops.hardware.<stage>.<key>`` (a stage run's own are ``lmops.hardware.<key>``); a
    stage that reran loses those it inherited before. A value the run already has is not
    logged again. With ``buffer``, metrics and tags go through it. Returns the stages
    inherited.
    """
    from mlflow.entities import Metric

    reran = set(reran)
    wanted = set(candidates) - reran
    inherited: list[str] = []
    metrics: dict[str, float] = {}
    hardware: dict[str, str] = {}
    for stage, files in declared.items():
        if stage not in wanted or (data := read_metrics_files(root, files)) is None:
            continue
        inherited.append(stage)
        metrics.update(stage_metrics(stage, data))
        if isinstance(data.get("hardware"), dict):
            hardware.update(
                {f"{HARDWARE_TAG}{stage}.{k}": str(v) for k, v in data["hardware"].items()}
            )
    run = client.get_run(run_id)
    metrics = {k: v for k, v in metrics.items() if run.data.metrics.get(k) != v}
    for key in run.data.tags:
        if key.startswith(HARDWARE_TAG) and key[len(HARDWARE_TAG) :].split(".")[0] in reran:
            client.delete_tag(run_id, key)
    order = [*declared, *sorted(reran - set(declared))]
    tags = {
        tag.STAGES_RERAN: ",".join(s for s in order if s in reran),
        tag.STAGES_INHERITED: ",".join(inherited),
        **hardware,
    }
    now = int(time.time() * 1000)
    if buffer is not None:
        buffer.log_metrics(metrics, step=0, run_id=run_id, timestamp=now)
        buffer.set_tags(tags, run_id=run_id)
    else:
        _batches(client, run_id, [Metric(k, v, now, 0) for k, v in metrics.items()], [])
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    return inherited


def _ends_pipeline_run() -> bool:
    """Whether this stage's pipeline run is its ``dvc`` process's (a plain ``dvc repro`` or
    ``dvc exp run``), which no flow ends: then each stage, as it ends it, gives it the
    metrics of the stages that did not rerun (:func:`_inherit_under_dvc`)."""
    return not os.environ.get(PARENT_ENV) and _dvc_process() is not None


def _inherit_under_dvc(
    client: Any, run: Any, parent_id: str, stage: str, buffer: RunBuffer, failed: bool = False
) -> None:
    """:func:`inherit_metrics` for the pipeline run of a plain ``dvc repro``, as ``stage``
    ends it. Every stage without a run under it inherits, those DVC has yet to reach as
    they are now: one that then reruns replaces them with its own values. After a failure,
    only the stages before ``stage`` do (DVC found them up to date)."""
    root = project_root()
    declared = declared_metrics(root)
    if not declared:
        return
    if not buffer.flush():
        warnings.warn(
            f"pipeline run {parent_id}: the tracking server is away, so the metrics of the "
            "stages not rerun were not added",
            stacklevel=2,
        )
        return
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    tried = {r.data.tags.get(tag.STAGE) for r in children} | {stage}
    reran = {
        name
        for r in children
        if r.info.status == "FINISHED" and (name := r.data.tags.get(tag.STAGE))
    }
    if not failed:
        reran.add(stage)
    order = list(declared)
    scope = order[: order.index(stage)] if failed and stage in order else order
    inherit_metrics(
        client, parent_id, root, declared, reran, [s for s in scope if s not in tried], buffer
    )


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
    # mlflow's Dataset marks profile abstract but is no ABC; MetaDataset leaves it out
    dataset = MetaDataset(source=source, name=name, digest=md5)  # type: ignore[abstract]
    if (buffer := active_buffer()) is not None:
        buffer.log_input(dataset.to_dict(), context)
        buffer.set_tags({f"data.{name}.md5": md5})
    else:
        mlflow.log_input(dataset, context=context)
        mlflow.set_tag(f"data.{name}.md5", md5)
    return md5


def log_stage_outputs(
    stage: str,
    metrics: dict[str, Any],
    model_dir: str | Path | None = None,
    files: tuple[str | Path, ...] = (),
) -> None:
    """Numeric metrics as ``<stage>/<name>`` (:func:`stage_metrics`), string ones as tags, a
    model dir and files as artifacts, to the active stage run (nothing without one, e.g. on
    a torchrun worker).

    The ``hardware`` block (:func:`lmops.core.hardware.facts`) becomes params
    ``<stage>.hardware.<key>`` and tags ``lmops.hardware.<key>``.
    """
    run_id = mlflow_active_run_id()
    if run_id is None:
        return
    hardware = metrics.get("hardware")
    if isinstance(hardware, dict):
        metrics = {k: v for k, v in metrics.items() if k != "hardware"}
        log_params({f"{stage}.hardware.{k}": _param(v) for k, v in hardware.items()})
        set_tags({f"{HARDWARE_TAG}{k}": str(v) for k, v in hardware.items()})
    # a metric the training loop logged step by step keeps its history, not an extra point
    buffer = active_buffer()
    if buffer is not None:
        logged = buffer.latest_metrics()
    else:
        logged = sys.modules["mlflow"].get_run(run_id).data.metrics
    flat = {k: v for k, v in flatten(metrics).items() if v is not None}
    log_metrics({k: v for k, v in stage_metrics(stage, metrics).items() if k not in logged})
    set_tags({f"{stage}.{k}": v[:5000] for k, v in flat.items() if isinstance(v, str)})
    if model_dir is not None:
        log_artifacts(model_dir, artifact_path="model")
    for f in files:
        log_artifact(f)
