"""Translation as conditional generation, shared by finetune, evaluate and later stages.

A pair is one sequence ``<2tgt> source <sep> target </s>``: the target-language tag says
which way to translate, ``<sep>`` ends the source. Fine-tuning scores only the target
tokens and ``</s>``; decoding feeds ``<2tgt> source <sep>`` and reads up to ``</s>``.

A trained model travels as a *model directory* (:func:`save_model`): a checkpoint (see
:mod:`lmops.core.checkpoint`: safetensors, JSON, sha256 manifest) whose ``config.json`` holds the
model shape and vocabulary size, so :func:`load_model` rebuilds it without unpickling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lmops.config import DecodeConfig, ModelConfig
from lmops.core import checkpoint
from lmops.core.model import Transformer
from lmops.core.train import IGNORE_INDEX, BatchFn
from lmops.core.vocab import Tokenizer
from lmops.errors import DataError, LmopsError

PAD_MULTIPLE = 16  # batches are padded to a multiple of this: fewer shapes, no waste to speak of
BUCKET_POOL = 50  # pair_batches sorts this many batches' worth of pairs by length at a time


# ------------------------------------------------------------------ model dirs


def save_model(model: Transformer, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a model directory at ``path`` (atomically; replaces an old one)."""
    config = {"model": model.cfg.model_dump(), "vocab_size": model.vocab_size, **(meta or {})}
    return checkpoint.save_weights(model, path, config)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Rebuild the model of a model directory (checksums verified) and its config."""
    path = Path(path)
    if not (path / checkpoint.CONFIG).is_file():
        raise checkpoint.CheckpointError(
            f"{path}: no model here ({checkpoint.CONFIG} missing); run the stage that writes it"
        )
    config = checkpoint.read_config(path)
    try:
        model = Transformer(ModelConfig(**config["model"]), int(config["vocab_size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.CONFIG}: not a model config ({err})"
        ) from None
    checkpoint.load_weights(model, path)
    return model.to(device).eval(), config


def check_vocab(model: Transformer, tok: Tokenizer, where: str | Path) -> None:
    if model.vocab_size != tok.vocab_size:
        raise LmopsError(
            f"{where}: model has {model.vocab_size} token embeddings but the "
            f"vocabulary has {tok.vocab_size}; rebuild it with this vocabulary"
        )


# -------------------------------------------------------------------- training


def max_source_tokens(block_size: int) -> int:
    """Longest source kept: half the context, less the tag and ``<sep>``."""
    return max(1, block_size // 2 - 2)


def prompt(tok: Tokenizer, src_ids: Sequence[int], tgt_lang: str, block_size: int) -> list[int]:
    """``<2tgt> source <sep>``, the source cut to :func:`max_source_tokens`."""
    return [tok.lang_id(tgt_lang), *list(src_ids)[: max_source_tokens(block_size)], tok.sep_id]


def example(
    tok: Tokenizer, src_ids: Sequence[int], tgt_ids: Sequence[int], tgt_lang: str, block_size: int
) -> tuple[list[int], list[int]]:
    """Inputs and targets of one pair; targets are IGNORE_INDEX over the prompt."""
    head = prompt(tok, src_ids, tgt_lang, block_size)
    seq = (head + list(tgt_ids) + [tok.eos_id])[: block_size + 1]
    targets = [IGNORE_INDEX] * (len(head) - 1) + seq[len(head) :]
    return seq[:-1], targets


def pair_vocab(pairs: pd.DataFrame, tok: Tokenizer) -> np.ndarray:
    """A bool per vocabulary id: whether it is a special token or occurs in ``pairs``."""
    used = np.zeros(tok.vocab_size, dtype=bool)
    for column in ("src_ids", "tgt_ids"):
        used[np.concatenate([np.asarray(ids, dtype=np.int64) for ids in pairs[column]])] = True
    used[sorted(tok.special_ids)] = True
    return used


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to a common length (a multiple of PAD_MULTIPLE); padding is not scored."""
    longest = max(len(x) for x, _ in rows)
    width = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, : len(x)] = torch.tensor(x)
        targets[i, : len(y)] = torch.tensor(y)
    return inputs, targets


