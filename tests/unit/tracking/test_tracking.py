"""MLflow tracking: nested stage runs under one parent, failures recorded, data by digest."""

from __future__ import annotations

import sys

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmops.tracking import runs as tracking
from tests.conftest import REPO


def _runs(kind):
    exp = mlflow.get_experiment_by_name("lmops-test")
    return MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`lmops.kind` = '{kind}'"
    )


def test_stages_nest_under_one_parent(mlflow_store, monkeypatch):
    with tracking.stage_run("first", {"a": 1, "nested": [1, 2]}):
        mlflow.log_metric("first/x", 3.0)
    parent = _runs("pipeline")[0]
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    with tracking.stage_run("second", {"b": "two"}):
        mlflow.log_metric("second/y", 4.0)

    assert len(_runs("pipeline")) == 1
    stages = {r.data.tags["lmops.stage"]: r for r in _runs("stage")}
    assert set(stages) == {"first", "second"}
    for run in stages.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
    assert stages["first"].data.params == {"first.a": "1", "first.nested": "[1, 2]"}
    assert stages["second"].data.metrics["second/y"] == 4.0
    assert stages["first"].data.metrics["first/wall_seconds"] >= 0
    assert MlflowClient().get_run(parent.info.run_id).info.status == "FINISHED"


def test_failure_marks_stage_and_parent_failed(mlflow_store):
    with pytest.raises(ValueError, match="boom"), tracking.stage_run("broken"):
        raise ValueError("boom")
    (stage,) = _runs("stage")
    assert stage.info.status == "FAILED"
    assert stage.data.tags["lmops.error"] == "ValueError: boom"
    parent = MlflowClient().get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert mlflow.active_run() is None


def test_dvc_env_becomes_tags(mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "vocab")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    with tracking.stage_run("vocab"):
        pass
    (stage,) = _runs("stage")
    assert stage.data.tags["dvc.stage"] == "vocab"
    assert stage.data.tags["dvc.exp_name"] == "exp-abc"
    (parent,) = _runs("pipeline")
    assert parent.info.run_name == "exp-abc"


def test_data_is_referenced_by_digest(mlflow_store, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("hello\n")
    with tracking.stage_run("reader") as run:
        digest = tracking.log_data_input(data, "corpus")
    assert digest == tracking.file_digest(data)
    got = MlflowClient().get_run(run.info.run_id)
    assert got.inputs.dataset_inputs[0].dataset.digest == digest
    assert got.inputs.dataset_inputs[0].dataset.name == "corpus"
    (data / "a.txt").write_text("changed\n")
    assert tracking.file_digest(data) != digest


def test_dvc_md5_comes_from_the_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  clean:\n    outs:\n    - path: data/clean\n"
        "      md5: abc123.dir\n"
    )
    assert tracking.dvc_md5("data/clean") == "abc123.dir"
    assert tracking.dvc_md5("data/other") is None


def _project(root, lr: float) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"]["lr"] = lr
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")


def test_the_pipeline_run_holds_the_params_files_and_stage_metrics(mlflow_store, tmp_path):
    _project(tmp_path, 0.002)
    with tracking.stage_run("first", {"a": 1}):
        mlflow.log_metric("first/x", 3.0)
    (parent,) = _runs("pipeline")
    # the whole params file, resolved: defaults included, sections as prefixes
    assert parent.data.params["finetune.lr"] == "0.002"
    assert parent.data.params["vocab.vocab_size"] == str(
        yaml.safe_load((REPO / "params.yaml").read_text())["vocab"]["vocab_size"]
    )
    assert parent.data.params["tokenise.num_proc"]
    assert "first.a" not in parent.data.params  # stage params stay on the stage run
    assert parent.data.metrics["first/x"] == 3.0 and "first/wall_seconds" in parent.data.metrics
    names = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"params.yaml", "dvc.lock"} <= names


