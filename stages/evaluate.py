"""Score the fine-tuned translator: perplexity per language, BLEU and chrF, samples.

Run with: dvc repro evaluate
   or: python stages/evaluate.py --params params.yaml --model data/models/finetune \
           --vocab data/vocab --clean data/clean --tokens data/tokens \
           --out data/evaluate --metrics data/metrics/evaluate.json
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.pipeline import as_paths, evaluate
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Evaluate a model directory on the held-out test data.", evaluate.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(evaluate.Paths, vars(args))
    logged = {"target_lang": params.clean.target_lang, **flatten(params.evaluate)}
    with tracking.stage_run("evaluate", logged):
        tracking.log_data_input(paths.model, "model")
        tracking.log_data_input(paths.tokens, "tokens")
        result = evaluate.run(paths, params)
        metrics, samples = result.metrics, result.table
        tracking.log_stage_outputs(
            "evaluate", metrics, files=(paths.out / evaluate.TRANSLATIONS_FILE,)
        )
        tracking.log_table(samples, "evaluate/samples.json")
        print(
            f"BLEU {metrics['bleu']:.2f}  chrF {metrics['chrf']:.2f}  ({metrics['bleu_signature']})"
        )
        for _, row in samples.head(5).iterrows():
            print(f"  {row['source']}\n    ref: {row['reference']}\n    hyp: {row['hypothesis']}")


if __name__ == "__main__":
    stage.run("evaluate", main, build_parser())
