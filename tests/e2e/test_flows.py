"""The Prefect pipeline flow: DAG order from dvc.yaml, retries, metrics table, and a real
Prefect server + process worker running a deployment of the tiny pipeline."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
import yaml
from dvc.lock import FAILED_TO_LOCK_MESSAGE

from lmops.errors import LmopsError
from lmops.orchestrate import dag, repro
from tests.conftest import REPO
from tests.support import recorded, workspace

SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())


# ------------------------------------------------------------------ DAG order


def _must_precede(spec: dict) -> set[tuple[str, str]]:
    """(a, b) for every stage b with a dep that is, holds or sits inside an output of a."""

    def paths(items):
        for item in items or []:
            yield from ([item] if isinstance(item, str) else item)

    outs = {
        name: [PurePosixPath(p) for key in ("outs", "metrics", "plots") for p in paths(s.get(key))]
        for name, s in spec["stages"].items()
    }
    pairs = set()
    for b, s in spec["stages"].items():
        for dep in map(PurePosixPath, paths(s.get("deps"))):
            for a, produced in outs.items():
                if a != b and any(
                    dep == o or dep.is_relative_to(o) or o.is_relative_to(dep) for o in produced
                ):
                    pairs.add((a, b))
    return pairs


def test_dag_order_is_a_topological_order_of_dvc_yaml():
    order = dag.dag_order(SPEC)
    assert sorted(order) == sorted(SPEC["stages"])
    pairs = _must_precede(SPEC)
    assert ("clean", "validate") in pairs and ("evaluate", "distil") in pairs
    for a, b in pairs:
        assert order.index(a) < order.index(b), f"{a} must run before {b}"


def test_a_target_runs_only_what_it_needs():
    assert dag.dag_order(SPEC, "vocab") == ["clean", "validate", "vocab"]
    pretrain = dag.dag_order(SPEC, "pretrain")
    assert pretrain[-1] == "pretrain" and "finetune" not in pretrain and "tokenise" in pretrain
    with pytest.raises(LmopsError, match="unknown stage 'nope'; dvc.yaml has: clean"):
        dag.dag_order(SPEC, "nope")


def test_a_dep_inside_an_output_dir_and_a_cycle():
    spec = {
        "stages": {
            "late": {"deps": ["data/a/part.bin"], "outs": ["data/b"]},
            "early": {"deps": ["raw.txt"], "outs": ["data/a", {"m.json": {"cache": False}}]},
            "last": {"deps": ["data/b", "m.json"], "outs": ["c"]},
        }
    }
    assert dag.dag_order(spec) == ["early", "late", "last"]
    spec["stages"]["early"]["deps"].append("c")
    with pytest.raises(LmopsError, match="form a cycle"):
        dag.dag_order(spec)


def test_training_stages_are_tagged_for_a_gpu_pool():
    assert set(SPEC["stages"]) >= dag.ACCELERATOR_STAGES
    assert repro.stage_tags("pretrain") == ["stage:pretrain", "gpu"]
    assert repro.stage_tags("validate") == ["stage:validate"]


# --------------------------------------------------------------------- retries

# another dvc holds the paths a stage needs (recorded from a real second `dvc repro`), or
# the repository's own lock (DVC's message, from DVC itself)
LOCKED = recorded.DVC_BUSY
REPO_LOCKED = f"ERROR: {FAILED_TO_LOCK_MESSAGE}"
NO_SERVER = (
    "mlflow.exceptions.MlflowException: API request to http://mlflow:5000/api/2.0/"
    "mlflow/runs/create failed with exception HTTPConnectionPool(host='mlflow', "
    "port=5000): Max retries exceeded (Caused by NewConnectionError: Connection refused)"
)
BAD_DATA = (
    "lmops validate: error: data quality expectations failed (report: "
    "data/validate/index.html):\n  parallel_test: pair length ratio\n"
    "ERROR: failed to reproduce 'validate': failed to run: python stages/validate.py, "
    "exited with 1"
)
DIVERGED = (
    "lmops pretrain: error: pretrain: loss diverged at step 12: nan (max_loss 20.0); "
    "last good checkpoint data/train/pretrain/ckpt/step-10\n"
    "ERROR: failed to reproduce 'pretrain': exited with 1"
)


@pytest.mark.parametrize(
    ("output", "retry"),
    [
        (LOCKED, True),
        (REPO_LOCKED, True),
        (NO_SERVER, True),
        (BAD_DATA, False),
        (DIVERGED, False),
        # a diverged loss stays final even when the network also hiccuped in the same output
        (DIVERGED + "\n" + NO_SERVER, False),
        ("ERROR: failed to reproduce 'x': exited with 2\nTraceback ... KeyError: 'foo'", False),
    ],
)
def test_the_retry_condition_retries_only_transient_io(output, retry):
    from prefect.states import Failed

    exc = repro.StageFailed("s", 1, output)
    assert repro.should_retry(exc) is retry
    assert repro.retry_condition(None, None, Failed(data=exc)) is retry


def test_plain_network_errors_retry_and_bugs_do_not():
    from prefect.states import Failed

    assert repro.should_retry(ConnectionRefusedError("refused"))
    assert repro.should_retry(TimeoutError())
    assert not repro.should_retry(ValueError("bad value"))
    assert not repro.retry_condition(None, None, Failed(message="crashed: KeyError 'x'"))


def _ephemeral_startup_timeout() -> int:
    """The project's own setting for Prefect's temporary server (pyproject.toml)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["prefect"]
    return int(table["server"]["ephemeral"]["startup_timeout_seconds"])


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=_ephemeral_startup_timeout()):
        yield


