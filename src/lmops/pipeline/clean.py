"""The ``clean`` stage: raw corpora -> cleaned, split, leak-free text, as sharded splits.

How :func:`run` gets there, every step batch by batch (``clean.batch_rows`` rows), so the
stage's memory is bounded by the batch and by the held-out text, not by the corpus:

1. check every source (files exist, are UTF-8 text, embedded names are known),
2. load each through ``datasets`` (memory-mapped Arrow) into standard columns (``text`` or
   ``src``/``tgt``/``group``),
3. clean every text (:func:`lmops.data.text.clean_text`) in a batched ``Dataset.map`` on
   ``clean.num_proc`` processes and drop rows that are empty, too short, too long, badly
   length-matched (pairs) or duplicates (an 8-byte hash of each text in a compact set,
   :mod:`lmops.data.dedup`); de-duplication sees the rows a source names held-out first,
   so they keep their place,
4. split: as the source says (``split`` for all its rows, ``split_column`` for each: a
   corpus's own train, dev and test files), else monolingual text at random (seeded) and
   parallel pairs by whole groups (e.g. Bible books) when the source has a
   ``group_column``, else at random,
5. remove from the training text every row that equals or contains a held-out text (an
   Aho-Corasick automaton over the held-out texts, on ``clean.num_proc`` threads), so
   evaluation never scores what the model has read,
6. write each split as shards of ``clean.shard_rows`` rows (:mod:`lmops.data.layout`).

Between the steps, rows wait in parquet files in a temporary directory (``TMPDIR``, which
needs about twice the corpus's size free). The rows and their order are those of the
in-memory stage this replaced, whatever the batch size (tests/unit/pipeline).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmops.config import CleanConfig, Params
from lmops.data.dedup import Dedup
from lmops.data.layout import SPLITS, ShardWriter
from lmops.data.sources import check_source, clean_rows, kept_batches, load_source, source_lang
from lmops.data.split import HeldOut, SourceSplit, check_groups
from lmops.io import atomic_output, write_json
from lmops.pipeline import Result, path

log = logging.getLogger(__name__)

Part = Literal["held_out", "train"] | None


def held_out_first(cfg: CleanConfig) -> list[tuple[int, Part]]:
    """The sources (by their index), in parts, in the order de-duplication sees them: the
    rows a source itself names valid or test (``split``, ``split_column``) before all the
    others, so a sentence that is also in the training data keeps its held-out copy.
    Sources that leave splitting to ``clean.split`` keep their order."""
    first: list[tuple[int, Part]] = []
    then: list[tuple[int, Part]] = []
    for i, src in enumerate(cfg.sources):
        if src.split:
            (then if src.split == "train" else first).append((i, None))
        elif src.split_column:
            first.append((i, "held_out"))
            then.append((i, "train"))
        else:
            then.append((i, None))
    return first + then


@dataclass
class _SplitStats:
    """Rows, characters, UTF-8 bytes (and rows per language) of the splits written."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, name: str, table: pa.Table) -> None:
        c = self.counts.setdefault(name, Counter({"rows": 0, "chars": 0, "bytes": 0}))
        c["rows"] += table.num_rows
        for col in ("text",) if name.startswith("mono") else ("src", "tgt"):
            c["chars"] += pc.sum(pc.utf8_length(table.column(col))).as_py() or 0
            c["bytes"] += pc.sum(pc.binary_length(table.column(col))).as_py() or 0
        if name.startswith("mono"):
            for lang, n in zip(
                *np.unique(table.column("lang").to_numpy(False), return_counts=True), strict=True
            ):
                c[f"rows_{lang}"] += int(n)

    def result(self) -> dict[str, int]:
        out = {}
        for name, c in self.counts.items():
            out.update({f"{name}.{k}": int(c[k]) for k in ("rows", "chars", "bytes")})
            out.update(
                {f"{name}.{k}": int(v) for k, v in sorted(c.items()) if k.startswith("rows_")}
            )
        return out


class _Outputs:
    """The six output splits' writers, opened as rows arrive, and their stats."""

    def __init__(self, out_dir: Path, cfg: CleanConfig):
        self.out_dir, self.cfg = out_dir, cfg
        self.writers: dict[str, ShardWriter] = {}
        self.stats = _SplitStats()

    def _writer(self, name: str) -> ShardWriter:
        if name not in self.writers:
            fmt, rows = self.cfg.format, self.cfg.shard_rows
            self.writers[name] = ShardWriter(self.out_dir, name, fmt, rows)
            self.stats.add(name, self.writers[name].schema.empty_table())
        return self.writers[name]

    def write(self, name: str, table: pa.Table) -> None:
        self._writer(name).write(table)
        self.stats.add(name, table)

    def close(self) -> None:
        """Finish every split; one with no rows gets its one empty shard."""
        for kind in ("mono", "parallel"):
            for split in SPLITS:
                self._writer(f"{kind}_{split}").close()


