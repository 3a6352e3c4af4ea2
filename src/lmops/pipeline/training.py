"""What the training stages share: validation, the stage summary, the best-weights tail.

pretrain, finetune and distil all train with :func:`lmops.core.train.fit`; finetune and
distil both select their output by validation BLEU (:data:`SELECT_METRIC`) and end the
same way (:func:`keep_best`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import sacrebleu
import torch

from lmops.config import DecodeConfig, DistilConfig, FinetuneConfig
from lmops.core.checkpoint import load_weights
from lmops.core.model import Transformer, flops_per_token
from lmops.core.train import DistEnv, EvalFn, TrainResult, lm_loss
from lmops.core.translation import fixed_batches, read_pairs, save_model, translate_ids
from lmops.core.vocab import Tokenizer

# the validation metrics the training stages record (their curves, MLflow keys)
SELECT_METRIC = "valid_bleu"
VALID_LOSS = "valid_loss"
VALID_PPL = "valid_ppl"


def mean_loss(model: torch.nn.Module, batches: list) -> float:
    device = next(model.parameters()).device
    losses = [lm_loss(model, (x.to(device), y.to(device))).item() for x, y in batches]
    return sum(losses) / len(losses)


def bleu_validation(
    tok: Tokenizer,
    valid_path: Path,
    tgt_lang: str,
    block_size: int,
    cfg: FinetuneConfig | DistilConfig,
    decode: DecodeConfig,
) -> tuple[EvalFn, DecodeConfig]:
    """``fit``'s evaluate callback for translation training, and the decoding it uses.

    The callback returns the teacher-forced loss on the first ``eval_batches`` batches of
    the validation pairs and the BLEU of greedy translations of the first ``bleu_samples``,
    decoded with ``decode``'s guards (``no_repeat_ngram_size``, ``repetition_penalty``,
    ``min_new_tokens``): the checkpoint kept is chosen on outputs like those ``evaluate``
    scores, not on loops that the guards would have cut (docs/performance.md,
    "Translation quality").
    """
    valid = read_pairs(valid_path)
    valid_batches = fixed_batches(
        valid, tok, tgt_lang, block_size, cfg.batch_size, cfg.eval_batches
    )
    bleu_pairs = valid.iloc[: cfg.bleu_samples]
    greedy = decode.model_copy(update={"beam_size": 1})

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        hyps = translate_ids(
            cast(Transformer, model), tok, list(bleu_pairs["src_ids"]), tgt_lang, greedy
        )
        bleu = sacrebleu.corpus_bleu(hyps, [list(bleu_pairs["tgt"])]).score
        return {VALID_LOSS: mean_loss(model, valid_batches), SELECT_METRIC: bleu}

    return evaluate, greedy


def summary(result: TrainResult, model: Transformer) -> dict[str, Any]:
    """The stage's metrics file: final losses, throughput and size."""
    out: dict[str, Any] = {
        "steps": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        "wall_seconds": round(result.wall_seconds, 2),
        "tokens_per_sec": round(result.tokens_per_sec, 1),
        "resumed_from": result.resumed_from,
        "num_params": model.num_params(),
        "flops_per_token": flops_per_token(model.cfg, model.vocab_size),
    }
    out.update(result.metrics)
    out["hardware"] = result.hardware
    return out


def keep_best(
    model: Transformer,
    result: TrainResult,
    out_model: str | Path,
    meta: dict[str, Any],
    target_lang: str,
    metric: str = SELECT_METRIC,
) -> dict[str, Any] | None:
    """The tail of a stage that keeps its best checkpoint (by ``metric``): those weights go
    into ``model``, rank 0 writes them to ``out_model`` (``meta`` first in its config,
    ``target_lang`` last) and gets the summary; another rank gets None."""
    model.cpu()
    if result.best_checkpoint is not None:
        load_weights(model, result.best_checkpoint)
    if not DistEnv.from_env().is_main:
        return None
    save_model(
        model,
        out_model,
        {
            **meta,
            "steps": result.step,
            "best_step": result.best_step,
            metric: result.best_metric,
            "target_lang": target_lang,
        },
    )
    out = summary(result, model)
    out.update({"best_step": result.best_step, f"best_{metric}": result.best_metric})
    return out
