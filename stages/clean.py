"""Load, clean, split and de-leak the raw corpora.

Run with: dvc repro clean
   or: python stages/clean.py --params params.yaml --out data/clean \
           --stats data/metrics/clean.json
"""

from __future__ import annotations

import argparse

from lmops import data, stage, tracking
from lmops.config import flatten, load_params


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Load, clean, split and de-leak the raw corpora.")
    p.add_argument("--out", required=True, help="directory to write the splits into")
    p.add_argument("--stats", required=True, help="stats JSON to write (a DVC metric)")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    with tracking.stage_run("clean", {**flatten(params.clean), "seed": params.seed}):
        stats = data.build_clean(params.clean, params.seed, args.out, args.stats)
        tracking.log_metrics({f"clean/{k}": v for k, v in stats.items()})
        tracking.log_artifact(args.stats, artifact_path="clean")


if __name__ == "__main__":
    stage.run("clean", main, build_parser())
