"""Train the shared SentencePiece vocabulary on the pretraining text.

Run with: dvc repro vocab
   or: python stages/vocab.py --params params.yaml --data data/clean \
           --quality data/metrics/validate.json --out data/vocab
"""

from __future__ import annotations

import argparse

from lmops.config import flatten, load_params
from lmops.core.vocab import MODEL_FILE, VOCAB_FILE
from lmops.data.layout import split_path
from lmops.pipeline import as_paths, vocab
from lmops.tracking import runs as tracking
from lmops.tracking import stage


def build_parser() -> argparse.ArgumentParser:
    return stage.parser(
        "Train the SentencePiece vocabulary on the clean pretraining text.", vocab.Paths
    )


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    paths = as_paths(vocab.Paths, vars(args))
    with tracking.stage_run("vocab", flatten(params.vocab)):
        tracking.log_data_input(split_path(paths.data, vocab.TRAIN_SPLIT), "mono_train")
        meta = vocab.run(paths, params).metrics
        tracking.log_dict(meta, "vocab/meta.json")
        for name in (MODEL_FILE, VOCAB_FILE):
            tracking.log_artifact(paths.out / name, artifact_path="vocab")
        tracking.log_metrics(
            {
                "vocab/size": meta["vocab_size"],
                "vocab/train_sentences": meta["train_sentences"],
            }
        )


if __name__ == "__main__":
    stage.run("vocab", main, build_parser())
