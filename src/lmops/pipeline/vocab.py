"""The ``vocab`` stage: a SentencePiece model trained on the bilingual pretraining text
(``mono_train``, which already holds both sides of the parallel train pairs), written in
the layout :class:`lmops.core.vocab.Tokenizer` reads.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm.auto import tqdm

from lmops.config import Params, VocabConfig
from lmops.core.vocab import (
    BOS_ID,
    EOS_ID,
    META_FILE,
    MODEL_FILE,
    PAD_ID,
    SEP,
    UNK_ID,
    VOCAB_FILE,
    lang_tag,
)
from lmops.data import layout
from lmops.data.sample import sample_texts
from lmops.errors import DataError, LmopsError, QualityError
from lmops.io import atomic_output, read_json, write_json
from lmops.pipeline import Result, path

TRAIN_SPLIT = "mono_train"
# sentencepiece silently drops longer sentences; its default is 4192 bytes.
_SPM_MAX_SENTENCE_BYTES = 4192


def check_quality(path: str | Path) -> None:
    """Refuse to build on data the validate stage did not pass."""
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"{path}: data quality summary not found (run the validate stage)")
    try:
        summary = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise QualityError(f"{path}: data quality summary is not valid JSON: {err}") from None
    if not isinstance(summary, dict) or "success" not in summary:
        raise QualityError(f"{path}: data quality summary has no 'success' key")
    if summary["success"] is not True:
        raise QualityError(
            f"{path}: data validation failed (success: {summary['success']!r}); "
            "fix the data or the validate thresholds before building the vocabulary"
        )


def _size_error(err: RuntimeError, cfg: VocabConfig, source: Path, n: int) -> LmopsError:
    msg = str(err)
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    if too_high:
        return LmopsError(
            f"vocab.vocab_size={cfg.vocab_size} is too large for the training text "
            f"({source}, {n} sentences): sentencepiece can make at most {too_high.group(2)} "
            f"pieces; set vocab.vocab_size <= {too_high.group(2)} in params.yaml"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_low:
        return LmopsError(
            f"vocab.vocab_size={cfg.vocab_size} is too small: the characters of {source} "
            f"plus the special pieces{' and 256 byte pieces' if cfg.byte_fallback else ''} "
            f"need at least {too_low.group(2)}; raise vocab.vocab_size or lower "
            "vocab.character_coverage in params.yaml"
        )
    return LmopsError(f"{source}: sentencepiece training failed: {msg}")


def train_vocab(
    texts: Sequence[str],
    out_dir: str | Path,
    cfg: VocabConfig,
    languages: Sequence[str],
    seed: int,
    source: str | Path = TRAIN_SPLIT,
    total: int | None = None,
) -> dict[str, Any]:
    """Train SentencePiece on ``texts`` into ``out_dir`` (which must exist); returns meta.
    ``total``: the training text's rows when ``texts`` is already a sample of them."""
    out_dir = Path(out_dir)
    if not texts:
        raise DataError(f"{source}: no text to train the vocabulary on")
    specials = [lang_tag(lang) for lang in languages] + [SEP]
    # sentencepiece's own sampler ignores set_random_generator_seed (seen on 0.2.x: two runs,
    # two models), so cap the input here with our seed and let it see every sentence we pass.
    sample = list(texts)
    if len(sample) > cfg.input_sentence_size:
        keep = np.random.default_rng(seed).permutation(len(sample))[: cfg.input_sentence_size]
        sample = [sample[i] for i in keep]
    longest = max(len(t.encode("utf-8")) for t in sample)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tqdm(sample, desc="vocab: read text", unit=" sent")),
            # model_writer, not model_prefix: the prefix (a temp dir) would be saved in the
            # model and make every run's spm.model differ.
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max(_SPM_MAX_SENTENCE_BYTES, longest),
            num_threads=cfg.num_threads,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=specials,
            minloglevel=1,
        )
    except RuntimeError as err:
        raise _size_error(err, cfg, Path(source), len(sample)) from None

    (out_dir / MODEL_FILE).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # The same "piece<TAB>score" listing spm_train writes, for people reading the vocabulary.
    (out_dir / VOCAB_FILE).write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(len(sp))),
        encoding="utf-8",
    )
    meta = {
        "vocab_size": sp.get_piece_size(),
        "pad_id": sp.pad_id(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "sep_id": sp.piece_to_id(SEP),
        "lang_ids": {lang: sp.piece_to_id(lang_tag(lang)) for lang in languages},
        "languages": list(languages),
        "model_type": cfg.model_type,
        "byte_fallback": cfg.byte_fallback,
        "character_coverage": cfg.character_coverage,
        "train_sentences": len(texts) if total is None else total,
        "sampled_sentences": len(sample),
        "seed": seed,
    }
    write_json(out_dir / META_FILE, meta)
    return meta


def build_vocab(
    data_dir: str | Path, out: str | Path, cfg: VocabConfig, languages: Sequence[str], seed: int
) -> dict[str, Any]:
    """The vocab stage: ``mono_train`` from the clean stage's dir -> ``out`` (atomic).

    The split is read batch by batch and only a seeded sample of ``vocab.input_sentence_size``
    texts is kept (the same sample :func:`train_vocab` draws from a list), so memory is
    bounded by that param, not by the corpus."""
    path = layout.split_path(data_dir, TRAIN_SPLIT)
    texts, total = sample_texts(data_dir, TRAIN_SPLIT, cfg.input_sentence_size, seed)
    with atomic_output(out, is_dir=True) as tmp:
        return train_vocab(texts, tmp, cfg, languages, seed, source=path, total=total)


@dataclass(frozen=True)
class Paths:
    data: Path = path("clean stage output dir")
    quality: Path = path("validate stage summary JSON")
    out: Path = path("vocab dir to write")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The vocab stage (reads ``seed``, ``vocab`` and the languages of ``clean``): refuses
    data that failed validation, then trains; the metrics are the vocabulary's meta."""
    check_quality(paths.quality)
    return Result(
        build_vocab(paths.data, paths.out, params.vocab, params.clean.languages, params.seed)
    )