def test_a_reused_parent_keeps_its_first_params_with_a_warning(mlflow_store, tmp_path, monkeypatch):
    _project(tmp_path, 0.002)
    with tracking.stage_run("first"):
        pass
    (parent,) = _runs("pipeline")
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    _project(tmp_path, 0.004)
    with (
        pytest.warns(UserWarning, match=r"other values for \['finetune.lr'\]"),
        tracking.stage_run("second"),
    ):
        pass
    assert MlflowClient().get_run(parent.info.run_id).data.params["finetune.lr"] == "0.002"


def test_compare_shows_the_one_param_that_differs(mlflow_store, tmp_path, capsys):
    from lmops import cli
    from lmops.tracking import compare

    for lr in (0.002, 0.004):
        _project(tmp_path, lr)
        with tracking.stage_run("finetune", {"lr": lr}):
            mlflow.log_metric("finetune/train_loss", 4.0 + lr)
            mlflow.log_metric("finetune/steps", 30)
    new, old = compare.recent_runs(2)
    runs = [compare.summarise(r) for r in (old, new)]
    assert runs[0].stages == runs[1].stages == ["finetune"]
    rows = compare.table(runs)
    # the headline metrics (of these, the training time), the param that differs; the
    # other metrics with --all
    assert [(kind, key) for kind, key, _ in rows] == [
        ("metric", "finetune/wall_seconds"),
        ("param", "finetune.lr"),
    ]
    assert rows[1][2] == ["0.002", "0.004"]
    assert {key for _, key, _ in compare.table(runs, all_rows=True)} >= {
        "finetune/train_loss",
        "finetune/steps",
        "vocab.vocab_size",
    }

    cli.main(["compare", "--last", "2"])
    out = capsys.readouterr().out
    assert "finetune.lr" in out and "0.004" in out and "vocab.vocab_size" not in out
    with pytest.raises(SystemExit):
        cli.main(["compare", "no-such-run"])
    assert "MLflow run no-such-run: not found" in capsys.readouterr().err


def _gone_process_tags() -> dict[str, str]:
    """The host, pid and start-time tags of a process that ran and is gone."""
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    tags = tracking.process_tags(psutil.Process(proc.pid))
    proc.communicate(b"")
    return tags


@pytest.mark.skipif(sys.platform != "linux", reason="psutil derives start times so on Linux")
def test_a_wall_clock_adjustment_moves_no_process_start(monkeypatch):
    """On Linux psutil's create_time() is boot time + ticks since boot, and the kernel's boot
    time follows the wall clock: an NTP adjustment of 2 s between two stages of one
    `dvc repro` split it into two pipeline runs, and a live run looked vanished."""
    import psutil
    import psutil._pslinux as pslinux

    from lmops.tracking import tags as tag

    before = psutil.Process()
    key, tags = tracking._dvc_process_key(before), tracking.process_tags(before)
    real = pslinux.boot_time
    monkeypatch.setattr(pslinux, "boot_time", lambda: real() + 2.0)
    after = psutil.Process()
    assert after.create_time() == pytest.approx(before.create_time() + 2.0)  # it moved
    assert tracking._dvc_process_key(after) == key
    assert tracking._process_state(tags, tags[tag.HOST]) is True
    assert tracking._process_state({**tags, tag.PID_STAMP: "1"}, tags[tag.HOST]) is False


