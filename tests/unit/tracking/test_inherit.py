"""A pipeline run carries the metrics of the whole pipeline state: the stages it did not
rerun get theirs from their metrics files, under the keys a rerun would have logged them
with, and `lmops compare` opens with the headline figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmops.orchestrate import repro
from lmops.tracking import compare
from lmops.tracking import runs as tracking
from lmops.tracking import tags as tag

# data/metrics/pretrain.json of a tiny-profile run, as pipeline.pretrain wrote it
PRETRAIN = {
    "flops_per_token": 969600,
    "hardware": {"compile": False, "cpu_count": 2, "device": "cpu", "precision": "bf16"},
    "num_params": 145216,
    "resumed_from": 0,
    "steps": 30,
    "tokens_per_sec": 39929.2,
    "tokens_seen": 15360,
    "train_loss": 5.286734199523925,
    "valid_loss": 5.275415897369385,
    "valid_ppl": 195.4717557984843,
    "wall_seconds": 0.38,
}
EVALUATE = {
    "bleu": 12.41,
    "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
    "bpb_en": 4.069858756232614,
    "chrf": 35.2,
    "hardware": {"device": "cpu", "precision": "bf16"},
    "ppl_en": 187.90828036985152,
    "test_pairs": 32,
}
VALIDATE = {"evaluated": 73, "failed": 0, "success": True, "suites": {"mono_test": {"failed": 0}}}
DISTIL = {"bleu": 9.1, "bleu_retained": None, "param_ratio": 0.2457, "wall_seconds": 0.28}


def _workspace(root: Path) -> None:
    """A dvc.yaml of five stages in a chain (vocab declares no metrics file) and the
    metrics files of validate, pretrain and distil; evaluate's is written by the test."""

    def stage(dep: str | None, out: str, metrics: str | None) -> dict:
        spec: dict = {"cmd": "true", "deps": [dep] if dep else [], "outs": [out]}
        if metrics:
            spec["metrics"] = [{f"data/metrics/{metrics}.json": {"cache": False}}]
        return spec

    stages = {
        "validate": stage(None, "data/validate", "validate"),
        "vocab": stage("data/validate", "data/vocab", None),
        "pretrain": stage("data/vocab", "data/models/pretrain", "pretrain"),
        "evaluate": stage("data/models/pretrain", "data/evaluate", "evaluate"),
        "distil": stage("data/evaluate", "data/models/distil", "distil"),
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "data/metrics").mkdir(parents=True)
    for name, data in (("validate", VALIDATE), ("pretrain", PRETRAIN), ("distil", DISTIL)):
        (root / f"data/metrics/{name}.json").write_text(json.dumps(data))


@pytest.fixture
def workspace(mlflow_store, tmp_path) -> Path:
    _workspace(tmp_path)
    return tmp_path


@pytest.fixture
def under_dvc(monkeypatch):
    """Each call: a new stand-in for the `dvc` process the next stages run under, so they
    share a pipeline run of a plain `dvc repro` (no flow) of their own."""
    procs: list[subprocess.Popen] = []

    def new_dvc() -> None:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        procs.append(proc)
        monkeypatch.setattr(tracking, "_dvc_process", lambda: psutil.Process(proc.pid))

    yield new_dvc
    for proc in procs:
        proc.kill()
        proc.wait()


def _stage(root: Path, name: str, metrics: dict) -> None:
    """What a stage script does: write its metrics file, log it through its run."""
    with tracking.stage_run(name):
        (root / f"data/metrics/{name}.json").write_text(json.dumps(metrics))
        tracking.log_stage_outputs(name, metrics)


def _pipeline_runs() -> list:
    exp = mlflow.get_experiment_by_name("lmops-test")
    return MlflowClient().search_runs(
        [exp.experiment_id],
        f"tags.`{tag.KIND}` = '{tag.KIND_PIPELINE}'",
        order_by=["attributes.start_time ASC"],
    )


def _prefixed(metrics: dict, stage: str) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(f"{stage}/")}


def test_stage_metrics_is_the_key_scheme_of_a_stage_run():
    assert tracking.stage_metrics("validate", VALIDATE) == {
        "validate/evaluated": 73.0,
        "validate/failed": 0.0,
        "validate/success": 1.0,
        "validate/suites.mono_test.failed": 0.0,
    }
    got = tracking.stage_metrics("evaluate", EVALUATE)
    assert got["evaluate/bleu"] == 12.41 and got["evaluate/test_pairs"] == 32.0
    assert not [k for k in got if "hardware" in k or "signature" in k]
    assert "distil/bleu_retained" not in tracking.stage_metrics("distil", DISTIL)


