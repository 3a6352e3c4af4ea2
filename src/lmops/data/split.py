"""Train/valid/test splits, by whole groups or at random, batch by batch, and the leak check
that keeps every held-out text out of the training text."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from ahocorasick_rs import AhoCorasick, MatchKind

from lmops.config import CleanConfig, SourceConfig
from lmops.data.sample import permutation_head
from lmops.errors import DataError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- splitting


def random_split(
    n: int, valid_fraction: float, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A train/valid/test label per row, drawn at random in the given shares."""
    labels = np.full(n, "train", dtype=object)
    order = rng.permutation(n)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    labels[order[:n_valid]] = "valid"
    labels[order[n_valid : n_valid + n_test]] = "test"
    return labels


def group_split(groups: pd.Series, valid_groups: list[str], test_groups: list[str]) -> np.ndarray:
    """A train/valid/test label per row: named groups are held out whole."""
    labels = np.full(len(groups), "train", dtype=object)
    labels[groups.isin(valid_groups).to_numpy()] = "valid"
    labels[groups.isin(test_groups).to_numpy()] = "test"
    return labels


def check_groups(known: set[str], valid_groups: list[str], test_groups: list[str]) -> None:
    """Every held-out group must exist, or a typo would silently hold out nothing."""
    unknown = [g for g in (*valid_groups, *test_groups) if g not in known]
    if unknown:
        raise DataError(
            f"clean.split: unknown group(s) {', '.join(map(repr, unknown))} in "
            f"valid_groups/test_groups; known groups: {', '.join(sorted(known))}"
        )


# the names a source's own split column may use, and the split each means
SPLIT_NAMES = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "dev": "valid",
    "test": "test",
}


def source_splits(values: Iterable[Any], where: str) -> np.ndarray:
    """The split (train, valid or test) of each value of a source's ``split_column``; an
    unknown value stops with the values it knows."""
    values = list(values)
    names = [SPLIT_NAMES.get(str(v).strip().lower()) for v in values]
    if None in names:
        bad = sorted({str(v) for v, n in zip(values, names, strict=True) if n is None})
        raise DataError(
            f"{where}: split column value(s) {', '.join(map(repr, bad[:5]))} are not a "
            f"split; use one of {', '.join(SPLIT_NAMES)}"
        )
    return np.array(names, dtype=object)


