"""The clean stage's library: text cleaning, loading each source type, splitting, leakage."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lmops.config import CleanConfig
from lmops.data import layout, sources, text
from lmops.data import split as splits
from lmops.data.dedup import Dedup
from lmops.errors import DataError
from lmops.pipeline import clean as clean_stage


def clean_cfg(sources: list[dict], **overrides) -> CleanConfig:
    return CleanConfig.model_validate({"sources": sources, **overrides})


# ------------------------------------------------------------- clean_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # zero-width and other format characters vanish, joining what they separated
        ("Hello\u200bWorld\u200d!\ufeff", "HelloWorld!"),
        ("co\u00adoperate \u2060now\u200e", "cooperate now"),
        # control characters become spaces
        ("a\x00b\x07c\td\ne\x7ff\x85g", "a b c d e f g"),
        # NFC, also when a removed format character sat inside the pair
        ("Cafe\u0301", "Caf\u00e9"),
        ("e\u200b\u0301t\u00e9", "\u00e9t\u00e9"),
        # every Unicode space collapses to one plain space; ends are stripped
        ("  a \u00a0 b\u2009c\n\n d\u202f:\u3000 ", "a b c d :"),
        # HTML: block tags separate, inline tags do not, entities are unescaped once
        (
            "<p>Paris is the <b>capital</b> of France.</p><p>It has 2&nbsp;million &amp; more.</p>",
            "Paris is the capital of France. It has 2 million & more.",
        ),
        ("H<sub>2</sub>O<br/>is water<!-- hidden -->.", "H2O is water."),
        ("a &lt;b&gt; tag &amp;amp; AT&T;", "a <b> tag &amp; AT&T;"),
        # wiki markup
        (
            "'''Paris''' is the capital of [[France]] and of the [[Île-de-France|region]]."
            "{{cite web|url=x}}<ref name=\"a\">Source, 2020.</ref> ''Ville''<ref name=b/>",
            "Paris is the capital of France and of the region. Ville",
        ),
        ("A{{Infobox|name={{lang|fr|Paris}}}}B", "A B"),
        ("[[File:x.jpg|thumb|A [[cat]] sits]]Cats purr.[[Category:Felines]]", "Cats purr."),
        (
            "== History ==\nFounded [https://example.org in 1900] here.",
            "History Founded in 1900 here.",
        ),
        ("", ""),
        (None, ""),
        # text without markup is left alone (brackets, apostrophes, plain '=')
        ("l'eau [sic] a = b, it's", "l'eau [sic] a = b, it's"),
    ],
)
def test_clean_text(raw, expected):
    assert text.clean_text(raw) == expected


def test_clean_text_removes_lone_surrogates_so_text_can_be_written():
    assert text.clean_text("ok\ud800!") == "ok!"


@pytest.mark.parametrize(
    ("texts", "ratio", "expected"),
    [
        (["hello"], None, ""),
        ([""], None, "empty"),
        (["hi"], None, "too_short"),
        (["x" * 11], None, "too_long"),
        (["hello", ""], 3.0, "empty"),
        (["hello", "hi"], 3.0, "too_short"),
        (["abc", "abcdefghi"], 3.0, ""),
        (["abc", "abcdefghij"], 3.0, "length_ratio"),
    ],
)
def test_drop_reason(texts, ratio, expected):
    assert text.drop_reason(texts, min_chars=3, max_chars=10, max_ratio=ratio) == expected


# ------------------------------------------------------------------ loading


def test_load_text_file_keeps_lines_and_max_rows(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("First line.\n\nThird line.\nFourth.\n", encoding="utf-8")
    src = {"name": "t", "type": "text", "role": "monolingual", "lang": "en", "path": str(path)}
    cfg = clean_cfg([src])
    ds = sources.load_source(cfg.sources[0], cfg, str(tmp_path / "cache"))
    assert ds.column_names == ["text"]
    assert ds["text"] == ["First line.", "", "Third line.", "Fourth."]
    cfg = clean_cfg([{**src, "max_rows": 2}])
    assert sources.load_source(cfg.sources[0], cfg)["text"] == ["First line.", ""]


def test_load_jsonl_parallel_with_numbered_groups(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"id": 1, "en": "Good morning.", "fr": "Bonjour.", "chapter": 1},
        {"id": 2, "en": "Thank you.", "fr": "Merci.", "chapter": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = clean_cfg(
        [
            {
                "name": "p",
                "type": "json",
                "role": "parallel",
                "path": str(path),
                "group_column": "chapter",
            }
        ]
    )
    ds = sources.load_source(cfg.sources[0], cfg)
    assert ds.column_names == ["src", "tgt", "group"]
    assert ds.to_list() == [
        {"src": "Good morning.", "tgt": "Bonjour.", "group": "1"},
        {"src": "Thank you.", "tgt": "Merci.", "group": "2"},
    ]


def test_load_csv_with_custom_text_column(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text('id,body\n1,"Un texte, avec virgule."\n2,Deuxième texte.\n', encoding="utf-8")
    cfg = clean_cfg(
        [
            {
                "name": "c",
                "type": "csv",
                "role": "monolingual",
                "lang": "fr",
                "path": str(path),
                "text_column": "body",
            }
        ]
    )
    ds = sources.load_source(cfg.sources[0], cfg)
    assert ds.column_names == ["text"]
    assert ds["text"] == ["Un texte, avec virgule.", "Deuxième texte."]


def test_load_parquet_parallel_with_named_columns_and_glob(tmp_path):
    for i in range(2):
        pd.DataFrame({"english": [f"Sentence {i}."], "french": [f"Phrase {i}."]}).to_parquet(
            tmp_path / f"part-{i}.parquet"
        )
    cfg = clean_cfg(
        [
            {
                "name": "pq",
                "type": "parquet",
                "role": "parallel",
                "path": str(tmp_path / "part-*.parquet"),
                "src_column": "english",
                "tgt_column": "french",
            }
        ]
    )
    ds = sources.load_source(cfg.sources[0], cfg)
    assert ds.column_names == ["src", "tgt", "group"]
    assert ds.to_list() == [
        {"src": "Sentence 0.", "tgt": "Phrase 0.", "group": ""},
        {"src": "Sentence 1.", "tgt": "Phrase 1.", "group": ""},
    ]


def test_load_two_aligned_text_files(tmp_path):
    (tmp_path / "a.en").write_text("One.\nTwo.\nThree.\n", encoding="utf-8")
    (tmp_path / "a.fr").write_text("Un.\nDeux.\nTrois.\n", encoding="utf-8")
    cfg = clean_cfg(
        [
            {
                "name": "a",
                "type": "text",
                "role": "parallel",
                "src_path": str(tmp_path / "a.en"),
                "tgt_path": str(tmp_path / "a.fr"),
            }
        ]
    )
    ds = sources.load_source(cfg.sources[0], cfg)
    assert ds["src"] == ["One.", "Two.", "Three."]
    assert ds["tgt"] == ["Un.", "Deux.", "Trois."]


def test_load_embedded_bible_joins_versions_and_normalises_the_web():
    cfg = clean_cfg(
        [
            {
                "name": "b",
                "type": "embedded",
                "role": "parallel",
                "dataset": "bible_en_fr",
                "group_column": "book",
                "max_rows": 40,
            }
        ]
    )
    ds = sources.load_source(cfg.sources[0], cfg)
    assert ds[0] == {
        "src": "In the beginning God created the heavens and the earth.",
        "tgt": "Au commencement, Dieu créa les cieux et la terre.",
        "group": "Genesis",
    }
    assert "God's Spirit was hovering" in ds[1]["src"]  # the WEB writes God`s
    assert not any(c in t for t in ds["src"] for c in "`[]")


# -------------------------------------------------------------- filtering


def test_clean_source_counts_drops_and_dedups_pairs_on_either_side():
    cfg = clean_cfg(
        [{"name": "x", "type": "embedded", "role": "monolingual", "dataset": "wiki_en"}],
        min_chars=3,
        max_chars=40,
        max_length_ratio=3.0,
    )
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "src": [
                "Hello there.",
                "Hello there.",
                "Good night.",
                "Yes",
                "<b></b>",
                "Fine.",
                "Bye.",
            ],
            "tgt": [
                "Salut.",
                "Bonjour.",
                "Salut.",
                "Oui",
                "Vide",
                "Une phrase bien trop longue.",
                "Au revoir.",
            ],
            "group": [""] * 7,
        }
    )
    cleaned = sources.clean_rows(ds, "parallel", cfg)
    dropped: Counter[str] = Counter()
    # batches of 2: duplicates and the texts they repeat fall in different batches
    batches = sources.kept_batches(cleaned, "parallel", 2, Dedup(["src", "tgt"]), dropped)
    kept = pa.concat_tables(batches)
    assert kept.column("src").to_pylist() == ["Hello there.", "Yes", "Bye."]
    assert kept.column_names == ["src", "tgt", "group"]
    assert dropped == {"duplicate": 2, "empty": 1, "length_ratio": 1, "too_short": 0, "too_long": 0}


# -------------------------------------------------------------- splitting


def test_group_split_holds_out_whole_groups():
    groups = pd.Series(["Genesis", "Ruth", "Ruth", "Mark", "Genesis", "Jonah"])
    labels = splits.group_split(groups, ["Ruth", "Jonah"], ["Mark"])
    assert labels.tolist() == ["train", "valid", "valid", "test", "train", "valid"]


def test_check_groups_names_unknown_and_known():
    with pytest.raises(
        DataError,
        match=r"unknown group\(s\) 'Marc'.*known groups: "
        r"Genesis, Mark, Ruth",
    ):
        splits.check_groups({"Genesis", "Ruth", "Mark"}, ["Ruth"], ["Marc"])


def test_random_split_shares_and_seed():
    labels = splits.random_split(1000, 0.02, 0.03, np.random.default_rng(1))
    assert (labels == "valid").sum() == 20 and (labels == "test").sum() == 30
    again = splits.random_split(1000, 0.02, 0.03, np.random.default_rng(1))
    other = splits.random_split(1000, 0.02, 0.03, np.random.default_rng(2))
    assert labels.tolist() == again.tolist() and labels.tolist() != other.tolist()


# ---------------------------------------------------------------- leakage


def test_held_out_equal_contained_and_overlapping():
    held = splits.HeldOut(["Jesus wept.", "abcX", "bcY"], key_chars=3)
    texts = ["Jesus wept.", "And Jesus wept. Then", "Jesus wept", "abcY", "abcbcX", ""]
    assert held.leaks(texts).tolist() == [True, True, False, True, False, False]
    assert splits.HeldOut([]).leaks(["anything"]).tolist() == [False]


def test_held_out_matches_brute_force():
    rng = random.Random(0)

    def word(lo, hi):
        return "".join(rng.choice("ab ") for _ in range(rng.randint(lo, hi)))

    held = [word(2, 9) for _ in range(40)]
    texts = [word(0, 30) for _ in range(500)]
    found = splits.HeldOut(held, key_chars=4).leaks(texts)
    expected = [any(h in t for h in held if h) for t in texts]
    assert found.tolist() == expected
    assert 0 < sum(expected) < len(texts)


# --------------------------------------------------------- whole stage


def test_build_clean_on_files_removes_leaks(tmp_path):
    held_verse = "The held out verse about the sea."
    (tmp_path / "en.txt").write_text(
        "A document about apples and pears.\n"
        f"This document quotes it: {held_verse} And goes on.\n"
        "A document about apples and pears.\n"
        "Another plain document here.\n",
        encoding="utf-8",
    )
    pairs = [
        {"en": "A train sentence one.", "fr": "Une phrase d'entraînement un.", "book": "A"},
        {"en": f"Prefix. {held_verse}", "fr": "Un préfixe et la mer.", "book": "A"},
        {"en": "A train sentence two.", "fr": "Une phrase d'entraînement deux.", "book": "A"},
        {"en": held_verse, "fr": "Le verset retenu sur la mer.", "book": "B"},
        {"en": "A test sentence.", "fr": "Une phrase de test.", "book": "C"},
    ]
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8"
    )
    cfg = clean_cfg(
        [
            {
                "name": "docs",
                "type": "text",
                "role": "monolingual",
                "lang": "en",
                "path": str(tmp_path / "en.txt"),
            },
            {
                "name": "pairs",
                "type": "json",
                "role": "parallel",
                "path": str(tmp_path / "pairs.jsonl"),
                "group_column": "book",
            },
        ],
        split={
            "valid_fraction": 0,
            "test_fraction": 0,
            "valid_groups": ["B"],
            "test_groups": ["C"],
        },
        format="jsonl",
    )
    stats = clean_stage.build_clean(cfg, 1, tmp_path / "out", tmp_path / "stats.json")

    out = {
        n: layout.read_split(tmp_path / "out", n)
        for n in ("mono_train", "parallel_train", "parallel_valid", "parallel_test")
    }
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        f"{k}_{s}{part}"
        for k in ("mono", "parallel")
        for s in ("test", "train", "valid")
        for part in ("", "/part-00000.jsonl")
    ]
    assert out["parallel_train"]["src"].tolist() == [
        "A train sentence one.",
        "A train sentence two.",
    ]
    assert out["parallel_valid"]["group"].tolist() == ["B"]
    assert out["parallel_test"].to_dict("records") == [
        {"src": "A test sentence.", "tgt": "Une phrase de test.", "group": "C", "source": "pairs"}
    ]
    assert out["mono_train"].to_dict("records") == [
        {"text": "A document about apples and pears.", "lang": "en", "source": "docs"},
        {"text": "Another plain document here.", "lang": "en", "source": "docs"},
        {"text": "A train sentence one.", "lang": "en", "source": "pairs"},
        {"text": "A train sentence two.", "lang": "en", "source": "pairs"},
        {"text": "Une phrase d'entraînement un.", "lang": "fr", "source": "pairs"},
        {"text": "Une phrase d'entraînement deux.", "lang": "fr", "source": "pairs"},
    ]
    assert stats == json.loads((tmp_path / "stats.json").read_text())
    assert stats["leaked.parallel_train"] == 1
    assert stats["leaked.mono_train"] == 1
    assert stats["leaked.total"] == 2
    assert stats["source.docs.dropped.duplicate"] == 1
    assert stats["source.docs.kept"] == 3
    assert stats["mono_train.rows"] == 6 and stats["mono_train.rows_fr"] == 2
    assert stats["parallel_train.chars"] == sum(
        len(t) for t in (*out["parallel_train"]["src"], *out["parallel_train"]["tgt"])
    )
    assert all(isinstance(v, int) for v in stats.values())


def test_real_corpora_slice_has_no_held_out_text_in_training(tmp_path):
    """A slice of the embedded corpora, as the default pipeline loads them. Dedup is
    off so that verses repeated across books ("Yahweh spoke to Moses, saying,")
    reach the leak check instead of being dropped earlier as duplicates."""
    cfg = clean_cfg(
        [
            {
                "name": "wiki_en",
                "type": "embedded",
                "role": "monolingual",
                "dataset": "wiki_en",
                "max_rows": 2000,
            },
            {
                "name": "wiki_fr",
                "type": "embedded",
                "role": "monolingual",
                "dataset": "wiki_fr",
                "max_rows": 2000,
            },
            # the first 3000 verses: Genesis, Exodus and the start of Leviticus
            {
                "name": "bible",
                "type": "embedded",
                "role": "parallel",
                "dataset": "bible_en_fr",
                "group_column": "book",
                "max_rows": 3000,
            },
        ],
        split={"valid_groups": ["Genesis"], "test_groups": ["Leviticus"]},
        dedup=False,
    )
    stats = clean_stage.build_clean(cfg, 1337, tmp_path / "out", tmp_path / "stats.json")
    out = {
        f"{k}_{s}": layout.read_split(tmp_path / "out", f"{k}_{s}")
        for k in ("mono", "parallel")
        for s in layout.SPLITS
    }

    assert set(out["parallel_train"]["group"]) == {"Exodus"}
    assert set(out["parallel_valid"]["group"]) == {"Genesis"}
    assert set(out["parallel_test"]["group"]) == {"Leviticus"}
    assert stats["source.bible.loaded"] == 3000
    assert stats["leaked.parallel_train"] == 12  # Exodus pairs repeating a Leviticus verse
    assert stats["parallel_train.rows"] == 1213 - 12 - stats["source.bible.dropped.length_ratio"]
    for lang, name in (("en", "wiki_en"), ("fr", "wiki_fr")):
        kept = stats[f"source.{name}.kept"]
        assert stats[f"source.{name}.loaded"] == 2000
        assert stats[f"mono_valid.rows_{lang}"] == round(kept * 0.02)
        assert stats[f"mono_test.rows_{lang}"] == round(kept * 0.02)
    # mono_train = wiki train + both sides of every parallel train pair
    wiki_train = (
        sum(stats[f"source.{n}.kept"] for n in ("wiki_en", "wiki_fr"))
        - stats["mono_valid.rows"]
        - stats["mono_test.rows"]
    )
    assert stats["mono_train.rows"] == wiki_train + 2 * stats["parallel_train.rows"]

    held = {
        t
        for s in ("valid", "test")
        for t in (
            *out[f"parallel_{s}"]["src"],
            *out[f"parallel_{s}"]["tgt"],
            *out[f"mono_{s}"]["text"],
        )
    }
    assert len(held) > 3000
    # Brute force, independent of HeldOut: cleaned texts hold no newline, so one
    # joined string finds every occurrence of a held-out text in any training row.
    texts = [
        *out["mono_train"]["text"],
        *out["parallel_train"]["src"],
        *out["parallel_train"]["tgt"],
    ]
    joined = "\n".join(texts)
    assert joined.count("\n") == len(texts) - 1
    leaked = [h for h in held if h in joined]
    assert leaked == [], f"{len(leaked)} held-out texts are in the training data: {leaked[:3]}"
