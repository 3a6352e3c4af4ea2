"""Train the shared SentencePiece vocabulary on the pretraining text.

Run with: dvc repro vocab
   or: python stages/vocab.py --params params.yaml --data data/clean \
           --quality data/metrics/validate.json --out data/vocab
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmops import data, stage, tracking, vocab
from lmops.config import flatten, load_params


def build_parser() -> argparse.ArgumentParser:
    p = stage.parser("Train the SentencePiece vocabulary on the clean pretraining text.")
    p.add_argument("--data", required=True, help="clean stage output dir")
    p.add_argument("--quality", required=True, help="validate stage summary JSON")
    p.add_argument("--out", required=True, help="vocab dir to write")
    return p


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    with tracking.stage_run("vocab", flatten(params.vocab)):
        vocab.check_quality(args.quality)
        tracking.log_data_input(data.split_path(args.data, vocab.TRAIN_SPLIT), "mono_train")
        meta = vocab.build_vocab(args.data, args.out, params.vocab,
                                 params.clean.languages, params.seed)
        tracking.log_dict(meta, "vocab/meta.json")
        for name in (vocab.MODEL_FILE, vocab.VOCAB_FILE):
            tracking.log_artifact(str(Path(args.out) / name), artifact_path="vocab")
        tracking.log_metrics({
            "vocab/size": meta["vocab_size"],
            "vocab/train_sentences": meta["train_sentences"],
        })


if __name__ == "__main__":
    stage.run("vocab", main, build_parser())
