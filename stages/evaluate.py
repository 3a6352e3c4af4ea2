"""Score the fine-tuned translator: perplexity per language, BLEU and chrF, samples.

Run with: dvc repro evaluate
   or: python stages/evaluate.py --params params.yaml --model data/models/finetune \
           --vocab data/vocab --clean data/clean --tokens data/tokens \
           --out data/evaluate --metrics data/metrics/evaluate.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmops import evaluate, stage, tracking
from lmops.config import flatten, load_params
from lmops.io import write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Evaluate a model directory on the held-out test data.")
    p.add_argument("--model", required=True, help="model dir to score")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--clean", required=True, help="clean stage output dir (mono_test)")
    p.add_argument("--tokens", required=True, help="tokenise stage output dir (parallel_test)")
    p.add_argument("--out", required=True, help="dir for samples and translations")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    logged = {"target_lang": params.clean.target_lang, **flatten(params.evaluate)}
    with tracking.stage_run("evaluate", logged):
        tracking.log_data_input(args.model, "model")
        tracking.log_data_input(args.tokens, "tokens")
        metrics, samples = evaluate.evaluate(args.model, args.vocab, args.clean, args.tokens,
                                             params.evaluate, params.clean.target_lang,
                                             args.out)
        write_json(args.metrics, metrics)
        tracking.log_stage_outputs(
            "evaluate", metrics, files=(Path(args.out) / evaluate.TRANSLATIONS_FILE,))
        tracking.log_table(samples, "evaluate/samples.json")
        print(f"BLEU {metrics['bleu']:.2f}  chrF {metrics['chrf']:.2f}  "
              f"({metrics['bleu_signature']})")
        for _, row in samples.head(5).iterrows():
            print(f"  {row['source']}\n    ref: {row['reference']}\n    hyp: {row['hypothesis']}")


if __name__ == "__main__":
    stage.run("evaluate", main, build_parser())
