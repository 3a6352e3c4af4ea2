"""The ``pretrain`` stage: a bilingual causal language model on the tokenise stage's stream.

Training windows are random ``block_size`` slices of ``pretrain_train.bin``; validation
loss is measured at intervals on fixed, evenly spaced windows of ``pretrain_valid.bin``.
The final weights go to a model directory (:func:`lmops.translation.save_model`); the
checkpoints that let a killed run resume live in the stage's work directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmops.config import Params
from lmops.errors import DataError
from lmops.model import Transformer, flops_per_token
from lmops.tokenise import load_stream
from lmops.tracking import file_digest
from lmops.train import DistEnv, TrainResult, fit, lm_loss, seed_everything, window_batches
from lmops.translation import save_model
from lmops.vocab import Tokenizer

TRAIN_STREAM = "pretrain_train"
VALID_STREAM = "pretrain_valid"


def fixed_windows(tokens: np.ndarray, block_size: int, batch_size: int,
                  n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced windows over ``tokens``: the same validation batches at every eval."""
    n_windows = len(tokens) - block_size
    if n_windows < 1:
        raise DataError(f"validation stream: {len(tokens)} tokens, need more than block_size "
                        f"({block_size})")
    count = min(batch_size * n_batches, n_windows)
    starts = np.linspace(0, n_windows - 1, count).astype(np.int64)
    rows = torch.from_numpy(np.stack([np.asarray(tokens[s : s + block_size + 1])
                                      for s in starts]).astype(np.int64))
    return [(rows[i : i + batch_size, :-1], rows[i : i + batch_size, 1:])
            for i in range(0, count, batch_size)]


def mean_loss(model: torch.nn.Module, batches: list) -> float:
    device = next(model.parameters()).device
    losses = [lm_loss(model, (x.to(device), y.to(device))).item() for x, y in batches]
    return sum(losses) / len(losses)


def summary(result: TrainResult, model: Transformer) -> dict[str, Any]:
    """The stage's metrics file: final losses, throughput and size."""
    out = {
        "steps": result.step, "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss, "wall_seconds": round(result.wall_seconds, 2),
        "tokens_per_sec": round(result.tokens_per_sec, 1), "resumed_from": result.resumed_from,
        "num_params": model.num_params(),
        "flops_per_token": flops_per_token(model.cfg, model.vocab_size),
    }
    out.update(result.metrics)
    out["hardware"] = result.hardware
    return out


def pretrain(tokens_dir: str | Path, vocab_dir: str | Path, work_dir: str | Path,
             out_model: str | Path, params: Params,
             curve_path: str | Path | None = None) -> dict[str, Any]:
    """Train from scratch (or resume), write the model directory, return the metrics."""
    tokens_dir = Path(tokens_dir)
    tok = Tokenizer.load(vocab_dir)
    cfg, mcfg = params.pretrain, params.model
    train = load_stream(tokens_dir / TRAIN_STREAM, tok.vocab_size)
    valid = load_stream(tokens_dir / VALID_STREAM, tok.vocab_size)
    valid_batches = fixed_windows(valid, mcfg.block_size, cfg.batch_size, cfg.eval_batches)

    seed_everything(params.seed)
    model = Transformer(mcfg, tok.vocab_size)

    def evaluate(model: torch.nn.Module, step: int) -> dict[str, float]:
        loss = mean_loss(model, valid_batches)
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}

    resolved = {
        "model": mcfg.model_dump(), "vocab_size": tok.vocab_size,
        "data": {name: file_digest(tokens_dir / f"{name}.bin")
                 for name in (TRAIN_STREAM, VALID_STREAM)},
    }
    result = fit(model, window_batches(train, mcfg.block_size, params.seed,
                                       str(tokens_dir / f"{TRAIN_STREAM}.bin")),
                 lm_loss, cfg, work_dir, seed=params.seed, stage="pretrain",
                 resolved_config=resolved, evaluate=evaluate, curve_path=curve_path)
    if DistEnv.from_env().is_main:
        save_model(model.cpu(), out_model, {"stage": "pretrain", "steps": result.step})
    return summary(result, model)
