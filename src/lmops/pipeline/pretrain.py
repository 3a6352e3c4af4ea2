"""The ``pretrain`` stage: a bilingual causal language model on the tokenise stage's stream.

Training windows are random ``block_size`` slices of ``pretrain_train.bin``; validation
loss is measured at intervals on fixed, evenly spaced windows of ``pretrain_valid.bin``.
The final weights go to a model directory (:func:`lmops.core.translation.save_model`); the
checkpoints that let a killed run resume live in the stage's work directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmops.config import Params
from lmops.core.model import Transformer
from lmops.core.train import DistEnv, TrainLog, fit, lm_loss, seed_everything, window_batches
from lmops.core.translation import save_model
from lmops.core.vocab import Tokenizer
from lmops.data.tokens import TRAIN_STREAM, VALID_STREAM, load_stream
from lmops.errors import DataError
from lmops.io import file_digest, write_json
from lmops.pipeline import Result, path
from lmops.pipeline.training import VALID_LOSS, VALID_PPL, mean_loss, summary


def fixed_windows(
    tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced windows over ``tokens``: the same validation batches at every eval."""
    n_windows = len(tokens) - block_size
    if n_windows < 1:
        raise DataError(
            f"validation stream: {len(tokens)} tokens, need more than block_size ({block_size})"
        )
    count = min(batch_size * n_batches, n_windows)
    starts = np.linspace(0, n_windows - 1, count).astype(np.int64)
    rows = torch.from_numpy(
        np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts]).astype(np.int64)
    )
    return [
        (rows[i : i + batch_size, :-1], rows[i : i + batch_size, 1:])
        for i in range(0, count, batch_size)
    ]


def pretrain(
    tokens_dir: str | Path,
    vocab_dir: str | Path,
    work_dir: str | Path,
    out_model: str | Path,
    params: Params,
    curve_path: str | Path | None = None,
    log: TrainLog | None = None,
) -> dict[str, Any]:
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
        return {VALID_LOSS: loss, VALID_PPL: math.exp(min(loss, 50.0))}

    resolved = {
        "model": mcfg.model_dump(),
        "vocab_size": tok.vocab_size,
        "data": {
            name: file_digest(tokens_dir / f"{name}.bin") for name in (TRAIN_STREAM, VALID_STREAM)
        },
    }
    result = fit(
        model,
        window_batches(
            train, mcfg.block_size, params.seed, str(tokens_dir / f"{TRAIN_STREAM}.bin")
        ),
        lm_loss,
        cfg,
        work_dir,
        seed=params.seed,
        stage="pretrain",
        resolved_config=resolved,
        evaluate=evaluate,
        curve_path=curve_path,
        log=log,
    )
    if DistEnv.from_env().is_main:
        save_model(model.cpu(), out_model, {"stage": "pretrain", "steps": result.step})
    return summary(result, model)


@dataclass(frozen=True)
class Paths:
    tokens: Path = path("tokenise stage output dir")
    vocab: Path = path("vocab stage output dir")
    work: Path = path("checkpoint dir (kept between runs)")
    out: Path = path("model dir to write")
    metrics: Path = path("metrics JSON to write")
    curve: Path = path("loss curve CSV (dvc plots)")


def run(paths: Paths, params: Params, log: TrainLog | None = None) -> Result:
    """The pretrain stage (reads ``seed``, ``model`` and ``pretrain``)."""
    metrics = pretrain(
        paths.tokens, paths.vocab, paths.work, paths.out, params, curve_path=paths.curve, log=log
    )
    if not DistEnv.from_env().is_main:  # torchrun: rank 0 writes the outputs
        return Result(None)
    write_json(paths.metrics, metrics)
    return Result(metrics)
