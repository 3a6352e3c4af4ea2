"""Seeded samples of a split's rows without holding the split (or a permutation of it) in
memory: what the whole-corpus steps (the vocabulary, whole-split checks) read."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

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
        rng.shuffle(order)
        head = np.array(order[:k])
        del order
    finally:
        path.unlink()
    return head


def sample_texts(
    data_dir: str | Path,
    name: str,
    k: int,
    seed: int,
    column: str = "text",
    batch_rows: int = layout.READ_ROWS,
) -> tuple[list[str], int]:
    """Up to ``k`` texts of split ``name`` drawn at random (seeded), in the order drawn,
    and the split's row count; all of them, in order, when it has ``k`` or fewer. The split
    is read batch by batch; a missing column or text is a DataError naming the split and
    the row."""
    n = layout.split_rows(data_dir, name)
    where = layout.split_path(data_dir, name)
    if n <= k:
        rows = None
    else:
        with tempfile.TemporaryDirectory(prefix="lmops-sample-") as tmp:
            rows = permutation_head(n, k, np.random.default_rng(seed), tmp)
        by_row = np.argsort(rows, kind="stable")
        wanted = rows[by_row]
    texts: list[str | None] = [None] * min(n, k)
    for _, start, df in layout.iter_split(data_dir, name, batch_rows, columns=[column]):
        if column not in df.columns:
            raise DataError(f"{where}: no '{column}' column (columns: {list(df.columns)})")
        values = df[column]
        missing = values.isna().to_numpy()
        if missing.any():
            raise DataError(f"{where}: row {start + int(missing.argmax())}: {column} is missing")
        if rows is None:
            texts[start : start + len(values)] = values.tolist()
            continue
        lo, hi = np.searchsorted(wanted, [start, start + len(values)])
        picked = values.to_numpy(dtype=object)[wanted[lo:hi] - start]
        for slot, text in zip(by_row[lo:hi].tolist(), picked.tolist(), strict=True):
            texts[slot] = text
    return [t for t in texts if t is not None], n
