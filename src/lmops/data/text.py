"""Text cleaning and the checks a raw text file must pass before it is read."""

from __future__ import annotations

import functools
import html
import re
import sys
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from lmops.errors import DataError

DROP_REASONS = ("empty", "too_short", "too_long", "length_ratio", "duplicate")


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
    cls = "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)
    return re.compile(rf"[{cls}\ud800-\udfff]")


def strip_markup(text: str) -> str:
    """Remove HTML tags, comments, ``<ref>`` notes and wiki markup; unescape HTML entities.
    Each pattern runs only on a text holding the character it starts with: most lines of a
    corpus hold no markup at all, and a substring test is far cheaper than a regex scan."""
    if "<" in text:
        text = _REF.sub("", text)
        text = _COMMENT.sub("", text)
        text = _BLOCK_TAG.sub(" ", text)
        text = _TAG.sub("", text)
    previous = None
    while previous != text and ("{{" in text or "[[" in text):
        previous = text  # templates and links nest: peel the innermost each round
        text = _TEMPLATE.sub(" ", text)
        text = _WIKI_FILE.sub(" ", text)
        text = _WIKI_LINK.sub(r"\1", text)
    if "[" in text:
        text = _EXT_LINK.sub(r"\1", text)
    if "==" in text:
        text = _HEADING.sub(r"\2", text)
    if "''" in text:
        text = _EMPHASIS.sub("", text)
    return html.unescape(text) if "&" in text else text


def clean_text(text: str | None) -> str:
    """One text, cleaned: markup stripped, control and zero-width characters gone,
    whitespace collapsed to single spaces, Unicode NFC."""
    if text is None:
        return ""
    text = strip_markup(str(text))
    text = _CONTROL.sub(" ", text)
    if text.isascii():  # no format character, and already NFC
        return " ".join(text.split())
    text = _invisible().sub("", text)
    text = " ".join(text.split())  # str.split() knows every Unicode space
    # Last, because removing a format character can leave a composable pair behind.
    return unicodedata.normalize("NFC", text)


def drop_reason(
    texts: Iterable[str], min_chars: int, max_chars: int, max_ratio: float | None = None
) -> str:
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


def clean_batch(
    batch: dict[str, list],
    columns: list[str],
    min_chars: int,
    max_chars: int,
    max_ratio: float | None,
) -> dict[str, list]:
    out = {c: [clean_text(t) for t in batch[c]] for c in columns}
    out["drop"] = [
        drop_reason(row, min_chars, max_chars, max_ratio)
        for row in zip(*(out[c] for c in columns), strict=True)
    ]
    return out


# -------------------------------------------------------- checking files


_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32LE"),
    (b"\x00\x00\xfe\xff", "UTF-32BE"),
    (b"\xff\xfe", "UTF-16LE"),
    (b"\xfe\xff", "UTF-16BE"),
)


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
            raise DataError(
                f"{path}: encoded as {wide}, expected UTF-8; re-encode the file: "
                f"iconv -f {wide} -t UTF-8"
            )
        if b"\0" in head:
            raise DataError(
                f"{path}: binary file (NUL byte at byte offset {head.index(0)}); "
                "expected UTF-8 text"
            )
        fh.seek(0)
        offset, has_text, lineno = 0, False, 0
        while line := fh.readline(max_line_bytes + 2 if max_line_bytes else -1):  # + CRLF
            lineno += 1
            if max_line_bytes and len(line.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(
                    f"{path}: line {lineno} is over {max_line_bytes} bytes "
                    "(clean.max_line_bytes): a text source holds one text per line; split "
                    "the file into lines, or raise clean.max_line_bytes"
                )
            if b"\0" in line:
                raise DataError(
                    f"{path}: line {lineno}: binary data (NUL byte at byte offset "
                    f"{offset + line.index(0)}); expected UTF-8 text"
                )
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


def check_binary_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
