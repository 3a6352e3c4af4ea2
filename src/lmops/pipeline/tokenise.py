"""The ``tokenise`` stage: clean text -> token ids.

Output directory::

    pretrain_{train,valid}.bin/.json      token streams (:mod:`lmops.data.tokens`)
    parallel_{train,valid,test}.parquet   src, tgt, src_ids, tgt_ids (list<int32>)

``mono_test`` stays text: evaluate scores perplexity and bits-per-byte on it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmops.config import Params, TokeniseConfig
from lmops.core.vocab import Tokenizer
from lmops.data import layout
from lmops.data.tokens import ID_TYPE, STREAM_FEATURES, STREAM_SPLITS, write_stream
from lmops.errors import DataError
from lmops.io import atomic_output, write_json
from lmops.pipeline import Result, path

PARALLEL_SPLITS = ("parallel_train", "parallel_valid", "parallel_test")
# pairs written a row group at a time: memory bounded, and the same bytes for the same pairs
PAIRS_ROW_GROUP = 1 << 16
PARALLEL_FEATURES = datasets.Features(
    {
        "src": datasets.Value("string"),
        "tgt": datasets.Value("string"),
        "src_ids": datasets.List(ID_TYPE),
        "tgt_ids": datasets.List(ID_TYPE),
    }
)


def utf8_bytes(texts: pd.Series) -> int:
    return int(pc.sum(pc.binary_length(pa.array(texts, type=pa.large_string()))).as_py() or 0)


class _EncodeMono:
    """datasets.map function: ``<2lang> ids </s>`` per row."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        eos = self.tok.eos_id
        tags = [self.tok.lang_id(lang) for lang in batch["lang"]]
        ids = [
            [tag, *row, eos] for tag, row in zip(tags, self.tok.encode(batch["text"]), strict=True)
        ]
        return {"ids": ids}


class _EncodePairs:
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"src_ids": self.tok.encode(batch["src"]), "tgt_ids": self.tok.encode(batch["tgt"])}


def _check_columns(df: pd.DataFrame, path: Path, columns: tuple[str, ...], start: int) -> None:
    for col in columns:
        if col not in df.columns:
            raise DataError(f"{path}: no '{col}' column (columns: {list(df.columns)})")
        missing = df[col].isna().to_numpy()
        if missing.any():
            raise DataError(f"{path}: row {start + int(missing.argmax())}: '{col}' is missing")


def _check(
    data_dir: Path,
    name: str,
    columns: tuple[str, ...],
    text_columns: tuple[str, ...],
    languages: list[str] | None = None,
) -> tuple[int, int]:
    """Read split ``name`` batch by batch: every column present, no value missing, every
    language known. Returns its rows and the UTF-8 bytes of its ``text_columns``."""
    path = layout.split_path(data_dir, name)
    rows = text_bytes = 0
    for _, start, df in layout.iter_split(data_dir, name, columns=columns):
        _check_columns(df, path, columns, start)
        if languages is not None:
            unknown = ~df["lang"].isin(languages).to_numpy()
            if unknown.any():
                row = int(unknown.argmax())
                raise DataError(
                    f"{path}: row {start + row}: language {df['lang'].iloc[row]!r} has no tag "
                    f"in the vocabulary (languages: {languages})"
                )
        rows += len(df)
        text_bytes += sum(utf8_bytes(df[c]) for c in text_columns)
    return rows, text_bytes