def _pending(cache: Path, name: str, cfg: CleanConfig) -> ShardWriter:
    """Rows waiting in the cache for the next step (parquet, whatever clean.format)."""
    return ShardWriter(cache, name, "parquet", cfg.shard_rows)


def _batches(files: Iterable[Path], batch_rows: int) -> Iterator[pa.Table]:
    for file in files:
        # pre_buffer (the default) reads every row group of the file into memory first
        for batch in pq.ParquetFile(file, pre_buffer=False).iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])


def _in_order(
    pool: ThreadPoolExecutor,
    fn: Callable[[pa.Table], np.ndarray],
    tables: Iterator[pa.Table],
    ahead: int,
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(table, fn(table)) in the tables' order, with up to ``ahead`` tables in flight."""
    pending: deque[tuple[pa.Table, Future[np.ndarray]]] = deque()
    for table in tables:
        pending.append((table, pool.submit(fn, table)))
        if len(pending) >= ahead:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _clean_sources(
    cfg: CleanConfig, cache: Path, stats: dict[str, int]
) -> list[tuple[list[Path], int]]:
    """Steps 1-3: each source's kept rows, in parquet files under ``cache``, and their count."""
    for src in cfg.sources:  # fail on a bad file before minutes of work on the others
        check_source(src, cfg)
    loaded = [load_source(src, cfg, str(cache), check=False) for src in cfg.sources]
    grouped = {
        g
        for src, ds in zip(cfg.sources, loaded, strict=True)
        if src.role == "parallel" and src.group_column
        for g in ds.unique("group")
    }
    if grouped:
        check_groups(grouped, cfg.split.valid_groups, cfg.split.test_groups)
    dedup = {"monolingual": Dedup(["text"], cache), "parallel": Dedup(["src", "tgt"], cache)}
    kept: list[tuple[list[Path], int]] = [([], 0) for _ in cfg.sources]
    dropped: list[Counter[str]] = [Counter() for _ in cfg.sources]
    cleaned = {}
    for i, part in held_out_first(cfg):
        src = cfg.sources[i]
        if i not in cleaned:
            cleaned[i] = clean_rows(loaded[i], src.role, cfg, str(cache / f"clean-{i}.arrow"))
        file = cache / f"kept-{i}-{part or 'all'}.parquet"
        writer: pq.ParquetWriter | None = None
        rows = 0
        batches = kept_batches(
            cleaned[i],
            src.role,
            cfg.batch_rows,
            dedup[src.role] if cfg.dedup else None,
            dropped[i],
            part,
        )
        for table in batches:
            writer = writer or pq.ParquetWriter(file, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is not None:
            writer.close()
            files, n = kept[i]
            kept[i] = ([*files, file], n + rows)
    for src, ds, (_, n), counts in zip(cfg.sources, loaded, kept, dropped, strict=True):
        key = f"source.{src.name}"
        stats[f"{key}.loaded"] = len(ds)
        stats[f"{key}.kept"] = n
        stats.update({f"{key}.dropped.{r}": v for r, v in sorted(counts.items())})
        log.info(
            "%s: %d rows loaded, %d kept (%s)",
            src.name,
            len(ds),
            n,
            ", ".join(f"{r} {v}" for r, v in counts.items() if v) or "none dropped",
        )
    return kept


def _split_sources(
    cfg: CleanConfig,
    seed: int,
    kept: list[tuple[list[Path], int]],
    out: _Outputs,
    cache: Path,
) -> tuple[list[str], dict[str, list[Path]]]:
    """Step 4: held-out rows into their splits, training rows into working files in the
    cache; returns every held-out text, and the training rows' files by kind."""
    held: list[str] = []
    pending = {kind: _pending(cache, f"{kind}_train", cfg) for kind in ("mono", "parallel")}
    for src, (files, n) in zip(cfg.sources, kept, strict=True):
        kind = "mono" if src.role == "monolingual" else "parallel"
        splitter = SourceSplit(src, n, cfg, seed, cache)
        start = 0
        for table in _batches(files, cfg.batch_rows):
            labels = splitter.labels(table, start)
            start += table.num_rows
            rows = table.num_rows
            table = table.append_column("source", pa.array([src.name] * rows, pa.string()))
            if kind == "mono":
                lang = pa.array([source_lang(src)] * rows, pa.string())
                table = table.append_column("lang", lang)
            for split in SPLITS:
                part = table.filter(pa.array(labels == split))
                if not part.num_rows:
                    continue
                if split == "train":
                    pending[kind].write(part)
                    continue
                out.write(f"{kind}_{split}", part)
                for col in ("text",) if kind == "mono" else ("src", "tgt"):
                    held.extend(part.column(col).to_pylist())
    return held, {kind: writer.close() for kind, writer in pending.items()}


def _remove_leaks(
    cfg: CleanConfig,
    held: HeldOut,
    pending: dict[str, list[Path]],
    out: _Outputs,
    cache: Path,
    stats: dict[str, int],
) -> None:
    """Step 5: ``parallel_train`` and ``mono_train`` (mono train text + both sides of the
    train pairs) without any row that equals or contains a held-out text: a valid/test
    sentence in either language, or a valid/test monolingual text."""

    def pair_leaks(table: pa.Table) -> np.ndarray:
        src, tgt = (held.leaks(table.column(c).to_pylist()) for c in ("src", "tgt"))
        return src | tgt

    def text_leaks(table: pa.Table) -> np.ndarray:
        return held.leaks(table.column("text").to_pylist())

    mono_dedup = Dedup(["text"], cache) if cfg.dedup else None
    duplicates = 0

    def to_mono_train(table: pa.Table) -> None:
        nonlocal duplicates
        if mono_dedup is not None:
            every = np.ones(table.num_rows, dtype=bool)
            dup = mono_dedup.duplicates({"text": table.column("text").to_pylist()}, every)
            duplicates += int(dup.sum())
            table = table.filter(pa.array(~dup))
        out.write("mono_train", table)

    leaked = {"parallel_train": 0, "mono_train": 0}
    pairs = _pending(cache, "parallel_train_kept", cfg)
    with ThreadPoolExecutor(cfg.num_proc, thread_name_prefix="leak-check") as pool:
        ahead = 2 * cfg.num_proc
        batches = _batches(pending["parallel"], cfg.batch_rows)
        for table, mask in _in_order(pool, pair_leaks, batches, ahead):
            leaked["parallel_train"] += int(mask.sum())
            table = table.filter(pa.array(~mask))
            out.write("parallel_train", table)
            pairs.write(table)
        sides = pairs.close()
        # mono_train: the mono train text, then every source side, then every target side;
        # its de-duplication drops a wiki text equal to a verse, or a verse read the same
        # in both languages
        batches = _batches(pending["mono"], cfg.batch_rows)
        for table, mask in _in_order(pool, text_leaks, batches, ahead):
            leaked["mono_train"] += int(mask.sum())
            to_mono_train(table.filter(pa.array(~mask)))
    for col, lang in (("src", cfg.source_lang), ("tgt", cfg.target_lang)):
        for table in _batches(sides, cfg.batch_rows):
            langs = pa.array([lang] * table.num_rows, pa.string())
            side = {"text": table.column(col), "lang": langs, "source": table.column("source")}
            to_mono_train(pa.table(side))
    stats.update({f"leaked.{k}": v for k, v in leaked.items()})
    stats["leaked.total"] = sum(leaked.values())
    stats["mono_train.duplicates_removed"] = duplicates


def build_clean(
    cfg: CleanConfig, seed: int, out_dir: str | Path, stats_path: str | Path
) -> dict[str, int]:
    """The clean stage: load, clean, split and de-leak every source; write the
    splits into ``out_dir`` and the numbers into ``stats_path`` (returned too).

    Nothing is left at either path unless the whole stage succeeds.
    """
    Path(stats_path).unlink(missing_ok=True)  # never leave the previous run's numbers
    stats: dict[str, int] = {}
    with (
        atomic_output(out_dir, is_dir=True) as tmp,
        tempfile.TemporaryDirectory(prefix="lmops-clean-") as cache_dir,
    ):
        cache = Path(cache_dir)
        kept = _clean_sources(cfg, cache, stats)
        out = _Outputs(tmp, cfg)
        held, pending = _split_sources(cfg, seed, kept, out, cache)
        _remove_leaks(cfg, HeldOut(held), pending, out, cache, stats)
        log.info("removed %d training rows that hold held-out text", stats["leaked.total"])
        out.close()
        stats.update(out.stats.result())
    write_json(stats_path, stats)
    return stats


@dataclass(frozen=True)
class Paths:
    out: Path = path("directory to write the splits into")
    stats: Path = path("stats JSON to write (a DVC metric)")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The clean stage (reads ``seed`` and ``clean``)."""
    return Result(build_clean(params.clean, params.seed, paths.out, paths.stats))