def read_pairs(path: str | Path) -> pd.DataFrame:
    """A tokenise stage ``parallel_*.parquet``: src, tgt, src_ids, tgt_ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (run the tokenise stage)")
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, corrupted, not ours
        raise DataError(
            f"{path}: cannot be read as parquet ({type(err).__name__}: {err}); "
            "rerun the tokenise stage"
        ) from None
    missing = {"src", "tgt", "src_ids", "tgt_ids"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; rerun the tokenise stage")
    if df.empty:
        raise DataError(f"{path}: no pairs")
    return df.reset_index(drop=True)


def pair_batches(
    pairs: pd.DataFrame, tok: Tokenizer, tgt_lang: str, block_size: int, seed: int
) -> BatchFn:
    """``get_batch`` for fine-tuning: epochs over the pairs, each batch of similar lengths.

    Epoch ``e`` is a permutation of the pairs drawn from ``(seed, e)``; every run of
    ``BUCKET_POOL`` batches' worth of it is sorted by length and cut into batches, whose
    order is shuffled again. A batch pads only to its own longest pair: on the default
    corpus that computes ~40% fewer tokens than batches of random pairs, and each pair is
    seen once per epoch. Batch ``step`` depends on ``(seed, step, size)`` alone, so a
    resumed run draws the same batches.
    """
    examples = [
        example(tok, s, t, tgt_lang, block_size)
        for s, t in zip(pairs["src_ids"], pairs["tgt_ids"], strict=True)
    ]
    lengths = np.array([len(x) for x, _ in examples])
    epochs: dict[tuple[int, int], list[np.ndarray]] = {}

    def epoch_batches(epoch: int, size: int) -> list[np.ndarray]:
        if (epoch, size) not in epochs:
            rng = np.random.default_rng([seed % 2**64, epoch])
            repeats = math.ceil(size / len(examples))  # fewer pairs than one batch: repeat
            order = np.concatenate([rng.permutation(len(examples)) for _ in range(repeats)])
            order = order[: len(order) // size * size]
            batches = []
            for lo in range(0, len(order), size * BUCKET_POOL):
                pool = order[lo : lo + size * BUCKET_POOL]
                pool = pool[np.argsort(lengths[pool], kind="stable")]
                batches += [pool[i : i + size] for i in range(0, len(pool), size)]
            epochs.clear()  # one epoch at a time is all a run needs
            epochs[epoch, size] = [batches[i] for i in rng.permutation(len(batches))]
        return epochs[epoch, size]

    def get_batch(step: int, size: int) -> tuple[Tensor, Tensor]:
        per_epoch = max(1, len(examples) // size)
        rows = epoch_batches(step // per_epoch, size)[step % per_epoch]
        return collate([examples[i] for i in rows], tok.pad_id)

    return get_batch


def mix_batches(pairs: BatchFn, text: BatchFn, share: float, seed: int) -> BatchFn:
    """``get_batch`` whose rows are ``pairs`` rows and, ``share`` of them, ``text`` rows.

    Text windows are cut to the width of the pairs' batch (they are as long as the
    block, pairs mostly shorter), both kinds are padded to one width and shuffled together
    (from ``(seed, step)``), so every micro-batch sees the same mix.
    """
    if share <= 0:
        return pairs

    def get_batch(step: int, size: int) -> tuple[Tensor, Tensor]:
        n_text = round(size * share)
        if not n_text:
            return pairs(step, size)
        pair_x, pair_y = pairs(step, size - n_text)
        text_x, text_y = text(step, n_text)
        width = pair_x.shape[1]  # the block may be shorter than a padded pair: then pad text
        text_x = F.pad(text_x[:, :width], (0, width - min(width, text_x.shape[1])), value=0)
        text_y = F.pad(
            text_y[:, :width], (0, width - min(width, text_y.shape[1])), value=IGNORE_INDEX
        )
        xs, ys = [pair_x, text_x], [pair_y, text_y]
        order = torch.from_numpy(np.random.default_rng([seed % 2**64, step, 1]).permutation(size))
        return torch.cat(xs)[order], torch.cat(ys)[order]

    return get_batch


def fixed_batches(
    pairs: pd.DataFrame,
    tok: Tokenizer,
    tgt_lang: str,
    block_size: int,
    batch_size: int,
    n_batches: int,
) -> list[tuple[Tensor, Tensor]]:
    """The first ``n_batches * batch_size`` pairs in order: the same validation set each time."""
    head = pairs.iloc[: n_batches * batch_size]
    rows = [
        example(tok, s, t, tgt_lang, block_size)
        for s, t in zip(head["src_ids"], head["tgt_ids"], strict=True)
    ]
    return [collate(rows[i : i + batch_size], tok.pad_id) for i in range(0, len(rows), batch_size)]


# -------------------------------------------------------------------- decoding


def generate(
    model: Transformer,
    tok: Tokenizer,
    sources: Sequence[Sequence[int]],
    tgt_lang: str,
    cfg: DecodeConfig,
    progress: bool = False,
    desc: str = "translate",
    deadline: float | None = None,
) -> list[list[int]]:
    """Translate tokenised sources into token ids (eos removed); batches hold similar
    lengths (less padding). Past ``deadline`` (a ``time.monotonic()`` value) decoding stops
    with :class:`~lmops.errors.DeadlineExceeded`."""
    prompts = [prompt(tok, s, tgt_lang, model.cfg.block_size) for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit=" sent", disable=not progress)
    with bar, torch.inference_mode():
        for lo in range(0, len(order), cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            batch = [prompts[i] for i in idx]
            if cfg.beam_size == 1:
                ids = model.generate_greedy(
                    batch,
                    cfg.max_new_tokens,
                    tok.eos_id,
                    tok.pad_id,
                    cfg.min_new_tokens,
                    deadline=deadline,
                    no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                    repetition_penalty=cfg.repetition_penalty,
                )
            else:
                ids = model.generate_beam(
                    batch,
                    cfg.max_new_tokens,
                    tok.eos_id,
                    tok.pad_id,
                    beam_size=cfg.beam_size,
                    length_penalty=cfg.length_penalty,
                    min_new_tokens=cfg.min_new_tokens,
                    deadline=deadline,
                    no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                    repetition_penalty=cfg.repetition_penalty,
                )
            for i, seq in zip(idx, ids, strict=True):
                out[i] = seq
            bar.update(len(idx))
    return out


def translate_ids(
    model: Transformer,
    tok: Tokenizer,
    sources: Sequence[Sequence[int]],
    tgt_lang: str,
    cfg: DecodeConfig,
    progress: bool = False,
    desc: str = "translate",
    deadline: float | None = None,
) -> list[str]:
    """Translate tokenised sources into text (see :func:`generate`)."""
    return tok.decode(generate(model, tok, sources, tgt_lang, cfg, progress, desc, deadline))


def translate(
    model: Transformer,
    tok: Tokenizer,
    texts: Sequence[str],
    tgt_lang: str,
    cfg: DecodeConfig,
    progress: bool = False,
    deadline: float | None = None,
) -> list[str]:
    """Translate plain sentences into ``tgt_lang``."""
    ids = tok.encode(list(texts))
    return translate_ids(model, tok, ids, tgt_lang, cfg, progress, deadline=deadline)
