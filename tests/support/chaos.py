"""Crash loop: stop the training stages at random moments, ``kill -9`` or SIGTERM, rerun
``dvc repro``, and check that every rerun ends with the weights of an uninterrupted run, bit
for bit, and leaves no MLflow run RUNNING.

    make chaos                                   # 20 stops on the chaos profile
    python -m tests.support.chaos --kills 40 --seed 7    # more, or another sequence of stops
    python -m tests.support.chaos --workspace DIR        # on a workspace built before

It builds a throwaway git + DVC workspace from this checkout (the tiny profile with longer
training, so a stop lands mid-training more often than in start-up), runs the pipeline
once to ``distil`` uninterrupted as the reference, then repeats: pick a training stage,
discard its checkpoints, start ``dvc repro --force`` of it, and stop it at a random moment
(mostly a random time after a randomly chosen checkpoint, so in a step, an evaluation or a
checkpoint write; sometimes in start-up) in one of three ways: ``SIGKILL`` to the whole
process group (dvc and the stage), SIGTERM to the group (a container or systemd stop), or
SIGTERM to the stage process alone (a plain ``kill``). A SIGTERMed stage must exit within
a minute with its MLflow run KILLED. Sometimes the rerun is killed too; finally
``dvc repro`` finishes. A stop survived when the rerun's weights (``model.safetensors``)
and metrics, timings aside, equal the reference's and no run of the store is left RUNNING
(the rerun ends the ghosts of a ``kill -9``). Prints ``survived/total``; exits 1 if any
stop was not survived.

Given a workspace already built to ``distil`` and up to date (``--workspace``, or
``chaos(..., built=True)`` as the tests do with their tiny workspace), it makes no
reference run: the training stages' outputs there are the reference, and when to stop
them is read from their runs in its MLflow store (:func:`recorded_windows`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from lmops.core.checkpoint import sha256
from lmops.orchestrate.repro import group_alive
from lmops.tracking import tags as tag
from tests.support import workspace

STAGES = ("pretrain", "finetune", "distil")
# longer training than the tiny profile so that the kills spread over the training loop
PROFILE = {
    "pretrain": {"max_steps": 150, "checkpoint_interval": 10, "eval_interval": 50},
    "finetune": {"max_steps": 120, "checkpoint_interval": 10, "eval_interval": 40},
    "distil": {"max_steps": 120, "checkpoint_interval": 10, "eval_interval": 40},
}
# metrics that measure the machine, not the model, or say where a run resumed
VOLATILE = (
    "wall_seconds",
    "tokens_per_sec",
    "resumed_from",
    "decode_seconds",
    "ms_per_sentence",
    "sentences_per_sec",
)


@dataclass
class Kill:
    stage: str
    how: str  # one of HOW
    after: int  # the checkpoint step the kill waited for (0: none, in start-up)
    delay: float  # seconds after that (or after the start) the group was killed
    checkpoint: int  # the newest checkpoint step on disk after the kill (0: none)
    kills: int  # 1, or 2 when the rerun was killed too
    survived: bool
    detail: str = ""


def stable_metrics(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE}


def fingerprint(root: Path, stage: str) -> tuple[str, dict[str, Any]]:
    return (
        sha256(root / "data/models" / stage / "model.safetensors"),
        stable_metrics(root / "data/metrics" / f"{stage}.json"),
    )


def _dvc(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args],
        cwd=root,
        env=workspace.clean_env(TQDM_DISABLE="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# how a run is stopped: kill -9 of dvc and the stage, SIGTERM of both (systemd, a
# container's stop), or a plain `kill` of the stage process alone
HOW = ("SIGKILL", "SIGTERM", "SIGTERM to the stage")
STOP_WITHIN = 60.0  # seconds a SIGTERMed stage may take to end its runs and exit


def _stop(proc: subprocess.Popen, stage: str, how: str) -> str:
    """Stop the run; returns how it really was stopped ('' when it stopped as it should).
    A stage not started yet (dvc is still starting) gets its SIGTERM with dvc."""
    if how == "SIGKILL":
        workspace.stop(proc, signal.SIGKILL)
        return ""
    script = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if f"stages/{stage}.py" in p.cmdline()
    ]
    if how == "SIGTERM to the stage" and script:
        for p in script:
            p.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WITHIN
    while group_alive(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(proc):
        workspace.stop(proc, signal.SIGKILL)
        return f"still running {STOP_WITHIN:.0f} s after {how}"
    return ""


def _killed_run(
    root: Path, stage: str, force: bool, after_step: int, delay: float, how: str = "SIGKILL"
) -> tuple[bool, str]:
    """Start `dvc repro` of ``stage``; once its checkpoint for ``after_step`` is on disk (at
    once for 0), wait ``delay`` seconds and stop it (:data:`HOW`). Returns whether it was
    stopped (False: the run ended first) and what went wrong in the stop ('' if nothing)."""
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=workspace.clean_env(TQDM_DISABLE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while after_step and newest_checkpoint(root, stage) < after_step and proc.poll() is None:
        time.sleep(0.01)
    try:
        proc.wait(timeout=delay)
        return False, ""
    except subprocess.TimeoutExpired:
        return True, _stop(proc, stage, how)


def _store(root: Path) -> tuple[Any, str]:
    """A client of the workspace's MLflow store and the id of its experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    return client, client.get_experiment_by_name("lmops").experiment_id


