"""Load, clean, split and de-leak the raw corpora.

Run with: dvc repro clean
   or: python stages/clean.py --params params.yaml --out data/clean \
           --stats data/metrics/clean.json
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.pipeline import as_paths, clean
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Load, clean, split and de-leak the raw corpora.", clean.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(clean.Paths, vars(args))
    with tracking.stage_run("clean", {**flatten(params.clean), "seed": params.seed}):
        stats = clean.run(paths, params).metrics
        tracking.log_metrics({f"clean/{k}": v for k, v in stats.items()})
        tracking.log_artifact(paths.stats, artifact_path="clean")


if __name__ == "__main__":
    stage.run("clean", main, build_parser())
