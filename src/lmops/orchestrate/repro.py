"""What the Prefect flows need from the pipeline, without Prefect: runs, retries, metrics.

DVC stays in charge of what is up to date: the order comes from ``dvc.yaml``'s own
deps and outs (:mod:`lmops.orchestrate.dag`), and each stage runs as
``dvc repro --single-item <stage>``, which skips a stage whose inputs did not change.
A run with params overrides or an experiment name is one ``dvc exp run`` over the whole
target instead: an experiment is a single commit of the whole pipeline's results, so it
cannot be built up one stage at a time; its per-stage results are read from DVC's output.

The flows (``flows/``) add scheduling, retries, tags and artifacts around this.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from lmops.config import dvc_set_args, flatten
from lmops.errors import LmopsError, stop_reason
from lmops.orchestrate.dag import ACCELERATOR_STAGES, metrics_files
from lmops.tracking import runs as tracking
from lmops.tracking import tags as tag
from lmops.tracking.compare import format_value
from lmops.tracking.redact import public_url, redact

GPU_TAG = "gpu"
# how long a stopped stage gets to end its runs before the group gets SIGTERM, then SIGKILL;
# Prefect's runner kills a cancelled flow run's process 30 s after its SIGTERM
STOP_GRACE_SECONDS = 12.0
# a stage's progress bar goes to the flow run's log once a minute (and when it ends), not
# at each redraw: a GPU pretrain redraws tens of thousands of times
PROGRESS_LOG_SECONDS = 60.0

# Failures worth a retry: another DVC process holds the workspace lock, or the tracking
# server / remote storage could not be reached. Checked against the stage's output.
TRANSIENT_PATTERNS = (
    r"is busy, it is being blocked by",  # DVC 3's rwlock: another dvc runs a stage here
    r"Unable to acquire lock",
    r"lock file .* is in use|is locked by",
    r"Connection ?(refused|reset|aborted|Error)",
    r"Max retries exceeded",
    r"Temporary failure in name resolution",
    r"(Read|Connect)?Timeout(Error)?|timed out",
    r"API request to .* failed",
    r"\b(502|503|504)\b.*(Bad Gateway|Service Unavailable|Gateway Time-?out)",
    r"database is locked",
    r"tracking server .* is not answering",
)
# Failures that a rerun cannot fix: the data or the params must change first.
PERMANENT_PATTERNS = (
    r"data quality expectations failed|expectations failed",
    r"loss diverged",
    r"invalid parameters",
)

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")


class StageFailed(LmopsError):
    """A ``dvc repro`` / ``dvc exp run`` exited non-zero; carries the tail of its output."""

    def __init__(self, stage: str, returncode: int, output: str):
        self.stage = stage
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.rstrip().splitlines()[-25:])
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")

    @property
    def transient(self) -> bool:
        return is_transient(self.output)


def is_transient(text: str) -> bool:
    """True for a failure a retry may cure (lock held, network); never for bad data or loss."""
    if any(re.search(p, text, re.IGNORECASE) for p in PERMANENT_PATTERNS):
        return False
    return any(re.search(p, text, re.IGNORECASE) for p in TRANSIENT_PATTERNS)


def should_retry(exc: BaseException | None) -> bool:
    """The retry decision for an exception raised by a stage task."""
    if exc is None:
        return False
    if isinstance(exc, StageFailed):
        return exc.transient
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return is_transient(f"{type(exc).__name__}: {exc}")


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed stage task only for transient I/O.

    Prefect hands over the Failed state; its data is the exception the task raised.
    """
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # no result to read back: judge by the state's message
            exc = None
    if isinstance(exc, BaseException):
        return should_retry(exc)
    return is_transient(str(getattr(state, "message", "") or ""))


def stage_tags(stage: str) -> list[str]:
    """Prefect task tags of a stage: ``stage:<name>`` and ``gpu`` where it trains."""
    return [f"stage:{stage}", *([GPU_TAG] if stage in ACCELERATOR_STAGES else [])]


