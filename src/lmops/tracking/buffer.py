"""Tracking that outlives a tracking server going away: buffer, spool file, replay.

Everything a stage logs (metrics, params, tags, artifacts, tables, dataset inputs and the
runs' final status) goes through one :class:`RunBuffer`. While the server answers, each
call is sent at once, as MLflow's own functions would. When a call fails because the server
does not answer (connection refused or reset, timeout, 5xx after MLflow's retries), that
call and every later one are kept in order: in memory, and appended to a spool file
``<project>/mlruns/spool/<stage run id>.jsonl`` (artifacts are copied, hard-linked where
possible, into ``mlruns/spool/<stage run id>/``, so a temporary file may go away). Metrics
keep the step and timestamp they were logged with.

While entries are kept, at most once every ``LMOPS_TRACKING_RETRY_SECONDS`` (30) a log call
asks the server's ``/health`` (a few seconds at most) and, once it answers, sends what is
kept. Training never waits longer than that probe. At the end of a stage
:meth:`RunBuffer.close` keeps trying for ``LMOPS_TRACKING_FLUSH_WAIT`` seconds (60), then
leaves the spool file and says how to upload it later: ``lmops tracking sync``
(:func:`lmops.tracking.sync`).

The spool file is JSON lines, one entry each, numbered by ``seq``::

    {"seq": 1, "run_id": "...", "kind": "metrics",
     "metrics": [{"key": "pretrain/train_loss", "value": 3.2, "timestamp": 1700000000000,
                  "step": 40}]}
    {"seq": 2, "run_id": "...", "kind": "params", "params": {"pretrain.lr": "0.001"}}
    {"seq": 3, "run_id": "...", "kind": "tags", "tags": {"lmops.error": "..."}}
    {"seq": 4, "run_id": "...", "kind": "artifact", "path": "<run id>/4/plot.png",
     "artifact_path": null}                      (also "artifacts" for a directory)
    {"seq": 5, "run_id": "...", "kind": "table", "path": "...", "artifact_file": "a/b.json"}
    {"seq": 6, "run_id": "...", "kind": "input", "dataset": {...}, "context": "input"}
    {"seq": 7, "run_id": "...", "kind": "end", "status": "FINISHED", "end_time": 1700000000000}
    {"ack": 5}                                   entries up to seq 5 reached the server

Replaying is idempotent (MLflow keeps one copy of a metric with the same key, step,
timestamp and value; a param logged again with its value is accepted; tags and artifacts
are overwritten), so an entry sent twice after a crash does no harm. An entry the server
rejects (not merely does not answer) is never dropped: the buffer stops there, keeps the
file and names the entry.

A buffer may be used from several threads (the system-metrics monitor,
:mod:`lmops.tracking.system`, logs from its own while training logs from the main one):
each call is sent or kept whole, in the order the calls take one lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from lmops.errors import LmopsError
from lmops.tracking import tags as tag
from lmops.tracking.redact import redact, redact_uri

try:  # POSIX: a spool file is locked while the stage that writes it is alive
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RETRY_ENV = "LMOPS_TRACKING_RETRY_SECONDS"
FLUSH_WAIT_ENV = "LMOPS_TRACKING_FLUSH_WAIT"
DEFAULT_RETRY_SECONDS = 30.0
DEFAULT_FLUSH_WAIT = 60.0
PROBE_TIMEOUT = 4.0
# MLflow retries a failed request with a back-off that adds up to minutes; a stage sends
# with these unless they are set: one immediate retry, and no request waits over 15 s ...
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", TIMEOUT_ENV: "15"}
# ... but an artifact upload, whose answer comes once the server has stored the file
ARTIFACT_TIMEOUT = "120"
SPOOL_DIR = Path("mlruns") / "spool"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # where MLflow lists a run's tables
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # log_batch limits


class TrackingServerError(LmopsError):
    """The tracking server does not answer."""


class SpoolBusy(LmopsError):
    """A spool file is being written by a stage that is still running."""


def seconds_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LmopsError(f"{name}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise LmopsError(f"{name}={raw!r}: expected a number of seconds >= 0")
    return value


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------ is it answering


def is_http(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def _os_reason(text: str) -> str | None:
    for needle in (
        "Connection refused",
        "Connection reset",
        "Connection aborted",
        "Name or service not known",
        "Temporary failure in name resolution",
        "No route to host",
        "Network is unreachable",
        "timed out",
    ):
        if needle.lower() in text.lower():
            return needle.lower()
    return None


def unreachable_reason(err: BaseException | None) -> str | None:
    """Why ``err`` means that the tracking server did not answer; None for any other error
    (a rejected request, a bug), which must not be buffered away."""
    import requests

    bad_request = (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidHeader,
    )
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, bad_request):
            return None
        if isinstance(err, requests.exceptions.HTTPError):
            status = err.response.status_code if err.response is not None else 500
            return f"HTTP {status}" if status >= 500 else None
        if isinstance(err, requests.exceptions.Timeout | TimeoutError):
            return "timed out"
        if isinstance(err, requests.exceptions.RetryError):
            return "server errors after retries"
        if isinstance(err, requests.exceptions.RequestException | ConnectionError):
            return _os_reason(str(err)) or "connection failed"
        err = err.__cause__ or err.__context__
    return None


def probe(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the server at ``uri`` answers HTTP (any status: behind a proxy that wants
    credentials, a 401 is an answer), else why not."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout, allow_redirects=False)
    except requests.exceptions.SSLError:
        return None  # something answers; MLflow reports its TLS settings itself
    except requests.exceptions.Timeout:
        return f"timed out after {timeout:g} s"
    except requests.exceptions.RequestException as err:
        return unreachable_reason(err) or type(err).__name__
    return None


def unreachable_message(uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {redact_uri(uri)} is not answering ({reason}); "
        "start it (docs/tracking.md, 'Team set-up') or unset MLFLOW_TRACKING_URI to track to "
        "mlruns/ in this checkout"
    )


def check_server(uri: str) -> None:
    """Raise :class:`TrackingServerError` at once when ``uri`` is an http(s) tracking server
    that does not answer; anything else (a local store) passes."""
    if is_http(uri) and (reason := probe(uri)) is not None:
        raise TrackingServerError(unreachable_message(uri, reason))


@contextlib.contextmanager
def http_settings(values: Mapping[str, str], override: bool = False) -> Iterator[None]:
    """MLflow's HTTP settings for a block: only those not set (``override``: all of them)."""
    before = {k: os.environ.get(k) for k in values}
    changed = {k: v for k, v in values.items() if override or before[k] is None}
    os.environ.update(changed)
    try:
        yield
    finally:
        for k in changed:
            if before[k] is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = cast(str, before[k])  # not None: checked above


