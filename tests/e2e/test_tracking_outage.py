"""A tracking server that does not answer, or goes away mid-run, against a real
`mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to a local directory).

- not answering when a stage starts: the stage stops at once, one line, nothing written;
- lost while training and back before the end: every step of every metric arrives, with
  its original timestamp, and the runs end FINISHED;
- still away at the end: the stage leaves a spool file, and `lmops tracking sync` uploads
  it once the server is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmops.config import load_profile
from lmops.core.train import fit, lm_loss, seed_everything, window_batches
from lmops.pipeline.training import VALID_LOSS
from lmops.tracking import runs as tracking
from lmops.tracking import system
from lmops.tracking.buffer import (
    FLUSH_WAIT_ENV,
    PROBE_TIMEOUT,
    RETRY_ENV,
    TrackingServerError,
    check_server,
)
from tests.conftest import REPO, dvc_env
from tests.support.ddp_worker import BLOCK, SEED, TinyLM, config, tokens
from tests.support.helpers import listening_port, mlflow_server_cmd, wait_for

pytestmark = pytest.mark.slow

EXPERIMENT = "lmops-outage-test"
STAGE = "tiny"
KEYS = ("train_loss", "lr", "grad_norm", "tokens_per_sec", VALID_LOSS)
SECRETS = {  # each must appear nowhere: no param, tag, artifact or output
    "MLFLOW_TRACKING_PASSWORD": "pw-7c1e5a9d",
    "MLFLOW_TRACKING_TOKEN": "tok-3f8b2e6a",
    "AWS_SECRET_ACCESS_KEY": "aws-9d4c7b1f",
    "HF_TOKEN": "hf-5a2e8c3d",
}
URI_SECRET = "uri-6b1d9f4e"


class Server:
    """`mlflow server` that a test can stop and start again on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.port: int | None = None  # the one the first start got
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.proc is not None:
            return
        # the first start binds port 0 and the kernel picks a free one; a restart must bind
        # that port again, however: the clients' URI is fixed, and a server that comes back
        # on the same port and store is what these tests are about
        port = 0 if self.port is None else self.port
        cmd = mlflow_server_cmd(self.root, port)
        log = self.root / "server.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=dvc_env(), start_new_session=True
            )
        if self.port is None:
            self.port = listening_port(self.proc, 180, log)
        wait_for(f"{self.uri}/health", self.proc, log)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-outage"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live(server):
    server.start()  # again, if an earlier test left it stopped
    return server


