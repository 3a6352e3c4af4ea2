"""Where the clean stage's splits live and how every later stage reads them.

Layout of the clean stage's output directory: one directory per split, holding the split's
rows in order as numbered shards (``clean.shard_rows`` rows each, the last one shorter):

    mono_{train,valid,test}/part-00000.{parquet|jsonl}, part-00001...      text, lang, source
    parallel_{train,valid,test}/part-00000.{parquet|jsonl}, ...            src, tgt, group, source

``mono_train`` is the pretraining text: monolingual train text plus both sides
of the parallel train pairs, with every held-out sentence removed.

A split is read whole (:func:`read_split`, for the small held-out splits and for tests) or
batch by batch (:func:`iter_split`, memory bounded by the batch, not by the split). The
shards are plain files in a fixed order, so a cluster engine can take the same list
(:func:`split_files`): ``datasets.load_dataset("parquet", data_files=...)``, or one task per
shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lmops.errors import DataError, DiskFullError
from lmops.io import disk_full_reason

SPLITS = ("train", "valid", "test")
MONO_COLUMNS = ("text", "lang", "source")
PARALLEL_COLUMNS = ("src", "tgt", "group", "source")
FORMATS = ("parquet", "jsonl")
SHARD_PREFIX = "part-"
# rows a reader holds at a time unless told otherwise: a few MB of text
READ_ROWS = 10_000


def split_columns(name: str) -> tuple[str, ...]:
    """The columns of split ``name`` (``mono_*`` or ``parallel_*``)."""
    return MONO_COLUMNS if name.startswith("mono") else PARALLEL_COLUMNS


# ------------------------------------------------------------------ layout


def shard_name(index: int, fmt: str) -> str:
    return f"{SHARD_PREFIX}{index:05d}.{fmt}"


def split_path(data_dir: str | Path, name: str) -> Path:
    """The directory of split ``name`` (e.g. ``parallel_test``); DataError if it is missing."""
    split_files(data_dir, name)
    return Path(data_dir) / name


def split_files(data_dir: str | Path, name: str) -> list[Path]:
    """The shards of split ``name``, in row order; DataError names what is missing."""
    folder = Path(data_dir) / name
    if not folder.is_dir():
        old = [folder.with_suffix(f".{fmt}") for fmt in FORMATS]
        if any(p.is_file() for p in old):  # one file per split: written before sharding
            raise DataError(
                f"{folder}: missing; {data_dir} holds one file per split, the layout of an "
                "earlier version: rerun the clean stage"
            )
        raise DataError(f"{folder}: missing (did the clean stage run?)")
    shards = sorted(
        p for p in folder.iterdir() if p.name.startswith(SHARD_PREFIX) and p.suffix[1:] in FORMATS
    )
    if not shards:
        raise DataError(f"{folder}: no shards ({SHARD_PREFIX}*.parquet); rerun the clean stage")
    if len({p.suffix for p in shards}) > 1:
        raise DataError(f"{folder}: shards in more than one format; rerun the clean stage")
    return shards


def _unreadable(path: Path, err: Exception) -> DataError:
    return DataError(
        f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: {err}); "
        "rerun the clean stage"
    )


def _read_jsonl(path: Path, name: str) -> pd.DataFrame:
    if path.stat().st_size == 0:  # an empty split's only shard
        return pd.DataFrame({c: pd.Series([], dtype="str") for c in split_columns(name)})
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError) as err:
        raise _unreadable(path, err) from None


def read_shard(path: Path, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One shard of split ``name``, whole; DataError names a file it cannot read."""
    if path.suffix == ".jsonl":
        df = _read_jsonl(path, name)
        return df if columns is None else df[[c for c in columns if c in df.columns]]
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); rerun the clean stage")
    try:
        return pq.read_table(path, columns=_present(path, columns)).to_pandas()
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, corrupted, not ours
        raise _unreadable(path, err) from None


def _present(path: Path, columns: Sequence[str] | None) -> list[str] | None:
    """``columns`` that the parquet shard has (a missing one is the caller's to report)."""
    if columns is None:
        return None
    names = pq.read_schema(path).names
    return [c for c in columns if c in names]