def fail_fast_http() -> contextlib.AbstractContextManager[None]:
    return http_settings(HTTP_DEFAULTS)


def _upload_timeout() -> contextlib.AbstractContextManager[None]:
    if os.environ.get(TIMEOUT_ENV) != HTTP_DEFAULTS[TIMEOUT_ENV]:  # the user's, or MLflow's
        return contextlib.nullcontext()
    return http_settings({TIMEOUT_ENV: ARTIFACT_TIMEOUT}, override=True)


def leave_active_run(status: str) -> None:
    """``mlflow.end_run``, waiting at most a few seconds for a server that is away: the run
    leaves MLflow's stack first, so it is left even when its status update fails."""
    import mlflow

    with (
        http_settings(
            {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
            override=True,
        ),
        contextlib.suppress(Exception),
    ):
        mlflow.end_run(status)


# ----------------------------------------------------------------- the buffer


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src: str | Path, dst: str | Path) -> None:
    # a hard link costs no space; the writers of model dirs replace files, never edit them
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RunBuffer:
    """Logs to MLflow runs through one client; keeps what the server does not take.

    ``run_id`` is the stage run: the default target of every call and the spool file's
    name. Calls may name another run (the stage's parent) with ``run_id=``.
    """

    def __init__(
        self,
        run_id: str,
        client: Any,
        spool_dir: str | Path,
        uri: str,
        retry_seconds: float | None = None,
    ):
        self.run_id, self.client, self.uri = run_id, client, uri
        self.spool_dir = Path(spool_dir)
        self.spool = self.spool_dir / f"{run_id}.jsonl"
        self.retry = (
            seconds_setting(RETRY_ENV, DEFAULT_RETRY_SECONDS)
            if retry_seconds is None
            else retry_seconds
        )
        self.pending: list[dict[str, Any]] = []
        self.rejected: str | None = None  # an entry the server refused: sending stops there
        self.seq = 0
        self.next_try = 0.0
        self._fh: Any = None
        self._acked_end: str | None = None  # a spool file's final status, already sent
        self._latest: dict[str, dict[str, tuple[int, int, float]]] = {}
        self._lock = threading.RLock()  # one call at a time: sent, or kept, in order

    # ---------------------------------------------------------------- logging

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        run_id: str | None = None,
        timestamp: int | None = None,
    ) -> None:
        if not metrics:
            return
        run_id, ts, step = run_id or self.run_id, timestamp or now_ms(), step or 0
        rows: list[dict[str, Any]] = [
            {"key": k, "value": float(v), "timestamp": ts, "step": int(step)}
            for k, v in metrics.items()
        ]
        with self._lock:
            latest = self._latest.setdefault(run_id, {})
            for row in rows:
                old = latest.get(row["key"])
                if old is None or (row["step"], row["timestamp"]) >= old[:2]:
                    latest[row["key"]] = (row["step"], row["timestamp"], row["value"])
            self._submit({"run_id": run_id, "kind": "metrics", "metrics": rows})

    def log_params(self, params: Mapping[str, str], run_id: str | None = None) -> None:
        if params:
            self._submit(
                {
                    "run_id": run_id or self.run_id,
                    "kind": "params",
                    "params": {k: str(v) for k, v in params.items()},
                }
            )

    def set_tags(self, tags: Mapping[str, str], run_id: str | None = None) -> None:
        if tags:
            self._submit(
                {
                    "run_id": run_id or self.run_id,
                    "kind": "tags",
                    "tags": {k: str(v) for k, v in tags.items()},
                }
            )

    def log_artifact(
        self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None
    ) -> None:
        """A file, or with ``log_artifacts`` semantics (its contents) a directory."""
        path = Path(path)
        kind = "artifacts" if path.is_dir() else "artifact"
        self._submit(
            {
                "run_id": run_id or self.run_id,
                "kind": kind,
                "path": str(path.resolve()),
                "artifact_path": artifact_path,
            },
            stage=lambda e: self._stage_copy(e),
        )

    def log_table(self, data: Any, artifact_file: str, run_id: str | None = None) -> None:
        """``MlflowClient.log_table``; kept, the table is written as MLflow writes it."""
        import pandas as pd

        run_id = run_id or self.run_id
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)

        def stage(entry: dict[str, Any]) -> None:
            rel = self._stage_path(posixpath.basename(artifact_file))
            frame.to_json(self.spool_dir / rel, orient="split", index=False, date_format="iso")
            entry["path"] = rel

        def send() -> None:
            with _upload_timeout():
                self.client.log_table(run_id, frame, artifact_file)

        self._submit(
            {"run_id": run_id, "kind": "table", "artifact_file": artifact_file},
            send=send,
            stage=stage,
        )

    def log_input(
        self, dataset: Mapping[str, Any], context: str, run_id: str | None = None
    ) -> None:
        """A dataset input: ``dataset`` is ``mlflow.data.Dataset.to_dict()``."""
        keep = ("name", "digest", "source_type", "source", "schema", "profile")
        self._submit(
            {
                "run_id": run_id or self.run_id,
                "kind": "input",
                "context": context,
                "dataset": {k: dataset.get(k) for k in keep},
            }
        )

    def end_run(self, status: str, run_id: str | None = None) -> None:
        """Set a run's final status (for MLflow's active run see :meth:`end_active_run`)."""
        self._submit(
            {"run_id": run_id or self.run_id, "kind": "end", "status": status, "end_time": now_ms()}
        )

    def end_active_run(self, status: str) -> None:
        """``mlflow.end_run(status)`` for the stage run, MLflow's active run: the run leaves
        MLflow's stack whether or not the server answers; its status is kept if need be."""
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            self.end_run(status)
            return
        entry = {"run_id": self.run_id, "kind": "end", "status": status, "end_time": now_ms()}
        with self._lock:
            if not self.pending:  # mlflow.end_run pops the run from the stack, then sets status
                self._submit(entry, send=lambda: mlflow.end_run(status))
                return
            self._keep(entry)
            leave_active_run(status)

    def latest_metrics(self, run_id: str | None = None) -> dict[str, float]:
        """The latest value (highest step) of every metric logged here to ``run_id``."""
        with self._lock:
            return {k: v[2] for k, v in self._latest.get(run_id or self.run_id, {}).items()}

    # -------------------------------------------------------------- internals

    def _submit(
        self,
        entry: dict[str, Any],
        send: Callable[[], None] | None = None,
        stage: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Send ``entry`` now, or keep it (and so every later one) for later."""
        with self._lock:
            self._submit_locked(entry, send, stage)

    def _submit_locked(
        self,
        entry: dict[str, Any],
        send: Callable[[], None] | None,
        stage: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        if not self.pending:
            try:
                (send or (lambda: self._send([entry])))()
                return
            except Exception as err:
                reason = unreachable_reason(err)
                if reason is None:
                    raise
                self._went_away(reason)
        if stage is not None:
            stage(entry)
        self._keep(entry)
        self.flush()

    def _went_away(self, reason: str) -> None:
        self.next_try = time.monotonic() + self.retry
        log.warning(
            "MLflow tracking server %s is not answering (%s); the run goes on, what "
            "it logs is kept in order in %s and sent once the server answers "
            "(tried again every %g s at most)",
            redact_uri(self.uri),
            reason,
            self.spool,
            self.retry,
        )

    def _stage_path(self, name: str) -> str:
        rel = f"{self.run_id}/{self.seq + 1:06d}/{name}"
        (self.spool_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        return rel

    def _stage_copy(self, entry: dict[str, Any]) -> None:
        src = Path(entry["path"])
        rel = self._stage_path(src.name)
        _link_or_copy(src, self.spool_dir / rel)
        entry["path"] = rel

    def _open(self) -> None:
        if self._fh is not None:
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.spool, "a", encoding="utf-8")  # noqa: SIM115 (held open, locked)
        if fcntl is not None:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _write(self, record: dict[str, Any]) -> None:
        self._open()
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _keep(self, entry: dict[str, Any]) -> None:
        self.seq += 1
        entry = {"seq": self.seq, **entry}
        self.pending.append(entry)
        self._write(entry)

    def _path(self, entry: dict[str, Any]) -> str:
        path = Path(entry["path"])
        return str(path if path.is_absolute() else self.spool_dir / path)

    def _send(self, group: list[dict[str, Any]]) -> None:
        """Send entries of one kind and run (only metrics come in groups of several)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        first, client = group[0], self.client
        kind, run_id = first["kind"], first["run_id"]
        if kind == "metrics":
            rows = [m for e in group for m in e["metrics"]]
            metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in rows]
            for lo in range(0, len(metrics), _MAX_METRICS):
                client.log_batch(run_id, metrics=metrics[lo : lo + _MAX_METRICS])
        elif kind == "params":
            params = [Param(k, v) for k, v in first["params"].items()]
            for lo in range(0, len(params), _MAX_PARAMS):
                client.log_batch(run_id, params=params[lo : lo + _MAX_PARAMS])
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in first["tags"].items()]
            for lo in range(0, len(tags), _MAX_TAGS):
                client.log_batch(run_id, tags=tags[lo : lo + _MAX_TAGS])
        elif kind == "artifact":
            with _upload_timeout():
                client.log_artifact(run_id, self._path(first), first.get("artifact_path"))
        elif kind == "artifacts":
            with _upload_timeout():
                client.log_artifacts(run_id, self._path(first), first.get("artifact_path"))
        elif kind == "table":
            with _upload_timeout():
                self._send_table(first)
        elif kind == "input":
            data = first["dataset"]
            client.log_inputs(
                run_id,
                [
                    DatasetInput(
                        Dataset(**data), [InputTag("mlflow.data.context", first["context"])]
                    )
                ],
            )
        elif kind == "end":
            client.set_terminated(run_id, first["status"], first.get("end_time"))
        else:
            raise LmopsError(f"{self.spool}: unknown entry kind {kind!r} (seq {first.get('seq')})")

    def _send_table(self, entry: dict[str, Any]) -> None:
        # what MlflowClient.log_table does with a written table, idempotently
        run_id, artifact_file = entry["run_id"], entry["artifact_file"]
        folder = posixpath.dirname(posixpath.normpath(artifact_file)) or None
        self.client.log_artifact(run_id, self._path(entry), folder)
        tags = self.client.get_run(run_id).data.tags
        listed = json.loads(tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
        item = {"path": artifact_file, "type": "table"}
        if item not in listed:
            self.client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, json.dumps([*listed, item]))

    def _next_group(self) -> list[dict[str, Any]]:
        first = self.pending[0]
        group, count = [first], len(first.get("metrics", ()))
        if first["kind"] != "metrics":
            return group
        for entry in self.pending[1:]:
            if (
                entry["kind"] != "metrics"
                or entry["run_id"] != first["run_id"]
                or count + len(entry["metrics"]) > _MAX_METRICS
            ):
                break
            group.append(entry)
            count += len(entry["metrics"])
        return group

    # ---------------------------------------------------------------- flushing

    def flush(self, force: bool = False) -> bool:
        """Send what is kept, at most once per retry interval (``force``: now). True when
        nothing is left."""
        with self._lock:
            return self._flush_locked(force)

    def _flush_locked(self, force: bool) -> bool:
        if not self.pending:
            if self._fh is not None:  # a spool file whose entries all reached the server
                self._discard()
            return True
        if self.rejected is not None or (not force and time.monotonic() < self.next_try):
            return False
        self.next_try = time.monotonic() + self.retry
        if is_http(self.uri) and probe(self.uri) is not None:
            return False
        sent = 0
        while self.pending:
            group = self._next_group()
            try:
                self._send(group)
            except Exception as err:
                if unreachable_reason(err) is None:
                    self.rejected = (
                        f"the server rejected entry {group[0]['seq']} "
                        f"({group[0]['kind']}) of {self.spool}: "
                        f"{redact(str(err))[:500]}"
                    )
                    log.warning("%s; it and what follows stay in the spool file", self.rejected)
                break
            del self.pending[: len(group)]
            sent += len(group)
            self._write({"ack": group[-1]["seq"]})
        if self.pending:
            return False
        self._discard()
        log.warning(
            "MLflow tracking server %s answers again: %d kept entries sent",
            redact_uri(self.uri),
            sent,
        )
        return True

    def close(self, wait: float | None = None) -> bool:
        """Send what is kept, trying for up to ``wait`` seconds (``LMOPS_TRACKING_FLUSH_WAIT``);
        True when everything reached the server. Otherwise the spool file stays, and a
        warning says how to upload it."""
        wait = seconds_setting(FLUSH_WAIT_ENV, DEFAULT_FLUSH_WAIT) if wait is None else wait
        deadline = time.monotonic() + wait
        while not self.flush(force=True):
            left = deadline - time.monotonic()
            if self.rejected is not None or left <= 0:
                break
            time.sleep(min(max(self.retry, 0.5), left))
        with self._lock:
            if not self.pending:
                return True
            self.release()
        why = self.rejected or (
            f"the server {redact_uri(self.uri)} did not answer within {wait:g} s ({FLUSH_WAIT_ENV})"
        )
        log.warning(
            "%s: %d tracking entries of MLflow run %s are kept in %s; once the "
            "server answers, upload them (same MLFLOW_TRACKING_URI) with: "
            "lmops tracking sync",
            why,
            len(self.pending),
            self.run_id,
            self.spool,
        )
        return False

    def release(self) -> None:
        """Close the spool file (and so unlock it) without deleting it."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def _discard(self) -> None:
        self.release()
        with contextlib.suppress(FileNotFoundError):
            self.spool.unlink()
        shutil.rmtree(self.spool_dir / self.run_id, ignore_errors=True)

    # ------------------------------------------------------------ spool files

    def final_status(self) -> str | None:
        """The status the kept entries give the stage run, if they end it."""
        ends = [
            e["status"] for e in self.pending if e["kind"] == "end" and e["run_id"] == self.run_id
        ]
        return ends[-1] if ends else self._acked_end

    def end_abandoned(self, message: str) -> None:
        """Mark the stage run FAILED, after what is kept: its process died before ending it."""
        with self._lock:
            self._keep({"run_id": self.run_id, "kind": "tags", "tags": {tag.ERROR: message}})
            self._keep(
                {"run_id": self.run_id, "kind": "end", "status": "FAILED", "end_time": now_ms()}
            )

    @classmethod
    def from_spool(cls, path: str | Path, client: Any, uri: str) -> RunBuffer:
        """The buffer a stage left in a spool file, locked, its unsent entries pending."""
        path = Path(path)
        buf = cls(path.stem, client, path.parent, uri, retry_seconds=0.0)
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open, locked)
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise SpoolBusy(f"{path}: still being written by a running stage") from None
        fh.seek(0)
        entries, acked = [], 0
        for number, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                log.warning("%s: line %d is not complete JSON; skipped", path, number)
                continue
            if "ack" in record:
                acked = max(acked, int(record["ack"]))
            else:
                entries.append(record)
        buf._fh = fh
        buf.seq = max((e["seq"] for e in entries), default=acked)
        buf.pending = [e for e in entries if e["seq"] > acked]
        ends = [
            e["status"]
            for e in entries
            if e["seq"] <= acked and e["kind"] == "end" and e["run_id"] == buf.run_id
        ]
        buf._acked_end = ends[-1] if ends else None
        return buf
