"""MLflow tracking: nested stage runs under one parent, failures recorded, data by digest."""

from __future__ import annotations

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
    assert [(kind, key) for kind, key, _ in rows] == [
        ("param", "finetune.lr"),
        ("metric", "finetune/train_loss"),
    ]
    assert rows[0][2] == ["0.002", "0.004"]
    assert {key for _, key, _ in compare.table(runs, all_rows=True)} >= {
        "finetune/steps",
        "vocab.vocab_size",
    }

    cli.main(["compare", "--last", "2"])
    out = capsys.readouterr().out
    assert "finetune.lr" in out and "0.004" in out and "vocab.vocab_size" not in out
    with pytest.raises(SystemExit):
        cli.main(["compare", "no-such-run"])
    assert "MLflow run no-such-run: not found" in capsys.readouterr().err