def test_reconcile_ends_only_runs_whose_process_vanished(mlflow_store):
    from lmops.tracking import tags as tag

    client, exp = tracking.client_and_experiment()
    gone, alive = _gone_process_tags(), tracking.process_tags()
    other_host = {**alive, tag.HOST: "elsewhere"}
    reused_pid = {**alive, tag.PID_START: f"{float(alive[tag.PID_START]) - 3600:.2f}"}
    legacy = {k: v for k, v in reused_pid.items() if k != tag.PID_STAMP}  # before the stamp
    reused_pid[tag.PID_STAMP] = "1"

    def make(name, tags, parent=None):
        more = {"mlflow.parentRunId": parent} if parent else {}
        return client.create_run(exp, run_name=name, tags={**tags, **more}).info.run_id

    dead_parent = make("dead-pipeline", gone)
    dead_stage = make("dead-stage", gone, dead_parent)
    held_parent = make("held-pipeline", gone)  # its owner is gone, a stage of it lives
    live_stage = make("live-stage", alive, held_parent)
    reused = make("reused-pid", reused_pid)
    reused_legacy = make("reused-pid-legacy", legacy)
    remote = make("remote", other_host)
    untagged = make("untagged", {})

    dry = tracking.reconcile(dry_run=True)
    assert len(dry) == 4 and all("would end as FAILED" in line for line in dry)
    assert client.get_run(dead_stage).info.status == "RUNNING"

    lines = tracking.reconcile()
    gone_runs = {dead_parent, dead_stage, reused, reused_legacy}
    ended = {run_id for run_id in gone_runs if run_id in "".join(lines)}
    assert ended == gone_runs and len(lines) == 4
    for run_id in gone_runs:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.info.end_time is not None
        assert run.data.tags[tag.ERROR].startswith(tracking.VANISHED)
    pid = gone[tag.PID]
    assert client.get_run(dead_stage).data.tags[tag.ERROR] == (
        f"process vanished (SIGKILL or out of memory?): pid {pid} on {gone[tag.HOST]} is gone"
    )
    for run_id in (held_parent, live_stage, remote, untagged):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert tracking.reconcile() == []  # nothing more to do

    # another host's runs (and untagged ones) only past the user's limit
    assert tracking.reconcile(other_hosts_after=1.0) == []
    lines = tracking.reconcile(other_hosts_after=0.0)
    assert len(lines) == 2
    assert client.get_run(remote).data.tags[tag.ERROR].startswith("no end after 0.0 h on elsewhere")
    assert client.get_run(untagged).info.status == "FAILED"
    assert client.get_run(live_stage).info.status == "RUNNING"


def test_a_new_pipeline_run_reconciles_and_stage_runs_say_where_they_run(mlflow_store):
    import os
    import socket

    from lmops.tracking import tags as tag

    client, exp = tracking.client_and_experiment()
    ghost = client.create_run(exp, run_name="ghost", tags=_gone_process_tags()).info.run_id
    with tracking.stage_run("first") as run:
        tags = client.get_run(run.info.run_id).data.tags
    assert (tags[tag.HOST], tags[tag.PID]) == (socket.gethostname(), str(os.getpid()))
    assert client.get_run(ghost).info.status == "FAILED"


def test_ctrl_c_and_sigterm_end_the_stage_and_pipeline_runs_as_killed(mlflow_store):
    import signal

    from lmops.errors import Stopped

    with pytest.raises(Stopped), tracking.stage_run("first"):
        raise Stopped(signal.SIGTERM)
    (stage,), (parent,) = _runs("stage"), _runs("pipeline")
    assert (stage.info.status, parent.info.status) == ("KILLED", "KILLED")
    assert stage.data.tags["lmops.error"] == "stopped by SIGTERM"
    assert parent.data.tags["lmops.error"] == "first: stopped by SIGTERM"


def test_tracking_sync_also_ends_runs_whose_process_vanished(mlflow_store, tmp_path):
    from lmops.tracking import tags as tag

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the project root: spool under it
    client, exp = tracking.client_and_experiment()
    ghost = client.create_run(exp, run_name="ghost", tags=_gone_process_tags()).info.run_id
    lines = tracking.sync()
    assert lines[0] == f"nothing to sync: no spool files in {tmp_path / 'mlruns' / 'spool'}"
    assert lines[1:] == [
        f"run {ghost} (ghost): {client.get_run(ghost).data.tags[tag.ERROR]}; ended as FAILED"
    ]
    assert client.get_run(ghost).info.status == "FAILED"
