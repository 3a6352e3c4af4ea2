"""Raw corpora -> cleaned, split, leak-free text (the ``clean`` stage).

Layout of the clean stage's output directory (read by every later stage
through :func:`read_split`):

    mono_{train,valid,test}.{parquet|jsonl}      columns: text, lang, source
    parallel_{train,valid,test}.{parquet|jsonl}  columns: src, tgt, group, source

``mono_train`` is the pretraining text: monolingual train text plus both sides
of the parallel train pairs, with every held-out sentence removed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lmops.errors import DataError

SPLITS = ("train", "valid", "test")
MONO_COLUMNS = ("text", "lang", "source")
PARALLEL_COLUMNS = ("src", "tgt", "group", "source")


def split_path(data_dir: str | Path, name: str) -> Path:
    """Path of split ``name`` (e.g. ``parallel_test``) in whichever format was written."""
    data_dir = Path(data_dir)
    for ext in ("parquet", "jsonl"):
        path = data_dir / f"{name}.{ext}"
        if path.is_file():
            return path
    raise DataError(f"{data_dir}/{name}.parquet: missing (did the clean stage run?)")


def read_split(data_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one split written by the clean stage."""
    path = split_path(data_dir, name)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


def write_split(df: pd.DataFrame, data_dir: str | Path, name: str, fmt: str) -> Path:
    """Write one split as parquet or jsonl."""
    path = Path(data_dir) / f"{name}.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    return path
