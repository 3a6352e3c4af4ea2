"""Pretrain the bilingual causal language model on the token stream.

Run with: dvc repro pretrain
   or: python stages/pretrain.py --params params.yaml --tokens data/tokens --vocab data/vocab \
           --work data/train/pretrain --out data/models/pretrain \
           --metrics data/metrics/pretrain.json --curve data/plots/pretrain.csv
Killed midway, the same command resumes from the last checkpoint under --work.
Data-parallel: torchrun --nproc-per-node 2 stages/pretrain.py ... (same arguments).
"""

from __future__ import annotations

import argparse

from lmops import estimate, pretrain, stage, tracking
from lmops.config import flatten, load_params
from lmops.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Pretrain the bilingual language model.")
    p.add_argument("--tokens", required=True, help="tokenise stage output dir")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--work", required=True, help="checkpoint dir (kept between runs)")
    p.add_argument("--out", required=True, help="model dir to write")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--curve", required=True, help="loss curve CSV (dvc plots)")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    logged = {"seed": params.seed, **flatten(params.model, "model."),
              **flatten(params.pretrain)}
    with tracking.stage_run("pretrain", logged):
        tracking.log_data_input(args.tokens, "tokens")
        metrics = pretrain.pretrain(args.tokens, args.vocab, args.work, args.out, params,
                                    curve_path=args.curve)
        if tracking.is_worker_rank():  # torchrun: rank 0 writes the outputs
            return
        write_json(args.metrics, metrics)
        tracking.log_stage_outputs("pretrain", metrics, model_dir=args.out)


if __name__ == "__main__":
    stage.run("pretrain", main, build_parser(), before=estimate.training_stage_start)
