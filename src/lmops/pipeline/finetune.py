"""The ``finetune`` stage: the pretrained model learns to translate source -> target.

Each pair is ``<2tgt> source <sep> target </s>`` with the loss on the target side only
(:mod:`lmops.core.translation`). At every evaluation the stage measures the teacher-forced
validation loss and the BLEU of greedy translations of the first ``bleu_samples``
validation pairs, cut by ``evaluate.decode``'s guards as the test translations are; the
weights with the best validation BLEU are the stage's output.

A share ``lm_mix`` of every batch is plain pretraining text scored as a language model
(replay): without it the translator forgets how to model plain text and its perplexity
on held-out text climbs far above the pretrained model's. The text is that of the
monolingual sources (``lm_mix_text``): the pairs' own sentences, the rest of the
pretraining stream, are what the pairs teach already. With ``freeze_unused_embeddings``
the embedding rows of tokens that occur in no pair keep their pretrained values: the
pairs would otherwise teach the tied output layer that those tokens never come.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmops.config import Params
from lmops.core.train import TrainLog, fit, lm_loss, seed_everything, window_batches
from lmops.core.translation import (
    check_vocab,
    load_model,
    mix_batches,
    pair_batches,
    pair_vocab,
    read_pairs,
)
from lmops.core.vocab import Tokenizer
from lmops.data.tokens import TRAIN_STREAM, load_stream, monolingual_part
from lmops.io import file_digest, write_json
from lmops.pipeline import Result, path
from lmops.pipeline.training import SELECT_METRIC, bleu_validation, keep_best


def finetune(
    tokens_dir: str | Path,
    vocab_dir: str | Path,
    init_model: str | Path,
    work_dir: str | Path,
    out_model: str | Path,
    params: Params,
    curve_path: str | Path | None = None,
    log: TrainLog | None = None,
) -> dict[str, Any] | None:
    """Fine-tune ``init_model`` (or resume), write the best-BLEU model, return the metrics
    (None on a worker rank of a data-parallel run)."""
    tokens_dir, init_model = Path(tokens_dir), Path(init_model)
    tok = Tokenizer.load(vocab_dir)
    cfg, tgt_lang = params.finetune, params.clean.target_lang
    seed_everything(params.seed)
    model, _ = load_model(init_model)
    check_vocab(model, tok, init_model)
    block = model.cfg.block_size
    train = read_pairs(tokens_dir / "parallel_train.parquet")
    evaluate, greedy = bleu_validation(
        tok, tokens_dir / "parallel_valid.parquet", tgt_lang, block, cfg, params.evaluate.decode
    )
    resolved = {
        "model": model.cfg.model_dump(),
        "vocab_size": tok.vocab_size,
        "target_lang": tgt_lang,
        "bleu_decode": greedy.model_dump(),
        "init": file_digest(init_model / "model.safetensors"),
        "data": {
            **{
                name: file_digest(tokens_dir / f"{name}.parquet")
                for name in ("parallel_train", "parallel_valid")
            },
            TRAIN_STREAM: file_digest(tokens_dir / f"{TRAIN_STREAM}.bin"),
        },
    }
    text = window_batches(
        replay_text(tokens_dir / TRAIN_STREAM, tok.vocab_size, block, cfg.lm_mix_text),
        block,
        params.seed + 1,
        str(tokens_dir / f"{TRAIN_STREAM}.bin"),
    )
    batches = mix_batches(
        pair_batches(train, tok, tgt_lang, block, params.seed), text, cfg.lm_mix, params.seed
    )
    result = fit(
        model,
        batches,
        functools.partial(lm_loss, label_smoothing=cfg.label_smoothing),
        cfg,
        work_dir,
        seed=params.seed,
        stage="finetune",
        resolved_config=resolved,
        evaluate=evaluate,
        select_metric=SELECT_METRIC,
        select_mode="max",
        curve_path=curve_path,
        log=log,
        trainable_rows=(
            {"tok_emb.weight": torch.from_numpy(pair_vocab(train, tok))}
            if cfg.freeze_unused_embeddings
            else None
        ),
    )
    return keep_best(model, result, out_model, {"stage": "finetune"}, tgt_lang)


def replay_text(stream_path: Path, vocab_size: int, block: int, which: str) -> np.ndarray:
    """The pretraining tokens the ``lm_mix`` rows are cut from (``finetune.lm_mix_text``):
    the monolingual text, or the whole stream where that is asked for or the monolingual
    text is too short for one window (a corpus of pairs alone)."""
    stream = load_stream(stream_path, vocab_size)
    if which == "monolingual":
        text = monolingual_part(stream, stream_path)
        if len(text) > block:
            return text
    return stream


@dataclass(frozen=True)
class Paths:
    tokens: Path = path("tokenise stage output dir")
    vocab: Path = path("vocab stage output dir")
    init: Path = path("pretrained model dir")
    work: Path = path("checkpoint dir (kept between runs)")
    out: Path = path("model dir to write")
    metrics: Path = path("metrics JSON to write")
    curve: Path = path("loss and BLEU curve CSV (dvc plots)")


def run(paths: Paths, params: Params, log: TrainLog | None = None) -> Result:
    """The finetune stage (reads ``seed``, ``finetune``, ``evaluate.decode`` and the
    target language of ``clean``)."""
    metrics = finetune(
        paths.tokens,
        paths.vocab,
        paths.init,
        paths.work,
        paths.out,
        params,
        curve_path=paths.curve,
        log=log,
    )
    if metrics is not None:
        write_json(paths.metrics, metrics)
    return Result(metrics)
