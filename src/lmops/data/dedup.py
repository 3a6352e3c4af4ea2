"""Exact de-duplication at corpus scale: an 8-byte hash of each text, in a compact set.

A Python set of the texts themselves costs about 100 bytes a text plus the text; here a
text costs 8 bytes, in sorted numpy runs (memory-mapped files once they are large). Two
different texts share a 64-bit hash with probability about n^2 / 2^65 over n texts
(1 in 3,700 for 100 million texts): at worst one text dropped as a duplicate.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def text_hashes(texts: Sequence[str] | np.ndarray) -> np.ndarray:
    """A 64-bit hash of each text: SipHash with a fixed key over its UTF-8 bytes, so the
    same in every process and every run."""
    values = np.asarray(texts, dtype=object)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(values, categorize=False)


class HashSet:
    """A set of uint64 hashes: sorted runs, merged whenever a run is no longer at least
    twice the size of the next (so a few dozen runs at most, and each hash is copied
    O(log n) times). Runs of ``spill_entries`` or more hashes are written under
    ``spill_dir`` and memory-mapped, so the page cache, not the process, holds them."""

    def __init__(self, spill_dir: str | Path | None = None, spill_entries: int = 1 << 22):
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.spill_entries = spill_entries
        self._runs: list[np.ndarray] = []
        self._files: list[Path | None] = []
        self._names = itertools.count()

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Whether each hash is in the set (a boolean array)."""
        found = np.zeros(len(hashes), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, hashes)
            inside = at < len(run)
            found[inside] |= run[at[inside]] == hashes[inside]
        return found

    def add(self, hashes: np.ndarray) -> None:
        """Add hashes (repeats and hashes already in the set are fine)."""
        run = np.unique(np.asarray(hashes, dtype=np.uint64))
        run = run[~self.contains(run)]  # each hash is kept once
        if not len(run):
            return
        file: Path | None = None
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.union1d(self._runs.pop(), run)
            old = self._files.pop()
            if old is not None:
                old.unlink()
        if self.spill_dir is not None and len(run) >= self.spill_entries:
            file = self.spill_dir / f"hashes-{id(self)}-{next(self._names)}.npy"
            np.save(file, run)
            run = np.load(file, mmap_mode="r")
        self._runs.append(run)
        self._files.append(file)


class Dedup:
    """Which rows repeat a text seen before, batch after batch, first come first kept.

    A row is one text, or a pair's two texts (one column each): it is a duplicate when any
    of its texts was seen before in the same column, in an earlier batch or earlier in this
    one. Only the rows kept mark their texts seen, exactly as a row-by-row loop over a set
    of the texts would."""

    def __init__(self, columns: Sequence[str], spill_dir: str | Path | None = None):
        self.columns = list(columns)
        self.seen = {c: HashSet(spill_dir) for c in self.columns}

    def duplicates(self, texts: dict[str, Sequence[str]], candidates: np.ndarray) -> np.ndarray:
        """A boolean mask over the batch: True for the duplicates among the ``candidates``
        (rows not already dropped for another reason); marks the others' texts seen."""
        hashes = [text_hashes(texts[c]) for c in self.columns]
        if len(self.columns) == 1:  # one text a row: the first of each new text is kept
            return self._duplicates_one(self.seen[self.columns[0]], hashes[0], candidates)
        before = [
            self.seen[c].contains(h).tolist() for c, h in zip(self.columns, hashes, strict=True)
        ]
        values = [h.tolist() for h in hashes]
        fresh: list[set[int]] = [set() for _ in self.columns]
        dup = np.zeros(len(candidates), dtype=bool)
        for i in np.flatnonzero(candidates).tolist():
            if any(b[i] or v[i] in f for b, v, f in zip(before, values, fresh, strict=True)):
                dup[i] = True
            else:
                for v, f in zip(values, fresh, strict=True):
                    f.add(v[i])
        for c, f in zip(self.columns, fresh, strict=True):
            self.seen[c].add(np.fromiter(f, dtype=np.uint64, count=len(f)))
        return dup

    @staticmethod
    def _duplicates_one(seen: HashSet, hashes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """:meth:`duplicates` for one column, vectorised: a candidate is kept when its text
        was not seen before and no earlier candidate holds it."""
        rows = np.flatnonzero(candidates)
        dup = np.zeros(len(candidates), dtype=bool)
        if not len(rows):
            return dup
        values = hashes[rows]
        _, first = np.unique(values, return_index=True)  # the first row of each text
        is_first = np.zeros(len(rows), dtype=bool)
        is_first[first] = True
        fresh = ~seen.contains(values) & is_first
        dup[rows[~fresh]] = True
        seen.add(values[fresh])
        return dup
