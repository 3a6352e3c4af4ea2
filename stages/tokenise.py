"""Encode the clean text with the vocabulary: pretraining token streams and parallel ids.

Run with: dvc repro tokenise
   or: python stages/tokenise.py --params params.yaml --data data/clean --vocab data/vocab \
           --out data/tokens --stats data/metrics/tokenise.json
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.pipeline import as_paths, tokenise
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser(
        "Encode clean text into token streams and parallel id sequences.", tokenise.Paths
    )


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(tokenise.Paths, vars(args))
    with tracking.stage_run("tokenise", flatten(params.tokenise)):
        stats = tokenise.run(paths, params).metrics
        tracking.log_data_input(paths.vocab, "vocab")
        tracking.log_metrics({f"tokenise/{k}": v for k, v in flatten(stats).items()})


if __name__ == "__main__":
    stage.run("tokenise", main, build_parser())
