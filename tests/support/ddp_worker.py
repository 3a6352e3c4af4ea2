"""A tiny training run for the tests, and the script torchrun starts in the DDP test.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/ddp_worker.py \
        OUT_DIR BATCH_SIZE GRAD_ACCUM

The model, data and config here are shared with test_train.py so that the data-parallel
run and the single-process run it is compared with are built the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmops.config import TrainConfig
from lmops.core.train import fit, lm_loss, seed_everything, window_batches

VOCAB = 32
BLOCK = 8
SEED = 1234


class TinyLM(nn.Module):
    """Bigram LM: embedding, norm, output head tied to the embedding."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        nn.init.normal_(self.emb.weight, std=0.3)  # N(0, 1) would start the loss far above ln V
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.emb(idx))))


def tokens(n: int = 4000) -> np.ndarray:
    """A stream where the next token is usually 5 * token + 3 (mod VOCAB): learnable."""
    rng = np.random.default_rng(0)
    out = np.empty(n, dtype=np.int32)
    out[0] = 1
    noise = rng.random(n) < 0.2
    random_tok = rng.integers(0, VOCAB, size=n)
    for i in range(1, n):
        out[i] = random_tok[i] if noise[i] else (5 * out[i - 1] + 3) % VOCAB
    return out


def config(**overrides: object) -> TrainConfig:
    base = dict(
        max_steps=6,
        batch_size=16,
        grad_accum=1,
        lr=3e-2,
        min_lr=3e-3,
        warmup_steps=2,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=3,
        checkpoint_interval=3,
        log_interval=1,
        precision="fp32",
        device="cpu",
        max_loss=20.0,
    )
    return TrainConfig(**{**base, **overrides})


def run(out_dir: Path, cfg: TrainConfig, model: nn.Module | None = None, **kwargs):
    """Seeded model + data, then fit(); ``kwargs`` go to fit (loss_fn, evaluate ...)."""
    if model is None:
        seed_everything(SEED)
        model = TinyLM()
    kwargs.setdefault("loss_fn", lm_loss)
    return model, fit(
        model,
        window_batches(tokens(), BLOCK, SEED),
        cfg=cfg,
        out_dir=out_dir,
        seed=SEED,
        stage="train",
        resolved_config={"model": "tiny"},
        **kwargs,
    )


if __name__ == "__main__":
    out, batch_size, grad_accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run(out, config(batch_size=batch_size, grad_accum=grad_accum, num_threads=1))
