"""Check the clean data with Great Expectations; write the Data Docs report and a summary.

Run with: dvc repro validate
   or: python stages/validate.py --params params.yaml --data data/clean \
           --report data/validate --summary data/metrics/validate.json
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.pipeline import as_paths, validate
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser("Validate the clean data with Great Expectations.", validate.Paths)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(validate.Paths, vars(args))
    with tracking.stage_run("validate", flatten(params.validate_)):
        try:
            summary = validate.run(paths, params).metrics
        finally:
            # Data and report of a failed run are the ones worth looking at.
            if paths.data.is_dir():
                tracking.log_data_input(paths.data, "clean")
            if (paths.report / "index.html").is_file():
                tracking.log_artifacts(paths.report, artifact_path="gx_report")
        tracking.log_dict(summary, "validate/summary.json")
        tracking.log_metrics({f"validate/{k}": float(v) for k, v in flatten(summary).items()})


if __name__ == "__main__":
    stage.run("validate", main, build_parser())
