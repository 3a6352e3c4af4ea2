"""The ``evaluate`` stage: perplexity per language, BLEU and chrF on held-out data.

Perplexity: each language's held-out monolingual text (``mono_test``) is encoded as the
pretraining stream is (``<2lang> ids </s>`` per document), cut into consecutive windows
of ``block_size`` tokens, and every token is scored once. Reported per token (``ppl``)
and as bits per byte of UTF-8 text (``bpb``), which does not depend on the vocabulary.

Translation: the held-out test pairs (whole Bible books by default, never seen in
training) are translated with beam search and scored with sacrebleu; its signatures
are recorded next to the scores so figures stay comparable.

The same :func:`evaluate_model` scores any model directory (teacher, student, int8).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F

from lmops.config import EvaluateConfig, Params
from lmops.core.guards import degenerate, shares
from lmops.core.hardware import (
    autocast_dtype,
    facts,
    memory_errors,
    resolve_device,
)
from lmops.core.model import Transformer
from lmops.core.translation import check_vocab, generate, load_model, read_pairs
from lmops.core.vocab import Tokenizer
from lmops.data import layout
from lmops.errors import DataError
from lmops.io import atomic_output, write_json
from lmops.pipeline import Result, path

MONO_TEST = "mono_test"
PAIRS_TEST = "parallel_test.parquet"
SAMPLES_FILE = "samples.jsonl"
TRANSLATIONS_FILE = "translations.tsv"


def _autocast(model: Transformer, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, model.device, key="evaluate.precision")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


@torch.inference_mode()
def stream_nll(model: Transformer, ids: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL (nats) over ``ids`` in windows of ``block_size``; token count."""
    block = model.cfg.block_size
    n = (len(ids) - 1) // block  # full windows; the tail gets a window of its own
    starts = [i * block for i in range(n)]
    if n * block < len(ids) - 1:
        starts.append(n * block)
    total, count = 0.0, 0
    for lo in range(0, len(starts), batch_size):
        rows = [ids[s : s + block + 1] for s in starts[lo : lo + batch_size]]
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width - 1, dtype=torch.long)
        y = torch.full((len(rows), width - 1), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            t = torch.from_numpy(np.asarray(r, dtype=np.int64))
            x[i, : len(t) - 1], y[i, : len(t) - 1] = t[:-1], t[1:]
        logits = model(x.to(model.device)).float()
        y = y.to(model.device)
        total += F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((y != -100).sum())
    return total, count


def perplexity(
    model: Transformer, tok: Tokenizer, texts: pd.DataFrame, cfg: EvaluateConfig
) -> dict[str, float]:
    """``ppl_<lang>``, ``bpb_<lang>``, ``nll_<lang>`` (nats/token) for each language present."""
    out: dict[str, float] = {}
    for lang, rows in texts.groupby("lang", sort=True):
        docs = tok.encode(list(rows["text"]))
        tag = tok.lang_id(cast(str, lang))  # the groupby key: a language code
        ids = np.fromiter((t for doc in docs for t in (tag, *doc, tok.eos_id)), dtype=np.int64)
        with _autocast(model, cfg.precision):
            nll, count = stream_nll(model, ids, cfg.ppl_batch_size)
        # pandas-stubs allow .str.len() on str only; on bytes it counts bytes
        n_bytes = int(rows["text"].str.encode("utf-8").str.len().sum())  # type: ignore[misc]
        out[f"nll_{lang}"] = nll / count
        out[f"ppl_{lang}"] = math.exp(nll / count)
        out[f"bpb_{lang}"] = nll / math.log(2) / n_bytes
        out[f"tokens_{lang}"] = count
        out[f"bytes_{lang}"] = n_bytes
    return out


def bleu_chrf(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu defaults) with their signatures."""
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    return {
        "bleu": bleu.corpus_score(hyps, [refs]).score,
        "chrf": chrf.corpus_score(hyps, [refs]).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def read_translations(path: str | Path) -> pd.DataFrame:
    """A ``translations.tsv`` written by :func:`evaluate_model`: source, reference, hypothesis."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (run the stage that scores that model: dvc repro)")
    # no NA parsing: an empty hypothesis or the word "NA" is text, not a missing value
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    missing = {"source", "reference", "hypothesis"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}")
    return table


def score_translations(path: str | Path) -> dict[str, Any]:
    """BLEU and chrF of a ``translations.tsv`` (as :func:`bleu_chrf`), and its pair count.

    Lets a later stage compare with a model scored earlier without depending on that
    stage's metrics file, whose timings change on every run.
    """
    table = read_translations(path)
    return {
        **bleu_chrf(list(table["hypothesis"]), list(table["reference"])),
        "test_pairs": len(table),
    }