def test_prefects_temporary_server_gets_the_projects_start_up_timeout(flow_repo):
    """`python flows/pipeline.py` with no server: Prefect reads pyproject.toml in the
    working directory, so a slow machine gets more than Prefect's default 20 s."""
    code = (
        "from prefect.settings import get_current_settings; "
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    for cwd in (REPO, flow_repo):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd,
            env=_clean_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        assert int(out.stdout) == _ephemeral_startup_timeout() > 20


def test_the_stage_task_retries_a_held_lock_but_not_bad_data(prefect_harness, monkeypatch):
    """The real task's retry options: a lock is retried, a failed data check is not."""
    sys.path.insert(0, str(REPO / "flows"))
    try:
        import pipeline as flows_pipeline
    finally:
        sys.path.remove(str(REPO / "flows"))
    from prefect import flow

    calls: list[str] = []

    def fake_repro(repo, stage, parent, log=print):
        calls.append(stage)
        if stage == "clean" and calls.count("clean") == 1:
            raise repro.StageFailed(stage, 1, LOCKED)
        if stage == "validate":
            raise repro.StageFailed(stage, 1, BAD_DATA)
        return repro.StageResult(stage, "ran", seconds=calls.count(stage))  # the attempt

    monkeypatch.setattr(repro, "repro_stage", fake_repro)
    task = flows_pipeline.run_stage.with_options(retry_delay_seconds=0)

    @flow
    def two_stages():
        first = task(".", "clean", "p")
        try:
            task(".", "validate", "p")
        except repro.StageFailed as err:
            return first, str(err)
        return first, None

    first, error = two_stages()
    assert first.seconds == 2  # the task returned its retry's result
    assert calls == ["clean", "clean", "validate"]
    assert "data quality expectations failed" in error


# ---------------------------------------------------------------- DVC output


def test_a_progress_bar_reaches_the_flow_log_once_not_per_redraw(tmp_path):
    """A real tqdm bar of 3,000 redraws, as a stage draws it, through the stage runner."""
    script = (
        "import sys\n"
        "from tqdm import tqdm\n"
        "print('Running stage \\'pretrain\\':', flush=True)\n"
        "for _ in tqdm(range(3000), desc='pretrain', mininterval=0, file=sys.stderr): pass\n"
        "print('done')\n"
    )
    logged: list[str] = []
    output, _ = repro._run(
        [sys.executable, "-c", script], tmp_path, _clean_env(), "pretrain", logged.append
    )
    assert logged[0] == "Running stage 'pretrain':" and logged[-1] == "done"
    bars = logged[1:-1]
    assert len(bars) <= 2 and bars[-1].startswith("pretrain: 100%|"), logged
    assert output.splitlines() == logged  # what StageFailed would quote: no redraws
    assert repro.stage_statuses(output, ["pretrain"]) == {"pretrain": "ran"}


def test_stage_statuses_are_read_from_dvc_output():
    out = (
        "Stage 'clean' didn't change, skipping\n"
        "Running stage 'validate':\n> python stages/validate.py\n"
        "Stage 'vocab' is cached - skipping run, checking out outputs\n"
    )
    assert repro.stage_statuses(out, ["clean", "validate", "vocab", "tokenise"]) == {
        "clean": "skipped",
        "validate": "ran",
        "vocab": "restored",
        "tokenise": "not reached",
    }


def test_an_experiment_is_one_dvc_exp_run_with_the_overrides(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, root, env, label, log, save=None):
        seen.update(cmd=cmd, env=env, label=label, save=save)
        return "Running stage 'clean':\nStage 'validate' didn't change, skipping\n", 2.0

    monkeypatch.setattr(repro, "_run", fake_run)
    res = repro.exp_run(
        tmp_path,
        ["clean", "validate", "vocab"],
        "vocab",
        {"vocab": {"vocab_size": 4000}, "seed": 1},
        "big-vocab",
        "PARENT",
    )
    assert seen["cmd"] == [
        "dvc",
        "exp",
        "run",
        "-n",
        "big-vocab",
        "-S",
        "vocab.vocab_size=4000",
        "-S",
        "seed=1",
        "vocab",
    ]
    assert seen["env"]["LMOPS_PARENT_RUN_ID"] == "PARENT"
    assert seen["save"] == tmp_path.resolve() / "mlruns/output/PARENT/dvc-exp-run.log"
    assert [(r.stage, r.status) for r in res.stages] == [
        ("clean", "ran"),
        ("validate", "skipped"),
        ("vocab", "not reached"),
    ]
    assert repro.set_args(["a.b=1", "c=[1, 2]"]) == ["-S", "a.b=1", "-S", "c=[1, 2]"]
    with pytest.raises(LmopsError, match="expected key=value"):
        repro.set_args(["vocab.vocab_size"])


# -------------------------------------------------------------- metrics table


def test_the_metrics_table_lists_each_declared_file(tmp_path):
    spec = {
        "stages": {
            "clean": {"metrics": [{"m/clean.json": {"cache": False}}]},
            "evaluate": {"metrics": ["m/evaluate.json"]},
            "vocab": {"outs": ["v"]},
            "distil": {"metrics": ["m/distil.json"]},
        }
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m/clean.json").write_text(json.dumps({"train": {"rows": 120}, "ok": True}))
    (tmp_path / "m/evaluate.json").write_text(
        json.dumps({"bleu": 12.345678, "bleu_signature": "nrefs:1|...", "ppl_en": 41.0})
    )
    results = [repro.StageResult("clean", "skipped"), repro.StageResult("evaluate", "ran", 3.0)]
    table = repro.metrics_table(tmp_path, spec, ["clean", "evaluate", "vocab", "distil"], results)
    assert table.splitlines() == [
        "| stage | status | metric | value |",
        "|---|---|---|---|",
        "| clean | skipped | train.rows | 120 |",
        "| evaluate | ran | bleu | 12.35 |",
        "| evaluate | ran | ppl_en | 41 |",
        "| distil |  | `m/distil.json` | missing |",
    ]
    # only the stages asked for
    assert "distil" not in repro.metrics_table(tmp_path, spec, ["clean"])
    assert repro.results_table(results).splitlines()[-1] == "| evaluate | ran | 3.0 |"


def test_the_metrics_rows_hold_the_files_values_for_the_table_artifact(tmp_path):
    """The one source of the markdown table and of the flow's table artifact: the values
    as the files hold them (the table rounds them), a missing file as a row of its own."""
    spec = {
        "stages": {
            "pretrain": {"metrics": [{"m/pretrain.json": {"cache": False}}]},
            "finetune": {"metrics": ["m/finetune.json"]},
        }
    }
    (tmp_path / "m").mkdir()
    (tmp_path / "m/pretrain.json").write_text(
        json.dumps({"valid_loss": 3.14159265, "steps": 30, "resumed": False, "eval": {"bpb": 2.5}})
    )
    rows = repro.metrics_rows(tmp_path, spec)
    pre = {"stage": "pretrain", "file": "m/pretrain.json"}
    assert [r._asdict() for r in rows] == [
        {**pre, "metric": "valid_loss", "value": 3.14159265},
        {**pre, "metric": "steps", "value": 30},
        {**pre, "metric": "eval.bpb", "value": 2.5},
        {"stage": "finetune", "file": "m/finetune.json", "metric": None, "value": None},
    ]
    assert json.loads(json.dumps([r._asdict() for r in rows])) == [r._asdict() for r in rows]
    table = repro.metrics_table(tmp_path, spec).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2] == "| pretrain |  | valid_loss | 3.142 |"
    assert table[-1] == "| finetune |  | `m/finetune.json` | missing |"


# ------------------------------------------- a real server, worker and deployment


_clean_env = workspace.clean_env


def _prefect(env: dict[str, str], cwd: Path, *args: str, timeout: int = 120) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


# a Prefect server answers within this even on a loaded 2-core machine
API_TIMEOUT = 60


def _flow_runs(env: dict[str, str], ids: list[str]) -> dict[str, dict]:
    """State, start and end time and state history of flow runs, from the server's REST API
    (no Prefect client process to start per poll)."""
    api = env["PREFECT_API_URL"]
    out = {}
    for run_id in ids:
        with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=API_TIMEOUT) as r:
            run = json.load(r)
        query = urllib.parse.urlencode({"flow_run_id": run_id})
        with urllib.request.urlopen(f"{api}/flow_run_states/?{query}", timeout=API_TIMEOUT) as r:
            states = [s["name"] for s in json.load(r)]
        out[run_id] = {
            "state": run["state"]["type"],
            "start": run["start_time"],
            "end": run["end_time"],
            "states": states,
        }
    return out


