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

from lmops.config import flatten, load_params
from lmops.orchestrate import estimate
from lmops.pipeline import as_paths, pretrain
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Pretrain the bilingual language model.", pretrain.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(pretrain.Paths, vars(args))
    logged = {"seed": params.seed, **flatten(params.model, "model."), **flatten(params.pretrain)}
    with tracking.stage_run("pretrain", logged):
        tracking.log_data_input(paths.tokens, "tokens")
        metrics = pretrain.run(paths, params, tracking.StageLog()).metrics
        if metrics is not None:  # None on a worker rank: rank 0 writes the outputs
            tracking.log_stage_outputs("pretrain", metrics, model_dir=paths.out)


if __name__ == "__main__":
    stage.run("pretrain", main, build_parser(), before=estimate.training_stage_start)
