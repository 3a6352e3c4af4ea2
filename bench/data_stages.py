"""Data stage throughput: clean and tokenise in MB/s, vocabulary training time.

Run with: make bench   (or: python bench/data_stages.py [--params params.yaml])

Calls the library functions the DVC stages call (``clean_stage.build_clean``,
``vocab.build_vocab``, ``tokenise.tokenise``) on the params file's settings, into a
temporary directory, without MLflow. Each round runs the three in pipeline order, so
every figure is a median over the same number of rounds.

clean MB/s: UTF-8 bytes of the loaded raw text (every source's text columns, as
``sources.load_source`` returns them, before cleaning) / the stage's wall time.
tokenise MB/s: the stage's own figure, UTF-8 bytes of all the text it encodes / wall time.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from common import machine, median, setup_threads, spread, write_results

from lmops.config import load_params
from lmops.data import sources
from lmops.pipeline import clean as clean_stage
from lmops.pipeline import tokenise, vocab

ROOT = Path(__file__).resolve().parent.parent


def raw_text_bytes(params: Any) -> int:
    """UTF-8 bytes of every source's text columns as loaded (the clean stage's input)."""
    total = 0
    with tempfile.TemporaryDirectory(prefix="lmops-bench-cache-") as cache:
        for src in params.clean.sources:
            ds = sources.load_source(src, params.clean, cache)
            for column in ("text", "src", "tgt"):
                if column in ds.column_names:
                    total += sum(len(t.encode("utf-8")) for t in ds[column] if t)
    return total


def one_round(params: Any, work: Path) -> dict[str, float]:
    clean_dir, vocab_dir, tokens_dir = work / "clean", work / "vocab", work / "tokens"
    start = time.perf_counter()
    clean_stage.build_clean(params.clean, params.seed, clean_dir, work / "clean.json")
    clean_s = time.perf_counter() - start
    start = time.perf_counter()
    vocab.build_vocab(clean_dir, vocab_dir, params.vocab, params.clean.languages, params.seed)
    vocab_s = time.perf_counter() - start
    stats = tokenise.tokenise(clean_dir, vocab_dir, tokens_dir, params.tokenise)
    return {
        "clean_s": clean_s,
        "vocab_s": vocab_s,
        "tokenise_s": stats["wall_seconds"],
        "tokenise_bytes": stats["bytes"],
        "tokenise_tokens": stats["tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    setup_threads()
    info = machine(torch.device("cpu"))
    params = load_params(args.params)
    raw = raw_text_bytes(params)
    print(f"raw text: {raw / 1e6:.2f} MB")
    runs = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="lmops-bench-data-") as tmp:
            runs.append(one_round(params, Path(tmp)))
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v:,.2f}" for k, v in runs[-1].items() if k.endswith("_s"))
        )
    clean_s = [x["clean_s"] for x in runs]
    vocab_s = [x["vocab_s"] for x in runs]
    tok_s = [x["tokenise_s"] for x in runs]
    tok_bytes = runs[0]["tokenise_bytes"]
    rows = [
        {
            "stage": "clean",
            "MB": raw / 1e6,
            "seconds": median(clean_s),
            "MB/s": raw / 1e6 / median(clean_s),
            "spread": spread(clean_s),
        },
        {
            "stage": "vocab",
            "MB": "",
            "seconds": median(vocab_s),
            "MB/s": "",
            "spread": spread(vocab_s),
        },
        {
            "stage": "tokenise",
            "MB": tok_bytes / 1e6,
            "seconds": median(tok_s),
            "MB/s": tok_bytes / 1e6 / median(tok_s),
            "spread": spread(tok_s),
        },
    ]
    write_results(
        "data_stages",
        "Data stages: clean, vocab, tokenise",
        info,
        {"Stages": rows},
        extra={
            "params": args.params,
            "rounds": runs,
            "vocab": params.vocab.model_dump(),
            "tokenise": params.tokenise.model_dump(),
        },
        notes=[
            f"params: {Path(args.params).name} (vocab {params.vocab.model_type} "
            f"{params.vocab.vocab_size}, {params.vocab.num_threads} threads; tokenise "
            f"num_proc {params.tokenise.num_proc})",
            "clean MB = UTF-8 bytes of the loaded raw text; tokenise MB = bytes it encodes",
            f"median of {args.rounds} rounds; tokenise produced "
            f"{runs[0]['tokenise_tokens']:,} tokens",
        ],
    )


if __name__ == "__main__":
    main()
