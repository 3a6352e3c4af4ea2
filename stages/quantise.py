"""int8-quantise the student (and the teacher), export to ONNX, compare quality, size, speed.

Run with: dvc repro quantise
   or: python stages/quantise.py --params params.yaml --student data/models/distil \
           --teacher data/models/finetune --vocab data/vocab --clean data/clean \
           --tokens data/tokens --student-metrics data/metrics/distil.json \
           --teacher-translations data/evaluate/translations.tsv --work data/quantise \
           --out data/models/quantised --metrics data/metrics/quantise.json \
           --table data/plots/quantise.csv
Load the shipped model: lmops.quantise.load_quantised("data/models/quantised").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmops import quantise, stage, tracking
from lmops.config import flatten, load_params
from lmops.io import atomic_output, write_json


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Quantise the student and the teacher to int8 and compare them.")
    p.add_argument("--student", required=True, help="distil stage model dir")
    p.add_argument("--teacher", required=True, help="finetune stage model dir")
    p.add_argument("--vocab", required=True, help="vocab stage output dir")
    p.add_argument("--clean", required=True, help="clean stage output dir (mono_test)")
    p.add_argument("--tokens", required=True, help="tokenise stage output dir (parallel_test)")
    p.add_argument("--student-metrics", required=True, help="the student's metrics (distil)")
    p.add_argument("--teacher-translations", required=True,
                   help="the teacher's test translations (evaluate stage)")
    p.add_argument("--work", required=True, help="dir for every variant and its translations")
    p.add_argument("--out", required=True, help="the shipped int8 model dir")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--table", required=True, help="comparison CSV, one row per variant")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    logged = {"target_lang": params.clean.target_lang, **flatten(params.quantise),
              **flatten(params.evaluate, "evaluate.")}
    with tracking.stage_run("quantise", logged):
        tracking.log_data_input(args.student, "student_model")
        tracking.log_data_input(args.teacher, "teacher_model")
        metrics, table = quantise.quantise_stage(
            args.student, args.teacher, args.vocab, args.clean, args.tokens,
            args.student_metrics, args.teacher_translations, args.work, args.out, params)
        with atomic_output(args.table) as tmp:
            table.to_csv(tmp, index=False)
        write_json(args.metrics, metrics)
        tracking.log_stage_outputs("quantise", metrics, model_dir=args.out,
                                   files=(Path(args.work) / quantise.COMPARISON_PNG,))
        tracking.log_table(table, "quantise/comparison.json")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    stage.run("quantise", main, build_parser())