def _map(
    data_dir: Path,
    name: str,
    rows: int,
    fn: Any,
    features: datasets.Features,
    cfg: TokeniseConfig,
    cache: Path,
) -> datasets.Dataset:
    if rows == 0:  # map never calls fn on no rows, so the new columns would be missing
        return datasets.Dataset.from_dict({col: [] for col in features}, features=features)
    ds = layout.split_dataset(data_dir, name, cache)
    drop = [c for c in ds.column_names if c not in features]
    # Fewer batches than workers would only add process start-up time.
    num_proc = min(cfg.num_proc, max(1, len(ds) // cfg.batch_size))
    return ds.map(
        fn,
        batched=True,
        batch_size=cfg.batch_size,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=drop,
        features=features,
        desc=f"encode {name}",
    )


def _encode_mono(
    data_dir: Path, name: str, tok: Tokenizer, cfg: TokeniseConfig, cache: Path
) -> tuple[datasets.Dataset, int]:
    rows, text_bytes = _check(data_dir, name, ("text", "lang"), ("text",), tok.languages)
    if rows == 0 and name == "mono_train":
        raise DataError(
            f"{layout.split_path(data_dir, name)}: no rows, so no pretraining text to tokenise; "
            "check the clean stage's sources and filters (data/metrics/clean.json)"
        )
    return _map(data_dir, name, rows, _EncodeMono(tok), STREAM_FEATURES, cfg, cache), text_bytes


def _leading_monolingual_rows(data_dir: Path, name: str) -> int:
    """Rows of mono split ``name`` before the first side of a training pair: the clean stage
    writes the monolingual text first, then the pairs' sides, whose source is a parallel one."""
    pair_sources: set[str] = set()
    for _, _, df in layout.iter_split(data_dir, "parallel_train", columns=("source",)):
        pair_sources.update(df["source"])
    rows = 0
    for _, start, df in layout.iter_split(data_dir, name, columns=("source",)):
        side = df["source"].isin(pair_sources).to_numpy()
        if side.any():
            return start + int(side.argmax())
        rows = start + len(df)
    return rows


def _write_pairs(ds: datasets.Dataset, path: Path) -> None:
    """The encoded pairs as parquet, a row group at a time, without the datasets
    fingerprint: the bytes depend on the content alone, not on how map() batched it, so a
    rerun that changes nothing stops DVC's cascade."""
    schema = ds.features.arrow_schema.remove_metadata()
    with pq.ParquetWriter(path, schema) as out:
        if len(ds) == 0:
            out.write_table(schema.empty_table())
        for table in ds.with_format("arrow").iter(batch_size=PAIRS_ROW_GROUP):
            out.write_table(table.replace_schema_metadata(None).cast(schema))


def tokenise(
    data_dir: str | Path, vocab_dir: str | Path, out: str | Path, cfg: TokeniseConfig
) -> dict[str, Any]:
    """The tokenise stage: the clean stage's dir + a vocab dir -> ``out`` (atomic); stats."""
    data_dir = Path(data_dir)
    tok = Tokenizer.load(vocab_dir)
    started = time.perf_counter()
    stats: dict[str, Any] = {"vocab_size": tok.vocab_size}
    tokens = text_bytes = 0
    with atomic_output(out, is_dir=True) as tmp:
        # datasets' Arrow copy of the splits: beside the output, on its disk (and a full disk
        # is reported as the output's), removed before the output is moved into place
        cache = tmp / ".datasets-cache"
        for split, stem in STREAM_SPLITS.items():
            encoded, text = _encode_mono(data_dir, split, tok, cfg, cache)
            mono_rows = _leading_monolingual_rows(data_dir, split)
            side = write_stream(encoded, tmp / f"{stem}.bin", tok.vocab_size, text, mono_rows)
            stats[stem] = {
                "tokens": side["length"],
                "monolingual_tokens": side["monolingual_tokens"],
                "documents": side["documents"],
                "bytes": side["bytes"],
                "bytes_per_token": round(side["bytes"] / max(side["length"], 1), 4),
            }
            tokens += side["length"]
            text_bytes += side["bytes"]
        for split in PARALLEL_SPLITS:
            rows, pair_bytes = _check(data_dir, split, ("src", "tgt"), ("src", "tgt"))
            ds = _map(data_dir, split, rows, _EncodePairs(tok), PARALLEL_FEATURES, cfg, cache)
            _write_pairs(ds, tmp / f"{split}.parquet")
            src = int(pc.sum(pc.list_value_length(ds.data.column("src_ids"))).as_py() or 0)
            tgt = int(pc.sum(pc.list_value_length(ds.data.column("tgt_ids"))).as_py() or 0)
            stats[split] = {"pairs": len(ds), "src_tokens": src, "tgt_tokens": tgt}
            tokens += src + tgt
            text_bytes += pair_bytes
        shutil.rmtree(cache, ignore_errors=True)
    wall = time.perf_counter() - started
    stats.update(
        {
            "tokens": tokens,
            "bytes": text_bytes,
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(tokens / wall, 1),
            "mb_per_second": round(text_bytes / wall / 1e6, 3),
        }
    )
    return stats


@dataclass(frozen=True)
class Paths:
    data: Path = path("clean stage output dir")
    vocab: Path = path("vocab stage output dir")
    out: Path = path("tokens dir to write")
    stats: Path = path("stats JSON to write")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The tokenise stage (reads ``tokenise``)."""
    stats = tokenise(paths.data, paths.vocab, paths.out, params.tokenise)
    write_json(paths.stats, stats)
    return Result(stats)