def held_out_rows(
    n: int,
    valid_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
    work_dir: Path,
    max_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows :func:`random_split` labels valid and test, as two sorted index arrays,
    without the whole permutation in memory (:func:`lmops.data.sample.permutation_head`);
    each share holds ``max_rows`` rows at most."""
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    if max_rows is not None:
        n_valid, n_test = min(n_valid, max_rows), min(n_test, max_rows)
    head = permutation_head(n, n_valid + n_test, rng, work_dir)
    return np.sort(head[:n_valid]), np.sort(head[n_valid:])


class SourceSplit:
    """train/valid/test for each cleaned row of one source, batch by batch: the source's own
    (``split``, ``split_column``), or as ``clean.split`` says: whole groups, or at random."""

    def __init__(self, src: SourceConfig, n_rows: int, cfg: CleanConfig, seed: int, work_dir: Path):
        self.src, self.split = src, cfg.split
        self.valid: np.ndarray | None = None
        self.test: np.ndarray | None = None
        if not (src.split or src.split_column or (src.role == "parallel" and src.group_column)):
            # One random stream per source: adding a source does not reshuffle the others.
            rng = np.random.default_rng([seed, zlib.crc32(src.name.encode())])
            if src.role == "parallel":
                shares = (self.split.parallel_valid_fraction, self.split.parallel_test_fraction)
            else:
                shares = (self.split.valid_fraction, self.split.test_fraction)
            cap = self.split.max_held_out_rows
            self.valid, self.test = held_out_rows(n_rows, *shares, rng, work_dir, cap)
            if cap is not None and max(round(n_rows * f) for f in shares) > cap:
                log.info(
                    "%s: %d rows; valid and test hold %d and %d rows "
                    "(clean.split.max_held_out_rows: %d)",
                    src.name,
                    n_rows,
                    len(self.valid),
                    len(self.test),
                    cap,
                )

    def labels(self, rows: pa.Table, start: int) -> np.ndarray:
        """The split of each row of ``rows``, the source's rows ``start`` onwards."""
        n = rows.num_rows
        if self.src.split:
            return np.full(n, self.src.split, dtype=object)
        if self.src.split_column:  # already train/valid/test: load_source read them
            return np.array(rows.column("split").to_pylist(), dtype=object)
        if self.valid is None or self.test is None:  # whole groups
            groups = rows.column("group").to_pandas()
            return group_split(groups, self.split.valid_groups, self.split.test_groups)
        labels = np.full(n, "train", dtype=object)
        for name, index in (("valid", self.valid), ("test", self.test)):
            lo, hi = np.searchsorted(index, [start, start + n])
            labels[index[lo:hi] - start] = name
        return labels


# ------------------------------------------------------------------ leakage


class HeldOut:
    """Held-out texts; finds training texts that equal or contain any of them.

    An Aho-Corasick automaton over the first ``key_chars`` characters of every held-out
    text finds every place where one may start, in one pass over a batch of texts joined by
    newlines (cleaned texts hold none); only where a key is shorter than its text is the
    rest compared. Keys keep the automaton small however long the held-out documents are.
    The search itself runs without the GIL, so threads share the work.
    """

    SEP = "\n"

    def __init__(self, texts: Iterable[str], key_chars: int = 64):
        self.texts = {t for t in texts if t}
        by_key: dict[str, list[str]] = {}
        for t in sorted(self.texts):
            by_key.setdefault(t[:key_chars], []).append(t)
        keys = list(by_key)
        # a key that is a held-out text itself: every match is a leak
        self._whole = np.array([k in self.texts for k in keys], dtype=bool)
        self._longer = [[t for t in by_key[k] if len(t) > len(k)] for k in keys]
        self._matcher = AhoCorasick(keys, matchkind=MatchKind.Standard) if keys else None
        self._joinable = not any(self.SEP in t for t in self.texts)

    def contains_any(self, text: str) -> bool:
        """Whether ``text`` equals or contains a held-out text."""
        return bool(self.leaks([text])[0])

    def leaks(self, texts: Iterable[str]) -> np.ndarray:
        """Boolean mask: True where a text equals or contains a held-out text."""
        texts = list(texts)
        mask = np.zeros(len(texts), dtype=bool)
        if self._matcher is None or not texts:
            return mask
        if self._joinable:
            hay = self.SEP.join(texts)
            if hay.count(self.SEP) == len(texts) - 1:  # no text holds the separator
                starts = np.cumsum([0, *(len(t) + 1 for t in texts[:-1])])
                self._mark(hay, starts, mask)
                return mask
        for i, t in enumerate(texts):
            self._mark(t, np.zeros(1, dtype=np.int64), mask[i : i + 1])
        return mask

    def _mark(self, hay: str, starts: np.ndarray, mask: np.ndarray) -> None:
        assert self._matcher is not None
        found = self._matcher.find_matches_as_indexes(hay, overlapping=True)
        if not found:
            return
        matches = np.array(found, dtype=np.int64)  # (key, start, end), in characters
        rows = np.searchsorted(starts, matches[:, 1], side="right") - 1
        whole = self._whole[matches[:, 0]]
        mask[rows[whole]] = True
        rest = matches[~whole]
        for key, start, row in zip(
            rest[:, 0].tolist(), rest[:, 1].tolist(), rows[~whole].tolist(), strict=True
        ):
            if not mask[row] and any(hay.startswith(t, start) for t in self._longer[key]):
                mask[row] = True