def make_project(root: Path) -> Path:
    """A directory the stage scripts run in: dvc.yaml and the tiny profile as params.yaml."""
    root.mkdir(exist_ok=True)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    params = load_profile(REPO / "params.tiny.yaml", REPO / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def clean_stage(root: Path, env: dict[str, str], out: str = "data") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "stages/clean.py"),
        "--params",
        "params.yaml",
        "--out",
        f"{out}/clean",
        "--stats",
        f"{out}/clean.json",
    ]
    return subprocess.run(
        cmd, cwd=root, env=dvc_env(env), capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def in_project(tmp_path, monkeypatch, server):
    """Run in-process stages in a fresh project that tracks to ``server``."""
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.setenv(RETRY_ENV, "0")  # retry on every log call: the test's clock is short
    for var in ("LMOPS_PARENT_RUN_ID", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    import mlflow

    yield root
    while mlflow.active_run():
        mlflow.end_run()


def client_for(server: Server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def train(out: Path, steps: int, on_eval) -> object:
    """The real training loop on a tiny model, logging every step; ``on_eval(step)`` runs
    in each step's evaluation, before its metrics are logged."""
    seed_everything(SEED)

    def evaluate(model, step):
        on_eval(step)
        return {VALID_LOSS: 3.0 - step / 100}

    return fit(
        TinyLM(),
        window_batches(tokens(), BLOCK, SEED),
        lm_loss,
        config(max_steps=steps, eval_interval=1, checkpoint_interval=steps),
        out,
        seed=SEED,
        stage=STAGE,
        resolved_config={"model": "tiny"},
        evaluate=evaluate,
        log=tracking.StageLog(),
    )


def assert_every_step(client, run_id: str, result, steps: int) -> dict:
    rows = {row["step"]: row for row in result.history}
    histories = {}
    for key in KEYS:
        history = sorted(client.get_metric_history(run_id, f"{STAGE}/{key}"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, steps + 1)), key
        if key != "tokens_per_sec":
            assert [m.value for m in history] == pytest.approx(
                [rows[s][key] for s in range(1, steps + 1)]
            ), key
        histories[key] = history
    return histories


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def spool_files(root: Path) -> list[Path]:
    return sorted((root / "mlruns" / "spool").glob("*.jsonl"))


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_stage_stops_at_once_when_the_server_does_not_answer(tmp_path, kind):
    root = make_project(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == "silent":  # accepts connections, never answers
            sock.listen(8)
        port = sock.getsockname()[1]
        uri = f"http://lmops:{URI_SECRET}@127.0.0.1:{port}"
        out = clean_stage(root, {"MLFLOW_TRACKING_URI": uri})
        # the check the stage ran, timed on its own: the probe's wait and no more
        started = time.monotonic()
        with pytest.raises(TrackingServerError, match="is not answering"):
            check_server(uri)
        elapsed = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"lmops clean: error: MLflow tracking server http://***@127.0.0.1:{port} is not answering ("
    ), out.stderr
    assert "unset MLFLOW_TRACKING_URI" in last and "Traceback" not in out.stderr
    assert URI_SECRET not in out.stdout + out.stderr
    assert elapsed < PROBE_TIMEOUT + 1, elapsed
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]


def test_a_server_lost_mid_run_loses_no_metric(live, in_project, monkeypatch):
    steps, seen = 14, {}
    cpu = "system/cpu_utilization_percentage"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")

    def on_eval(step):
        if step == 4:
            seen["stop_ms"] = time.time() * 1000
            live.stop()
        elif step == 7:
            # one more system metrics point, taken while the server is away
            monitor = system.monitor_of(tracking.mlflow_active_run_id() or "")
            assert monitor is not None and monitor.wait_for(monitor.published + 1, timeout=10)
            seen["monitor"] = monitor
            seen["spooled"] = [
                json.loads(line)
                for f in spool_files(in_project)
                for line in f.read_text().splitlines()
            ]
            seen["restart_ms"] = time.time() * 1000
            live.start()
        elif step == 10:
            seen["spool_after_restart"] = spool_files(in_project)

    with tracking.stage_run(STAGE, {"lr": 0.03}) as run:
        result = train(in_project / "work", steps, on_eval)
        tracking.log_stage_outputs(
            STAGE, {"final_loss": result.train_loss}, model_dir=result.checkpoint
        )

    # while away, every step was kept in order in the spool file ...
    kept = [
        m["step"]
        for e in seen["spooled"]
        if e.get("kind") == "metrics"
        for m in e["metrics"]
        if m["key"] == f"{STAGE}/train_loss"
    ]
    assert kept == [5, 6, 7]
    # ... and sent as soon as the server answered again, mid-run
    assert seen["spool_after_restart"] == [] and spool_files(in_project) == []

    client = client_for(live)
    histories = assert_every_step(client, run.info.run_id, result, steps)
    # the kept metrics carry the time they were logged, not the time they were sent
    away = [m for m in histories["train_loss"] if 4 < m.step < 7]
    assert away and all(m.timestamp < seen["restart_ms"] for m in away)
    # so do the system metrics, sampled all along: kept while away, none lost
    kept_system = {
        (m["step"], m["timestamp"], m["value"])
        for e in seen["spooled"]
        if e.get("kind") == "metrics"
        for m in e["metrics"]
        if m["key"] == cpu
    }
    assert kept_system
    assert all(seen["stop_ms"] < t < seen["restart_ms"] for _, t, _ in kept_system)
    system_history = client.get_metric_history(run.info.run_id, cpu)
    assert kept_system <= {(m.step, m.timestamp, m.value) for m in system_history}
    assert sorted({m.step for m in system_history}) == list(range(seen["monitor"].published))
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params[f"{STAGE}.lr"] == "0.03"
    assert f"{STAGE}/final_loss" in got.data.metrics
    assert {"model/model.safetensors", f"{STAGE}_loss_curves.png"} <= artifacts(
        client, run.info.run_id
    )
    parent = client.get_run(got.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[f"{STAGE}/{VALID_LOSS}"] == pytest.approx(3.0 - steps / 100)


def test_a_server_still_away_at_the_end_leaves_a_spool_for_tracking_sync(
    live, in_project, monkeypatch, caplog
):
    import pandas as pd

    monkeypatch.setenv(FLUSH_WAIT_ENV, "1")
    steps = 8

    def on_eval(step):
        if step == 3:
            live.stop()

    with tracking.stage_run(STAGE, {"lr": 0.03}) as run:
        result = train(in_project / "work", steps, on_eval)
        tracking.log_stage_outputs(
            STAGE, {"final_loss": result.train_loss, "note": "kept"}, model_dir=result.checkpoint
        )
        tracking.log_table(
            pd.DataFrame({"source": ["a", "b"], "score": [1.0, 2.0]}), f"{STAGE}/samples.json"
        )
        tracking.log_dict({"steps": steps}, f"{STAGE}/meta.json")
    run_id = run.info.run_id

    # the stage finished; what the server did not take is in the spool file, and the
    # warning says how to upload it
    (spool,) = spool_files(in_project)
    assert spool.name == f"{run_id}.jsonl"
    assert "lmops tracking sync" in caplog.text and str(spool) in caplog.text
    entries = [json.loads(line) for line in spool.read_text().splitlines()]
    kinds = {e["kind"] for e in entries if "kind" in e}
    assert {"metrics", "tags", "artifact", "artifacts", "table", "end"} <= kinds
    ends = {e["run_id"]: e["status"] for e in entries if e.get("kind") == "end"}
    assert ends[run_id] == "FINISHED" and len(ends) == 2  # the stage run and its parent

    live.start()
    client = client_for(live)
    # a spool left by a stage that died mid-run: replayed, and its run marked FAILED
    exp = client.get_experiment_by_name(EXPERIMENT)
    crashed = client.create_run(exp.experiment_id).info.run_id
    (spool.parent / f"{crashed}.jsonl").write_text(
        json.dumps(
            {
                "seq": 1,
                "run_id": crashed,
                "kind": "metrics",
                "metrics": [{"key": "x", "value": 1.5, "timestamp": 1_700_000_000_000, "step": 3}],
            }
        )
        + "\n"
    )

    env = dvc_env({"MLFLOW_TRACKING_URI": live.uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT})

    def sync(*files: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "lmops", "tracking", "sync", *files],
            cwd=in_project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    # one file by name: only it is sent
    one = sync(f"mlruns/spool/{crashed}.jsonl")
    assert f"sent to run {crashed}, now FAILED" in one and run_id not in one
    assert spool_files(in_project) == [spool]
    # then every file left
    rest = sync()
    assert f"sent to run {run_id}, now FINISHED" in rest and crashed not in rest
    assert spool_files(in_project) == []
    assert list((in_project / "mlruns" / "spool").iterdir()) == []  # staged copies too

    assert_every_step(client, run_id, result, steps)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags[f"{STAGE}.note"] == "kept"
    assert json.loads(got.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": f"{STAGE}/samples.json", "type": "table"}
    ]
    assert {
        "model/model.safetensors",
        "model/manifest.json",
        f"{STAGE}_loss_curves.png",
        f"{STAGE}/samples.json",
        f"{STAGE}/meta.json",
    } <= artifacts(client, run_id)
    table = client.load_table(exp.experiment_id, f"{STAGE}/samples.json", [run_id])
    assert list(table["source"]) == ["a", "b"]
    parent = client.get_run(got.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    # rolled up from what the stage logged, the server being away
    assert parent.data.metrics[f"{STAGE}/{VALID_LOSS}"] == pytest.approx(3.0 - steps / 100)
    assert f"{STAGE}/wall_seconds" in parent.data.metrics

    dead = client.get_run(crashed)
    assert dead.info.status == "FAILED" and dead.data.metrics["x"] == 1.5
    assert "ended before its run" in dead.data.tags["lmops.error"]


def test_no_credential_reaches_mlflow_or_the_output(live, tmp_path, monkeypatch):
    root = make_project(tmp_path / "project")
    host = live.uri.removeprefix("http://")
    env = {
        "MLFLOW_TRACKING_URI": f"http://lmops:{URI_SECRET}@{host}",
        "MLFLOW_EXPERIMENT_NAME": "lmops-secrets-test",
        **SECRETS,
    }
    out = clean_stage(root, env)
    assert out.returncode == 0, out.stderr

    # a failure whose message quotes them, in-process: the lmops.error tag is masked
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    with pytest.raises(RuntimeError), tracking.stage_run("broken"):
        raise RuntimeError(f"cannot reach {env['MLFLOW_TRACKING_URI']} with {SECRETS['HF_TOKEN']}")

    client = client_for(live)
    exp = client.get_experiment_by_name("lmops-secrets-test")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags.get("lmops.stage") for r in runs} >= {"clean", "broken"}
    broken = next(r for r in runs if r.data.tags.get("lmops.stage") == "broken")
    assert broken.data.tags["lmops.error"] == (
        f"RuntimeError: cannot reach http://***@{host} with ***"
    )

    secrets = [URI_SECRET, *SECRETS.values()]
    texts = [out.stdout, out.stderr]
    for r in runs:
        texts += [*r.data.params, *r.data.params.values(), *r.data.tags, *r.data.tags.values()]
        folder = tmp_path / "artifacts" / r.info.run_id
        folder.mkdir(parents=True)
        client.download_artifacts(r.info.run_id, "", str(folder))
        texts += [
            p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
        ]
    assert len(texts) > 50
    leaks = [(s, t[:200]) for t in texts for s in secrets if s in t]
    assert leaks == []
