"""Fine-tune the pretrained model to translate; keep the weights with the best valid BLEU.

Run with: dvc repro finetune
   or: python stages/finetune.py --params params.yaml --tokens data/tokens --vocab data/vocab \
           --init data/models/pretrain --work data/train/finetune --out data/models/finetune \
           --metrics data/metrics/finetune.json --curve data/plots/finetune.csv
Killed midway, the same command resumes from the last checkpoint under --work.
"""

from __future__ import annotations

import argparse

from lmops import estimate, finetune, stage, tracking
from lmops.config import flatten, load_params
from lmops.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Fine-tune the pretrained model for translation.")
    p.add_argument("--tokens", required=True, help="tokenise stage output dir")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--init", required=True, help="pretrained model dir")
    p.add_argument("--work", required=True, help="checkpoint dir (kept between runs)")
    p.add_argument("--out", required=True, help="model dir to write")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--curve", required=True, help="loss and BLEU curve CSV (dvc plots)")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    logged = {"seed": params.seed, "target_lang": params.clean.target_lang,
              **flatten(params.finetune)}
    with tracking.stage_run("finetune", logged):
        tracking.log_data_input(args.tokens, "tokens")
        tracking.log_data_input(args.init, "pretrained_model")
        metrics = finetune.finetune(args.tokens, args.vocab, args.init, args.work, args.out,
                                    params, curve_path=args.curve)
        if tracking.is_worker_rank():  # torchrun: rank 0 writes the outputs
            return
        write_json(args.metrics, metrics)
        tracking.log_stage_outputs("finetune", metrics, model_dir=args.out)


if __name__ == "__main__":
    stage.run("finetune", main, build_parser(), before=estimate.training_stage_start)
