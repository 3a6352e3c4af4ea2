"""The tokenise stage: pretraining token streams, parallel id sequences, stream loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from lmops.config import TokeniseConfig, VocabConfig
from lmops.core.vocab import Tokenizer
from lmops.data import layout
from lmops.data.tokens import load_stream, monolingual_part, stream_dtype, write_stream
from lmops.errors import DataError, LmopsError
from lmops.io import file_digest
from lmops.pipeline import tokenise, vocab
from tests.support.helpers import make_clean, run_stage, stage_runs, write_params

CFG = TokeniseConfig(num_proc=1, batch_size=100)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    return make_clean(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def vocab_dir(clean_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v") / "vocab"
    vocab.build_vocab(clean_dir, out, VocabConfig(vocab_size=400, num_threads=1), ["en", "fr"], 7)
    return out


@pytest.fixture(scope="module")
def tokens(clean_dir, vocab_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("t") / "tokens"
    return out, tokenise.tokenise(clean_dir, vocab_dir, out, CFG)


def test_stream_is_tag_ids_eos_per_row_and_round_trips(clean_dir, vocab_dir, tokens):
    out, stats = tokens
    tok = Tokenizer.load(vocab_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "parallel_test.parquet",
        "parallel_train.parquet",
        "parallel_valid.parquet",
        "pretrain_train.bin",
        "pretrain_train.json",
        "pretrain_valid.bin",
        "pretrain_valid.json",
    ]
    for split, stem in (("mono_train", "pretrain_train"), ("mono_valid", "pretrain_valid")):
        mono = layout.read_split(clean_dir, split)
        texts = mono["text"].tolist()
        encoded = tok.encode(texts)
        stream = load_stream(out / stem)
        side = json.loads((out / f"{stem}.json").read_text())
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        # the monolingual text leads, the sides of the training pairs (source toy) follow
        text_rows = int((mono["source"] == "toy_text").sum())
        assert 0 < text_rows < len(texts) and (mono["source"][:text_rows] == "toy_text").all()
        assert side == {
            "dtype": "uint16",
            "length": sum(map(len, encoded)) + 2 * len(texts),
            "documents": len(texts),
            "bytes": n_bytes,
            "vocab_size": 400,
            "monolingual_tokens": sum(map(len, encoded[:text_rows])) + 2 * text_rows,
        }
        assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
        assert len(stream) == side["length"]

        docs = np.split(np.asarray(stream), np.flatnonzero(stream == tok.eos_id)[:-1] + 1)
        assert len(docs) == len(texts)
        assert [tok.lang_id(lang) for lang in mono["lang"]] == [int(d[0]) for d in docs]
        assert all(int(d[-1]) == tok.eos_id for d in docs)
        assert [d[1:-1].tolist() for d in docs] == encoded
        assert tok.decode([d.tolist() for d in docs]) == texts
        text = monolingual_part(stream, out / stem)
        assert len(text) == side["monolingual_tokens"] and int(text[-1]) == tok.eos_id
        assert tok.decode([d.tolist() for d in docs[:text_rows]]) == texts[:text_rows]
        assert stats[stem] == {
            "tokens": side["length"],
            "monolingual_tokens": side["monolingual_tokens"],
            "documents": len(texts),
            "bytes": n_bytes,
            "bytes_per_token": round(n_bytes / side["length"], 4),
        }
    assert not (out / "mono_test.bin").exists()  # evaluate reads mono_test as text


def test_parallel_ids_are_int32_lists_next_to_the_text(clean_dir, vocab_dir, tokens):
    out, stats = tokens
    tok = Tokenizer.load(vocab_dir)
    for split in ("parallel_train", "parallel_valid", "parallel_test"):
        table = pq.read_table(out / f"{split}.parquet")
        assert table.column_names == ["src", "tgt", "src_ids", "tgt_ids"]
        assert str(table.schema.field("src_ids").type.value_type) == "int32"
        assert str(table.schema.field("tgt_ids").type.value_type) == "int32"
        pairs = layout.read_split(clean_dir, split)
        got = table.to_pydict()
        assert got["src"] == pairs["src"].tolist() and got["tgt"] == pairs["tgt"].tolist()
        assert got["src_ids"] == tok.encode(got["src"])
        assert got["tgt_ids"] == tok.encode(got["tgt"])
        assert stats[split] == {
            "pairs": len(pairs),
            "src_tokens": sum(map(len, got["src_ids"])),
            "tgt_tokens": sum(map(len, got["tgt_ids"])),
        }
    assert stats["tokens"] == stats["pretrain_train"]["tokens"] + stats["pretrain_valid"][
        "tokens"
    ] + sum(
        stats[s]["src_tokens"] + stats[s]["tgt_tokens"]
        for s in ("parallel_train", "parallel_valid", "parallel_test")
    )
    assert stats["tokens_per_second"] > 0 and stats["mb_per_second"] > 0


def test_two_processes_write_the_same_bytes(clean_dir, vocab_dir, tokens, tmp_path):
    one, _ = tokens
    two = tmp_path / "tokens"
    tokenise.tokenise(clean_dir, vocab_dir, two, TokeniseConfig(num_proc=2, batch_size=100))
    for name in ("pretrain_train.bin", "pretrain_valid.bin", "pretrain_train.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes()
    assert pq.read_table(two / "parallel_train.parquet").equals(
        pq.read_table(one / "parallel_train.parquet")
    )


@pytest.mark.parametrize(
    "vocab_size, dtype",
    [(8000, np.uint16), (65535, np.uint16), (65536, np.uint32), (250_000, np.uint32)],
)
def test_dtype_follows_vocab_size(vocab_size, dtype):
    assert stream_dtype(vocab_size) == dtype


def test_large_vocab_stream_is_uint32(tmp_path):
    ids = [[70_000, 5, 69_999], [65_536, 3]]
    path = tmp_path / "big.bin"
    side = write_stream(datasets.Dataset.from_dict({"ids": ids}), path, 70_001, text_bytes=9)
    assert side == {
        "dtype": "uint32",
        "length": 5,
        "documents": 2,
        "bytes": 9,
        "vocab_size": 70_001,
        "monolingual_tokens": 5,  # no row count given: every row is monolingual text
    }
    assert path.stat().st_size == 5 * 4
    assert load_stream(path).tolist() == [70_000, 5, 69_999, 65_536, 3]


@pytest.mark.parametrize("rows, tokens", [(0, 0), (2, 5), (3, 9), (5, 12)])
def test_monolingual_tokens_count_the_leading_rows_across_chunks(tmp_path, rows, tokens):
    ids = [[1, 2], [3, 4, 5], [6, 7, 8, 9], [10], [11, 12]]
    path = tmp_path / "s.bin"
    ds = datasets.Dataset.from_dict({"ids": ids})
    side = write_stream(ds, path, 100, text_bytes=1, monolingual_rows=rows, chunk_rows=2)
    assert side["monolingual_tokens"] == tokens
    assert monolingual_part(load_stream(path), path).tolist() == list(range(1, tokens + 1))


def test_a_stream_without_monolingual_tokens_asks_for_tokenise(tmp_path):
    path = tmp_path / "s.bin"
    write_stream(datasets.Dataset.from_dict({"ids": [[1, 2]]}), path, 100, text_bytes=1)
    side = json.loads((tmp_path / "s.json").read_text())
    del side["monolingual_tokens"]  # as tokenise wrote it before the field existed
    (tmp_path / "s.json").write_text(json.dumps(side))
    with pytest.raises(LmopsError, match=r"s.json: no 'monolingual_tokens'; rerun the tokenise"):
        monolingual_part(load_stream(path), path)


def test_truncated_stream_names_file_and_lengths(tokens, tmp_path):
    out, stats = tokens
    for name in ("pretrain_valid.bin", "pretrain_valid.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    length = stats["pretrain_valid"]["tokens"]
    with open(tmp_path / "pretrain_valid.bin", "r+b") as fh:
        fh.truncate(2 * length - 6)
    with pytest.raises(LmopsError) as err:
        load_stream(tmp_path / "pretrain_valid.bin")
    assert str(err.value).startswith(
        f"{tmp_path / 'pretrain_valid.bin'}: expected {length} uint16 tokens ({2 * length} bytes"
    )
    assert f"the file has {2 * length - 6} bytes" in str(err.value)


def test_missing_or_broken_sidecar(tmp_path):
    (tmp_path / "s.bin").write_bytes(b"\0\0")
    with pytest.raises(LmopsError, match=r"s.json: token stream sidecar not found"):
        load_stream(tmp_path / "s")
    (tmp_path / "s.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(LmopsError, match=r"s.json: not a token stream sidecar \(KeyError"):
        load_stream(tmp_path / "s.bin")


def _no_leftovers(parent: Path) -> None:
    assert not (parent / "tokens").exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".tokens")] == []


def test_missing_vocab_dir(clean_dir, tmp_path):
    with pytest.raises(LmopsError, match=r"novocab/meta.json: not found \(run the vocab stage"):
        tokenise.tokenise(clean_dir, tmp_path / "novocab", tmp_path / "tokens", CFG)
    _no_leftovers(tmp_path)


def test_unknown_language_fails_without_output(vocab_dir, tmp_path):
    clean = make_clean(tmp_path / "clean", n=20)
    mono = layout.read_split(clean, "mono_valid")
    mono.loc[3, "lang"] = "de"
    layout.write_split(mono, clean, "mono_valid", "parquet")
    (tmp_path / "tokens").mkdir()  # an older, complete output must not survive either
    with pytest.raises(
        DataError,
        match=r"clean/mono_valid: row 3: language 'de' has no tag "
        r"in the vocabulary \(languages: \['en', 'fr'\]\)",
    ):
        tokenise.tokenise(clean, vocab_dir, tmp_path / "tokens", CFG)
    _no_leftovers(tmp_path)


def test_missing_column_and_missing_split(vocab_dir, tmp_path):
    clean = make_clean(tmp_path / "clean", n=20, fmt="jsonl")
    pairs = layout.read_split(clean, "parallel_test").drop(columns=["tgt"])
    layout.write_split(pairs, clean, "parallel_test", "jsonl")
    with pytest.raises(DataError, match=r"clean/parallel_test: no 'tgt' column"):
        tokenise.tokenise(clean, vocab_dir, tmp_path / "tokens", CFG)
    _no_leftovers(tmp_path)
    shutil.rmtree(clean / "parallel_test")
    with pytest.raises(DataError, match=r"clean/parallel_test: missing \(did the clean stage"):
        tokenise.tokenise(clean, vocab_dir, tmp_path / "tokens", CFG)
    _no_leftovers(tmp_path)


def test_stage_without_vocab_fails_then_runs(mlflow_store, clean_dir, vocab_dir, tmp_path, capsys):
    """One MLflow store for both runs: creating a store costs seconds."""
    params = write_params(tmp_path / "params.yaml", tokenise={"num_proc": 1, "batch_size": 64})
    argv = [
        "--params",
        str(params),
        "--data",
        str(clean_dir),
        "--vocab",
        "data/vocab",
        "--out",
        "data/tokens",
        "--stats",
        "data/metrics/tokenise.json",
    ]
    with pytest.raises(SystemExit) as exit_:
        run_stage("tokenise", argv)
    assert exit_.value.code == 1
    assert (
        "lmops tokenise: error: data/vocab/meta.json: not found (run the vocab stage first)"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "data" / "tokens").exists()
    assert not (tmp_path / "data" / "metrics" / "tokenise.json").exists()
    (failed,) = stage_runs("tokenise")
    assert failed.info.status == "FAILED"

    shutil.copytree(vocab_dir, tmp_path / "data" / "vocab")
    run_stage("tokenise", argv)
    stats = json.loads((tmp_path / "data/metrics/tokenise.json").read_text())
    assert stats["pretrain_train"]["documents"] == 1200
    assert stats["parallel_train"]["pairs"] == 300
    assert load_stream(tmp_path / "data/tokens/pretrain_train").shape == (
        stats["pretrain_train"]["tokens"],
    )
    (run,) = [r for r in stage_runs("tokenise") if r.info.run_id != failed.info.run_id]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"tokenise.num_proc": "1", "tokenise.batch_size": "64"}
    metrics = run.data.metrics
    assert metrics["tokenise/pretrain_train.tokens"] == stats["pretrain_train"]["tokens"]
    assert metrics["tokenise/parallel_test.pairs"] == 30
    assert metrics["tokenise/tokens_per_second"] > 0
    assert run.data.tags["data.vocab.md5"] == file_digest(tmp_path / "data" / "vocab")


def test_empty_splits_give_empty_outputs(vocab_dir, tmp_path):
    clean = make_clean(tmp_path / "clean", n=20)
    for name in ("mono_valid", "parallel_valid"):
        layout.write_split(layout.read_split(clean, name).iloc[:0], clean, name, "parquet")
    stats = tokenise.tokenise(clean, vocab_dir, tmp_path / "tokens", CFG)
    assert stats["pretrain_valid"] == {
        "tokens": 0,
        "monolingual_tokens": 0,
        "documents": 0,
        "bytes": 0,
        "bytes_per_token": 0.0,
    }
    assert stats["parallel_valid"] == {"pairs": 0, "src_tokens": 0, "tgt_tokens": 0}
    assert load_stream(tmp_path / "tokens" / "pretrain_valid").size == 0
    assert pq.read_table(tmp_path / "tokens" / "parallel_valid.parquet").num_rows == 0


def _reshard(src: Path, dst: Path, rows: int, fmt: str = "parquet") -> Path:
    for kind in ("mono", "parallel"):
        for split in layout.SPLITS:
            name = f"{kind}_{split}"
            with layout.ShardWriter(dst, name, fmt, shard_rows=rows) as out:
                for _, _, df in layout.iter_split(src, name, batch_rows=rows + 3):
                    out.write(df)
    return dst


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_many_shards_give_the_same_tokens_as_one(clean_dir, vocab_dir, tokens, tmp_path, fmt):
    one, stats = tokens
    sharded = _reshard(clean_dir, tmp_path / "clean", 37, fmt)
    assert len(layout.split_files(sharded, "mono_train")) == 33  # 1,200 rows
    cfg = TokeniseConfig(num_proc=2, batch_size=100)
    again = tokenise.tokenise(sharded, vocab_dir, tmp_path / "tokens", cfg)
    assert {k: v for k, v in again.items() if "second" not in k} == {
        k: v for k, v in stats.items() if "second" not in k
    }
    for path in sorted(one.iterdir()):
        assert (tmp_path / "tokens" / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_bad_row_in_a_later_shard_is_named_by_its_row_in_the_split(
    clean_dir, vocab_dir, tmp_path
):
    sharded = _reshard(clean_dir, tmp_path / "clean", 37)
    mono = layout.read_split(sharded, "mono_train")
    mono.loc[250, "lang"] = "de"
    shutil.rmtree(sharded / "mono_train")
    with layout.ShardWriter(sharded, "mono_train", "parquet", shard_rows=37) as out:
        out.write(mono)
    with pytest.raises(DataError, match=r"clean/mono_train: row 250: language 'de' has no tag"):
        tokenise.tokenise(sharded, vocab_dir, tmp_path / "tokens", CFG)
    _no_leftovers(tmp_path)


def test_finetune_replays_the_monolingual_text_not_the_pairs(
    clean_dir, vocab_dir, tokens, tmp_path
):
    """finetune.lm_mix_text: the text rows of a fine-tuning batch come from the monolingual
    sources; all of the stream where asked, or where the corpus is pairs alone."""
    from lmops.pipeline.finetune import replay_text

    out, _ = tokens
    tok = Tokenizer.load(vocab_dir)
    path, block = out / "pretrain_train", 16
    stream = np.asarray(load_stream(path))
    text = np.asarray(replay_text(path, tok.vocab_size, block, "monolingual"))
    mono = layout.read_split(clean_dir, "mono_train")
    docs = np.split(text, np.flatnonzero(text == tok.eos_id)[:-1] + 1)
    assert (
        tok.decode([d.tolist() for d in docs])
        == mono["text"][mono["source"] == "toy_text"].tolist()
    )
    assert np.array_equal(stream[: len(text)], text) and len(text) < len(stream)
    assert np.array_equal(replay_text(path, tok.vocab_size, block, "all"), stream)

    pairs_only = make_clean(tmp_path / "clean", n=20)
    mono = layout.read_split(pairs_only, "mono_train")
    layout.write_split(mono[mono["source"] == "toy"], pairs_only, "mono_train", "parquet")
    tokenise.tokenise(pairs_only, vocab_dir, tmp_path / "tokens", CFG)
    path = tmp_path / "tokens" / "pretrain_train"
    assert json.loads(path.with_suffix(".json").read_text())["monolingual_tokens"] == 0
    assert np.array_equal(
        replay_text(path, tok.vocab_size, block, "monolingual"), load_stream(path)
    )