def _memory_guard(
    what: str, lower: str, batch_size: int, device: torch.device
) -> contextlib.AbstractContextManager:
    """A failed allocation in ``what`` becomes one line naming the batch size to lower."""
    return memory_errors(device, lambda: (f"evaluate: {what} with batch_size {batch_size}", lower))


def evaluate_model(
    model: Transformer,
    tok: Tokenizer,
    clean_dir: str | Path,
    tokens_dir: str | Path,
    cfg: EvaluateConfig,
    tgt_lang: str,
    out_dir: str | Path,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score ``model``; write samples and all test translations to ``out_dir`` (atomically).

    Returns the metrics and the table of sample translations (source, reference,
    hypothesis, and what :func:`~lmops.core.guards.degenerate` found wrong with it). The
    metrics include the shares of outputs that ran to ``max_new_tokens`` or loop.
    """
    device = resolve_device(cfg.device, key="evaluate.device")
    model = model.to(device).eval()
    texts = layout.read_split(clean_dir, MONO_TEST)
    if texts.empty:
        raise DataError(f"{layout.split_path(clean_dir, MONO_TEST)}: no held-out text")
    pairs = read_pairs(Path(tokens_dir) / PAIRS_TEST)
    if cfg.max_test_pairs is not None:
        pairs = pairs.iloc[: cfg.max_test_pairs]

    with _memory_guard("perplexity", "evaluate.ppl_batch_size", cfg.ppl_batch_size, device):
        metrics: dict[str, Any] = perplexity(model, tok, texts, cfg)
    started = time.perf_counter()
    decoding = _memory_guard(
        f"decoding (beam_size {cfg.decode.beam_size}, max_new_tokens {cfg.decode.max_new_tokens})",
        "evaluate.decode.batch_size, evaluate.decode.beam_size or evaluate.decode.max_new_tokens",
        cfg.decode.batch_size,
        device,
    )
    with decoding, _autocast(model, cfg.precision):
        # encoded with the model's own vocabulary: a registered champion may carry another
        ids = generate(
            model,
            tok,
            tok.encode(list(pairs["src"])),
            tgt_lang,
            cfg.decode,
            progress=True,
            desc="translate test",
        )
    seconds = time.perf_counter() - started
    hyps = tok.decode(ids)
    flags = [degenerate(seq, cfg.decode.max_new_tokens) for seq in ids]
    metrics.update(bleu_chrf(hyps, list(pairs["tgt"])))
    metrics.update(shares(flags))
    metrics.update(
        {
            "test_pairs": len(pairs),
            "num_params": model.num_params(),
            "decode_seconds": seconds,
            "ms_per_sentence": 1000 * seconds / len(pairs),
            "hardware": facts(
                device, autocast_dtype(cfg.precision, device, "evaluate.precision"), compiled=False
            ),
        }
    )
    table = pd.DataFrame(
        {
            "source": pairs["src"],
            "reference": pairs["tgt"],
            "hypothesis": hyps,
            "degenerate": flags,  # "hit max_new_tokens", "loops", both or ""
        }
    )
    samples = table.head(cfg.n_samples)
    with atomic_output(out_dir, is_dir=True) as tmp:
        samples.to_json(tmp / SAMPLES_FILE, orient="records", lines=True, force_ascii=False)
        table.to_csv(tmp / TRANSLATIONS_FILE, sep="\t", index=False)
        write_json(tmp / "metrics.json", metrics)
    return metrics, samples


def evaluate(
    model_dir: str | Path,
    vocab_dir: str | Path,
    clean_dir: str | Path,
    tokens_dir: str | Path,
    cfg: EvaluateConfig,
    tgt_lang: str,
    out_dir: str | Path,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Load a model directory and score it; the metrics and the sample table."""
    tok = Tokenizer.load(vocab_dir)
    model, _ = load_model(model_dir)
    check_vocab(model, tok, model_dir)
    return evaluate_model(model, tok, clean_dir, tokens_dir, cfg, tgt_lang, out_dir)


@dataclass(frozen=True)
class Paths:
    model: Path = path("model dir to score")
    vocab: Path = path("vocab stage output dir")
    clean: Path = path("clean stage output dir (mono_test)")
    tokens: Path = path("tokenise stage output dir (parallel_test)")
    out: Path = path("dir for samples and translations")
    metrics: Path = path("metrics JSON to write")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The evaluate stage (reads ``evaluate`` and the target language of ``clean``); the
    table holds the sample translations."""
    metrics, samples = evaluate(
        paths.model,
        paths.vocab,
        paths.clean,
        paths.tokens,
        params.evaluate,
        params.clean.target_lang,
        paths.out,
    )
    write_json(paths.metrics, metrics)
    return Result(metrics, samples)
