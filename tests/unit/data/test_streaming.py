"""The pieces that let the clean stage stream: hashed de-duplication, the random split drawn
without the whole permutation in memory, the leak matcher, and the sharded split layout."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from lmops.data import layout
from lmops.data import split as splits
from lmops.data.dedup import Dedup, HashSet, text_hashes
from lmops.data.sample import sample_texts
from lmops.errors import DataError

# ------------------------------------------------------------- de-duplication


def test_text_hashes_are_stable_and_tell_texts_apart():
    texts = ["Jesus wept.", "Jésus pleura.", "", "Jesus wept.", "jesus wept."]
    h = text_hashes(texts)
    assert h.dtype == np.uint64 and h[0] == h[3] and len(set(h.tolist())) == 4
    # fixed key: the same numbers in every process and every run
    assert text_hashes(["Jesus wept."]).tolist() == [h[0]]
    assert int(text_hashes(["abc"])[0]) == int(pd.util.hash_array(np.array(["abc"], object))[0])


@pytest.mark.parametrize("spill_entries", [1 << 22, 50])
def test_hash_set_is_a_set(tmp_path, spill_entries):
    rng = np.random.default_rng(0)
    seen = HashSet(tmp_path, spill_entries=spill_entries)
    reference: set[int] = set()
    for _ in range(40):  # batches of varied sizes, with repeats within and across them
        batch = rng.integers(0, 3000, size=int(rng.integers(1, 200)), dtype=np.uint64)
        expected = np.array([int(x) in reference for x in batch.tolist()])
        assert (seen.contains(batch) == expected).all()
        seen.add(batch)
        reference.update(batch.tolist())
    assert len(seen) == len(reference)
    probe = np.arange(3000, dtype=np.uint64)
    assert seen.contains(probe).tolist() == [i in reference for i in range(3000)]
    assert len(seen._runs) <= 2 * np.log2(len(reference))  # runs are merged as they grow
    spilled = sorted(p.name for p in tmp_path.iterdir())
    assert (spilled != []) == (spill_entries == 50)  # and a merged run's file is removed
    assert len(spilled) <= len(seen._runs)


def test_dedup_across_batches_matches_a_row_by_row_loop():
    rng = random.Random(3)
    words = ["a", "b", "c", "d", "e", "f"]
    rows = [(rng.choice(words), rng.choice(words)) for _ in range(300)]
    candidates = np.array([rng.random() > 0.1 for _ in rows])
    # the reference: one set per column, a row is a duplicate when either text was seen
    seen: list[set[str]] = [set(), set()]
    expected = []
    for (src, tgt), candidate in zip(rows, candidates, strict=True):
        dup = bool(candidate) and (src in seen[0] or tgt in seen[1])
        if candidate and not dup:
            seen[0].add(src)
            seen[1].add(tgt)
        expected.append(dup)
    dedup = Dedup(["src", "tgt"])
    found = []
    for start in range(0, len(rows), 7):
        batch = rows[start : start + 7]
        texts = {"src": [r[0] for r in batch], "tgt": [r[1] for r in batch]}
        found.extend(dedup.duplicates(texts, candidates[start : start + 7]).tolist())
    assert found == expected
    assert 0 < sum(expected) < len(rows)


def test_one_column_dedup_matches_a_row_by_row_loop():
    # the vectorised path for one text a row; batches of 7 so repeats cross batches
    rng = random.Random(4)
    texts = [rng.choice("abcdefghijklmnopqrstuvwxyz") * rng.randint(1, 3) for _ in range(500)]
    candidates = np.array([rng.random() > 0.2 for _ in texts])
    seen: set[str] = set()
    expected = []
    for text, candidate in zip(texts, candidates, strict=True):
        expected.append(bool(candidate) and text in seen)
        if candidate:
            seen.add(text)
    dedup = Dedup(["text"])
    found = []
    for start in range(0, len(texts), 7):
        batch = {"text": texts[start : start + 7]}
        found.extend(dedup.duplicates(batch, candidates[start : start + 7]).tolist())
    assert found == expected
    assert 0 < sum(expected) < len(texts)
    assert len(dedup.seen["text"]) == len(seen) == 78


# ------------------------------------------------------------------ splitting


@pytest.mark.parametrize("n", [0, 1, 37, 5000])
def test_held_out_rows_are_the_random_split(tmp_path, n):
    labels = splits.random_split(n, 0.02, 0.05, np.random.default_rng([5, 7]))
    valid, test = splits.held_out_rows(n, 0.02, 0.05, np.random.default_rng([5, 7]), tmp_path)
    assert valid.tolist() == np.flatnonzero(labels == "valid").tolist()
    assert test.tolist() == np.flatnonzero(labels == "test").tolist()
    assert list(tmp_path.iterdir()) == []  # the memory-mapped permutation is gone


def test_held_out_rows_are_capped(tmp_path):
    # 2% and 5% of 20,000 rows would be 400 and 1,000: each share stops at the cap
    draw = splits.held_out_rows(20_000, 0.02, 0.05, np.random.default_rng(3), tmp_path)
    valid, test = splits.held_out_rows(
        20_000, 0.02, 0.05, np.random.default_rng(3), tmp_path, max_rows=150
    )
    assert (len(draw[0]), len(draw[1]), len(valid), len(test)) == (400, 1000, 150, 150)
    assert set(valid) <= set(draw[0]) and not set(valid) & set(test)  # the same draw, cut
    assert (np.diff(valid) > 0).all() and (np.diff(test) > 0).all()
    # a cap above both shares changes nothing
    same = splits.held_out_rows(
        20_000, 0.02, 0.05, np.random.default_rng(3), tmp_path, max_rows=1000
    )
    assert [a.tolist() for a in same] == [a.tolist() for a in draw]


# ------------------------------------------------------------------- leakage


def test_held_out_texts_with_newlines_are_matched_text_by_text():
    held = splits.HeldOut(["line one\nline two", "plain"], key_chars=4)
    texts = ["a\nline one\nline two\nz", "line one", "line two", "so plain", "", "pla\nin"]
    assert held.leaks(texts).tolist() == [True, False, False, True, False, False]
    # a training text with a newline in it: no joined search, same answers
    assert held.leaks(["x\nplain", "line one"]).tolist() == [True, False]


def test_held_out_long_texts_share_a_key():
    start = "The same first sixty-four characters of two held-out documents, "
    held = splits.HeldOut([start + "then one.", start + "then two."])
    assert held.leaks([f"{start}then two. More.", f"{start}then three.", start]).tolist() == [
        True,
        False,
        False,
    ]


# -------------------------------------------------------------------- layout


FRAME = pd.DataFrame(
    {"src": [f"s{i}" for i in range(10)], "tgt": [f"t{i}" for i in range(10)]}
).assign(group="g", source="x")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_shards_hold_the_rows_in_order(tmp_path, fmt):
    with layout.ShardWriter(tmp_path, "parallel_train", fmt, shard_rows=4) as out:
        for start in range(0, 10, 3):  # batches that straddle shard ends
            out.write(FRAME.iloc[start : start + 3])
    files = layout.split_files(tmp_path, "parallel_train")
    assert [p.name for p in files] == [f"part-0000{i}.{fmt}" for i in range(3)]
    assert layout.split_rows(tmp_path, "parallel_train") == 10
    pd.testing.assert_frame_equal(layout.read_split(tmp_path, "parallel_train"), FRAME)
    batches = list(layout.iter_split(tmp_path, "parallel_train", 3, columns=["src"]))
    assert [(p.name, start, len(df)) for p, start, df in batches] == [
        (f"part-00000.{fmt}", 0, 3),
        (f"part-00000.{fmt}", 3, 1),
        (f"part-00001.{fmt}", 4, 3),
        (f"part-00001.{fmt}", 7, 1),
        (f"part-00002.{fmt}", 8, 2),
    ]
    assert [s for _, _, df in batches for s in df["src"]] == FRAME["src"].tolist()
    assert all(list(df.columns) == ["src"] for _, _, df in batches)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_empty_split_has_one_shard_and_its_columns(tmp_path, fmt):
    layout.ShardWriter(tmp_path, "mono_valid", fmt, shard_rows=4).close()
    df = layout.read_split(tmp_path, "mono_valid")
    assert df.empty and list(df.columns) == list(layout.MONO_COLUMNS)
    assert layout.split_rows(tmp_path, "mono_valid") == 0
    ((_, start, batch),) = layout.iter_split(tmp_path, "mono_valid", 100)
    assert start == 0 and batch.empty


def test_a_split_in_the_old_one_file_layout_says_to_rerun_clean(tmp_path):
    FRAME.to_parquet(tmp_path / "parallel_train.parquet")
    with pytest.raises(DataError, match=r"one file per split, .*: rerun the clean stage"):
        layout.read_split(tmp_path, "parallel_train")
    with pytest.raises(DataError, match=r"parallel_test: missing \(did the clean stage run\?\)"):
        layout.split_path(tmp_path, "parallel_test")


def test_a_corrupted_shard_is_named(tmp_path):
    layout.write_split(FRAME, tmp_path, "parallel_train", "parquet")
    shard = tmp_path / "parallel_train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"{shard}: cannot be read as parquet .*rerun the clean"):
        list(layout.iter_split(tmp_path, "parallel_train", 5))


@pytest.mark.parametrize("k", [5, 9, 10, 50])
def test_a_sample_read_shard_by_shard_is_the_in_memory_sample(tmp_path, k):
    texts = [f"text {i}" for i in range(23)]
    frame = pd.DataFrame({"text": texts, "lang": "en", "source": "s"})
    with layout.ShardWriter(tmp_path, "mono_train", "parquet", shard_rows=4) as out:
        out.write(frame)
    got, n = sample_texts(tmp_path, "mono_train", k, seed=11, batch_rows=3)
    assert n == 23
    if k >= n:
        assert got == texts
    else:  # what the vocab stage drew from the whole list before it streamed
        assert got == [texts[i] for i in np.random.default_rng(11).permutation(23)[:k]]


def test_a_missing_text_is_named_by_its_row_in_the_split(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "lang": "en", "source": "s"})
    frame.loc[7, "text"] = None
    with layout.ShardWriter(tmp_path, "mono_train", "parquet", shard_rows=4) as out:
        out.write(frame)
    with pytest.raises(DataError, match=r"mono_train: row 7: text is missing"):
        sample_texts(tmp_path, "mono_train", 100, seed=1, batch_rows=3)
