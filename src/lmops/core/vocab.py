"""The :class:`Tokenizer` every model stage uses, read from the ``vocab`` stage's output.

The output directory describes itself, so later stages read it instead of re-declaring
anything::

    spm.model   the SentencePiece model
    spm.vocab   its pieces and scores (for people)
    meta.json   vocab_size, pad/unk/bos/eos/sep ids, lang_ids, languages, ...

Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then one language tag per
language (``<2en>``, ``<2fr>``) and the separator ``<sep>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from lmops.errors import LmopsError
from lmops.io import read_json

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SEP = "<sep>"
MODEL_FILE = "spm.model"
VOCAB_FILE = "spm.vocab"
META_FILE = "meta.json"


def lang_tag(lang: str) -> str:
    """The piece that asks for text in ``lang``: ``<2fr>``."""
    return f"<2{lang}>"


class Tokenizer:
    """A SentencePiece processor plus the vocab stage's ``meta.json``."""

    def __init__(self, sp: spm.SentencePieceProcessor, meta: dict[str, Any]):
        self.sp = sp
        self.meta = meta
        self._specials = frozenset(
            [self.pad_id, self.bos_id, self.eos_id, self.sep_id, *self.meta["lang_ids"].values()]
        )

    @classmethod
    def load(cls, vocab_dir: str | Path) -> Tokenizer:
        vocab_dir = Path(vocab_dir)
        for name in (META_FILE, MODEL_FILE):
            if not (vocab_dir / name).is_file():
                raise LmopsError(f"{vocab_dir / name}: not found (run the vocab stage first)")
        meta = read_json(vocab_dir / META_FILE)
        sp = spm.SentencePieceProcessor(model_file=str(vocab_dir / MODEL_FILE))
        if sp.get_piece_size() != meta.get("vocab_size"):
            raise LmopsError(
                f"{vocab_dir / META_FILE}: vocab_size {meta.get('vocab_size')} does not match "
                f"{MODEL_FILE} ({sp.get_piece_size()} pieces); rerun the vocab stage"
            )
        return cls(sp, meta)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def unk_id(self) -> int:
        return int(self.meta["unk_id"])

    @property
    def bos_id(self) -> int:
        return int(self.meta["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def sep_id(self) -> int:
        return int(self.meta["sep_id"])

    @property
    def languages(self) -> list[str]:
        return list(self.meta["languages"])

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids :meth:`decode` drops: pad, bos, eos, sep and the language tags (not unk)."""
        return self._specials

    def lang_id(self, lang: str) -> int:
        try:
            return int(self.meta["lang_ids"][lang])
        except KeyError:
            raise LmopsError(
                f"language {lang!r} has no tag in this vocabulary (languages: {self.languages})"
            ) from None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Plain piece ids, without tags, bos or eos."""
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence; special ids are dropped, unk shows as ``⁇``."""
        keep = [[int(i) for i in seq if int(i) not in self._specials] for seq in ids]
        return self.sp.decode(keep) if keep else []  # sentencepiece returns "" for []
