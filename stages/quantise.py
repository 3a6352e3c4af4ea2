"""Export the student (and the teacher) to ONNX, int8-quantise with onnxruntime, compare
quality, size and speed with fp32.

Run with: dvc repro quantise
   or: python stages/quantise.py --params params.yaml --student data/models/distil \
           --teacher data/models/finetune --vocab data/vocab --clean data/clean \
           --tokens data/tokens --student-metrics data/metrics/distil.json \
           --teacher-translations data/evaluate/translations.tsv --work data/quantise \
           --out data/models/quantised --metrics data/metrics/quantise.json \
           --table data/plots/quantise.csv
Load the shipped model: lmops.core.quantised.load_quantised("data/models/quantised").
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.pipeline import as_paths, quantise
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser(
        "Quantise the student and the teacher to int8 and compare them.", quantise.Paths
    )


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(quantise.Paths, vars(args))
    logged = {
        "target_lang": params.clean.target_lang,
        **flatten(params.quantise),
        **flatten(params.evaluate, "evaluate."),
    }
    with tracking.stage_run("quantise", logged):
        tracking.log_data_input(paths.student, "student_model")
        tracking.log_data_input(paths.teacher, "teacher_model")
        result = quantise.run(paths, params)
        metrics, table = result.metrics, result.table
        tracking.log_stage_outputs(
            "quantise", metrics, model_dir=paths.out, files=(paths.work / quantise.COMPARISON_PNG,)
        )
        tracking.log_table(table, "quantise/comparison.json")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    stage.run("quantise", main, build_parser())