@pytest.mark.slow
def test_a_deployment_runs_the_pipeline_on_a_process_worker(flow_repo, prefect_server, tmp_path):
    """Two runs of the pipeline deployment submitted at once, on a worker that would take
    both: the deployment's concurrency limit makes the second wait for the first."""
    env = prefect_server
    _prefect(env, flow_repo, "work-pool", "create", "lmops-gpu", "--type", "process")
    deployed = _prefect(env, flow_repo, "deploy", "--all")
    assert "lmops-pipeline/pipeline" in deployed
    nightly = _prefect(env, flow_repo, "deployment", "inspect", "lmops-retrain/nightly-retrain")
    assert "0 2 * * *" in nightly and "Europe/Paris" in nightly
    ids = [
        re.search(
            r"UUID:\s*([0-9a-f-]{36})",
            _prefect(
                env,
                flow_repo,
                "deployment",
                "run",
                "lmops-pipeline/pipeline",
                "--param",
                "target=clean",
            ),
        ).group(1)
        for _ in range(2)
    ]
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "worker",
            "start",
            "--pool",
            "lmops-gpu",
            "--type",
            "process",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            runs = _flow_runs(env, ids)
            if all(
                r["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()
            ):
                break
            assert time.monotonic() < deadline, (
                f"flow runs not done in 300 s: {runs}\n"
                + (tmp_path / "worker.log").read_text()[-6000:]
            )
            time.sleep(2)
        metrics = _prefect(env, flow_repo, "artifact", "inspect", "lmops-pipeline-metrics")
        link = _prefect(env, flow_repo, "artifact", "inspect", "lmops-mlflow-run")
    finally:
        workspace.stop(worker)
        log.close()
    worker_log = (tmp_path / "worker.log").read_text()
    assert all(r["state"] == "COMPLETED" for r in runs.values()), f"{runs}\n{worker_log[-6000:]}"
    first, second = sorted(runs.values(), key=lambda r: dt.datetime.fromisoformat(r["start"]))
    # serialised, not overlapping
    assert dt.datetime.fromisoformat(first["end"]) <= dt.datetime.fromisoformat(second["start"]), (
        runs
    )
    assert "AwaitingConcurrencySlot" in first["states"] + second["states"], runs
    flow_run_id = next(i for i, r in runs.items() if r is first)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{flow_repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    parents = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
    assert sorted(p.data.tags["prefect.flow_run_id"] for p in parents) == sorted(ids)
    parent = next(p for p in parents if p.data.tags["prefect.flow_run_id"] == flow_run_id)
    assert parent.data.tags["prefect.deployment"] == "pipeline"
    assert parent.info.status == "FINISHED"
    stages = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'stage'")
    assert [r.data.tags["lmops.stage"] for r in stages] == ["clean"]
    for run in stages:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
    later = next(p for p in parents if p is not parent)
    assert parent.data.tags["lmops.stage_status.clean"] == "ran"
    assert later.data.tags["lmops.stage_status.clean"] == "skipped"  # found up to date
    assert (flow_repo / "data/clean/parallel_test/part-00000.parquet").is_file()
    assert not (flow_repo / "data/validate").exists()  # the target stops at clean
    assert parent.info.run_id in link
    assert "| clean | ran |" in metrics and "mono_train.rows" in metrics
    # the stage's whole output, its bars' redraws included, stays in a file and is its
    # run's output.log
    (clean,) = stages
    kept = repro.output_file(flow_repo, parent.info.run_id, "clean").read_bytes()
    assert b"Running stage 'clean':" in kept and b"[clean] bible: " in kept and b"\r" in kept
    got = client.download_artifacts(clean.info.run_id, "output.log", str(tmp_path))
    assert Path(got).read_bytes() == kept


def _worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`prefect worker start` on the lmops-gpu process pool, as a user runs it."""
    log = open(log_path, "w")  # noqa: SIM115 - the child holds it; closed with the test
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "lmops-gpu"],
        cwd=log_path.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _submit(env: dict[str, str], repo: Path, *params: str) -> str:
    out = _prefect(env, repo, "deployment", "run", "lmops-pipeline/pipeline", *params)
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` was sent to process ``pid`` and waits to be handled (it is stopped)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)


def _wait_state(env: dict[str, str], run_id: str, states: tuple[str, ...], log: Path) -> dict:
    def done():
        try:
            run = _flow_runs(env, [run_id])[run_id]
        except OSError:  # a server slow to answer on a loaded machine: ask again
            return None
        return run if run["state"] in states else None

    try:
        return workspace.wait_for(done, f"flow run {run_id} {'/'.join(states)}", 600)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log.read_text()[-6000:]}") from None


def _post(env: dict[str, str], path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{env['PREFECT_API_URL']}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=API_TIMEOUT) as r:
        return json.load(r)


def _artifacts(env: dict[str, str], run_id: str) -> dict[str, dict]:
    """The artifacts of a flow run by key, as the server's REST API has them."""
    found = _post(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"]: a for a in found}


def _flow_log(env: dict[str, str], run_id: str) -> list[str]:
    """What a flow run logged itself (not its tasks), oldest first."""
    lines: list[str] = []
    while True:
        page = _post(
            env,
            "/logs/filter",
            {
                "logs": {"flow_run_id": {"any_": [run_id]}, "task_run_id": {"is_null_": True}},
                "sort": "TIMESTAMP_ASC",
                "offset": len(lines),
                "limit": 200,
            },
        )
        lines += [entry["message"] for entry in page]
        if len(page) < 200:
            return lines


@pytest.mark.slow
def test_a_cancelled_flow_run_stops_its_stage_and_the_next_run_resumes(
    flow_repo, prefect_server, tmp_path
):
    """Cancel the pipeline deployment's flow run while `pretrain` trains, on a real server
    and process worker: the flow run is CANCELLED, its MLflow runs KILLED, no process and
    no DVC lock is left, and the next flow run resumes to the weights of an uninterrupted
    run. Each flow run's progress artifact shows where it is and where it ended, its flow
    log each stage's start and end once, its table artifact the metrics files' values."""
    from mlflow.tracking import MlflowClient

    from lmops.config import flatten
    from tests.support import chaos

    def progress_of(run_id: str) -> dict:
        return _artifacts(env, run_id).get("lmops-pipeline-progress") or {"description": ""}

    def logged(run_id: str, line: str) -> list[str]:
        try:
            return workspace.wait_for(
                lambda: (
                    (lines := _flow_log(env, run_id)) and any(line in x for x in lines) and lines
                ),
                f"{line!r} in the log of flow run {run_id}",
                30,
            )
        except AssertionError as err:
            raise AssertionError(f"{err}:\n" + "\n".join(_flow_log(env, run_id))) from None

    max_steps = 120
    params = yaml.safe_load((flow_repo / "params.yaml").read_text())
    params["pretrain"].update(max_steps=max_steps, checkpoint_interval=10, eval_interval=60)
    (flow_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = prefect_server
    _prefect(env, flow_repo, "work-pool", "create", "lmops-gpu", "--type", "process")
    _prefect(env, flow_repo, "deploy", "--name", "pipeline")
    log = tmp_path / "worker.log"
    worker = _worker(env, log)
    try:
        first = _submit(env, flow_repo, "--param", "target=pretrain")
        stage = workspace.wait_for(
            lambda: (
                workspace.newest_checkpoint(flow_repo, "pretrain")
                and workspace.stage_process(flow_repo, "pretrain")
            ),
            "a pretrain checkpoint",
            600,
            worker,
        )
        # held mid-training, so that the cancellation lands there however fast it trains;
        # let go once the SIGTERM the cancellation sends it is pending
        stage.suspend()
        at_pretrain = workspace.wait_for(
            lambda: (
                (p := progress_of(first))["description"].startswith("stage 5 of 5: pretrain") and p
            ),
            "the progress artifact at pretrain",
            30,
        )
        assert at_pretrain["type"] == "progress" and 80 <= at_pretrain["data"] < 100, at_pretrain
        cancelled_at = time.monotonic()
        _prefect(env, flow_repo, "flow-run", "cancel", first)
        workspace.wait_for(
            lambda: _pending(stage.pid, signal.SIGTERM), "the SIGTERM of the cancellation", 120
        )
        term_seconds = time.monotonic() - cancelled_at
        stage.resume()
        resumed_at = time.monotonic()
        run = _wait_state(env, first, ("CANCELLED", "COMPLETED", "FAILED", "CRASHED"), log)
        stop_seconds = time.monotonic() - resumed_at
        assert run["state"] == "CANCELLED", f"{run}\n{log.read_text()[-6000:]}"
        stopped_at = workspace.newest_checkpoint(flow_repo, "pretrain")
        # where it stopped, down to the last step pretrain's progress bar showed
        stopped = progress_of(first)
        assert re.fullmatch(
            r"KILLED at stage 5 of 5: pretrain, step \d+ of 120; 4 of 5 stages done",
            stopped["description"],
        ), stopped
        assert 80 <= stopped["data"] < 100, stopped
        assert re.search(
            r"^stage 5 of 5 pretrain: failed after \d+\.\d s$",
            "\n".join(logged(first, "pretrain: failed")),
            re.MULTILINE,
        )
        assert 0 < stopped_at < max_steps
        assert workspace.processes_in(flow_repo) == []
        rwlock = json.loads((flow_repo / ".dvc/tmp/rwlock").read_text() or "{}")
        assert rwlock.get("write", {}) == {}, rwlock  # dvc released its lock

        client = MlflowClient(f"sqlite:///{flow_repo}/mlruns/mlflow.db")
        exp = client.get_experiment_by_name("lmops")
        (parent,) = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
        (stage,) = client.search_runs([exp.experiment_id], "tags.`lmops.stage` = 'pretrain'")
        assert (parent.info.status, stage.info.status) == ("KILLED", "KILLED")
        assert stage.data.tags["lmops.error"] == "stopped by SIGTERM"
        assert parent.data.tags["prefect.flow_run_id"] == first
        assert "SIGTERM" in parent.data.tags["lmops.error"]
        assert parent.data.tags["lmops.stage_status.pretrain"] == "failed"

        second = _submit(env, flow_repo, "--param", "target=pretrain")
        run = _wait_state(env, second, ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), log)
        assert run["state"] == "COMPLETED", f"{run}\n{log.read_text()[-6000:]}"
        # the flow run's process sends its last logs as it exits: wait for them before the
        # worker, and that process with it, is stopped
        lines = logged(second, "stage 5 of 5 pretrain: ran in")
    finally:
        workspace.stop(worker)
    metrics = json.loads((flow_repo / "data/metrics/pretrain.json").read_text())
    assert metrics["resumed_from"] >= stopped_at
    artifacts = _artifacts(env, second)
    done = artifacts["lmops-pipeline-progress"]
    assert (done["data"], done["description"]) == (100.0, "FINISHED; 5 of 5 stages done"), done
    table = artifacts["lmops-pipeline-metrics-table"]
    rows = json.loads(table["data"])
    stages = dag.dag_order(SPEC, "pretrain")
    assert table["type"] == "table" and rows == [
        r._asdict() for r in repro.metrics_rows(flow_repo, SPEC, stages)
    ]
    pretrain = {r["metric"]: r["value"] for r in rows if r["stage"] == "pretrain"}
    assert (
        pretrain == {k: v for k, v in flatten(metrics).items() if type(v) in (int, float)}
        and pretrain["resumed_from"] == metrics["resumed_from"]
    )
    assert {r["stage"] for r in rows} == set(dag.metrics_files(SPEC, stages))
    for k, name in enumerate(stages, 1):
        ends = [x for x in lines if re.fullmatch(rf"stage {k} of 5 {name}: \w+ in \d+\.\d s", x)]
        assert lines.count(f"stage {k} of 5 {name}: started") == len(ends) == 1, lines
    assert not [x for x in lines if "progress artifact not updated" in x]
    resumed = chaos.fingerprint(flow_repo, "pretrain")
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []

    shutil.rmtree(flow_repo / "data/train/pretrain")
    out = subprocess.run(
        ["dvc", "repro", "--force", "--single-item", "pretrain"],
        cwd=flow_repo,
        env=_clean_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert chaos.fingerprint(flow_repo, "pretrain") == resumed  # as if never stopped
    print(
        f"cancel request to the stage's SIGTERM {term_seconds:.1f} s, then to CANCELLED "
        f"{stop_seconds:.1f} s, at checkpoint step {stopped_at}"
    )


@pytest.mark.slow
def test_a_one_off_run_needs_no_server_and_runs_an_experiment(flow_repo, tmp_path):
    """`python flows/pipeline.py` on Prefect's temporary server; overrides make it an
    experiment: one `dvc exp run`, the stages still nested under one parent run."""
    env = _clean_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    out = subprocess.run(
        [
            sys.executable,
            "flows/pipeline.py",
            "--target",
            "validate",
            "-S",
            "validate.min_rows=5",
            "--experiment",
            "fewer-rows",
        ],
        cwd=flow_repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Running stage 'validate'" in out.stdout + out.stderr
    exps = subprocess.run(
        ["dvc", "exp", "list", "--name-only"],
        cwd=flow_repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert exps == ["fewer-rows"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{flow_repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "fewer-rows"
    assert parent.data.tags["dvc.exp_name"] == "fewer-rows"
    assert re.fullmatch(r"[0-9a-f-]{36}", parent.data.tags["prefect.flow_run_id"])
    stages = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'stage'")
    assert sorted(r.data.tags["lmops.stage"] for r in stages) == ["clean", "validate"]
    for run in stages:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["DVC_EXP_NAME"] == "fewer-rows"


def test_a_failed_data_check_fails_the_flow_and_its_parent_run(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    """No retry, the stages after it never start, and MLflow shows what happened."""
    sys.path.insert(0, str(REPO / "flows"))
    try:
        import pipeline as flows_pipeline
    finally:
        sys.path.remove(str(REPO / "flows"))
    from mlflow.tracking import MlflowClient

    shutil.copy(REPO / "dvc.yaml", tmp_path)
    calls: list[str] = []

    def fake_repro(repo, stage, parent, log=print):
        calls.append(stage)
        if stage == "validate":
            raise repro.StageFailed(stage, 1, BAD_DATA)
        return repro.StageResult(stage, "ran", 0.1)

    monkeypatch.setattr(repro, "repro_stage", fake_repro)
    with pytest.raises(repro.StageFailed, match="data quality expectations failed"):
        flows_pipeline.pipeline(repo=str(tmp_path), target="tokenise")
    assert calls == ["clean", "validate"]
    client = MlflowClient()
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("lmops-test").experiment_id],
        "tags.`lmops.kind` = 'pipeline'",
    )
    assert parent.info.status == "FAILED"
    assert re.fullmatch(r"[0-9a-f-]{36}", parent.data.tags["prefect.flow_run_id"])
    assert {
        k.rsplit(".", 1)[1]: v
        for k, v in parent.data.tags.items()
        if k.startswith("lmops.stage_status.")
    } == {"clean": "ran", "validate": "failed", "vocab": "not reached", "tokenise": "not reached"}


def _deployment(env: dict[str, str], name: str) -> dict | None:
    """The server's deployment ``name`` ('flow/deployment'), or None while there is none."""
    url = f"{env['PREFECT_API_URL']}/deployments/name/{urllib.parse.quote(name)}"
    try:
        with urllib.request.urlopen(url, timeout=API_TIMEOUT) as r:
            return json.load(r)
    except urllib.request.HTTPError as err:  # urllib.error's, as urllib.request exports it
        if err.code == 404:
            return None
        raise


def _run_processes(serve: subprocess.Popen) -> list:
    """The live child processes of a serving runner other than multiprocessing's resource
    tracker: those of the flow runs it runs."""
    import psutil

    found = []
    for p in psutil.Process(serve.pid).children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone, or a zombie not reaped yet
            pass
    return found


@pytest.mark.slow
def test_the_flow_served_from_its_script_runs_a_triggered_run(flow_repo, prefect_server, tmp_path):
    """`python flows/pipeline.py --serve NAME`, as docs/orchestration.md gives it for a
    machine without a worker: the deployment appears on the server with the checkout as
    its `repo`, a run triggered by name runs the pipeline from the serving process, and
    Ctrl-C stops it, leaving no process behind and its deployment paused."""
    from mlflow.tracking import MlflowClient

    name = "lmops-pipeline/lmops-pipeline-local"
    # the runner asks the server for scheduled runs every second, not every 10 s
    env = {**prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "flows/pipeline.py",
                "--repo",
                str(flow_repo),
                "--serve",
                "lmops-pipeline-local",
            ],
            cwd=flow_repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            deployment = workspace.wait_for(
                lambda: _deployment(env, name), f"deployment {name}", 120, serve
            )
        except AssertionError as err:
            raise AssertionError(f"{err}\n{log.read_text()[-6000:]}") from None
        assert deployment["parameters"] == {"repo": str(flow_repo.resolve())}
        out = _prefect(env, flow_repo, "deployment", "run", name, "--param", "target=clean")
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        run = _wait_state(env, run_id, ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), log)
        assert run["state"] == "COMPLETED", f"{run}\n{log.read_text()[-6000:]}"
        # the runner ran it in a child process (multiprocessing's spawn; its resource
        # tracker lives as long as the runner): that ends by itself, the runner idles again
        workspace.wait_for(
            lambda: serve.poll() is not None or not _run_processes(serve),
            "the flow run's process to exit",
            60,
        )
    finally:
        # Ctrl-C to its group, as in the terminal that serves it; SIGKILL only after 20 s.
        # (Prefect 3.8's SIGTERM handler exits as well, but may do so before the pause.)
        workspace.stop(serve, signal.SIGINT)
    # exited by itself, not by the SIGKILL, and paused its deployment on the way out
    assert serve.returncode == 0, f"{serve.returncode}\n{log.read_text()[-6000:]}"
    # multiprocessing's resource tracker leaves once the runner that started it is gone
    workspace.wait_for(lambda: workspace.processes_in(flow_repo) == [], "no process left", 30)
    assert _deployment(env, name)["paused"], log.read_text()[-6000:]

    client = MlflowClient(f"sqlite:///{flow_repo}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lmops")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == run_id
    assert parent.data.tags["prefect.deployment"] == "lmops-pipeline-local"
    assert parent.data.tags["lmops.stage_status.clean"] == "ran"
    (stage,) = client.search_runs([exp.experiment_id], "tags.`lmops.kind` = 'stage'")
    assert stage.data.tags["lmops.stage"] == "clean" and stage.info.status == "FINISHED"
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (flow_repo / "data/clean/parallel_test/part-00000.parquet").is_file()
    assert not (flow_repo / "data/validate").exists()  # the target stops at clean
