"""Check the clean data with Great Expectations; write the Data Docs report and a summary.

Run with: dvc repro validate
   or: python stages/validate.py --params params.yaml --data data/clean \
           --report data/validate --summary data/metrics/validate.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmops import quality, stage, tracking
from lmops.config import flatten, load_params


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Validate the clean data with Great Expectations.")
    p.add_argument("--data", required=True, help="clean stage output dir")
    p.add_argument("--report", required=True, help="Data Docs site dir to write")
    p.add_argument("--summary", required=True, help="summary JSON to write (DVC metrics)")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    with tracking.stage_run("validate", flatten(params.validate_)):
        try:
            summary = quality.validate_clean(args.data, args.report, args.summary,
                                             params.validate_, params.clean.languages)
        finally:
            # Data and report of a failed run are the ones worth looking at.
            if Path(args.data).is_dir():
                tracking.log_data_input(args.data, "clean")
            if (Path(args.report) / "index.html").is_file():
                tracking.log_artifacts(args.report, artifact_path="gx_report")
        tracking.log_dict(summary, "validate/summary.json")
        tracking.log_metrics({f"validate/{k}": float(v) for k, v in flatten(summary).items()})


if __name__ == "__main__":
    stage.run("validate", main, build_parser())
