"""The clean stage streams: its output is the in-memory stage's, row for row, whatever the
batch and shard sizes; duplicates and leaks are found across batches, sources and shards.

``clean_fingerprints.json`` was recorded from the in-memory clean stage (commit 78c6f1d,
before this one streamed) with ``tests.support.corpora.fingerprint``: a sha256 of each
split's rows in order, and the stage's stats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmops.config import CleanConfig, load_params
from lmops.data import layout
from lmops.errors import DataError
from lmops.pipeline.clean import build_clean
from tests.conftest import REPO
from tests.support.corpora import fingerprint, mixed_corpora

RECORDED = json.loads((Path(__file__).with_name("clean_fingerprints.json")).read_text())
# batches and shards far smaller than the corpus: hundreds of each
TINY = {"batch_rows": 7, "shard_rows": 13}


def assert_recorded(name: str, stats: dict[str, int], out: Path) -> None:
    want = RECORDED[name]
    assert fingerprint(out) == want["splits"]
    assert {k: stats[k] for k in want["stats"]} == want["stats"]


@pytest.mark.parametrize(
    "sizes", [{}, {"batch_rows": 2500, "shard_rows": 20_000}], ids=["defaults", "small-batches"]
)
def test_default_corpora_give_the_recorded_rows_in_order(tmp_path, sizes):
    params = load_params(REPO / "params.yaml")
    cfg = CleanConfig.model_validate({**params.clean.model_dump(), **sizes})
    stats = build_clean(cfg, params.seed, tmp_path / "clean", tmp_path / "clean.json")
    assert_recorded("defaults", stats, tmp_path / "clean")
    shards = len(layout.split_files(tmp_path / "clean", "mono_train"))
    assert shards == (1 if not sizes else 4)  # 78,683 rows
    assert layout.split_rows(tmp_path / "clean", "mono_train") == stats["mono_train.rows"]


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize(
    "sizes",
    [{}, TINY, {**TINY, "format": "jsonl", "num_proc": 1}],
    ids=["one-batch", "tiny-batches", "tiny-jsonl"],
)
def test_every_source_type_gives_the_recorded_rows_in_order(tmp_path, dedup, sizes):
    cfg = CleanConfig.model_validate({**mixed_corpora(tmp_path / "in"), "dedup": dedup, **sizes})
    stats = build_clean(cfg, 3, tmp_path / "clean", tmp_path / "clean.json")
    assert_recorded(f"mixed dedup={dedup}", stats, tmp_path / "clean")
    assert stats == json.loads((tmp_path / "clean.json").read_text())
    if sizes:
        mono_train = layout.split_files(tmp_path / "clean", "mono_train")
        assert len(mono_train) == -(-stats["mono_train.rows"] // 13)
        assert {p.suffix for p in mono_train} == {f".{sizes.get('format', 'parquet')}"}


# ------------------------------------------------------------ small, readable cases


def _lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _text(name: str, path: str, **kw: object) -> dict:
    return {"name": name, "type": "text", "role": "monolingual", "lang": "en", "path": path, **kw}


def _run(tmp_path: Path, sources: list[dict], **overrides: object) -> dict[str, int]:
    cfg = CleanConfig.model_validate(
        {
            "sources": sources,
            "split": {"valid_fraction": 0, "test_fraction": 0},
            "batch_rows": 2,
            "shard_rows": 3,
            **overrides,
        }
    )
    return build_clean(cfg, 1, tmp_path / "clean", tmp_path / "clean.json")


def _texts(tmp_path: Path, name: str) -> list[str]:
    return layout.read_split(tmp_path / "clean", name)["text"].tolist()


DOCS = [f"Document {i} talks about subject number {i}." for i in range(10)]


def test_duplicates_in_other_batches_and_sources_are_removed_and_held_out_copies_win(tmp_path):
    first = _lines(tmp_path / "a.txt", [DOCS[0], DOCS[1], DOCS[2], DOCS[3], DOCS[0], DOCS[4]])
    # a second source repeats texts of the first, several batches later
    second = _lines(tmp_path / "b.txt", [DOCS[5], DOCS[2], DOCS[6], DOCS[4], DOCS[5]])
    # a test file listed last still keeps its copy: the training copies are the duplicates
    held = _lines(tmp_path / "test.txt", [DOCS[6], DOCS[3]])
    stats = _run(
        tmp_path,
        [_text("a", first), _text("b", second), _text("t", held, split="test")],
    )
    assert _texts(tmp_path, "mono_test") == [DOCS[6], DOCS[3]]
    assert _texts(tmp_path, "mono_train") == [DOCS[0], DOCS[1], DOCS[2], DOCS[4], DOCS[5]]
    assert stats["source.a.dropped.duplicate"] == 2  # DOCS[0] again, DOCS[3] (held out)
    assert stats["source.b.dropped.duplicate"] == 4  # DOCS[2], [6] (held out), [4], [5]
    assert stats["source.t.dropped.duplicate"] == 0
    assert stats["leaked.total"] == 0  # removed as duplicates before the leak check


def test_a_held_out_text_inside_a_training_row_of_a_later_shard_is_removed(tmp_path):
    verse = "The held out verse about the sea."
    train = [*DOCS[:8], f"This one quotes it: {verse} And goes on.", DOCS[8]]
    pairs = [
        {"en": f"Pair {i} in English.", "fr": f"Paire {i} en francais.", "book": "A"}
        for i in range(7)
    ]
    pairs.insert(6, {"en": f"Yes. {verse}", "fr": "Oui, le verset sur la mer.", "book": "A"})
    pairs.append({"en": verse, "fr": "Le verset retenu sur la mer.", "book": "B"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    pair_source = {
        "name": "p",
        "type": "json",
        "role": "parallel",
        "path": str(tmp_path / "pairs.jsonl"),
        "group_column": "book",
    }
    stats = _run(
        tmp_path,
        [_text("docs", _lines(tmp_path / "a.txt", train)), pair_source],
        split={"valid_fraction": 0, "test_fraction": 0, "valid_groups": ["B"], "test_groups": []},
    )
    clean = tmp_path / "clean"
    # with 3 rows a shard, the leaking rows were in the third shard of each training split
    assert len(layout.split_files(clean, "mono_train")) == 8  # 9 docs + 7 pairs x 2 sides
    assert len(layout.split_files(clean, "parallel_train")) == 3
    assert stats["leaked.mono_train"] == 1 and stats["leaked.parallel_train"] == 1
    mono_train = _texts(tmp_path, "mono_train")
    assert not any(verse in t for t in mono_train)
    assert mono_train[:9] == [*DOCS[:8], DOCS[8]]
    src = layout.read_split(clean, "parallel_train")["src"].tolist()
    assert src == [f"Pair {i} in English." for i in range(7)]


def test_a_bad_value_in_a_later_batch_is_named_and_nothing_is_left(tmp_path):
    rows = [{"en": f"Sentence {i}.", "fr": f"Phrase {i}.", "part": "train"} for i in range(30)]
    rows[23]["part"] = "holdout"
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {
        "name": "own",
        "type": "json",
        "role": "parallel",
        "path": str(tmp_path / "own.jsonl"),
        "split_column": "part",
    }
    with pytest.raises(DataError, match=r"own\.jsonl \(clean\.sources\[own\]\): split column "):
        _run(tmp_path, [source])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.jsonl"]