def _search(root: Path, query: str, **kwargs: Any) -> list:
    """Runs of the workspace's MLflow store that match ``query``."""
    client, experiment_id = _store(root)
    return client.search_runs([experiment_id], query, **kwargs)


def running_runs(root: Path) -> list[str]:
    """The runs of the workspace's MLflow store still RUNNING: ghosts, once dvc is done."""
    runs = _search(root, "attributes.status = 'RUNNING'")
    return [f"{r.info.run_name} ({r.info.run_id})" for r in runs]


def _killed_status(root: Path, stage: str, since: float) -> str:
    """The status of the ``stage`` run started after ``since`` (time.time()); 'none' if
    the stop came before it started."""
    runs = _search(
        root, f"tags.`lmops.stage` = '{stage}' and attributes.start_time >= {int(since * 1000)}"
    )
    return runs[0].info.status if runs else "none"


newest_checkpoint = workspace.newest_checkpoint


def build(root: Path) -> dict[str, tuple[float, float]]:
    """Make the workspace, run the pipeline to distil once; returns for each training stage
    when its first checkpoint appeared and when it ended, in seconds after its start."""
    workspace.make(root, "params.tiny.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    for stage, values in PROFILE.items():
        params[stage].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(root, "repro", "distil")
    if out.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    windows = {}
    for stage in STAGES:  # when each stage's training loop runs, from `dvc repro` started
        shutil.rmtree(root / "data/train" / stage)  # or it resumes its finished run
        start = time.perf_counter()
        proc = subprocess.Popen(
            ["dvc", "repro", "--force", "--single-item", stage],
            cwd=root,
            env=workspace.clean_env(TQDM_DISABLE="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = None
        while proc.poll() is None:
            if first is None and newest_checkpoint(root, stage):
                first = time.perf_counter() - start
            time.sleep(0.05)
        if proc.returncode != 0:
            raise SystemExit(f"dvc repro --force {stage} failed:\n{proc.stderr.read()[-3000:]}")
        windows[stage] = (first or 0.0, time.perf_counter() - start)
    return windows


def recorded_windows(root: Path) -> dict[str, tuple[float, float]]:
    """What :func:`build` measures, read from a built workspace's MLflow store instead of
    timed on one more run of each stage: from the newest finished run of each training stage
    that trained from step 0, the seconds from the start of its process (its
    ``lmops.pid_start`` tag; ``dvc`` starts a fraction of a second earlier) to its first
    checkpoint (its first training loss logged at that step or later) and to its end."""
    client, _ = _store(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    windows = {}
    for stage in STAGES:
        runs = _search(
            root,
            f"tags.`lmops.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        run = next((r for r in runs if r.data.metrics.get(f"{stage}/resumed_from") == 0), None)
        if run is None:
            raise SystemExit(f"{root}: no finished {stage} run that trained from step 0")
        start = float(run.data.tags[tag.PID_START])
        interval = params[stage]["checkpoint_interval"]
        losses = client.get_metric_history(run.info.run_id, f"{stage}/train_loss")
        first = min(m.timestamp for m in losses if m.step >= interval) / 1000 - start
        windows[stage] = (first, run.info.end_time / 1000 - start)
    return windows


def chaos(root: Path, kills: int, seed: int, log=print, built: bool = False) -> list[Kill]:
    """Stop the training stages of the workspace ``root`` ``kills`` times (a stop of a
    rerun counts as one), the stages, moments and ways drawn with ``seed``; one
    :class:`Kill` for each stop and the rerun after it.

    ``built``: ``root`` is a workspace already built to ``distil`` and up to date, used as
    it is (its training stages' outputs are the reference; :func:`recorded_windows`);
    otherwise a workspace is made in ``root`` and the reference run with it."""
    rng = random.Random(seed)
    if built:
        if _dvc(root, "status", "--quiet", "--with-deps", "distil").returncode != 0:
            raise SystemExit(f"{root}: not up to date to distil (dvc status), so no reference")
        windows = recorded_windows(root)
    else:
        log(f"building the workspace and the uninterrupted reference in {root} ...")
        windows = build(root)
    reference = {stage: fingerprint(root, stage) for stage in STAGES}
    # the profile it trains with: PROFILE in the workspace chaos built, or the one it got
    params = yaml.safe_load((root / "params.yaml").read_text())
    log(
        "reference (first checkpoint, end): "
        + ", ".join(f"{s} {a:.1f} s, {b:.1f} s" for s, (a, b) in windows.items())
    )

    def draw(stage: str) -> tuple[int, float]:
        """Where to kill: mostly inside the training loop, some time after a random
        checkpoint (so the kill can land in a step, an evaluation or a checkpoint write);
        sometimes in start-up, before the first checkpoint."""
        first, end = windows[stage]
        interval, steps = params[stage]["checkpoint_interval"], params[stage]["max_steps"]
        if rng.random() < 0.15:
            return 0, rng.uniform(0.1, max(first, 0.2))
        per_interval = (end - first) / (steps // interval)
        return rng.randrange(interval, steps, interval), rng.uniform(0, per_interval)

    results: list[Kill] = []
    done = 0
    while done < kills:
        stage = rng.choice(STAGES)
        shutil.rmtree(root / "data/train" / stage, ignore_errors=True)
        after, delay = draw(stage)
        how = rng.choice(HOW)
        started = time.time()
        stopped, trouble = _killed_run(root, stage, True, after, delay, how)
        if not stopped:
            continue  # it finished first: no kill, draw again
        status = _killed_status(root, stage, started)
        if how != "SIGKILL" and not trouble and status not in ("KILLED", "none"):
            trouble = f"its run is {status} after {how}, not KILLED"  # none: not started yet
        count = 1
        checkpoint = newest_checkpoint(root, stage)
        # sometimes kill the resumed run as well (kill -9)
        if (
            not trouble
            and done + 1 < kills
            and rng.random() < 0.3
            and _killed_run(root, stage, False, *draw(stage))[0]
        ):
            count += 1
        out = _dvc(root, "repro", "--single-item", stage)
        if trouble:
            kill = Kill(stage, how, after, delay, checkpoint, count, False, trouble)
        elif out.returncode != 0:
            kill = Kill(
                stage,
                how,
                after,
                delay,
                checkpoint,
                count,
                False,
                f"the rerun failed: {out.stderr.strip()[-500:]}",
            )
        elif ghosts := running_runs(root):
            kill = Kill(
                stage, how, after, delay, checkpoint, count, False, f"runs left RUNNING: {ghosts}"
            )
        else:
            now = fingerprint(root, stage)
            same = now == reference[stage]
            resumed = json.loads((root / "data/metrics" / f"{stage}.json").read_text()).get(
                "resumed_from"
            )
            detail = f"resumed from step {resumed}"
            if not same:
                changed = sorted(k for k in now[1] if now[1][k] != reference[stage][1].get(k))
                detail += (" - weights differ" if now[0] != reference[stage][0] else "") + (
                    f" - metrics differ: {', '.join(changed)}" if changed else ""
                )
            kill = Kill(stage, how, after, delay, checkpoint, count, same, detail)
        results.append(kill)
        done += count
        when = f"{delay:.2f} s after checkpoint {after}" if after else f"at {delay:.1f} s"
        log(
            f"[{done:>3}/{kills}] {stage:<8} {how} {when} (newest checkpoint on disk: "
            f"step {checkpoint}){' and its rerun' if count > 1 else ''}: "
            f"{'survived' if kill.survived else 'NOT SURVIVED'}, {kill.detail}"
        )
    return results


def tally(results: list[Kill]) -> tuple[int, int]:
    """(stops survived, stops) of a crash loop."""
    return sum(r.kills for r in results if r.survived), sum(r.kills for r in results)


def summary(results: list[Kill], seconds: float) -> str:
    """The line that ends a crash loop: ``survived N/M stops (...) in S s``."""
    survived, kills = tally(results)
    by_stage = {s: sum(r.kills for r in results if r.stage == s) for s in STAGES}
    by_how = {h: sum(1 for r in results if r.how == h) for h in HOW}
    return (
        f"survived {survived}/{kills} stops ("
        + ", ".join(f"{s} {n}" for s, n in by_stage.items())
        + "; first stops: "
        + ", ".join(f"{h} {n}" for h, n in by_how.items())
        + f") in {seconds:.0f} s"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.chaos", description=__doc__.splitlines()[0]
    )
    p.add_argument("--kills", type=int, default=20, help="number of stops (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stage and delay draws")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--keep", type=Path, help="build the workspace here and keep it")
    where.add_argument(
        "--workspace",
        type=Path,
        help="use this workspace, built to distil and up to date (--keep's, say), as it is: "
        "no reference run",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmops-chaos-") as tmp:
        root = (args.workspace or args.keep or Path(tmp) / "repo").resolve()
        started = time.perf_counter()
        results = chaos(root, args.kills, args.seed, built=args.workspace is not None)
    survived, kills = tally(results)
    print("\n" + summary(results, time.perf_counter() - started))
    sys.exit(0 if survived == kills else 1)


if __name__ == "__main__":
    main()
