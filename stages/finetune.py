"""Fine-tune the pretrained model to translate; keep the weights with the best valid BLEU.

Run with: dvc repro finetune
   or: python stages/finetune.py --params params.yaml --tokens data/tokens --vocab data/vocab \
           --init data/models/pretrain --work data/train/finetune --out data/models/finetune \
           --metrics data/metrics/finetune.json --curve data/plots/finetune.csv
Killed midway, the same command resumes from the last checkpoint under --work.
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.orchestrate import estimate
from lmops.pipeline import as_paths, finetune
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Fine-tune the pretrained model for translation.", finetune.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(finetune.Paths, vars(args))
    logged = {
        "seed": params.seed,
        "target_lang": params.clean.target_lang,
        **flatten(params.finetune),
    }
    with tracking.stage_run("finetune", logged):
        tracking.log_data_input(paths.tokens, "tokens")
        tracking.log_data_input(paths.init, "pretrained_model")
        metrics = finetune.run(paths, params, tracking.StageLog()).metrics
        if metrics is not None:  # None on a worker rank: rank 0 writes the outputs
            tracking.log_stage_outputs("finetune", metrics, model_dir=paths.out)


if __name__ == "__main__":
    stage.run("finetune", main, build_parser(), before=estimate.training_stage_start)
