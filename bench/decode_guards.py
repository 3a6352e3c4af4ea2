"""Decoding guards chosen by validation BLEU: length penalty, no-repeat n-grams, repetition
penalty, for the pipeline's translator.

Run with: python bench/decode_guards.py [--root WORKSPACE]   (after ``dvc repro finetune``)

It translates the validation pairs (``data/tokens/parallel_valid.parquet``, never the test
set) with ``evaluate.decode`` of the workspace's ``params.yaml``, changing one thing at a
time: first ``length_penalty``, then, at the best one, every pair of
``no_repeat_ngram_size`` and ``repetition_penalty``. Each row gives BLEU, chrF and the
shares of translations that ran to ``max_new_tokens`` or loop
(:mod:`lmops.core.guards`); the best BLEU is marked. Writes
``results/decode_guards.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, setup_threads, write_results

from lmops.config import load_params
from lmops.core.guards import degenerate, shares
from lmops.core.translation import check_vocab, generate, load_model, read_pairs
from lmops.core.vocab import Tokenizer
from lmops.pipeline.evaluate import bleu_chrf

ROOT = Path(__file__).resolve().parent.parent
LENGTH_PENALTIES = (0.6, 1.0, 1.4)
NO_REPEAT = (0, 3, 4)
REPETITION = (1.0, 1.1, 1.3)


def score(model: Any, tok: Tokenizer, pairs: Any, tgt_lang: str, decode: Any) -> dict[str, Any]:
    start = time.perf_counter()
    ids = generate(model, tok, tok.encode(list(pairs["src"])), tgt_lang, decode)
    seconds = time.perf_counter() - start
    hyps = tok.decode(ids)
    found = bleu_chrf(hyps, list(pairs["tgt"]))
    flags = [degenerate(seq, decode.max_new_tokens) for seq in ids]
    return {
        "length_penalty": decode.length_penalty,
        "no_repeat_ngram_size": decode.no_repeat_ngram_size,
        "repetition_penalty": decode.repetition_penalty,
        "bleu": round(found["bleu"], 2),
        "chrf": round(found["chrf"], 2),
        **{k: round(v, 4) for k, v in shares(flags).items()},
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="a workspace after dvc repro")
    args = ap.parse_args()
    setup_threads()
    params = load_params(args.root / "params.yaml")
    tok = Tokenizer.load(args.root / "data/vocab")
    model, _ = load_model(args.root / "data/models/finetune")
    check_vocab(model, tok, args.root / "data/models/finetune")
    pairs = read_pairs(args.root / "data/tokens/parallel_valid.parquet")
    tgt = params.clean.target_lang
    base = params.evaluate.decode
    rows = []
    with torch.inference_mode():
        for lp in LENGTH_PENALTIES:
            rows.append(
                score(model, tok, pairs, tgt, base.model_copy(update={"length_penalty": lp}))
            )
            print(rows[-1], flush=True)
        best_lp = max(rows, key=lambda r: r["bleu"])["length_penalty"]
        for n in NO_REPEAT:
            for p in REPETITION:
                if (n, p) == (0, 1.0):
                    continue  # the length-penalty row already has it
                update = {"length_penalty": best_lp, "no_repeat_ngram_size": n}
                update["repetition_penalty"] = p
                rows.append(score(model, tok, pairs, tgt, base.model_copy(update=update)))
                print(rows[-1], flush=True)
    best = max(rows, key=lambda r: r["bleu"])
    for row in rows:
        row["best"] = "yes" if row is best else ""
    write_results(
        "decode_guards",
        "Decoding guards chosen by validation BLEU",
        machine(torch.device("cpu")),
        {"Validation pairs, evaluate.decode with one change at a time": rows},
        extra={"workspace": str(args.root), "valid_pairs": len(pairs)},
        notes=[
            f"{len(pairs)} validation pairs; beam_size {base.beam_size}, max_new_tokens "
            f"{base.max_new_tokens}; the model: {args.root}/data/models/finetune.",
            "First length_penalty alone, then at the best one each pair of "
            "no_repeat_ngram_size and repetition_penalty.",
            f"Best validation BLEU: {best['bleu']} with length_penalty "
            f"{best['length_penalty']}, no_repeat_ngram_size {best['no_repeat_ngram_size']}, "
            f"repetition_penalty {best['repetition_penalty']}.",
        ],
    )


if __name__ == "__main__":
    main()
