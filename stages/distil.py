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

from lmops.config import flatten, load_params
from lmops.orchestrate import estimate
from lmops.pipeline import as_paths, distil, evaluate
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Distil the teacher into a smaller student.", distil.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(distil.Paths, vars(args))
    logged = {
        "seed": params.seed,
        "target_lang": params.clean.target_lang,
        **flatten(params.distil),
        **flatten(params.evaluate, "evaluate."),
    }
    with tracking.stage_run("distil", logged):
        tracking.log_data_input(paths.tokens, "tokens")
        tracking.log_data_input(paths.teacher, "teacher_model")
        result = distil.run(paths, params, tracking.StageLog())
        metrics, samples = result.metrics, result.table
        if metrics is None:  # a worker rank: rank 0 writes the outputs
            return
        tracking.log_stage_outputs(
            "distil",
            metrics,
            model_dir=paths.out,
            files=(paths.eval_out / evaluate.TRANSLATIONS_FILE,),
        )
        tracking.log_table(samples, "distil/samples.json")
        retained = metrics["bleu_retained"]
        print(
            f"student BLEU {metrics['bleu']:.2f}, teacher {metrics['teacher_bleu']:.2f} "
            f"(retained {'n/a' if retained is None else f'{retained:.1%}'}), "
            f"{metrics['param_ratio']:.1%} of the teacher's parameters"
        )


if __name__ == "__main__":
    stage.run("distil", main, build_parser(), before=estimate.training_stage_start)
