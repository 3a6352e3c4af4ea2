"""The vocab stage: SentencePiece on the pretraining text, special ids, Tokenizer, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from mlflow.tracking import MlflowClient

from lmops.config import VocabConfig
from lmops.core.vocab import Tokenizer
from lmops.data import layout
from lmops.errors import LmopsError, QualityError
from lmops.io import file_digest
from lmops.pipeline import vocab
from tests.support.helpers import (
    LANGS,
    make_clean,
    run_stage,
    stage_runs,
    write_params,
)

REPO = Path(__file__).resolve().parents[3]


def write_quality(path: Path, success: bool = True) -> Path:
    path.write_text(json.dumps({"success": success}))
    return path


SMALL = {"vocab_size": 120, "byte_fallback": False, "num_threads": 1}


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    return make_clean(tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_special_ids_meta_and_round_trip(clean_dir, tmp_path, model_type):
    cfg = VocabConfig(model_type=model_type, vocab_size=400, byte_fallback=True, num_threads=1)
    meta = vocab.build_vocab(clean_dir, tmp_path / "vocab", cfg, LANGS, seed=7)

    assert sorted(p.name for p in (tmp_path / "vocab").iterdir()) == [
        "meta.json",
        "spm.model",
        "spm.vocab",
    ]
    assert json.loads((tmp_path / "vocab" / "meta.json").read_text()) == meta
    n_train = len(layout.read_split(clean_dir, "mono_train"))
    assert meta == {
        "vocab_size": 400,
        "pad_id": 0,
        "unk_id": 1,
        "bos_id": 2,
        "eos_id": 3,
        "sep_id": 6,
        "lang_ids": {"en": 4, "fr": 5},
        "languages": ["en", "fr"],
        "model_type": model_type,
        "byte_fallback": True,
        "character_coverage": 0.9995,
        "train_sentences": n_train,
        "sampled_sentences": n_train,
        "seed": 7,
    }
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "vocab" / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(7)] == [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<2en>",
        "<2fr>",
        "<sep>",
    ]
    assert sp.id_to_piece(7) == "<0x00>"  # byte fallback pieces follow the specials

    tok = Tokenizer.load(tmp_path / "vocab")
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id) == (
        400,
        0,
        1,
        2,
        3,
        6,
    )
    assert (tok.lang_id("en"), tok.lang_id("fr"), tok.languages) == (4, 5, ["en", "fr"])
    texts = [
        "The quiet horse hears a song behind 42 windows.",
        "Le cheval fatigué traverse le fleuve à côté de l'été.",
        "Ünseen wörds and 日本 survive through byte pieces.",
    ]
    ids = tok.encode(texts)
    assert all(len(row) > 0 and min(row) > 6 for row in ids)  # plain pieces only
    assert tok.decode(ids) == texts
    framed = [
        [tok.lang_id("fr"), tok.bos_id, *row, tok.sep_id, tok.eos_id, tok.pad_id, 0] for row in ids
    ]
    assert tok.decode(framed) == texts
    assert (tok.encode([]), tok.decode([]), tok.decode([[tok.eos_id]])) == ([], [], [""])


def test_unk_without_byte_fallback_is_kept(clean_dir, tmp_path):
    vocab.build_vocab(clean_dir, tmp_path / "v", VocabConfig(**SMALL), LANGS, seed=7)
    tok = Tokenizer.load(tmp_path / "v")
    (ids,) = tok.encode(["cat 日"])
    assert ids[-1] == tok.unk_id
    assert tok.decode([ids]) == ["cat  ⁇ "]  # sentencepiece pads the unk mark with spaces
    with pytest.raises(LmopsError, match=r"language 'de' has no tag .*\['en', 'fr'\]"):
        tok.lang_id("de")


def test_capped_input_is_sampled_with_the_seed(clean_dir, tmp_path):
    cfg = VocabConfig(**SMALL, input_sentence_size=500)
    for name in ("a", "b"):
        meta = vocab.build_vocab(clean_dir, tmp_path / name, cfg, LANGS, seed=3)
        assert (meta["train_sentences"], meta["sampled_sentences"]) == (1200, 500)
    for name in ("spm.model", "spm.vocab", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".vocab"))


def test_vocab_too_large_names_the_key_and_leaves_nothing(clean_dir, tmp_path):
    out = tmp_path / "vocab"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    cfg = VocabConfig(vocab_size=5000, num_threads=1)
    with pytest.raises(LmopsError) as err:
        vocab.build_vocab(clean_dir, out, cfg, LANGS, seed=7)
    msg = str(err.value)
    assert "vocab.vocab_size=5000 is too large" in msg
    maximum = int(msg.rsplit("vocab.vocab_size <= ", 1)[1].split()[0])
    assert 263 < maximum < 5000  # 256 byte pieces + 7 specials + learnt pieces
    assert f"{clean_dir}/mono_train" in msg
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_vocab_too_small_for_the_characters(clean_dir, tmp_path):
    with pytest.raises(
        LmopsError,
        match=r"vocab.vocab_size=200 is too small.*256 byte pieces"
        r".*need at least \d+; raise",
    ):
        vocab.build_vocab(clean_dir, tmp_path / "v", VocabConfig(vocab_size=200), LANGS, seed=7)
    assert not (tmp_path / "v").exists()


def test_missing_text_is_a_data_error(tmp_path):
    clean = make_clean(tmp_path / "clean", n=20)
    df = layout.read_split(clean, "mono_train")
    df.loc[5, "text"] = None
    layout.write_split(df, clean, "mono_train", "parquet")
    with pytest.raises(LmopsError, match=r"clean/mono_train: row 5: text is missing"):
        vocab.build_vocab(clean, tmp_path / "v", VocabConfig(**SMALL), LANGS, seed=7)
    assert not (tmp_path / "v").exists()


def test_tokenizer_load_missing_dir(tmp_path):
    with pytest.raises(LmopsError, match=r"nope/meta.json: not found \(run the vocab stage"):
        Tokenizer.load(tmp_path / "nope")


@pytest.mark.parametrize(
    "summary, problem",
    [
        (None, "data quality summary not found"),
        ('{"success": false, "failed": 3}', "data validation failed"),
        ('{"results": []}', "has no 'success' key"),
        ("{not json", "not valid JSON"),
    ],
)
def test_quality_summary_must_say_success(tmp_path, summary, problem):
    path = tmp_path / "validate.json"
    if summary is not None:
        path.write_text(summary)
    with pytest.raises(QualityError, match=problem) as err:
        vocab.check_quality(path)
    assert str(err.value).startswith(str(path))


def test_stage_refuses_failed_validation_then_logs_to_mlflow(
    mlflow_store, clean_dir, tmp_path, capsys
):
    """One MLflow store for both runs: creating a store costs seconds."""
    params = write_params(tmp_path / "params.yaml", vocab=SMALL)
    argv = [
        "--params",
        str(params),
        "--data",
        str(clean_dir),
        "--quality",
        "validate.json",
        "--out",
        "data/vocab",
    ]
    write_quality(tmp_path / "validate.json", success=False)
    with pytest.raises(SystemExit) as exit_:
        run_stage("vocab", argv)
    assert exit_.value.code == 1
    assert "lmops vocab: error: validate.json: data validation failed" in capsys.readouterr().err
    assert not (tmp_path / "data" / "vocab").exists()
    (failed,) = stage_runs("vocab")
    assert failed.info.status == "FAILED"

    write_quality(tmp_path / "validate.json", success=True)
    run_stage("vocab", argv)
    meta = json.loads((tmp_path / "data/vocab/meta.json").read_text())
    assert (meta["vocab_size"], meta["lang_ids"], meta["seed"]) == (120, {"en": 4, "fr": 5}, 7)
    (run,) = [r for r in stage_runs("vocab") if r.info.run_id != failed.info.run_id]
    assert run.info.status == "FINISHED"
    assert run.data.params["vocab.vocab_size"] == "120"
    assert run.data.metrics["vocab/size"] == 120
    assert run.data.metrics["vocab/train_sentences"] == meta["train_sentences"] == 1200
    assert run.data.metrics["vocab/wall_seconds"] > 0
    files = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "vocab")}
    assert files == {"vocab/meta.json", "vocab/spm.model", "vocab/spm.vocab"}
    mono_train = layout.split_path(clean_dir, vocab.TRAIN_SPLIT)
    assert run.data.tags["data.mono_train.md5"] == file_digest(mono_train)