# ---------------------------------------------------------------------- running


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped | restored | not reached
    seconds: float = 0.0


@dataclass
class RunResult:
    command: list[str]
    stages: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0


def set_args(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    """``-S key=value`` args from ``["a.b=1", ...]`` or ``{"a.b": 1}`` / ``{"a": {"b": 1}}``."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return dvc_set_args(dict(overrides))
    args: list[str] = []
    for item in overrides:
        if "=" not in str(item):
            raise LmopsError(f"params override {item!r}: expected key=value")
        args += ["-S", str(item)]
    return args


def stage_env(parent_run_id: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``dvc`` subprocess: ours, the venv's bin on PATH, the parent run."""
    env = dict(os.environ if base is None else base)
    # a stage's own DVC/MLflow context comes from the dvc process it runs under
    for key in (
        "DVC_STAGE",
        "DVC_ROOT",
        "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV",
        tracking.PARENT_ENV,
    ):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    return env


def stage_statuses(output: str, stages: Iterable[str]) -> dict[str, str]:
    """What DVC did with each stage, read from its output."""
    seen: dict[str, str] = {}
    for line in output.splitlines():
        for pattern, status in ((_RAN, "ran"), (_RESTORED, "restored"), (_SKIPPED, "skipped")):
            m = pattern.search(line)
            if m:
                seen[m.group(1)] = status
    return {s: seen.get(s, "not reached") for s in stages}


# who else reads a stage's output, line by line and redraw by redraw (:func:`watching`)
_WATCH: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "lmops_watch_output", default=None
)


@contextlib.contextmanager
def watching(watch: Callable[[str], None] | None):
    """Within it, :func:`_run` (so :func:`repro_stage` and :func:`exp_run`) hands every
    line and every progress bar redraw of a stage's output to ``watch`` as well, unthrottled
    (``lmops.orchestrate.progress.PipelineProgress.output`` reads the bars). A context,
    not an argument, so that it reaches the runner through the flow's tasks unchanged."""
    token = _WATCH.set(watch)
    try:
        yield
    finally:
        _WATCH.reset(token)


class OutputLines:
    """A subprocess's output as log lines: every line once, and progress bars (tqdm
    redraws a line with ``\\r``) once every ``every`` seconds and at their end, not once
    per redraw. Fed raw chunks; keeps the lines (not the redraws) for the caller.
    ``watch``, when given, gets every line and every redraw, as they come: a redraw as
    soon as it is there, not when the next one ends it (tqdm writes ``\\r`` first), since
    a stage may draw its bar once and then not for a while."""

    def __init__(
        self,
        log: Callable[[str], None],
        every: float = PROGRESS_LOG_SECONDS,
        watch: Callable[[str], None] | None = None,
    ):
        self.log, self.every, self.watch = log, every, watch
        self.lines: list[str] = []
        self._tail = ""
        self._bar: str | None = None  # the latest redraw not logged yet
        self._last_bar = -math.inf
        self._watched = ""  # the unfinished line watch has seen

    def feed(self, text: str) -> None:
        parts = re.split(r"(\r\n|\r|\n)", self._tail + text)
        self._tail = parts.pop()  # an unfinished line waits for the next chunk
        for segment, end in zip(parts[0::2], parts[1::2], strict=True):
            if self.watch is not None and segment.strip() and segment != self._watched:
                self._watch(segment)
            self._watched = ""
            if end == "\r":  # a progress bar redraw
                self._bar = segment
                now = time.monotonic()
                if now - self._last_bar >= self.every:
                    self._emit_bar(now)
            else:
                if self._bar is not None and segment.strip() == "":
                    self._emit_bar(time.monotonic())  # a bar closed with a bare newline
                    continue
                self._bar = None
                self._line(segment)
        if self.watch is not None and self._tail.strip() and self._tail != self._watched:
            self._watch(self._tail)  # the bar on screen now, or a line still being written
            self._watched = self._tail

    def close(self) -> None:
        if self._bar is not None:
            self._emit_bar(time.monotonic())
        if self._tail:
            if self.watch is not None and self._tail.strip() and self._tail != self._watched:
                self._watch(self._tail)
            self._line(self._tail)
            self._tail = ""

    def _watch(self, text: str) -> None:
        assert self.watch is not None
        try:
            self.watch(text)
        except Exception as err:  # a progress display is not worth stopping a stage for
            self.watch = None
            self.log(f"lmops: stopped watching the output: {type(err).__name__}: {err}")

    def _emit_bar(self, now: float) -> None:
        assert self._bar is not None
        if self._bar.strip():
            self.log(self._bar.strip())
        self._bar, self._last_bar = None, now

    def _line(self, line: str) -> None:
        self.lines.append(line)
        self.log(line)