def read_split(data_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one split written by the clean stage, whole; DataError names a file it cannot
    read. For a large split use :func:`iter_split`."""
    frames = [read_shard(p, name) for p in split_files(data_dir, name)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def iter_split(
    data_dir: str | Path,
    name: str,
    batch_rows: int = READ_ROWS,
    columns: Sequence[str] | None = None,
) -> Iterator[tuple[Path, int, pd.DataFrame]]:
    """Split ``name`` batch by batch, in row order: (shard, index of the batch's first row in
    the split, rows). At most ``batch_rows`` rows are held at a time (a jsonl shard is read
    whole: jsonl is for small data). ``columns``: only these, where present."""
    start = 0
    for path in split_files(data_dir, name):
        if path.suffix == ".jsonl":
            df = read_shard(path, name, columns)
            for i in range(0, max(len(df), 1), batch_rows):
                part = df.iloc[i : i + batch_rows].reset_index(drop=True)
                yield path, start + i, part
            start += len(df)
            continue
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes); rerun the clean stage")
        try:
            # pre_buffer (the default) would read the whole shard into memory first
            shard = pq.ParquetFile(path, pre_buffer=False)
            batches = shard.iter_batches(batch_size=batch_rows, columns=_present(path, columns))
            empty = True
            for batch in batches:
                empty = False
                yield path, start, batch.to_pandas()
                start += batch.num_rows
            if empty:  # the columns of an empty shard
                yield (
                    path,
                    start,
                    shard.schema_arrow.empty_table()
                    .select(_present(path, columns) or shard.schema_arrow.names)
                    .to_pandas(),
                )
        except (OSError, ValueError, pa.ArrowException) as err:
            raise _unreadable(path, err) from None


def split_rows(data_dir: str | Path, name: str) -> int:
    """Rows in split ``name``, from the parquet footers (jsonl shards are counted)."""
    rows = 0
    for path in split_files(data_dir, name):
        if path.suffix == ".jsonl":
            rows += len(_read_jsonl(path, name))
            continue
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError, pa.ArrowException) as err:
            raise _unreadable(path, err) from None
    return rows


def split_dataset(data_dir: str | Path, name: str, cache_dir: str | Path) -> Any:
    """Split ``name`` as a ``datasets.Dataset``, memory-mapped from an Arrow copy that
    ``datasets`` writes under ``cache_dir`` (so ``map`` can run on ``num_proc`` processes and
    any size fits). A split with no rows has no columns to load: ask :func:`split_rows`
    first."""
    import datasets  # slow to import: only the stages that map a split need it

    files = split_files(data_dir, name)
    builder = "parquet" if files[0].suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir)
        )
    except Exception as err:  # datasets wraps reader errors in its own types
        reason = disk_full_reason(err)
        if reason is not None:  # its Arrow copy, not the shards, could not be written
            raise DiskFullError(cache_dir, reason) from err
        cause = err.__cause__ or err
        raise DataError(
            f"{Path(data_dir) / name}: cannot be read as {builder} ({type(cause).__name__}: "
            f"{cause}); rerun the clean stage"
        ) from None


# ------------------------------------------------------------------ writing


class ShardWriter:
    """Write one split as shards of ``shard_rows`` rows into ``data_dir/name``, appending
    batches in order. Only whole shards are written; an empty split gets one empty shard,
    so every split has at least one file that says its format (and, as parquet, its
    columns)."""

    def __init__(
        self,
        data_dir: str | Path,
        name: str,
        fmt: str,
        shard_rows: int,
        schema: pa.Schema | None = None,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
        self.folder = Path(data_dir) / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name, self.fmt, self.shard_rows = name, fmt, shard_rows
        self.schema = schema or pa.schema([(c, pa.string()) for c in split_columns(name)])
        self.rows = 0
        self.shards: list[Path] = []
        self._in_shard = 0
        self._parquet: pq.ParquetWriter | None = None
        self._jsonl: Any = None

    def _open(self) -> None:
        path = self.folder / shard_name(len(self.shards), self.fmt)
        self.shards.append(path)
        self._in_shard = 0
        if self.fmt == "parquet":
            self._parquet = pq.ParquetWriter(path, self.schema)
        else:
            self._jsonl = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in _close)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def write(self, table: pa.Table | pd.DataFrame) -> None:
        """Append rows (columns in any order; those of the schema are kept)."""
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        table = table.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._parquet is None and self._jsonl is None:
                self._open()
            take = min(self.shard_rows - self._in_shard, table.num_rows - offset)
            part = table.slice(offset, take)
            if self._parquet is not None:
                self._parquet.write_table(part)
            else:
                names = part.column_names
                for row in zip(*(part.column(c).to_pylist() for c in names), strict=True):
                    self._jsonl.write(
                        json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False) + "\n"
                    )
            self._in_shard += take
            self.rows += take
            offset += take
            if self._in_shard == self.shard_rows:
                self._close()

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        if not self.shards:  # no rows: one empty shard
            self._open()
            if self._parquet is not None:
                self._parquet.write_table(self.schema.empty_table())
        self._close()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._close()


def write_split(df: pd.DataFrame, data_dir: str | Path, name: str, fmt: str) -> Path:
    """Write one split, whole, as a single shard (tests and small data); returns its
    directory. An existing split of that name is replaced."""
    folder = Path(data_dir) / name
    if folder.is_dir():
        for old in folder.glob(f"{SHARD_PREFIX}*"):
            old.unlink()
    table = pa.Table.from_pandas(df, preserve_index=False)
    with ShardWriter(data_dir, name, fmt, max(len(df), 1), table.schema) as out:
        out.write(table)
    return folder
