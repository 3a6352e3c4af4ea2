"""Where the clean stage's splits live and how every later stage reads them.

Layout of the clean stage's output directory:

    mono_{train,valid,test}.{parquet|jsonl}      columns: text, lang, source
    parallel_{train,valid,test}.{parquet|jsonl}  columns: src, tgt, group, source

``mono_train`` is the pretraining text: monolingual train text plus both sides
of the parallel train pairs, with every held-out sentence removed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from lmops.errors import DataError

SPLITS = ("train", "valid", "test")
MONO_COLUMNS = ("text", "lang", "source")
PARALLEL_COLUMNS = ("src", "tgt", "group", "source")


# ------------------------------------------------------------------ layout


def split_path(data_dir: str | Path, name: str) -> Path:
    """Path of split ``name`` (e.g. ``parallel_test``) in whichever format was written."""
    data_dir = Path(data_dir)
    for ext in ("parquet", "jsonl"):
        path = data_dir / f"{name}.{ext}"
        if path.is_file():
            return path
    raise DataError(f"{data_dir}/{name}.parquet: missing (did the clean stage run?)")


def read_split(data_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one split written by the clean stage; DataError names a file it cannot read."""
    path = split_path(data_dir, name)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); rerun the clean stage")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, corrupted, not ours
        raise DataError(
            f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: "
            f"{err}); rerun the clean stage"
        ) from None


def write_split(df: pd.DataFrame, data_dir: str | Path, name: str, fmt: str) -> Path:
    """Write one split as parquet or jsonl."""
    path = Path(data_dir) / f"{name}.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    return path