def _run(
    cmd: list[str],
    root: Path,
    env: Mapping[str, str],
    label: str,
    log: Callable[[str], None],
    watch: Callable[[str], None] | None = None,
    save: Path | None = None,
) -> tuple[str, float]:
    """Run ``cmd``, stream its output to ``log`` (:class:`OutputLines`) and to ``watch``
    (by default the one :func:`watching` set), and all of it, every progress-bar redraw
    included, to the file ``save``; raise StageFailed on a non-zero exit."""
    started = time.perf_counter()
    out = OutputLines(log, watch=watch if watch is not None else _WATCH.get())
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
    raw = open(save, "wb") if save is not None else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if raw is not None:
                raw.write(chunk)
                raw.flush()
            out.feed(decoder.decode(chunk))
        out.feed(decoder.decode(b"", final=True))
        out.close()
        proc.wait()
    except BaseException:
        # cancelled or crashed: stop the stage, so that dvc records nothing and releases
        # its lock, and leave no process of the group behind
        stop_group(proc)
        raise
    finally:
        if raw is not None:
            raw.close()
    output = "\n".join(out.lines)
    if proc.returncode != 0:
        raise StageFailed(label, proc.returncode, output)
    return output, time.perf_counter() - started


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop ``dvc`` (``proc``, a process group leader) and the stage it runs.

    The stage processes get SIGTERM first: each ends its MLflow run as KILLED and dies of
    the signal, and dvc, seeing the stage fail, writes nothing and releases its lock. What
    is left of the group after ``grace`` seconds gets SIGTERM, then SIGKILL. Returns once
    no process of the group is left.
    """
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        while group_alive(proc) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        if not group_alive(proc):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    proc.wait()
    while group_alive(proc):  # after SIGKILL: until the kernel has reaped them
        time.sleep(0.05)


def group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of ``proc``'s group (``start_new_session=True``) still runs.

    The leader (``dvc``) counts until it is reaped: a process whose main thread has died
    shows as a zombie while its other threads still end, and until it is reaped its pid
    exists, so the next ``dvc`` would take DVC's rwlock entry of that pid for a live
    holder ("is busy")."""
    if proc.poll() is None:
        return True
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # the rest of the group are orphans: zombies among them are init's to reap
    return any(
        p.status() != psutil.STATUS_ZOMBIE
        for p in psutil.process_iter()
        if _pgid(p.pid) == proc.pid
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def up_to_date(root: str | Path, target: str | None = None) -> bool:
    """One ``dvc status`` over ``target`` and what it needs (every stage without one):
    True when ``dvc repro`` would do nothing, so a no-op run costs one DVC start, not one
    per stage."""
    cmd = ["dvc", "status", "--quiet", *(["--with-deps", target] if target else [])]
    out = subprocess.run(
        cmd, cwd=Path(root).resolve(), env=stage_env(None), capture_output=True, text=True
    )
    return out.returncode == 0


OUTPUT_DIR = Path("mlruns") / "output"


def output_file(root: Path, parent_run_id: str | None, name: str) -> Path:
    """Where a flow keeps the whole output of ``dvc`` for a stage (or ``dvc-exp-run``)
    of pipeline run ``parent_run_id``: ``mlruns/output/<run id>/<name>.log``."""
    return root / OUTPUT_DIR / (parent_run_id or "no-run") / f"{name}.log"


def _keep_output(
    root: Path, parent_run_id: str | None, stage: str | None, save: Path, log: Callable[[str], None]
) -> None:
    """The output file as an artifact (:func:`lmops.tracking.runs.log_stage_output`); a
    failure to log it is said, and changes nothing of how the stage ended."""
    if parent_run_id is None:
        return
    try:
        with in_dir(root):
            tracking.log_stage_output(parent_run_id, stage, save)
    except Exception as err:
        log(f"lmops: {save} was not logged to MLflow: {type(err).__name__}: {err}")


def repro_stage(
    root: str | Path,
    stage: str,
    parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC decides whether it reruns. Its whole output
    is kept in :func:`output_file` and, when the stage ran, is the artifact ``output.log``
    of its MLflow run, also when it failed or was stopped."""
    root = Path(root).resolve()
    cmd = ["dvc", "repro", "--single-item", stage]
    save = output_file(root, parent_run_id, stage)
    try:
        output, seconds = _run(cmd, root, stage_env(parent_run_id), stage, log, save=save)
    finally:
        _keep_output(root, parent_run_id, stage, save, log)
    status = stage_statuses(output, [stage])[stage]
    if status == "not reached":  # dvc says nothing more than "up to date" for some stages
        status = "skipped"
    return StageResult(stage, status, seconds)


def exp_run(
    root: str | Path,
    stages: list[str],
    target: str | None,
    overrides: Mapping[str, Any] | Iterable[str] | None,
    name: str | None,
    parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """One ``dvc exp run`` over ``target`` (all stages without one), results per stage."""
    root = Path(root).resolve()
    cmd = [
        "dvc",
        "exp",
        "run",
        *(["-n", name] if name else []),
        *set_args(overrides),
        *([target] if target else []),
    ]
    save = output_file(root, parent_run_id, "dvc-exp-run")
    try:
        output, seconds = _run(
            cmd, root, stage_env(parent_run_id), target or "pipeline", log, save=save
        )
    finally:
        _keep_output(root, parent_run_id, None, save, log)
    result = RunResult(cmd, seconds=seconds)
    result.stages = [StageResult(s, st) for s, st in stage_statuses(output, stages).items()]
    return result


# ------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def in_dir(root: str | Path):
    """Run MLflow set-up from the project root: the default store lives under it."""
    with contextlib.chdir(root):
        yield


def start_parent_run(
    root: str | Path,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> tuple[str, str]:
    """Create the pipeline's parent run (stages nest under it); returns (run id, experiment id)."""
    with in_dir(root):
        client, experiment_id = tracking.client_and_experiment()
        run_id = tracking.create_pipeline_run(client, experiment_id, name, tags, params)
    return run_id, experiment_id


def failure(err: BaseException) -> tuple[str, str]:
    """How a flow's pipeline run ends after ``err``: its MLflow status and ``lmops.error``.
    KILLED when it was stopped (Ctrl-C, or the SIGTERM of a cancellation, which Prefect
    raises as its TerminationSignal), FAILED otherwise."""
    signum = getattr(err, "signal", None)  # Prefect's TerminationSignal carries it
    if isinstance(signum, int) and type(err).__name__ == "TerminationSignal":
        return "KILLED", f"stopped by {signal.Signals(signum).name} (a cancellation?)"
    if isinstance(err, KeyboardInterrupt):
        return "KILLED", stop_reason(err)
    return "FAILED", redact(f"{type(err).__name__}: {err}")


def end_parent_run(
    root: str | Path,
    run_id: str,
    status: str,
    results: Iterable[StageResult] = (),
    error: str | None = None,
) -> None:
    """End a flow's pipeline run with ``status`` (:func:`failure`), the status of each
    stage, the metrics of the stages it did not rerun (:func:`inherit_metrics`) and, when
    it did not finish, ``error`` as ``lmops.error``."""
    results = list(results)
    with in_dir(root):
        client = tracking.client()
        for r in results:
            client.set_tag(run_id, f"{tag.STAGE_STATUS}{r.stage}", r.status)
        if error:
            client.set_tag(run_id, tag.ERROR, error[:5000])
        elif tag.ERROR in client.get_run(run_id).data.tags:  # a stage's try a retry cured
            client.delete_tag(run_id, tag.ERROR)
        try:
            inherit_metrics(root, run_id, status, results, client)
        except Exception as err:  # the run ends all the same
            warnings.warn(
                f"pipeline run {run_id} lacks the stages not rerun: {type(err).__name__}: "
                f"{redact(str(err))}",
                stacklevel=2,
            )
        tracking.log_run_files(run_id, client, root)  # the final dvc.lock, every stage in it
        client.set_terminated(run_id, status=status)


def inherit_metrics(
    root: str | Path,
    run_id: str,
    status: str,
    results: Iterable[StageResult],
    client: Any = None,
) -> list[str]:
    """Give a flow's pipeline run the metrics of the stages it did not rerun, from their
    metrics files (:func:`lmops.tracking.runs.inherit_metrics`), so that it carries the
    whole pipeline state, as ``dvc exp show`` does, whichever stages DVC reran.

    A run that finished inherits every stage it did not rerun (all are up to date); one
    that failed or was stopped only those DVC found up to date before (skipped or
    restored), never the failed stage or those not reached. Returns the stages inherited.
    """
    root = Path(root).resolve()
    declared = tracking.declared_metrics(root)
    results = list(results)
    reran = [r.stage for r in results if r.status == "ran"]
    if status == "FINISHED":
        candidates = list(declared)
    else:
        candidates = [r.stage for r in results if r.status in ("skipped", "restored")]
    with in_dir(root):
        client = client or tracking.client()
        return tracking.inherit_metrics(client, run_id, root, declared, reran, candidates)


def run_url(root: str | Path, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server, or a local `mlflow ui`."""
    with in_dir(root):
        uri = tracking.tracking_uri()
    # the link is shown in Prefect: never with the URI's user and password
    base = (
        public_url(uri)
        if uri.startswith(("http://", "https://"))
        else os.environ.get("LMOPS_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MetricRow(NamedTuple):
    """One numeric metric of a stage's metrics file; ``metric`` and ``value`` are None
    for a file that does not exist."""

    stage: str
    file: str
    metric: str | None
    value: int | float | None


def metrics_rows(
    root: str | Path, dvc_yaml: Mapping[str, Any], stages: Iterable[str] | None = None
) -> list[MetricRow]:
    """Every numeric metric the stages' metrics files (``dvc.yaml``'s ``metrics``) hold,
    in stage order, a file's keys flattened (``train.rows``).

    A file that does not exist (the stage never ran) is one row without a metric rather
    than a failed report.
    """
    rows: list[MetricRow] = []
    for stage, files in metrics_files(dvc_yaml, stages).items():
        for rel in files:
            path = Path(root) / rel
            if not path.is_file():
                rows.append(MetricRow(stage, rel, None, None))
                continue
            data = flatten(json.loads(path.read_text(encoding="utf-8")))
            rows += [
                MetricRow(stage, rel, key, value)
                for key, value in data.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            ]
    return rows


def metrics_table(
    root: str | Path,
    dvc_yaml: Mapping[str, Any],
    stages: Iterable[str] | None = None,
    results: Iterable[StageResult] = (),
) -> str:
    """:func:`metrics_rows` as a markdown table, with each stage's status in ``results``;
    a missing file is listed as missing."""
    status = {r.stage: r.status for r in results}
    lines = ["| stage | status | metric | value |", "|---|---|---|---|"]
    for row in metrics_rows(root, dvc_yaml, stages):
        where = f"| {row.stage} | {status.get(row.stage, '')} |"
        if row.metric is None or row.value is None:
            lines.append(f"{where} `{row.file}` | missing |")
        else:
            lines.append(f"{where} {row.metric} | {format_value(row.value, width=None)} |")
    return "\n".join(lines) + "\n"


def results_table(results: Iterable[StageResult]) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds:.1f} |" for r in results]
    return "\n".join(lines) + "\n"
