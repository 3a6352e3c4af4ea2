"""Seeded samples of a split's rows without holding the split (or a permutation of it) in
memory: what the whole-corpus steps (the vocabulary, whole-split checks) read."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lmops.data import layout
from lmops.errors import DataError


def permutation_head(n: int, k: int, rng: np.random.Generator, work_dir: str | Path) -> np.ndarray:
    """``rng.permutation(n)[:k]``, the same draw, made by ``Generator.shuffle`` of
    ``arange(n)`` in a memory-mapped file under ``work_dir``: only ``k`` indices stay in
    memory however large ``n`` is."""
    k = min(k, n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    path = Path(tempfile.mkstemp(prefix="permutation-", suffix=".npy", dir=work_dir)[1])
    try:
        order = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n,))
        step = 1 << 20
        for start in range(0, n, step):
            order[start : start + step] = np.arange(start, min(n, start + step))
        # as a plain ndarray: Generator.shuffle swaps a memmap (a subclass) element by
        # element in Python, 100x slower; the draws, and so the order, are the same
        rng.shuffle(order.view(np.ndarray))
        head = np.array(order[:k])
        del order
    finally:
        path.unlink()
    return head


def sample_rows(
    data_dir: str | Path,
    name: str,
    k: int,
    seed: int,
    columns: Sequence[str],
    batch_rows: int = layout.READ_ROWS,
) -> tuple[pd.DataFrame, int]:
    """Up to ``k`` rows (``columns`` only) of split ``name`` drawn at random (seeded), in
    the order drawn, and the split's row count; all of them, in order, when it has ``k`` or
    fewer. The split is read batch by batch, so only the sample is held."""
    n = layout.split_rows(data_dir, name)
    if n <= k:
        frames = [df for _, _, df in layout.iter_split(data_dir, name, batch_rows, columns)]
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], n
    with tempfile.TemporaryDirectory(prefix="lmops-sample-") as tmp:
        rows = permutation_head(n, k, np.random.default_rng(seed), tmp)
    by_row = np.argsort(rows, kind="stable")
    wanted = rows[by_row]
    picked = []
    for _, start, df in layout.iter_split(data_dir, name, batch_rows, columns):
        lo, hi = np.searchsorted(wanted, [start, start + len(df)])
        picked.append(df.iloc[wanted[lo:hi] - start])
    sample = pd.concat(picked, ignore_index=True)
    # back from row order to the order drawn
    order = np.empty(len(by_row), dtype=np.int64)
    order[by_row] = np.arange(len(by_row))
    return sample.iloc[order].reset_index(drop=True), n


def sample_texts(
    data_dir: str | Path,
    name: str,
    k: int,
    seed: int,
    column: str = "text",
    batch_rows: int = layout.READ_ROWS,
) -> tuple[list[str], int]:
    """Up to ``k`` texts of split ``name`` drawn at random (seeded), in the order drawn,
    and the split's row count (:func:`sample_rows`). A missing column or text is a
    DataError naming the split and the row."""
    where = layout.split_path(data_dir, name)
    for _, start, df in layout.iter_split(data_dir, name, batch_rows, [column]):
        if column not in df.columns:
            raise DataError(f"{where}: no '{column}' column (columns: {list(df.columns)})")
        missing = df[column].isna().to_numpy()
        if missing.any():
            raise DataError(f"{where}: row {start + int(missing.argmax())}: {column} is missing")
    sample, n = sample_rows(data_dir, name, k, seed, [column], batch_rows)
    return sample[column].tolist(), n
