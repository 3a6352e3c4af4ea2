"""Distil the fine-tuned teacher into a smaller student; score it like the teacher.

Run with: dvc repro distil
   or: python stages/distil.py --params params.yaml --tokens data/tokens --vocab data/vocab \
           --clean data/clean --teacher data/models/finetune \
           --teacher-translations data/evaluate/translations.tsv --work data/train/distil \
           --out data/models/distil --eval-out data/distil \
           --metrics data/metrics/distil.json --curve data/plots/distil.csv
Killed midway, the same command resumes from the last checkpoint under --work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmops import distil, estimate, evaluate, stage, tracking
from lmops.config import flatten, load_params
from lmops.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Distil the teacher into a smaller student.")
    p.add_argument("--tokens", required=True, help="tokenise stage output dir")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--clean", required=True, help="clean stage output dir (mono_test)")
    p.add_argument("--teacher", required=True, help="fine-tuned teacher model dir")
    p.add_argument("--teacher-translations", required=True,
                   help="the teacher's test translations (evaluate stage)")
    p.add_argument("--work", required=True, help="checkpoint dir (kept between runs)")
    p.add_argument("--out", required=True, help="student model dir to write")
    p.add_argument("--eval-out", required=True, help="dir for the student's translations")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--curve", required=True, help="loss and BLEU curve CSV (dvc plots)")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    logged = {"seed": params.seed, "target_lang": params.clean.target_lang,
              **flatten(params.distil), **flatten(params.evaluate, "evaluate.")}
    with tracking.stage_run("distil", logged):
        tracking.log_data_input(args.tokens, "tokens")
        tracking.log_data_input(args.teacher, "teacher_model")
        metrics, samples = distil.distil(args.tokens, args.vocab, args.clean, args.teacher,
                                         args.teacher_translations, args.work, args.out,
                                         args.eval_out, params, curve_path=args.curve)
        if tracking.is_worker_rank():  # torchrun: rank 0 writes the outputs
            return
        write_json(args.metrics, metrics)
        tracking.log_stage_outputs(
            "distil", metrics, model_dir=args.out,
            files=(Path(args.eval_out) / evaluate.TRANSLATIONS_FILE,))
        tracking.log_table(samples, "distil/samples.json")
        retained = metrics["bleu_retained"]
        print(f"student BLEU {metrics['bleu']:.2f}, teacher {metrics['teacher_bleu']:.2f} "
              f"(retained {'n/a' if retained is None else f'{retained:.1%}'}), "
              f"{metrics['param_ratio']:.1%} of the teacher's parameters")


if __name__ == "__main__":
    stage.run("distil", main, build_parser(), before=estimate.training_stage_start)
