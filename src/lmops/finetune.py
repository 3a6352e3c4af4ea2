"""The ``finetune`` stage: the pretrained model learns to translate source -> target.

Each pair is ``<2tgt> source <sep> target </s>`` with the loss on the target side only
(:mod:`lmops.translation`). At every evaluation the stage measures the teacher-forced
validation loss and the BLEU of greedy translations of the first ``bleu_samples``
validation pairs; the weights with the best validation BLEU are the stage's output.

A share ``lm_mix`` of every batch is plain pretraining text scored as a language model
(replay): without it the translator forgets how to model plain text and its perplexity
on held-out text climbs far above the pretrained model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sacrebleu
import torch

from lmops.checkpoint import load_weights
from lmops.config import DecodeConfig, DistilConfig, FinetuneConfig, Params
from lmops.pretrain import TRAIN_STREAM, mean_loss, summary
from lmops.tokenise import load_stream
from lmops.tracking import file_digest
from lmops.train import DistEnv, EvalFn, fit, lm_loss, seed_everything, window_batches
from lmops.translation import (
    check_vocab,
    fixed_batches,
    load_model,
    mix_batches,
    pair_batches,
    read_pairs,
    save_model,
    translate_ids,
)
from lmops.vocab import Tokenizer

SELECT_METRIC = "valid_bleu"


def bleu_validation(tok: Tokenizer, valid_path: Path, tgt_lang: str, block_size: int,
                    cfg: FinetuneConfig | DistilConfig,
                    decode: DecodeConfig) -> tuple[EvalFn, DecodeConfig]:
    """``fit``'s evaluate callback for translation training, and the decoding it uses.

    The callback returns the teacher-forced loss on the first ``eval_batches`` batches of
    the validation pairs and the BLEU of greedy translations of the first ``bleu_samples``.
    """
    valid = read_pairs(valid_path)
    valid_batches = fixed_batches(valid, tok, tgt_lang, block_size, cfg.batch_size,
                                  cfg.eval_batches)
    bleu_pairs = valid.iloc[: cfg.bleu_samples]
    greedy = DecodeConfig(beam_size=1, max_new_tokens=decode.max_new_tokens,
                          batch_size=decode.batch_size)

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        hyps = translate_ids(model, tok, list(bleu_pairs["src_ids"]), tgt_lang, greedy)
        bleu = sacrebleu.corpus_bleu(hyps, [list(bleu_pairs["tgt"])]).score
        return {"valid_loss": mean_loss(model, valid_batches), SELECT_METRIC: bleu}

    return evaluate, greedy


def finetune(tokens_dir: str | Path, vocab_dir: str | Path, init_model: str | Path,
             work_dir: str | Path, out_model: str | Path, params: Params,
             curve_path: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune ``init_model`` (or resume), write the best-BLEU model, return the metrics."""
    tokens_dir, init_model = Path(tokens_dir), Path(init_model)
    tok = Tokenizer.load(vocab_dir)
    cfg, tgt_lang = params.finetune, params.clean.target_lang
    seed_everything(params.seed)
    model, _ = load_model(init_model)
    check_vocab(model, tok, init_model)
    block = model.cfg.block_size
    train = read_pairs(tokens_dir / "parallel_train.parquet")
    evaluate, greedy = bleu_validation(tok, tokens_dir / "parallel_valid.parquet", tgt_lang,
                                       block, cfg, params.evaluate.decode)
    resolved = {
        "model": model.cfg.model_dump(), "vocab_size": tok.vocab_size,
        "target_lang": tgt_lang, "bleu_decode": greedy.model_dump(),
        "init": file_digest(init_model / "model.safetensors"),
        "data": {**{name: file_digest(tokens_dir / f"{name}.parquet")
                    for name in ("parallel_train", "parallel_valid")},
                 TRAIN_STREAM: file_digest(tokens_dir / f"{TRAIN_STREAM}.bin")},
    }
    text = window_batches(load_stream(tokens_dir / TRAIN_STREAM, tok.vocab_size), block,
                          params.seed + 1,
                          str(tokens_dir / f"{TRAIN_STREAM}.bin"))
    batches = mix_batches(pair_batches(train, tok, tgt_lang, block, params.seed), text,
                          cfg.lm_mix, params.seed)
    result = fit(model, batches, lm_loss, cfg,
                 work_dir, seed=params.seed, stage="finetune", resolved_config=resolved,
                 evaluate=evaluate, select_metric=SELECT_METRIC, select_mode="max",
                 curve_path=curve_path)
    model = model.cpu()
    if result.best_checkpoint is not None:
        load_weights(model, result.best_checkpoint)
    if DistEnv.from_env().is_main:
        save_model(model, out_model, {"stage": "finetune", "steps": result.step,
                                      "best_step": result.best_step,
                                      SELECT_METRIC: result.best_metric,
                                      "target_lang": tgt_lang})
    out = summary(result, model)
    out.update({"best_step": result.best_step, f"best_{SELECT_METRIC}": result.best_metric})
    return out
