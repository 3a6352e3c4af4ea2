"""The ``clean`` stage: raw corpora -> cleaned, split, leak-free text.

How :func:`run` gets there:

1. check every source (files exist, are UTF-8 text, embedded names are known),
2. load each through ``datasets`` into standard columns (``text`` or ``src``/``tgt``/``group``),
3. clean every text (:func:`lmops.data.text.clean_text`) in a batched ``Dataset.map`` and drop
   rows that are empty, too short, too long, badly length-matched (pairs) or duplicates,
4. split: as the source says (``split`` for all its rows, ``split_column`` for each: a
   corpus's own train, dev and test files), else monolingual text at random (seeded) and
   parallel pairs by whole groups (e.g. Bible books) when the source has a
   ``group_column``, else at random; de-duplication sees the rows a source names held-out
   first, so they keep their place,
5. remove from the training text every row that equals or contains a held-out
   text, so evaluation never scores what the model has read.

The output layout is :mod:`lmops.data.layout`'s.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from lmops.config import CleanConfig, Params, SourceConfig
from lmops.data.layout import MONO_COLUMNS, PARALLEL_COLUMNS, SPLITS, write_split
from lmops.data.sources import check_source, clean_source, load_source, source_lang
from lmops.data.split import check_groups, concat_rows, remove_leaks, split_labels
from lmops.io import atomic_output, write_json
from lmops.pipeline import Result, path

log = logging.getLogger(__name__)


def _split_stats(name: str, df: pd.DataFrame) -> dict[str, int]:
    text_cols = ["text"] if name.startswith("mono") else ["src", "tgt"]
    texts = [t for c in text_cols for t in df[c]]
    stats = {
        f"{name}.rows": len(df),
        f"{name}.chars": sum(map(len, texts)),
        f"{name}.bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    if "lang" in df:
        stats.update(
            {
                f"{name}.rows_{lang}": int(n)
                for lang, n in df["lang"].value_counts().sort_index().items()
            }
        )
    return stats


def held_out_first(
    loaded: list[tuple[SourceConfig, datasets.Dataset]],
) -> list[tuple[int, SourceConfig, datasets.Dataset]]:
    """The sources (by their index), in parts, in the order de-duplication sees them: the
    rows a source itself names valid or test (``split``, ``split_column``) before all the
    others, so a sentence that is also in the training data keeps its held-out copy.
    Sources that leave splitting to ``clean.split`` keep their order."""
    Part = tuple[int, SourceConfig, datasets.Dataset]
    first: list[Part] = []
    then: list[Part] = []
    for i, (src, ds) in enumerate(loaded):
        if src.split:
            (then if src.split == "train" else first).append((i, src, ds))
        elif src.split_column:
            train = np.array(ds["split"]) == "train"
            for rows, into in ((~train, first), (train, then)):
                if rows.any():
                    into.append((i, src, ds.select(np.flatnonzero(rows))))
        else:
            then.append((i, src, ds))
    return first + then


def build_clean(
    cfg: CleanConfig, seed: int, out_dir: str | Path, stats_path: str | Path
) -> dict[str, int]:
    """The clean stage: load, clean, split and de-leak every source; write the
    splits into ``out_dir`` and the numbers into ``stats_path`` (returned too).

    Nothing is left at either path unless the whole stage succeeds.
    """
    Path(stats_path).unlink(missing_ok=True)  # never leave the previous run's numbers
    stats: dict[str, int] = {}
    mono: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    pairs: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    seen: dict[str, dict[str, set[str]]] = {"monolingual": {}, "parallel": {}}
    with (
        atomic_output(out_dir, is_dir=True) as tmp,
        tempfile.TemporaryDirectory(prefix="lmops-datasets-") as cache,
    ):
        for src in cfg.sources:  # fail on a bad file before minutes of work on the others
            check_source(src, cfg)
        loaded = [(src, load_source(src, cfg, cache, check=False)) for src in cfg.sources]
        grouped = {
            g
            for src, ds in loaded
            if src.role == "parallel" and src.group_column
            for g in ds.unique("group")
        }
        if grouped:
            check_groups(grouped, cfg.split.valid_groups, cfg.split.test_groups)
        cleaned: dict[int, list[tuple[pd.DataFrame, Counter[str]]]] = {}
        for i, src, part in held_out_first(loaded):
            cleaned.setdefault(i, []).append(clean_source(part, src.role, cfg, seen[src.role]))
        for i, (src, ds) in enumerate(loaded):
            kept = pd.concat([k for k, _ in cleaned[i]], ignore_index=True)
            dropped: Counter[str] = Counter()
            for _, part_dropped in cleaned[i]:
                dropped.update(part_dropped)  # unlike +, keeps the reasons counted 0
            key = f"source.{src.name}"
            stats[f"{key}.loaded"] = len(ds)
            stats[f"{key}.kept"] = len(kept)
            stats.update({f"{key}.dropped.{r}": n for r, n in sorted(dropped.items())})
            log.info(
                "%s: %d rows loaded, %d kept (%s)",
                src.name,
                len(ds),
                len(kept),
                ", ".join(f"{r} {n}" for r, n in dropped.items() if n) or "none dropped",
            )
            kept["source"] = src.name
            if src.role == "monolingual":
                kept["lang"] = source_lang(src)
            labels = split_labels(src, kept, cfg, seed)
            for split in SPLITS:
                (mono if src.role == "monolingual" else pairs)[split].append(kept[labels == split])

        out = {f"mono_{s}": concat_rows(mono[s], MONO_COLUMNS) for s in SPLITS}
        out.update({f"parallel_{s}": concat_rows(pairs[s], PARALLEL_COLUMNS) for s in SPLITS})
        stats.update(remove_leaks(out, cfg))
        log.info("removed %d training rows that hold held-out text", stats["leaked.total"])
        for name, df in out.items():
            write_split(df, tmp, name, cfg.format)
            stats.update(_split_stats(name, df))
    write_json(stats_path, stats)
    return stats


@dataclass(frozen=True)
class Paths:
    out: Path = path("directory to write the splits into")
    stats: Path = path("stats JSON to write (a DVC metric)")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The clean stage (reads ``seed`` and ``clean``)."""
    return Result(build_clean(params.clean, params.seed, paths.out, paths.stats))
