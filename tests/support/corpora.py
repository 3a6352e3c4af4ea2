"""Small seeded corpora in every source type, and a fingerprint of the clean stage's output.

The corpora are built to exercise every rule of the clean stage at once: duplicates within a
source, across sources and on either side of a pair; held-out texts that recur in training
rows, whole or inside a longer text; a corpus's own split column and split-named files
listed after the training ones; group and random splits; rows dropped for every reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from lmops.data import layout

EN = [
    "the",
    "a",
    "river",
    "sea",
    "king",
    "stone",
    "bread",
    "light",
    "house",
    "road",
    "old",
    "new",
    "small",
    "great",
]
FR = [
    "le",
    "la",
    "fleuve",
    "mer",
    "roi",
    "pierre",
    "pain",
    "lumiere",
    "maison",
    "route",
    "vieux",
    "neuf",
    "petit",
    "grand",
]


def _sentence(rng: random.Random, n: int) -> tuple[str, str]:
    idx = [rng.randrange(len(EN)) for _ in range(n)]
    en = " ".join(EN[i] for i in idx).capitalize() + "."
    fr = " ".join(FR[i] for i in idx).capitalize() + "."
    return en, fr


def _doc(rng: random.Random, lang: int) -> str | None:
    roll = rng.random()
    if roll < 0.01:
        return None
    if roll < 0.02:
        return "<b></b>"
    if roll < 0.03:
        return "x " * 300  # too long
    parts = [_sentence(rng, rng.randint(1, 5))[lang] for _ in range(rng.randint(1, 4))]
    return " ".join(parts)


def _pair(rng: random.Random) -> tuple[str, str]:
    en, fr = _sentence(rng, rng.randint(1, 6))
    roll = rng.random()
    if roll < 0.03:
        fr = fr + " " + " ".join(rng.choice(FR) for _ in range(30))  # length ratio
    elif roll < 0.08:
        fr = _sentence(rng, rng.randint(1, 3))[1]  # a target shared with other sources
    return en, fr


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)


def mixed_corpora(root: Path, seed: int = 7) -> dict[str, Any]:
    """Write the corpora under ``root``; return the ``clean`` params that read them."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs_en = [_doc(rng, 0) or "" for _ in range(1500)]
    (root / "docs_en.txt").write_text("\n".join(docs_en) + "\n", encoding="utf-8")
    _jsonl(root / "docs_fr_valid.jsonl", [{"body": _doc(rng, 1)} for _ in range(50)])
    _csv(root / "docs_fr.csv", ["id", "body"], [[i, _doc(rng, 1)] for i in range(800)])
    books = "ABCDEF"
    _jsonl(
        root / "grouped.jsonl",
        [
            {"en": en, "fr": fr, "book": rng.choice(books)}
            for en, fr in (_pair(rng) for _ in range(1500))
        ],
    )
    _csv(root / "random.csv", ["en", "fr"], [list(_pair(rng)) for _ in range(1000)])
    parts = ["train"] * 8 + ["dev", "test", "Validation"]
    _jsonl(
        root / "own.jsonl",
        [
            {"en": en, "fr": fr, "part": rng.choice(parts)}
            for en, fr in (_pair(rng) for _ in range(600))
        ],
    )
    text_pairs = [_pair(rng) for _ in range(500)]
    (root / "text.en").write_text("".join(en + "\n" for en, _ in text_pairs), encoding="utf-8")
    (root / "text.fr").write_text("".join(fr + "\n" for _, fr in text_pairs), encoding="utf-8")
    _jsonl(
        root / "test.jsonl", [dict(zip(("en", "fr"), _pair(rng), strict=True)) for _ in range(40)]
    )

    def path(name: str) -> str:
        return str(root / name)

    mono = {"role": "monolingual"}
    pairs = {"role": "parallel"}
    return {
        "sources": [
            {"name": "docs_en", "type": "text", **mono, "lang": "en", "path": path("docs_en.txt")},
            {
                "name": "docs_fr_valid",
                "type": "json",
                **mono,
                "lang": "fr",
                "path": path("docs_fr_valid.jsonl"),
                "text_column": "body",
                "split": "valid",
            },
            {
                "name": "docs_fr",
                "type": "csv",
                **mono,
                "lang": "fr",
                "path": path("docs_fr.csv"),
                "text_column": "body",
            },
            {
                "name": "grouped",
                "type": "json",
                **pairs,
                "path": path("grouped.jsonl"),
                "group_column": "book",
            },
            {"name": "random", "type": "csv", **pairs, "path": path("random.csv")},
            {
                "name": "own",
                "type": "json",
                **pairs,
                "path": path("own.jsonl"),
                "split_column": "part",
            },
            {
                "name": "text",
                "type": "text",
                **pairs,
                "src_path": path("text.en"),
                "tgt_path": path("text.fr"),
                "split": "train",
            },
            {"name": "test", "type": "json", **pairs, "path": path("test.jsonl"), "split": "test"},
        ],
        "split": {
            "valid_fraction": 0.05,
            "test_fraction": 0.05,
            "parallel_valid_fraction": 0.05,
            "parallel_test_fraction": 0.05,
            "valid_groups": ["B"],
            "test_groups": ["E"],
        },
        "min_chars": 3,
        "max_chars": 400,
    }


def fingerprint(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows, columns and a sha256 of each split's rows in order (one JSON list a row)."""
    out = {}
    for kind in ("mono", "parallel"):
        for split in layout.SPLITS:
            name = f"{kind}_{split}"
            df = layout.read_split(data_dir, name)
            h = hashlib.sha256()
            for row in df.itertuples(index=False):
                h.update(json.dumps(list(row), ensure_ascii=False).encode() + b"\n")
            out[name] = {"rows": len(df), "columns": list(df.columns), "sha256": h.hexdigest()}
    return out
