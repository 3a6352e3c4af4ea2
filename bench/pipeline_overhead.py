"""Pipeline overhead: a no-op `dvc repro`, and the Prefect flow's cost on top of it.

Run with: make bench   (or: python bench/pipeline_overhead.py [--rounds 3])

Builds the whole pipeline once on the tiny profile in a fresh git + DVC workspace (a
no-op does the same work whatever the model size: DVC checks every stage's deps and outs
against its lock), then times, interleaved, three ways of finding that nothing changed:

- `dvc repro`, everything cached;
- `python flows/pipeline.py`: the Prefect flow on its temporary local server (started
  and stopped by the run, as a one-off run does it), one task per stage;
- the same flow against a Prefect server already running on 127.0.0.1 (as a deployment
  on a worker runs it).

The flow's overhead is its wall time minus the no-op `dvc repro`'s, paired per round.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import interleaved, machine, median, paired_ratio, spread, write_results

from tests.support import workspace

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    return workspace.clean_env(TQDM_DISABLE="1", **extra)


def timed(cmd: list[str], root: Path, env: dict[str, str], expect: str | None = None) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    text = out.stdout + out.stderr
    if out.returncode != 0 or "Running stage" in text or (expect and expect not in text):
        raise SystemExit(
            f"{' '.join(cmd)}: not a clean no-op (exit {out.returncode}):\n{text[-3000:]}"
        )
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--profile",
        default=str(ROOT / "params.tiny.yaml"),
        help="params profile the workspace is built with",
    )
    args = p.parse_args()
    info = machine(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="lmops-bench-overhead-") as tmp:
        root = workspace.make(Path(tmp) / "repo", Path(args.profile).resolve(), source=ROOT)
        print("building the pipeline once (dvc repro) ...")
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "-q"], cwd=root, env=_env(), check=True)
        build_s = time.perf_counter() - start
        stages = len(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
        flow = [sys.executable, "flows/pipeline.py"]
        temp_env = _env(
            PREFECT_HOME=str(Path(tmp) / "prefect-temp"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
        )
        with workspace.prefect_server(Path(tmp) / "prefect-server") as server_env:
            runs = interleaved(
                {
                    "dvc repro": lambda: timed(
                        ["dvc", "repro"], root, _env(), "Data and pipelines are up to date"
                    ),
                    "flow, temporary server": lambda: timed(flow, root, temp_env, "Completed"),
                    "flow, running server": lambda: timed(flow, root, server_env, "Completed"),
                },
                args.rounds,
            )
    dvc = runs["dvc repro"]
    rows = [
        {
            "run": name,
            "no-op seconds": median(v),
            "spread": spread(v),
            "overhead over dvc repro (s)": (
                0.0 if name == "dvc repro" else median([a - b for a, b in zip(v, dvc, strict=True)])
            ),
            "x dvc repro": paired_ratio(v, dvc),
        }
        for name, v in runs.items()
    ]
    write_results(
        "pipeline_overhead",
        "Pipeline overhead: no-op runs",
        info,
        {f"No-op runs of the {stages}-stage pipeline (median of {args.rounds}, interleaved)": rows},
        extra={"rounds": runs, "build_seconds": build_s, "profile": args.profile},
        notes=[
            "Goals: a no-op `dvc repro` within 3 s; the Prefect flow's overhead within 15 s.",
            "On a no-op the flow runs one `dvc status --quiet` (stale stages would each run "
            "as a Prefect task, `dvc repro --single-item`), creates and ends the MLflow "
            "parent run and reports to Prefect; the temporary server adds its start-up.",
        ],
    )


if __name__ == "__main__":
    main()
