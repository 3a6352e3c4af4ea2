"""MLflow as the system of record, against a real `mlflow server` on 127.0.0.1.

One tiny pipeline run (`dvc repro evaluate`) logs to the server; its run is traced from
MLflow alone, its translator is registered and served over REST, and loaded in a fresh
process. Then two more runs, one param apart, are compared through the MLflow API.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
import yaml

from lmops.config import load_params
from lmops.orchestrate import retrain
from lmops.tracking import compare, registry
from lmops.tracking.system import is_system_metric
from tests.conftest import dvc, dvc_env, make_tiny_repo
from tests.support.helpers import BIN, listening_port, mlflow_server_cmd, wait_for

pytestmark = pytest.mark.slow

EXPERIMENT = "lmops-server-test"
STAGES = ["clean", "validate", "vocab", "tokenise", "pretrain", "finetune", "evaluate"]
SOURCES = ["In the beginning God created the heaven and the earth.", "And God said."]


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str], health: str):
    """Start the server ``cmd``, told to listen on 127.0.0.1 port 0, in its own process
    group; yield its URL once its ``health`` path answers; always stop the whole group at
    the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{listening_port(proc, 180, log)}"
        wait_for(f"{url}{health}", proc, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server: sqlite backend, artifacts proxied to a local directory."""
    d = tmp_path_factory.mktemp("mlflow-server")
    cmd = mlflow_server_cmd(d)
    with process(cmd, d / "server.log", dvc_env(), "/health") as url:
        yield url


@pytest.fixture(scope="module")
def env(server) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}


@pytest.fixture(scope="module")
def client(env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, env) -> Path:
    root = make_tiny_repo(tmp_path_factory.mktemp("workspace"))
    dvc(root, "repro", "evaluate", env=env)
    return root


def pipeline_runs(client) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs(
        [exp.experiment_id],
        "tags.`lmops.kind` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


def stage_runs(client, parent_id: str) -> dict:
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["lmops.stage"]: r for r in runs}


@pytest.fixture(scope="module")
def first_run(client, workspace):
    (run,) = pipeline_runs(client)
    return run


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def test_a_pipeline_run_is_traced_from_mlflow_alone(client, workspace, first_run):
    parent = first_run
    assert parent.info.status == "FINISHED"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert parent.data.tags["git.commit"] == head
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    # the whole params file, flattened with its sections as prefixes
    assert parent.data.params["finetune.lr"] == repr(params["finetune"]["lr"])
    assert parent.data.params["model.n_layer"] == repr(params["model"]["n_layer"])
    assert parent.data.params["vocab.vocab_size"] == repr(params["vocab"]["vocab_size"])

    stages = stage_runs(client, parent.info.run_id)
    assert sorted(stages) == sorted(STAGES)
    for name, run in stages.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["git.commit"] == head and run.data.tags["dvc.stage"] == name
        assert run.data.metrics[f"{name}/wall_seconds"] > 0
        # every metric is <stage>/<name> but the run's system use (system/...), and every
        # stage param carries the stage
        own = [k for k in run.data.metrics if not is_system_metric(k)]
        assert all(k.startswith(f"{name}/") for k in own), run.data.metrics
        assert all(k.startswith(f"{name}.") for k in run.data.params), run.data.params
    # the parent holds what every stage's metrics files hold, as dvc exp show does, for
    # the compare view; the curves and each run's own clock stay on the stage runs
    from lmops.tracking import runs as tracking

    ev = json.loads((workspace / "data/metrics/evaluate.json").read_text())
    assert parent.data.metrics["evaluate/bleu"] == ev["bleu"]
    assert set(parent.data.metrics) == set().union(
        *(tracking.result_keys(workspace, stage) for stage in STAGES)
    )

    # step-wise curves
    for stage, key in (
        ("pretrain", "train_loss"),
        ("finetune", "train_loss"),
        ("finetune", "valid_bleu"),
    ):
        history = client.get_metric_history(stages[stage].info.run_id, f"{stage}/{key}")
        steps = [m.step for m in history]
        assert len(steps) > 1 and steps == sorted(steps), (stage, key, steps)

    # artifacts: the run's files, the GX report, the vocabulary, weights, tables, plots
    assert {"params.yaml", "dvc.lock"} <= artifacts(client, parent.info.run_id)
    assert "gx_report/index.html" in artifacts(client, stages["validate"].info.run_id)
    assert "vocab/spm.model" in artifacts(client, stages["vocab"].info.run_id)
    for stage in ("pretrain", "finetune"):
        got = artifacts(client, stages[stage].info.run_id)
        assert {"model/model.safetensors", "model/config.json"} <= got
        assert f"{stage}_loss_curves.png" in got
    assert {"translations.tsv", "evaluate/samples.json"} <= artifacts(
        client, stages["evaluate"].info.run_id
    )

    # data by DVC md5, through log_input
    inputs = {
        d.dataset.name: d.dataset.digest
        for d in client.get_run(stages["evaluate"].info.run_id).inputs.dataset_inputs
    }
    outs = {o["path"]: o["md5"] for o in lock(workspace)["finetune"]["outs"]}
    assert inputs["model"] == outs["data/models/finetune"]


@pytest.fixture(scope="module")
def registered(env, workspace, first_run):
    digest = retrain.source_digest(load_params(workspace / "params.yaml").clean)
    with mock.patch.dict(os.environ, env):
        return retrain.champion_challenger(workspace, first_run.info.run_id, digest)


def test_the_translator_is_registered_with_an_alias(client, workspace, first_run, registered):
    assert registered["action"] == "promoted"
    model = client.get_registered_model(registry.MODEL_NAME)
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    version = client.get_model_version(registry.MODEL_NAME, "1")
    assert version.run_id == first_run.info.run_id
    ev = json.loads((workspace / "data/metrics/evaluate.json").read_text())
    assert float(version.tags["metric.bleu"]) == ev["bleu"]
    assert version.tags[registry.MD5_TAG] == next(
        o["md5"] for o in lock(workspace)["finetune"]["outs"] if o["path"] == "data/models/finetune"
    )
    # the run now holds the final dvc.lock, evaluate included
    local = client.download_artifacts(first_run.info.run_id, "dvc.lock", str(workspace / "dl"))
    assert "evaluate" in yaml.safe_load(Path(local).read_text())["stages"]


def local_translations(workspace: Path, **overrides) -> list[str]:
    from lmops.tracking.serving import Translator

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    translator = Translator.from_dirs(
        workspace / "data/models/finetune",
        workspace / "data/vocab",
        decode=params["evaluate"]["decode"],
    )
    return translator.translate(SOURCES, **overrides)


def fresh_env(env: dict[str, str]) -> dict[str, str]:
    # no PYTHONPATH: the model must bring its own lmops code
    return {k: v for k, v in dvc_env(env).items() if k != "PYTHONPATH"}


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        pytest.fail(f"{url}: HTTP {err.code}: {err.read().decode()}")


def send(url: str, body: bytes) -> tuple[int, str]:
    """POST ``body`` as JSON; the status and the text of the answer, error or not."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def rows(sources: list, **params) -> bytes:
    body: dict = {"dataframe_split": {"columns": ["source"], "data": [[s] for s in sources]}}
    return json.dumps({**body, **({"params": params} if params else {})}).encode()


BLOCK_SIZE = 64  # params.tiny.yaml's model.block_size: the default cap on max_new_tokens
# what a hostile client sends, and what the served model must answer: the status and a
# message naming the field and the limit
HOSTILE = {
    "a huge max_new_tokens": (
        rows(["Hello."], max_new_tokens=10**9),
        400,
        f"max_new_tokens must be between 1 and {BLOCK_SIZE} (the model's block_size)",
    ),
    "a huge beam": (rows(["Hello."], beam_size=500), 400, "beam_size must be between 1 and 8"),
    "a negative beam": (rows(["Hello."], beam_size=-3), 400, "got -3"),
    "a non-numeric beam": (rows(["Hello."], beam_size="four"), 400, "beam_size"),
    "10,000 rows": (
        rows(["Hello."] * 10_000),
        400,
        "10,000 sources in one request, over the limit of 256 (serve.max_rows)",
    ),
    "a 1 MB source": (
        rows(["a" * 1_000_000]),
        400,
        "source 1: 1,000,000 characters, over the limit of 2,000 (serve.max_source_chars)",
    ),
    "non-string values": (rows([3, None]), 400, "source"),
    "a wrong column": (
        json.dumps({"dataframe_split": {"columns": ["text", "x"], "data": [["a", "b"]]}}).encode(),
        400,
        "source",
    ),
    "malformed JSON": (b'{"dataframe_split": {"columns": ["source"], "data": [[', 400, "JSON"),
    "a deadline no decoding can meet": (
        rows(SOURCES, deadline_s=1e-9),
        504,
        "passed the deadline of 1e-09 s",
    ),
}


def test_the_champion_is_served_over_rest(env, workspace, registered, tmp_path):
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{registry.MODEL_NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        "0",
    ]
    # `mlflow models serve` drops a port of 0 (a false value) from the uvicorn command it
    # runs, which would then take uvicorn's default, 8000; uvicorn reads UVICORN_PORT for
    # a port it is not given
    serve_env = {**fresh_env(env), "UVICORN_PORT": "0"}
    with process(cmd, tmp_path / "serve.log", serve_env, "/ping") as base:
        split = post(
            f"{base}/invocations",
            {
                "dataframe_split": {"columns": ["source"], "data": [[s] for s in SOURCES]},
                "params": {"beam_size": 1},
            },
        )
        records = post(
            f"{base}/invocations", {"dataframe_records": [{"source": s} for s in SOURCES]}
        )
        empty = post(
            f"{base}/invocations",
            {"dataframe_split": {"columns": ["source"], "data": [[""], [" "]]}},
        )
        answers = {}
        for case, (body, _, _) in HOSTILE.items():
            answers[case] = send(f"{base}/invocations", body)
            # and the server goes on serving: the next request gets the usual answer
            status, text = send(f"{base}/invocations", rows(SOURCES[:1], beam_size=1))
            assert status == 200, f"after {case}: {text}"
            assert json.loads(text)["predictions"] == split["predictions"][:1], case
    # every hostile request is refused with the field and the limit; the deadline's 504 is
    # raised by the decoding itself, so that work has stopped when the answer is sent
    for case, (_, status, message) in HOSTILE.items():
        assert answers[case][0] == status, (case, answers[case])
        assert message in json.loads(answers[case][1])["message"], (case, answers[case])
    # empty sources get empty translations
    assert empty["predictions"] == [{"translation": ""}, {"translation": ""}]
    # the served model translates exactly as the pipeline's model does here
    assert split["predictions"] == [
        {"translation": t} for t in local_translations(workspace, beam_size=1)
    ]
    assert records["predictions"] == [{"translation": t} for t in local_translations(workspace)]
    assert all(isinstance(p["translation"], str) for p in records["predictions"])


def test_the_pyfunc_loads_and_translates_in_a_fresh_process(env, workspace, registered):
    code = (
        "import json, sys, pathlib, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/lmops-translator@champion')\n"
        f"out = m.predict(pd.DataFrame({{'source': {SOURCES!r}}}))\n"
        "import lmops\n"
        "print(json.dumps({'translations': list(out['translation']),\n"
        "                  'lmops': lmops.__file__, 'pickled': 'cloudpickle' in sys.modules,\n"
        "                  'signature': m.metadata.get_input_schema().input_names()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workspace,
        env=fresh_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["translations"] == local_translations(workspace)
    assert got["signature"] == ["source"]
    # its code came with the model, not from this checkout
    assert "/code/lmops/" in got["lmops"] and "/src/lmops/" not in got["lmops"]

    # `lmops translate` gives the same, from the registry and from the local directories
    by_uri = lmops_cli(
        workspace, env, "translate", *SOURCES, "--model-uri", "models:/lmops-translator@champion"
    )
    by_dir = lmops_cli(  # the sentences one per line on stdin, a blank line stays blank
        workspace,
        None,
        *("translate", "--model", "data/models/finetune", "--vocab", "data/vocab"),
        stdin="\n".join(SOURCES[:1] + [""] + SOURCES[1:]) + "\n",
    )
    expected = local_translations(workspace)
    assert by_uri == "".join(f"{t}\n" for t in expected)
    assert by_dir == "".join(f"{t}\n" for t in expected[:1] + [""] + expected[1:])


def lmops_cli(root: Path, env: dict[str, str] | None, *args: str, stdin: str = "") -> str:
    """``lmops ARGS`` in ``root`` (against the server ``env`` names); its output."""
    out = subprocess.run(
        [sys.executable, "-m", "lmops", *args],
        input=stdin,
        cwd=root,
        env=dvc_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def table_rows(output: str) -> set[str]:
    """The row names of ``lmops compare``'s table."""
    return {line.split()[0] for line in output.splitlines()[2:] if line.strip()}


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def lr_runs(env, client, workspace, first_run, registered) -> list:
    """The first pipeline run, then two more, each at half the learning rate before:
    `dvc repro evaluate` reruns finetune and evaluate."""
    lr = yaml.safe_load((workspace / "params.yaml").read_text())["finetune"]["lr"]
    for new in (lr * 0.5, lr * 0.25):
        set_param(workspace, "finetune", "lr", new)
        dvc(workspace, "repro", "evaluate", env=env)
    runs = pipeline_runs(client)
    assert [r.info.run_id for r in runs[:1]] == [first_run.info.run_id]
    return runs


def test_two_runs_one_param_apart_differ_in_that_param_only(env, client, workspace, lr_runs):
    lr = yaml.safe_load((workspace / "params.yaml").read_text())["finetune"]["lr"]
    with mock.patch.dict(os.environ, env):
        runs = [compare.summarise(r.info.run_id, client) for r in lr_runs]
    first, b, c = runs
    assert b.stages == c.stages == ["finetune", "evaluate"]
    assert set(b.metrics) == set(c.metrics)
    assert set(b.metrics) <= set(first.metrics)
    for x, y in ((b, c), (first, b)):
        assert set(x.params) == set(y.params)
        assert [k for k in x.params if x.params[k] != y.params[k]] == ["finetune.lr"]
    assert c.params["finetune.lr"] == repr(lr)

    # the documented command prints the same comparison: the headline figures first
    out = lmops_cli(workspace, env, "compare", b.run_id, c.run_id)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == [
        "git.commit",
        "reran",
        "inherited",
        "evaluate/bleu",
    ]
    assert lines[3].split()[1:] == ["finetune,evaluate"] * 2
    assert lines[4].split()[1:] == ["clean,validate,tokenise,pretrain"] * 2
    rows = table_rows(out)
    assert {"evaluate/chrf", "evaluate/ppl_en", "evaluate/bpb_fr", "finetune.lr"} <= rows
    assert {"pretrain/wall_seconds", "finetune/wall_seconds"} <= rows  # the headline's time
    assert not any(r.startswith(("clean", "model.", "evaluate.")) for r in rows), rows
    assert "finetune/train_loss" not in rows  # the rest: with --all
    every = table_rows(lmops_cli(workspace, env, "compare", b.run_id, c.run_id, "--all"))
    assert rows < every and {"model.n_layer", "finetune/train_loss", "clean/leaked.total"} <= every
    assert "evaluate/decode_seconds" not in every  # timings differ on every run: on request
    timed = table_rows(lmops_cli(workspace, env, "compare", b.run_id, c.run_id, "--timings"))
    assert "evaluate/decode_seconds" in timed - rows


def test_runs_one_param_apart_line_up_metric_by_metric(client, workspace, lr_runs):
    """Each pipeline run carries the whole pipeline state's metrics: the stages DVC did
    not rerun, from their metrics files, under the keys a rerun logs."""
    first, b, c = (client.get_run(r.info.run_id) for r in lr_runs)
    for run in (b, c):
        assert run.data.tags["lmops.stages_reran"] == "finetune,evaluate"
        assert run.data.tags["lmops.stages_inherited"] == "clean,validate,tokenise,pretrain"
    assert first.data.tags["lmops.stages_reran"] == ",".join(STAGES)
    assert first.data.tags["lmops.stages_inherited"] == ""
    # the two runs one param apart: the same keys, row by row
    assert set(b.data.metrics) == set(c.data.metrics)
    # inherited: the values of the metrics files, as `dvc exp show` reads them
    from lmops.tracking import runs as tracking

    files = {}
    for stage in ("clean", "validate", "tokenise", "pretrain"):
        data = json.loads((workspace / f"data/metrics/{stage}.json").read_text())
        files[stage] = tracking.stage_metrics(stage, data)
        assert files[stage], stage
        for run in (b, c):
            assert {k: run.data.metrics[k] for k in files[stage]} == files[stage], stage
    assert (
        c.data.metrics["pretrain/valid_ppl"]
        == json.loads((workspace / "data/metrics/pretrain.json").read_text())["valid_ppl"]
    )
    assert c.data.tags["lmops.hardware.pretrain.device"] == "cpu"
    # and against the run that reran every stage: row by row too (the registry step's
    # decision, retrain/..., is on the first run alone)
    assert set(b.data.metrics) == {k for k in first.data.metrics if not k.startswith("retrain/")}
    assert {"validate/success", "pretrain/train_loss", "clean/leaked.total"} <= set(b.data.metrics)


def test_stopped_stages_leave_no_running_run_on_the_server(env, client, workspace, first_run):
    """A `kill` (SIGTERM) of a training stage ends its runs on the server as KILLED at once;
    after a `kill -9`, `lmops runs reconcile` ends them as FAILED, and only them."""
    from tests.support import workspace as ws

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["pretrain"].update(max_steps=100000, checkpoint_interval=5)
    (workspace / "params.long.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    exp = client.get_experiment_by_name(EXPERIMENT)

    def stopped_stage(sig: int, work: str):
        proc = subprocess.Popen(
            [sys.executable, "stages/pretrain.py", "--params", "params.long.yaml"]
            + ["--tokens", "data/tokens", "--vocab", "data/vocab", "--work", work]
            + ["--out", "scratch/model", "--metrics", "scratch/m.json", "--curve", "scratch/c.csv"],
            cwd=workspace,
            env=dvc_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ckpt = workspace / work / "ckpt"
        ws.wait_for(lambda: list(ckpt.glob("step-*")), "a checkpoint", 300, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        (run,) = client.search_runs(
            [exp.experiment_id],
            f"tags.`lmops.stage` = 'pretrain' and tags.`lmops.pid` = '{proc.pid}'",
        )
        return proc.returncode, err, run, client.get_run(run.data.tags["mlflow.parentRunId"])

    code, err, run, parent = stopped_stage(signal.SIGTERM, "scratch/term")
    assert code == -signal.SIGTERM and err.rstrip().endswith("lmops pretrain: stopped by SIGTERM")
    assert (run.info.status, parent.info.status) == ("KILLED", "KILLED")
    assert run.data.tags["lmops.error"] == "stopped by SIGTERM"
    assert run.data.metrics["pretrain/train_loss"] > 0  # what it logged reached the server

    code, _, run, parent = stopped_stage(signal.SIGKILL, "scratch/kill")
    assert code == -signal.SIGKILL
    assert (run.info.status, parent.info.status) == ("RUNNING", "RUNNING")

    def reconcile(*args: str) -> list[str]:
        return lmops_cli(workspace, env, "runs", "reconcile", *args).splitlines()

    assert sorted(line.split()[1] for line in reconcile("--dry-run")) == sorted(
        [run.info.run_id, parent.info.run_id]
    )
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    lines = reconcile()
    assert len(lines) == 2 and all(
        "process vanished (SIGKILL or out of memory?)" in line for line in lines
    ), lines
    for ghost in (run, parent):
        ended = client.get_run(ghost.info.run_id)
        assert ended.info.status == "FAILED" and ended.info.end_time is not None
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
    assert reconcile() == [f"no vanished runs in experiment '{EXPERIMENT}'"]
