"""Encode the clean text with the vocabulary: pretraining token streams and parallel ids.

Run with: dvc repro tokenise
   or: python stages/tokenise.py --params params.yaml --data data/clean --vocab data/vocab \
           --out data/tokens --stats data/metrics/tokenise.json
"""

from __future__ import annotations

import argparse

from lmops import stage, tokenise, tracking
from lmops.config import flatten, load_params
from lmops.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Encode clean text into token streams and parallel id sequences.")
    p.add_argument("--data", required=True, help="clean stage output dir")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--out", required=True, help="tokens dir to write")
    p.add_argument("--stats", required=True, help="stats JSON to write")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    with tracking.stage_run("tokenise", flatten(params.tokenise)):
        stats = tokenise.tokenise(args.data, args.vocab, args.out, params.tokenise)
        tracking.log_data_input(args.vocab, "vocab")
        write_json(args.stats, stats)
        tracking.log_metrics({f"tokenise/{k}": v for k, v in flatten(stats).items()})


if __name__ == "__main__":
    stage.run("tokenise", main, build_parser())
