"""The real `dvc` CLI on a tiny profile: data stages build, cache, rerun narrowly, track."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import sacrebleu
import torch
import yaml
from mlflow.tracking import MlflowClient

from lmops.core.train import curve_panels
from lmops.core.translation import load_model, pair_vocab, read_pairs
from lmops.core.vocab import Tokenizer
from lmops.data import layout
from lmops.io import file_digest
from lmops.orchestrate import repro
from lmops.pipeline import quantise
from tests.conftest import dvc, dvc_env, make_tiny_repo
from tests.support import chaos, recorded, workspace

DATA_STAGES = ["clean", "validate", "vocab", "tokenise"]
MODEL_STAGES = ["pretrain", "finetune", "evaluate", "distil", "quantise"]
STAGES = DATA_STAGES + MODEL_STAGES
pytestmark = pytest.mark.slow


def _env(root: Path) -> dict[str, str]:
    return dvc_env()


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding the project's pipeline and the tiny profile."""
    return make_tiny_repo(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def first_run(repo) -> str:
    return dvc(repo, "repro")


def params_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_data_stages_build(repo, first_run):
    assert ran(first_run) == STAGES
    for split in (
        "mono_train",
        "mono_valid",
        "mono_test",
        "parallel_train",
        "parallel_valid",
        "parallel_test",
    ):
        assert (repo / "data/clean" / split / "part-00000.parquet").is_file()
    assert (repo / "data/validate/index.html").is_file()
    meta = json.loads((repo / "data/vocab/meta.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert meta["vocab_size"] == params["vocab"]["vocab_size"]
    sidecar = json.loads((repo / "data/tokens/pretrain_train.json").read_text())
    assert (repo / "data/tokens/pretrain_train.bin").stat().st_size == (
        sidecar["length"] * (2 if sidecar["dtype"] == "uint16" else 4)
    )
    clean = json.loads((repo / "data/metrics/clean.json").read_text())
    for split in ("mono_train", "parallel_train", "parallel_test"):
        rows = layout.split_rows(repo / "data/clean", split)
        assert rows > 0 and clean[f"{split}.rows"] == rows
    assert clean["leaked.total"] == 0
    metrics = dvc(repo, "metrics", "show", "--json")
    assert "data/metrics/tokenise.json" in metrics


def test_stages_are_nested_runs_of_one_pipeline_run(repo, first_run):
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlruns/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("lmops")
    parents = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    stages = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'stage'")
    assert sorted(r.data.tags["lmops.stage"] for r in stages) == sorted(STAGES)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    for run in stages:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dvc.stage"] == run.data.tags["lmops.stage"]
        assert run.data.tags["git.commit"] == commit
        assert run.data.metrics[f"{run.data.tags['lmops.stage']}/wall_seconds"] > 0
    vocab = next(r for r in stages if r.data.tags["lmops.stage"] == "vocab")
    assert vocab.data.params["vocab.vocab_size"] == str(
        yaml.safe_load((repo / "params.yaml").read_text())["vocab"]["vocab_size"]
    )
    artifacts = [a.path for a in client.list_artifacts(vocab.info.run_id, "vocab")]
    assert any(p.endswith("spm.model") for p in artifacts)


def test_second_repro_does_nothing(repo, first_run):
    out = dvc(repo, "repro")
    assert ran(out) == []
    assert "up to date" in out or "didn't change" in out
    assert "changed" not in dvc(repo, "status")


def test_a_change_to_logging_code_reruns_nothing_and_to_the_model_reruns_training(repo, first_run):
    """The deps rule at work (tests/support/imports.py): tracking code is no stage's dep."""
    from lmops.orchestrate import dag

    runs = repo / "src/lmops/tracking/runs.py"
    model = repo / "src/lmops/core/model.py"
    saved = runs.read_text(), model.read_text()
    try:
        runs.write_text(saved[0] + "\n# a change to how metrics are logged\n")
        assert "changed" not in dvc(repo, "status")
        assert dag.stages_to_run(repo) == []
        model.write_text(saved[1] + "\n# a change to the model\n")
        changed = set(json.loads(dvc(repo, "status", "--json")))
        readers = {
            name
            for name, stage in dag.load_dvc_yaml(repo)["stages"].items()
            if "src/lmops/core/model.py" in stage["deps"]
        }
        assert changed == readers and {"pretrain", "finetune", "distil"} <= readers
        assert not readers & {"clean", "validate", "vocab", "tokenise"}
    finally:
        runs.write_text(saved[0])
        model.write_text(saved[1])
    assert "changed" not in dvc(repo, "status")


def test_one_param_reruns_only_what_reads_it(repo, first_run):
    from lmops.orchestrate.repro import up_to_date

    assert up_to_date(repo) and up_to_date(repo, "evaluate")
    params = params_of(repo)
    params["evaluate"]["n_samples"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the flow's one-call check agrees with what dvc repro then does
    assert not up_to_date(repo) and not up_to_date(repo, "evaluate")
    assert up_to_date(repo, "finetune")
    assert ran(dvc(repo, "repro")) == ["evaluate"]
    assert up_to_date(repo)
    samples = (repo / "data/evaluate/samples.jsonl").read_text().splitlines()
    assert len(samples) == params["evaluate"]["n_samples"]


def test_a_rerun_with_the_same_output_stops_the_cascade(repo, first_run):
    """tokenise reruns for a new batch size, writes the same bytes; nothing after it reruns."""
    params = params_of(repo)
    params["tokenise"]["batch_size"] = 77
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(dvc(repo, "repro")) == ["tokenise"]


# ------------------------------------------------------------------ model stages


def test_model_stages_learn_and_report(repo, first_run):
    params = params_of(repo)
    vocab_size = params["vocab"]["vocab_size"]
    pre = json.loads((repo / "data/metrics/pretrain.json").read_text())
    assert pre["steps"] == params["pretrain"]["max_steps"]
    assert (
        pre["tokens_seen"]
        == pre["steps"] * params["pretrain"]["batch_size"] * (params["model"]["block_size"])
    )
    # learning: well below the loss of a uniform guess over the vocabulary
    assert pre["valid_loss"] < math.log(vocab_size) - 0.5
    curve = pd.read_csv(repo / "data/plots/pretrain.csv")
    assert curve["step"].max() == pre["steps"]
    assert curve["train_loss"].dropna().iloc[-1] < curve["train_loss"].dropna().iloc[0]

    fine = json.loads((repo / "data/metrics/finetune.json").read_text())
    assert fine["best_step"] in range(1, fine["steps"] + 1)
    assert fine["best_valid_bleu"] == max(
        pd.read_csv(repo / "data/plots/finetune.csv")["valid_bleu"].dropna()
    )
    # embedding rows of the tokens in no training pair stay the pretrained ones, bit for bit
    used = torch.from_numpy(
        pair_vocab(
            read_pairs(repo / "data/tokens/parallel_train.parquet"),
            Tokenizer.load(repo / "data/vocab"),
        )
    )
    pre_emb, fine_emb = (
        load_model(repo / "data/models" / stage)[0].tok_emb.weight.detach()
        for stage in ("pretrain", "finetune")
    )
    assert 0 < int(used.sum()) < vocab_size
    assert torch.equal(fine_emb[~used], pre_emb[~used])
    assert (fine_emb[used] != pre_emb[used]).any(dim=1).all()

    ev = json.loads((repo / "data/metrics/evaluate.json").read_text())
    assert ev["test_pairs"] == params["evaluate"]["max_test_pairs"]
    # the scores are sacreBLEU's own on the translations the stage wrote
    written = pd.read_csv(
        repo / "data/evaluate/translations.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    assert len(written) == ev["test_pairs"]
    hyps, refs = list(written["hypothesis"]), [list(written["reference"])]
    assert ev["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    assert ev["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score, abs=1e-9)
    assert ev["bleu_signature"].startswith("nrefs:1|")
    for lang in ("en", "fr"):
        assert 1 < ev[f"ppl_{lang}"] < vocab_size
        assert ev[f"ppl_{lang}"] == pytest.approx(math.exp(ev[f"nll_{lang}"]))
        assert ev[f"bpb_{lang}"] == pytest.approx(
            ev[f"nll_{lang}"] * ev[f"tokens_{lang}"] / math.log(2) / ev[f"bytes_{lang}"]
        )
    table = pd.read_csv(repo / "data/evaluate/translations.tsv", sep="\t")
    assert len(table) == ev["test_pairs"]
    assert list(table.columns) == ["source", "reference", "hypothesis", "degenerate"]
    # the degenerate shares count the rows the table flags
    flags = written["degenerate"]
    assert set(flags) <= {"", "hit max_new_tokens", "loops", "hit max_new_tokens, loops"}
    assert ev["degenerate_share"] == pytest.approx((flags != "").mean())
    assert ev["hit_max_new_tokens_share"] == pytest.approx(flags.str.contains("hit").mean())
    assert ev["looping_share"] == pytest.approx(flags.str.contains("loops").mean())

    shown = json.loads(
        subprocess.run(
            ["dvc", "metrics", "show", "--json"],
            cwd=repo,
            env=_env(repo),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    files = next(iter(shown.values()))["data"]
    assert files["data/metrics/evaluate.json"]["data"]["bleu"] == ev["bleu"]
    assert files["data/metrics/pretrain.json"]["data"]["valid_loss"] == pre["valid_loss"]
    plots = dvc(repo, "plots", "show", "-o", str(repo / "plots-html"))
    assert (repo / "plots-html" / "index.html").is_file(), plots


def test_model_stage_runs_hold_curves_weights_and_samples(repo, first_run):
    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    runs = {
        r.data.tags["lmops.stage"]: r
        for r in client.search_runs(
            [exp.experiment_id], "tags.`lmops.kind` = 'stage' and attributes.status = 'FINISHED'"
        )
    }
    pre = runs["pretrain"]
    history = client.get_metric_history(pre.info.run_id, "pretrain/train_loss")
    assert (
        len(history)
        == params_of(repo)["pretrain"]["max_steps"] // params_of(repo)["pretrain"]["log_interval"]
    )
    assert pre.data.params["pretrain.model.n_layer"] == str(params_of(repo)["model"]["n_layer"])
    names = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert "pretrain_loss_curves.png" in names
    # the PNGs plot what the stages recorded: their curves for dvc plots, read back
    for stage, metric in (("pretrain", "valid_ppl"), ("finetune", "valid_bleu")):
        rows = pd.read_csv(repo / f"data/plots/{stage}.csv").to_dict("records")
        history = [{k: v for k, v in row.items() if not pd.isna(v)} for row in rows]
        assert curve_panels(history) == {"loss": ["train_loss", "valid_loss"], metric: [metric]}
    assert {a.path for a in client.list_artifacts(pre.info.run_id, "model")} >= {
        "model/model.safetensors",
        "model/config.json",
        "model/manifest.json",
    }
    ev = runs["evaluate"]
    assert (
        ev.data.metrics["evaluate/bleu"]
        == json.loads((repo / "data/metrics/evaluate.json").read_text())["bleu"]
    )
    assert ev.data.tags["evaluate.bleu_signature"].startswith("nrefs:1|")
    assert "evaluate/samples.json" in {
        a.path for a in client.list_artifacts(ev.info.run_id, "evaluate")
    }


def test_distil_and_quantise_compare_smaller_faster_models(repo, first_run, tmp_path):
    from lmops.config import load_params
    from lmops.core.quantised import load_quantised
    from lmops.core.translation import load_model
    from lmops.core.vocab import Tokenizer
    from lmops.pipeline.evaluate import TRANSLATIONS_FILE, evaluate_model, read_translations

    params = params_of(repo)
    ev = json.loads((repo / "data/metrics/evaluate.json").read_text())
    dis = json.loads((repo / "data/metrics/distil.json").read_text())
    assert dis["steps"] == params["distil"]["max_steps"] and dis["method"] == "word"
    assert dis["test_pairs"] == ev["test_pairs"] and dis["teacher_bleu"] == ev["bleu"]
    student, _ = load_model(repo / "data/models/distil")
    teacher, _ = load_model(repo / "data/models/finetune")
    assert dis["student_params"] == student.num_params() == dis["num_params"]
    assert dis["param_ratio"] == pytest.approx(student.num_params() / teacher.num_params())
    assert dis["param_ratio"] <= 1 / 3
    # a share of the teacher's BLEU; none when the teacher scored 0 (the tiny one may)
    expected = dis["bleu"] / ev["bleu"] if ev["bleu"] else None
    assert dis["bleu_retained"] == pytest.approx(expected)
    # the student kept is the one with the lowest validation loss (its BLEU is noisier)
    curve = pd.read_csv(repo / "data/plots/distil.csv").dropna(subset="valid_loss")
    assert dis["best_valid_loss"] == curve["valid_loss"].min()
    assert dis["best_step"] == curve.loc[curve["valid_loss"].idxmin(), "step"]
    assert load_model(repo / "data/models/distil")[1]["valid_loss"] == dis["best_valid_loss"]
    assert len(pd.read_csv(repo / "data/distil/translations.tsv", sep="\t")) == ev["test_pairs"]

    q = json.loads((repo / "data/metrics/quantise.json").read_text())
    table = pd.read_csv(repo / "data/plots/quantise.csv").set_index("variant")
    assert set(table.index) == {
        "teacher fp32",
        "student fp32",
        "student onnx int8",
        "teacher onnx int8",
    }
    # the stated rule applied to the table the stage wrote picks what it shipped
    bound = params["quantise"]["max_bleu_drop"]
    assert q["shipped"] == quantise.choose_shipped(table.reset_index(), bound)
    assert table["shipped"].sum() == 1 and table.loc[q["shipped"], "shipped"]
    assert table.loc["student fp32", "bleu"] == dis["bleu"]
    assert table.loc["teacher fp32", "bleu"] == ev["bleu"]
    assert table.loc["student onnx int8", "num_params"] == student.num_params()
    # the graph is a larger share of a tiny model's file than of the default one's (27%)
    assert table.loc["student onnx int8", "file_mb"] < 0.5 * table.loc["student fp32", "file_mb"]
    assert table.loc["teacher onnx int8", "file_mb"] < 0.35 * table.loc["teacher fp32", "file_mb"]
    for n in params["quantise"]["speed_batch_sizes"]:
        assert (table[f"tokens_per_sec_b{n}"] > 0).all()
        assert table.loc["student fp32", f"speedup_b{n}"] == 1.0
        assert q[f"shipped_speedup_b{n}"] == table.loc[q["shipped"], f"speedup_b{n}"]
    # what ships is the int8 variant that was scored, file for file
    scored = repo / "data/quantise" / q["shipped"].replace(" ", "_")
    assert {p.name: file_digest(p) for p in (repo / "data/models/quantised").iterdir()} == {
        p.name: file_digest(p) for p in scored.iterdir()
    }
    scored_dir = repo / "data/quantise/eval" / q["shipped"].replace(" ", "_")
    int8 = read_translations(scored_dir / TRANSLATIONS_FILE)
    assert table.loc[q["shipped"], "bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(list(int8["hypothesis"]), [list(int8["reference"])]).score
    )
    # loaded from its directory alone, the shipped model translates the test set again,
    # word for word as it was scored
    cfg = load_params(repo / "params.yaml")
    again, _ = evaluate_model(
        load_quantised(repo / "data/models/quantised"),
        Tokenizer.load(repo / "data/vocab"),
        repo / "data/clean",
        repo / "data/tokens",
        quantise.int8_eval_config(cfg.evaluate),
        cfg.clean.target_lang,
        tmp_path / "again",
    )
    again_tsv = read_translations(tmp_path / "again" / TRANSLATIONS_FILE)
    assert list(again_tsv["hypothesis"]) == list(int8["hypothesis"])
    assert again["bleu"] == pytest.approx(table.loc[q["shipped"], "bleu"])

    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    run = _last_run(repo, "quantise")
    assert run.data.metrics["quantise/shipped_size_ratio"] == pytest.approx(q["shipped_size_ratio"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "comparison.png" in names
    assert "quantise/comparison.json" in {
        a.path for a in client.list_artifacts(run.info.run_id, "quantise")
    }


def _runs_of(repo: Path, stage: str) -> tuple:
    """The newest ``stage`` run and its pipeline run."""
    run = _last_run(repo, stage)
    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    return run, client.get_run(run.data.tags["mlflow.parentRunId"])


def test_sequence_distillation_trains_the_student_on_the_teachers_translations(repo, first_run):
    """``distil.method: sequence`` end to end: the teacher beam-translates a seeded sample of
    the training sources, and those translations, recomputed here, are what the student
    trained on. The workspace returns to word-level distillation afterwards."""
    from lmops.config import load_params
    from lmops.core.translation import generate, load_model, read_pairs
    from lmops.core.vocab import Tokenizer
    from lmops.pipeline import distil

    before = (repo / "params.yaml").read_text()
    params = params_of(repo)
    params["distil"]["method"] = "sequence"
    # the tiny teacher, 30 steps old, may end a translation at once: bar that for a few
    # tokens, so that it always gives the student something to learn
    params["distil"]["sequence_decode"]["min_new_tokens"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert ran(dvc(repo, "repro", "--single-item", "distil")) == ["distil"]
        cfg = load_params(repo / "params.yaml")
        dis = json.loads((repo / "data/metrics/distil.json").read_text())
        assert dis["method"] == "sequence" and dis["steps"] == cfg.distil.max_steps
        assert _last_run(repo, "distil").data.params["distil.method"] == "sequence"
        (cache,) = (repo / "data/train/distil").glob(f"{distil.SEQKD_PREFIX}*.parquet")
        trained_on = pd.read_parquet(cache)
        train = read_pairs(repo / "data/tokens/parallel_train.parquet")
        chosen = distil.sequence_pairs(train, cfg.distil.sequence_max_pairs, cfg.seed)
        assert len(chosen) == cfg.distil.sequence_max_pairs < len(train)
        teacher, _ = load_model(repo / "data/models/finetune")
        tok = Tokenizer.load(repo / "data/vocab")
        ids = generate(
            teacher, tok, list(chosen["src_ids"]), cfg.clean.target_lang, cfg.distil.sequence_decode
        )
        assert min(map(len, ids)) >= 4
        assert [list(t) for t in trained_on["tgt_ids"]] == ids
        assert list(trained_on["src"]) == list(chosen["src"])
        assert [list(t) for t in trained_on["tgt_ids"]] != [list(t) for t in chosen["tgt_ids"]]
    finally:
        (repo / "params.yaml").write_text(before)
        assert ran(dvc(repo, "repro", "--single-item", "distil")) == ["distil"]
    assert json.loads((repo / "data/metrics/distil.json").read_text())["method"] == "word"


@pytest.mark.parametrize(
    "stage, how", [("pretrain", "kill the stage"), ("distil", "kill -9 the group")]
)
def test_a_killed_training_stage_resumes_to_the_same_weights(repo, first_run, stage, how, tmp_path):
    """Stopped mid-run, then `dvc repro`: it resumes from the checkpoint, bit for bit, with
    the same metrics (timings aside). A plain `kill` (SIGTERM) of the stage ends its runs
    as KILLED and dvc fails at once, its lock released; after a `kill -9` of dvc and the
    stage, the next `dvc repro` ends their runs as FAILED. finetune shares the loop;
    `make chaos` stops all three at random moments, with either signal."""
    weights = repo / "data/models" / stage / "model.safetensors"
    uninterrupted = chaos.fingerprint(repo, stage)
    ckpt = repo / "data/train" / stage / "ckpt"
    shutil.rmtree(ckpt.parent)
    log = tmp_path / "dvc.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            ["dvc", "repro", "--force", "--single-item", stage],
            cwd=repo,
            env=_env(repo),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        script = workspace.wait_for(
            lambda: list(ckpt.glob("step-*")) and workspace.stage_process(repo, stage),
            "a checkpoint",
            300,
            proc,
        )
        script.suspend()  # held mid-training, however fast this machine trains
        if how == "kill the stage":
            script.send_signal(signal.SIGTERM)
            script.resume()
            proc.wait(timeout=60)  # dvc sees the stage fail and stops by itself
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        workspace.stop(proc, signal.SIGKILL)
    first = sorted(ckpt.glob("step-*"))
    killed_at = int(first[-1].name.split("-")[1])
    assert killed_at < params_of(repo)[stage]["max_steps"]
    assert not weights.exists()  # dvc removed the old output; none was half-written
    run, parent = _runs_of(repo, stage)
    if how == "kill the stage":
        # died of the signal: -15 when DVC's shell execs the stage, 143 when a shell
        # stands between them and reports the death (seen on a CI runner)
        assert proc.returncode != 0
        assert re.search(r"exited with (-15|143)\b", log.read_text()), log.read_text()
        assert (run.info.status, parent.info.status) == ("KILLED", "KILLED")
        assert run.data.tags["lmops.error"] == "stopped by SIGTERM"
        assert workspace.processes_in(repo) == []
    else:
        assert (run.info.status, parent.info.status) == ("RUNNING", "RUNNING")  # ghosts

    out = dvc(repo, "repro", stage)
    assert stage in ran(out)
    metrics = json.loads((repo / "data/metrics" / f"{stage}.json").read_text())
    assert metrics["resumed_from"] >= killed_at > 0
    assert chaos.fingerprint(repo, stage) == uninterrupted
    if how == "kill -9 the group":  # the next pipeline run ended the ghosts
        for ghost in (run, parent):
            ended = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db").get_run(ghost.info.run_id)
            assert ended.info.status == "FAILED"
            assert ended.data.tags["lmops.error"].startswith(
                "process vanished (SIGKILL or out of memory?): pid "
            )


def test_a_second_repro_in_the_workspace_fails_fast_naming_the_lock(repo, first_run):
    ckpt = repo / "data/train/pretrain"
    shutil.rmtree(ckpt)
    first = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "pretrain"],
        cwd=repo,
        env=_env(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # the stage runs, so dvc holds the workspace lock; hold it there while the second tries
        script = workspace.wait_for(
            lambda: ckpt.exists() and workspace.stage_process(repo, "pretrain"),
            "the first repro's pretrain",
            120,
            first,
        )
        script.suspend()
        # the holder stays suspended until the second returns: a second run that waited
        # for the lock instead of failing would never return, and time out here
        second = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=300
        )
        held = script.status() == psutil.STATUS_STOPPED
        script.resume()
    finally:
        first.wait(timeout=300)
    assert second.returncode != 0
    # DVC locks the paths a running stage reads and writes; the second run stops at the
    # first stage that needs one, naming the process that holds it, as recorded for the
    # retry tests' fake
    busy = recorded.fields(recorded.DVC_BUSY_TEMPLATE, second.stderr)
    assert busy is not None, second.stderr
    assert busy["pid"] == str(first.pid) and busy["command"].endswith(
        "repro --force --single-item pretrain"
    )
    assert Path(busy["rwlock"]).resolve() == (repo / ".dvc/tmp/rwlock").resolve()
    # what a flow's stage task sees then: a failure worth a retry once the lock is free
    assert repro.should_retry(repro.StageFailed("pretrain", second.returncode, second.stderr))
    assert held
    assert first.returncode == 0  # the first one was not disturbed
    dvc(repo, "status")


def test_two_queued_experiments_run_at_once_with_their_own_runs_and_equal_metrics(repo, first_run):
    """`dvc exp run --queue` twice with the same params, both run by two workers: each is
    a pipeline run of its own in MLflow, and both give identical metrics (determinism:
    the kill tests compare finetune and distil reruns with uninterrupted runs too)."""
    for _ in range(2):
        dvc(repo, "exp", "run", "--queue", "-S", "pretrain.lr=0.0011", "pretrain")
    dvc(repo, "exp", "run", "--run-all", "--jobs", "2")
    shown = json.loads(
        subprocess.run(
            ["dvc", "exp", "show", "--json"],
            cwd=repo,
            env=_env(repo),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    exps = {
        rev["name"]: rev["data"]["metrics"]
        for base in shown
        for exp in (base.get("experiments") or [])
        for rev in exp["revs"]
    }
    assert len(exps) == 2, exps
    for name, metrics in exps.items():  # dvc exp show has {"error": ...} for a failed one
        if "data" not in metrics.get("data/metrics/pretrain.json", {}):
            logs = subprocess.run(
                ["dvc", "queue", "logs", name],
                cwd=repo,
                env=_env(repo),
                capture_output=True,
                text=True,
            )
            pytest.fail(
                f"experiment {name}: no pretrain metrics {metrics}; its log:\n"
                f"{(logs.stdout + logs.stderr)[-4000:]}"
            )
    stable = [
        {
            k: v
            for k, v in metrics["data/metrics/pretrain.json"]["data"].items()
            if k not in chaos.VOLATILE
        }
        for metrics in exps.values()
    ]
    assert stable[0] == stable[1]
    assert stable[0]["valid_loss"] > 0
    assert stable[0]["steps"] == params_of(repo)["pretrain"]["max_steps"]

    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    ran_in = []
    for name in exps:
        parents = client.search_runs(
            [exp.experiment_id],
            f"tags.`lmops.kind` = 'pipeline' and tags.`DVC_EXP_NAME` = '{name}'",
        )
        assert len(parents) == 1 and parents[0].info.run_name == name
        children = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
        )
        ran_in.append(sorted(r.data.tags["lmops.stage"] for r in children))
        assert all(r.info.status == "FINISHED" for r in children)
        assert parents[0].info.status == "FINISHED"
    assert ran_in == [["pretrain"], ["pretrain"]]
    dvc(repo, "exp", "remove", "--all")


def _stage(repo: Path, script: str, params: dict, *args: str) -> subprocess.CompletedProcess:
    (repo / "params.bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, f"stages/{script}.py", "--params", "params.bad.yaml", *args],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _last_run(repo: Path, stage: str):
    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    return client.search_runs(
        [exp.experiment_id],
        f"tags.`lmops.stage` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]


def test_a_diverging_loss_stops_pretrain_with_the_step(repo, first_run):
    params = params_of(repo)
    params["pretrain"]["max_loss"] = 1.0  # below the first loss: diverged at step 1
    out = _stage(
        repo,
        "pretrain",
        params,
        "--tokens",
        "data/tokens",
        "--vocab",
        "data/vocab",
        "--work",
        "scratch/work",
        "--out",
        "scratch/model",
        "--metrics",
        "scratch/m.json",
        "--curve",
        "scratch/c.csv",
    )
    assert out.returncode == 1, out.stderr
    assert "loss diverged at step 1" in out.stderr and "max_loss 1.0" in out.stderr
    assert not (repo / "scratch/model").exists() and not (repo / "scratch/m.json").exists()
    run = _last_run(repo, "pretrain")
    assert run.info.status == "FAILED"
    assert "loss diverged at step 1" in run.data.tags["lmops.error"]


def test_out_of_memory_stops_pretrain_with_the_step_and_the_batch_size(repo, first_run):
    """A batch far too big for a 5 GB address-space limit: the allocation fails for real."""
    import resource

    params = params_of(repo)
    params["pretrain"]["batch_size"] = 65536
    (repo / "params.bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    limit = 5 << 30
    args = ["--tokens", "data/tokens", "--vocab", "data/vocab", "--work", "scratch/work"]
    args += ["--out", "scratch/model", "--metrics", "scratch/m.json", "--curve", "scratch/c.csv"]
    out = subprocess.run(
        [sys.executable, "stages/pretrain.py", "--params", "params.bad.yaml", *args],
        cwd=repo,
        env=_env(repo),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert out.returncode == 1, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("lmops pretrain: error:")]
    assert line == (
        "lmops pretrain: error: pretrain: training step 1 with batch_size 65536: out of host "
        "memory on cpu (RuntimeError); lower pretrain.batch_size and raise pretrain.grad_accum "
        "by the same factor (the effective batch stays 65536), or model.block_size; the last "
        "checkpoint (none written yet) is kept"
    )
    assert "Traceback" not in out.stderr
    assert not (repo / "scratch/model").exists() and not (repo / "scratch/m.json").exists()
    run = _last_run(repo, "pretrain")
    assert run.info.status == "FAILED"
    message = line.removeprefix("lmops pretrain: error: ")
    assert run.data.tags["lmops.error"] == f"OutOfMemoryError: {message}"


def test_a_missing_pretrained_model_is_named(repo, first_run):
    out = _stage(
        repo,
        "finetune",
        params_of(repo),
        "--tokens",
        "data/tokens",
        "--vocab",
        "data/vocab",
        "--init",
        "data/models/nothing-here",
        "--work",
        "scratch/fw",
        "--out",
        "scratch/fm",
        "--metrics",
        "scratch/f.json",
        "--curve",
        "scratch/f.csv",
    )
    assert out.returncode == 1
    assert "lmops finetune: error: data/models/nothing-here: not found" in out.stderr
    assert _last_run(repo, "finetune").info.status == "FAILED"


def test_a_missing_teacher_stops_distil_with_its_name(repo, first_run):
    out = _stage(
        repo,
        "distil",
        params_of(repo),
        "--tokens",
        "data/tokens",
        "--vocab",
        "data/vocab",
        "--clean",
        "data/clean",
        "--teacher",
        "data/models/no-teacher",
        "--teacher-translations",
        "data/evaluate/translations.tsv",
        "--work",
        "scratch/dw",
        "--out",
        "scratch/dm",
        "--eval-out",
        "scratch/de",
        "--metrics",
        "scratch/d.json",
        "--curve",
        "scratch/d.csv",
    )
    assert out.returncode == 1
    assert "lmops distil: error: data/models/no-teacher: not found" in out.stderr
    assert not (repo / "scratch/dm").exists() and not (repo / "scratch/d.json").exists()
    assert _last_run(repo, "distil").info.status == "FAILED"


# ------------------------------------------------------------------ hardware


def test_model_stages_record_the_hardware_they_ran_on(repo, first_run, monkeypatch):
    """Device, resolved precision, compile, CPU and GPUs: in each metrics file, as params
    and tags of the stage run, and in `lmops compare`."""
    import torch

    from lmops.core import hardware

    expected = hardware.precision_name(hardware.autocast_dtype("auto", torch.device("cpu")))
    for stage in MODEL_STAGES:
        hw = json.loads((repo / f"data/metrics/{stage}.json").read_text())["hardware"]
        assert hw["device"] == "cpu" and hw["cpu_capability"] == hardware.cpu_capability()
        assert hw["cpu"] == hardware.cpu_model() and hw["gpu_count"] == 0
        # quantise times every variant in fp32 activations; the others resolve auto
        assert hw["precision"] == ("fp32" if stage == "quantise" else expected), stage
    assert (
        json.loads((repo / "data/metrics/pretrain.json").read_text())["hardware"]["processes"] == 1
    )
    client = MlflowClient(f"sqlite:///{repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    (run,) = client.search_runs(
        [exp.experiment_id],
        "tags.`lmops.stage` = 'pretrain' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert run.data.params["pretrain.hardware.precision"] == expected
    assert run.data.tags["lmops.hardware.cpu_capability"] == hardware.cpu_capability()
    assert run.data.tags["lmops.hardware.compile"] == "False"  # the tiny profile's own
    from lmops.tracking import compare

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the pipeline run that holds this stage run (later tests make runs of other stages)
    text = compare.compare([run.data.tags["mlflow.parentRunId"]], all_rows=True)
    assert re.search(rf"pretrain\.hardware\.precision\s+{expected}\b", text)


def test_each_training_stage_printed_its_estimate_first(repo, first_run):
    for stage in ("pretrain", "finetune", "distil"):
        assert re.search(
            rf"\[{stage}\] estimated [\d.]+ (s|min) on this machine: \d+ steps x ", first_run
        ), stage


def test_a_stage_run_with_another_work_dir_is_estimated_from_there(
    repo, first_run, tmp_path, monkeypatch, capsys
):
    """The estimate a training stage prints as it starts counts the checkpoints of its own
    ``--work``: run by hand into an empty dir, it is a whole run, not dvc.yaml's finished one."""
    from lmops.orchestrate import estimate

    steps = params_of(repo)["distil"]["max_steps"]
    monkeypatch.chdir(repo)
    for argv, resumed in (([], True), (["--work", str(tmp_path / "elsewhere")], False)):
        estimate.training_stage_start("distil", "params.yaml", argv)
        printed = capsys.readouterr().err
        assert (f"resuming at step {steps}" in printed) is resumed, printed
        assert re.search(rf": {0 if resumed else steps} steps x ", printed), printed


def test_estimate_names_what_repro_would_run_and_its_time(repo, first_run):
    from lmops.orchestrate import estimate
    from lmops.orchestrate.dag import stages_to_run

    dvc(repo, "repro")  # earlier tests reran single stages: bring the rest up to date
    assert stages_to_run(repo) == []
    assert "nothing to run" in estimate.render(estimate.estimate([], repo))
    params = params_of(repo)
    params["evaluate"]["decode"]["beam_size"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # evaluate reads it, and distil and quantise score with the same decoding
    assert stages_to_run(repo) == ["evaluate", "distil", "quantise"]
    assert stages_to_run(repo, "evaluate") == ["evaluate"]
    ests = estimate.estimate(stages_to_run(repo), repo)
    assert [e.stage for e in ests] == ["evaluate", "distil", "quantise"]
    assert all(e.seconds > 0 for e in ests)
    # distil resumes at its last step: only the scoring is left
    assert (
        "0 steps x" in ests[1].detail
        and f"resuming at step {params['distil']['max_steps']}" in ests[1].detail
    )
    text = estimate.render(ests)
    total = re.search(r"total\s+([\d.]+) (s|min)", text)
    assert total and "over 45 minutes" not in text
    # a run ten thousand times longer is named as such, with the faster option
    steps, params["pretrain"]["max_steps"] = params["pretrain"]["max_steps"], 10**6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (long,) = estimate.estimate(["pretrain"], repo)
    assert long.seconds > 45 * 60 and "1000000 steps x" in long.detail
    assert "dvc exp run $(lmops params set-args params.fast.yaml)" in estimate.render([long])
    params["pretrain"]["max_steps"] = steps
    params["evaluate"]["decode"]["beam_size"] -= 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_to_run(repo) == [] and ran(dvc(repo, "repro")) == []


def test_a_checkpoint_counts_in_the_estimate_only_where_the_stage_would_resume_from_it(
    repo, first_run
):
    """A finished checkpoint the trainer would start afresh from (a stage of the run
    rebuilds its inputs first, its inputs changed on disk, another vocabulary size or
    seed) is estimated as the whole run the stage will train, not as one to resume."""
    from lmops.orchestrate import estimate
    from lmops.orchestrate.dag import stages_to_run

    dvc(repo, "repro")  # earlier tests reran single stages: bring the rest up to date
    original = params_of(repo)
    steps = {s: original[s]["max_steps"] for s in ("pretrain", "finetune", "distil")}

    def left(stages: list[str]) -> dict[str, int]:
        out = {}
        for e in estimate.estimate(stages, repo):
            if e.stage in steps:
                found = re.search(r"^(\d+) steps x ", e.detail)
                assert found, e.detail
                out[e.stage] = int(found.group(1))
        return out

    def write(params: dict) -> None:
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # as the trainer would: each stage alone resumes at its last step
    for stage in steps:
        assert left([stage]) == {stage: 0}
    # another held-out share: dvc repro rebuilds the data, then trains every stage whole
    params = params_of(repo)
    params["clean"]["split"]["valid_fraction"] *= 2
    write(params)
    todo = stages_to_run(repo)
    assert todo[:5] == ["clean", "validate", "vocab", "tokenise", "pretrain"], todo
    assert left(todo) == steps
    # a stage alone, as it starts once the stages before it ran: another vocabulary size,
    # another seed
    vocab = {**original["vocab"], "vocab_size": original["vocab"]["vocab_size"] + 8}
    for key, value in (("vocab", vocab), ("seed", original["seed"] + 1)):
        write({**original, key: value})
        assert left(["pretrain"]) == {"pretrain": steps["pretrain"]}, key
    write(original)
    # other pretrained weights on disk: finetune starts afresh from them, distil does not care
    weights = repo / "data/models/pretrain/model.safetensors"
    kept = weights.with_name("kept.safetensors")
    os.replace(weights, kept)  # not in place: the file may be a link into the DVC cache
    try:
        weights.write_bytes(kept.read_bytes() + b"\0")
        assert left(["finetune"]) == {"finetune": steps["finetune"]}
        assert left(["distil"]) == {"distil": 0}
    finally:
        os.replace(kept, weights)
    assert left(["finetune"]) == {"finetune": 0}
    assert stages_to_run(repo) == []


def test_nproc_2_trains_pretrain_under_torchrun_as_one_process_does(repo, first_run):
    """`dvc repro` alone: pretrain relaunches itself under torchrun (gloo, 2 CPU processes)
    and ends with the weights one process gets from the same params, in fp32."""
    import torch
    from safetensors.torch import load_file

    dvc(repo, "repro")  # earlier tests reran single stages: bring the rest up to date
    model = repo / "data/models/pretrain/model.safetensors"
    # what the first run wrote: put back at the end, so later `dvc repro`s run nothing
    kept = [
        "dvc.lock",
        "params.yaml",
        "data/models/pretrain",
        "data/train/pretrain",
        "data/metrics/pretrain.json",
        "data/plots/pretrain.csv",
    ]
    backup = repo.parent / "nproc-backup"

    def copy(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)

    for path in kept:
        copy(repo / path, backup / path)
    params = params_of(repo)
    params["pretrain"]["precision"] = "fp32"
    results = {}
    for nproc in (1, 2):
        params["pretrain"]["nproc"] = nproc
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.rmtree(repo / "data/train/pretrain", ignore_errors=True)  # train, not resume
        out = dvc(repo, "repro", "pretrain")
        assert ran(out) == ["pretrain"]
        metrics = json.loads((repo / "data/metrics/pretrain.json").read_text())
        assert metrics["hardware"]["processes"] == nproc
        results[nproc] = (load_file(model), metrics["train_loss"])
    assert "torchrun" in out and "2 data-parallel processes" in out
    (one, loss1), (two, loss2) = results[1], results[2]
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    for name, weight in one.items():
        torch.testing.assert_close(two[name], weight, atol=1e-4, rtol=1e-4)
    for path in kept:
        shutil.rmtree(repo / path, ignore_errors=True)
        copy(backup / path, repo / path)
    assert ran(dvc(repo, "repro")) == []


def test_the_crash_loop_survives_stops_at_random_moments(repo, first_run):
    """`make chaos` in short, on this file's workspace (up to date: its training stages'
    outputs are the uninterrupted reference, so the loop makes no reference run). Seed 14
    draws a SIGTERM of dvc and pretrain in training, then a kill -9 of the rerun that
    resumes it: the last rerun ends with the reference's weights and metrics and leaves
    no MLflow run RUNNING."""

    lines: list[str] = []
    started = time.perf_counter()
    results = chaos.chaos(repo, kills=2, seed=14, log=lines.append, built=True)
    lines.append(chaos.summary(results, time.perf_counter() - started))
    print("\n".join(lines))
    assert chaos.tally(results) == (2, 2), "\n".join(lines)
    assert re.match(r"survived 2/2 stops \(", lines[-1]), lines[-1]
    # both signals: each kill's first stop, and the kill -9 of a rerun stopped as well
    signals = [k.how.split()[0] for k in results] + ["SIGKILL"] * sum(k.kills - 1 for k in results)
    assert {"SIGKILL", "SIGTERM"} <= set(signals), "\n".join(lines)
