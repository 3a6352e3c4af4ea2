"""Train/valid/test splits, by whole groups or at random, and the leak check that keeps
every held-out text out of the training text."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmops.config import CleanConfig, SourceConfig
from lmops.data.layout import MONO_COLUMNS
from lmops.errors import DataError

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


def split_labels(src: SourceConfig, rows: pd.DataFrame, cfg: CleanConfig, seed: int) -> np.ndarray:
    """train/valid/test for each cleaned row of one source: the source's own (``split``,
    ``split_column``), or as ``clean.split`` says."""
    if src.split:
        return np.full(len(rows), src.split, dtype=object)
    if src.split_column:  # already train/valid/test: load_source read them (source_splits)
        return rows["split"].to_numpy(dtype=object)
    split = cfg.split
    if src.role == "parallel" and src.group_column:
        return group_split(rows["group"], split.valid_groups, split.test_groups)
    # One random stream per source: adding a source does not reshuffle the others.
    rng = np.random.default_rng([seed, zlib.crc32(src.name.encode())])
    if src.role == "parallel":
        return random_split(
            len(rows), split.parallel_valid_fraction, split.parallel_test_fraction, rng
        )
    return random_split(len(rows), split.valid_fraction, split.test_fraction, rng)


# ------------------------------------------------------------------ leakage


def _trie_regex(strings: set[str]) -> str:
    """A regex matching any of ``strings``, shaped as a trie: at each position the
    engine follows one branch instead of trying every string in turn (a flat
    alternation of ~2k sentences is ~50x slower)."""
    trie: dict[str, Any] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = None

    def render(node: dict[str, Any]) -> str:
        branches = []
        for ch, child in node.items():
            if ch == "":
                continue
            chain = [ch]
            # Follow single-child chains iteratively: recursion only at branch points.
            while len(child) == 1 and "" not in child:
                ((ch, child),) = child.items()
                chain.append(ch)
            branches.append(re.escape("".join(chain)) + render(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return render(trie)


class HeldOut:
    """Held-out texts; finds training texts that equal or contain any of them.

    One regex over the first ``key_chars`` characters of every held-out text
    finds the few places where one may start; only those are compared in full.
    Keys keep the regex small however long the held-out documents are.
    """

    def __init__(self, texts: Iterable[str], key_chars: int = 64):
        self.texts = {t for t in texts if t}
        self._by_key: dict[str, list[str]] = {}
        for t in self.texts:
            self._by_key.setdefault(t[:key_chars], []).append(t)
        self._key_lengths = sorted({len(k) for k in self._by_key})
        self._search = re.compile(_trie_regex(set(self._by_key))).search if self.texts else None

    def contains_any(self, text: str) -> bool:
        """Whether ``text`` equals or contains a held-out text."""
        if self._search is None:
            return False
        match = self._search(text)
        while match is not None:
            # The trie matched the longest key starting here; every other key that
            # starts here is a prefix of it.
            start, longest = match.start(), match.group()
            for n in self._key_lengths:
                if n > len(longest):
                    break
                if any(text.startswith(h, start) for h in self._by_key.get(longest[:n], ())):
                    return True
            match = self._search(text, start + 1)  # occurrences may overlap
        return False

    def leaks(self, texts: Iterable[str], desc: str = "leak check") -> np.ndarray:
        """Boolean mask: True where a text equals or contains a held-out text."""
        texts = list(texts)
        return np.fromiter(
            (self.contains_any(t) for t in tqdm(texts, desc=desc, unit="row")),
            dtype=bool,
            count=len(texts),
        )


# ---------------------------------------------------------------- the stage


def empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in columns})


def concat_rows(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty_frame(columns)
    return pd.concat(frames, ignore_index=True)[list(columns)]


def remove_leaks(out: dict[str, pd.DataFrame], cfg: CleanConfig) -> dict[str, int]:
    """Build ``mono_train`` (mono train text + both sides of the train pairs) and remove
    from it, and from ``parallel_train``, every row that equals or contains a held-out
    text: a valid/test sentence in either language, or a valid/test monolingual text.
    Changes ``out`` in place; returns the counts removed."""
    held = HeldOut(
        t
        for s in ("valid", "test")
        for t in (
            *out[f"parallel_{s}"]["src"],
            *out[f"parallel_{s}"]["tgt"],
            *out[f"mono_{s}"]["text"],
        )
    )
    train = out["parallel_train"]
    leaked = held.leaks(train["src"], "leak check: parallel src") | held.leaks(
        train["tgt"], "leak check: parallel tgt"
    )
    out["parallel_train"] = train[~leaked].reset_index(drop=True)
    stats = {"leaked.parallel_train": int(leaked.sum())}

    pairs = out["parallel_train"]
    sides = [
        pd.DataFrame({"text": pairs[col], "lang": lang, "source": pairs["source"]})
        for col, lang in (("src", cfg.source_lang), ("tgt", cfg.target_lang))
    ]
    mono_train = concat_rows([out["mono_train"], *sides], MONO_COLUMNS)
    leaked = held.leaks(mono_train["text"], "leak check: mono_train")
    mono_train = mono_train[~leaked]
    stats["leaked.mono_train"] = int(leaked.sum())
    stats["leaked.total"] = stats["leaked.parallel_train"] + stats["leaked.mono_train"]
    # A wiki text may equal a verse, or a verse read the same in both languages.
    dup = mono_train["text"].duplicated() if cfg.dedup else np.zeros(len(mono_train), bool)
    stats["mono_train.duplicates_removed"] = int(dup.sum())
    mono_train = mono_train[~dup]
    out["mono_train"] = mono_train.reset_index(drop=True)
    return stats