def test_a_run_that_reran_evaluate_only_inherits_the_rest_from_the_metrics_files(
    workspace, under_dvc
):
    under_dvc()
    _stage(workspace, "evaluate", EVALUATE)
    (parent,) = _pipeline_runs()
    metrics, tags = parent.data.metrics, parent.data.tags
    # pretrain did not rerun: its numbers come from data/metrics/pretrain.json, under the
    # keys its stage run logs them with
    assert _prefixed(metrics, "pretrain") == tracking.stage_metrics("pretrain", PRETRAIN)
    assert metrics["pretrain/valid_ppl"] == 195.4717557984843
    assert metrics["pretrain/wall_seconds"] == 0.38
    assert metrics["validate/success"] == 1.0
    # distil's file is there (an earlier run's), and DVC is done: it is the state too
    assert metrics["distil/bleu"] == 9.1 and "distil/bleu_retained" not in metrics
    # evaluate reran: what its metrics file holds, not its run's own clock (no file has it)
    assert metrics["evaluate/bleu"] == 12.41 and "evaluate/wall_seconds" not in metrics
    assert tags[tag.STAGES_RERAN] == "evaluate"
    assert tags[tag.STAGES_INHERITED] == "validate,pretrain,distil"  # vocab declares none
    assert tags[f"{tag.HARDWARE}pretrain.precision"] == "bf16"
    assert parent.info.status == "FINISHED"

    # a run that reran pretrain has the same keys and values, wall time included
    under_dvc()
    _stage(workspace, "pretrain", PRETRAIN)
    _, rerun = _pipeline_runs()
    assert rerun.data.tags[tag.STAGES_RERAN] == "pretrain"
    assert rerun.data.tags[tag.STAGES_INHERITED] == "validate,evaluate,distil"
    assert _prefixed(rerun.data.metrics, "pretrain") == _prefixed(metrics, "pretrain")
    # and so does everything else: the two line up row by row
    assert set(metrics) == set(rerun.data.metrics)
    assert set(rerun.data.metrics) <= set(metrics)
    assert all(metrics[k] == v for k, v in rerun.data.metrics.items())


def test_each_stage_that_ends_the_run_completes_it_without_logging_twice(workspace, under_dvc):
    (workspace / "data/metrics/evaluate.json").write_text(json.dumps({**EVALUATE, "bleu": 10.0}))
    under_dvc()
    _stage(workspace, "pretrain", PRETRAIN)
    _stage(workspace, "evaluate", EVALUATE)
    (parent,) = _pipeline_runs()
    assert parent.data.tags[tag.STAGES_RERAN] == "pretrain,evaluate"
    assert parent.data.tags[tag.STAGES_INHERITED] == "validate,distil"
    # as pretrain ended the run, evaluate's metrics file was an earlier run's; evaluate's
    # rerun replaced its values; validate's were logged once, not once per stage
    client = MlflowClient()
    history = client.get_metric_history(parent.info.run_id, "evaluate/bleu")
    assert [m.value for m in history] == [10.0, 12.41]
    assert parent.data.metrics["evaluate/bleu"] == 12.41
    assert len(client.get_metric_history(parent.info.run_id, "validate/evaluated")) == 1
    # and the hardware it inherited with them: its own is on its stage run
    assert not [k for k in parent.data.tags if k.startswith(f"{tag.HARDWARE}evaluate.")]


def test_a_failed_stage_inherits_nothing_nor_do_those_after_it(workspace, under_dvc):
    (workspace / "data/metrics/pretrain.json").unlink()  # DVC removed it to rerun pretrain
    under_dvc()
    with pytest.raises(RuntimeError, match="diverged"), tracking.stage_run("pretrain"):
        raise RuntimeError("diverged")
    (parent,) = _pipeline_runs()
    assert parent.info.status == "FAILED"
    assert parent.data.tags[tag.STAGES_RERAN] == ""
    assert parent.data.tags[tag.STAGES_INHERITED] == "validate"
    assert set(parent.data.metrics) == set(tracking.stage_metrics("validate", VALIDATE))


def test_a_flow_run_inherits_what_it_did_not_rerun_and_only_what_dvc_found_up_to_date(
    workspace, monkeypatch
):
    (workspace / "data/metrics/evaluate.json").write_text(json.dumps(EVALUATE))
    Stage = repro.StageResult
    run_id, _ = repro.start_parent_run(workspace, tags={})
    results = [Stage("validate", "skipped"), Stage("vocab", "skipped")]
    results += [Stage("pretrain", "restored"), Stage("evaluate", "ran")]
    with monkeypatch.context() as env:  # the flow's stage, nested under its run
        env.setenv(tracking.PARENT_ENV, run_id)
        with tracking.stage_run("evaluate"):
            pass
    repro.end_parent_run(workspace, run_id, "FINISHED", results)
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[tag.STAGES_RERAN] == "evaluate"
    # distil is beyond the target, its file an earlier run's: the state, as dvc exp show
    assert run.data.tags[tag.STAGES_INHERITED] == "validate,pretrain,distil"
    assert _prefixed(run.data.metrics, "pretrain") == tracking.stage_metrics("pretrain", PRETRAIN)
    assert "evaluate/bleu" not in run.data.metrics  # a stage that reran: from its own run

    run_id, _ = repro.start_parent_run(workspace, tags={})
    results = [Stage("validate", "skipped"), Stage("vocab", "skipped")]
    results += [Stage("pretrain", "failed"), Stage("evaluate", "not reached")]
    repro.end_parent_run(workspace, run_id, "FAILED", results, error="StageFailed: pretrain")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tag.STAGES_RERAN] == ""
    assert run.data.tags[tag.STAGES_INHERITED] == "validate"
    assert set(run.data.metrics) == set(tracking.stage_metrics("validate", VALIDATE))


def test_a_pipeline_run_takes_of_a_stage_what_its_metrics_files_hold(workspace):
    """The keys a rerun stage rolls up: its metrics files' (pretrain), none for a stage that
    declares no file (vocab), every key for a stage dvc.yaml does not have."""
    assert tracking.result_keys(workspace, "pretrain") == set(
        tracking.stage_metrics("pretrain", PRETRAIN)
    )
    assert tracking.result_keys(workspace, "vocab") == set()
    assert tracking.result_keys(workspace, "not-a-stage") is None


def test_missing_and_unreadable_metrics_files_are_skipped(tmp_path):
    assert tracking.read_metrics_files(tmp_path, ["data/metrics/none.json"]) is None
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "good.yaml").write_text("bleu: 3.5\n")
    with pytest.warns(UserWarning, match=r"bad.json: not read"):
        got = tracking.read_metrics_files(tmp_path, ["bad.json", "good.yaml"])
    assert got == {"bleu": 3.5}


def _summary(name: str, metrics: dict, params: dict | None = None) -> compare.RunSummary:
    return compare.RunSummary(name, name, params or {}, metrics)


def test_compare_opens_with_the_headline_figures():
    common = {
        "clean/mono_train.rows": 6428.0,
        "tokenise/tokens": 1443873.0,
        "finetune/train_loss": 5.01,
        "evaluate/decode_seconds": 0.17,
        "quantise/shipped_speedup_b1": 1.61,
        "quantise/student_onnx_int8.file_mb": 0.0553,
        "distil/bleu_retained": 0.73,
        "evaluate/ppl_fr": 196.9,
        "evaluate/ppl_en": 187.9,
        "evaluate/bleu": 12.41,
        "pretrain/wall_seconds": 0.38,
    }
    old = _summary("a", {**common, "clean/mono_test.rows": 150.0}, {"evaluate.decode.beam": "2"})
    new = _summary(
        "b",
        {**common, "evaluate/bleu": 11.9, "evaluate/decode_seconds": 0.09},
        {"evaluate.decode.beam": "1"},
    )
    rows = [key for _, key, _ in compare.table([old, new])]
    assert rows == [
        "evaluate/bleu",
        "evaluate/ppl_en",
        "evaluate/ppl_fr",
        "distil/bleu_retained",
        "quantise/student_onnx_int8.file_mb",
        "quantise/shipped_speedup_b1",
        "pretrain/wall_seconds",
        "evaluate.decode.beam",
    ]
    assert compare.headline(common) == rows[:7]
    # --all: every row, the headline first; the other timings only with --timings
    every = [key for _, key, _ in compare.table([old, new], all_rows=True)]
    assert every[:8] == rows
    assert {"clean/mono_test.rows", "clean/mono_train.rows", "finetune/train_loss"} <= set(every)
    assert "evaluate/decode_seconds" not in every
    timed = [key for _, key, _ in compare.table([old, new], volatile=True)]
    assert timed == [*rows, "evaluate/decode_seconds"]
    text = compare.render([old, new], compare.table([old, new])).splitlines()
    assert [line.split()[0] for line in text[2:6]] == [
        "git.commit",
        "reran",
        "inherited",
        "evaluate/bleu",
    ]
