"""The clean stage run as its script runs it: bad input stops it with a message that
names the file and the problem, and leaves neither --out nor --stats behind."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from lmops.tracking import stage
from tests.conftest import REPO


def _load_stage():
    spec = importlib.util.spec_from_file_location("clean_stage", REPO / "stages" / "clean.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


clean_stage = _load_stage()


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One MLflow store for the whole module: creating a sqlite store takes seconds."""
    store = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "lmops-test-clean")
        for var in ("LMOPS_PARENT_RUN_ID", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
            mp.delenv(var, raising=False)
        yield f"sqlite:///{store}/mlflow.db"


@pytest.fixture
def workdir(tmp_path, monkeypatch, shared_mlflow):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(sources: list[dict], split: dict | None = None) -> None:
    params = {
        "seed": 1,
        "clean": {
            "sources": sources,
            "format": "jsonl",
            "split": {"valid_fraction": 0.25, "test_fraction": 0.25, **(split or {})},
        },
    }
    with open("params.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(params, fh)
    stage.run(
        "clean",
        clean_stage.main,
        clean_stage.build_parser(),
        ["--params", "params.yaml", "--out", "data/clean", "--stats", "data/metrics/clean.json"],
    )


def assert_fails(capsys, sources: list[dict], split: dict | None = None) -> str:
    """Run the stage on bad input; return its error line after checking nothing was left."""
    with pytest.raises(SystemExit) as exc:
        run_stage(sources, split)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("lmops clean: error: "), err
    assert not Path("data/clean").exists()
    assert not Path("data/metrics/clean.json").exists()
    temp_dirs = [p for p in Path().rglob(".*") if p.is_dir()]  # atomic_output's temp dirs
    assert temp_dirs == []
    return err.removeprefix("lmops clean: error: ")


def mono(path: str, **kw) -> dict:
    return {"name": "docs", "type": "text", "role": "monolingual", "lang": "en", "path": path, **kw}


DOCS = "".join(f"Document number {i} is about topic {i}.\n" for i in range(12))


def test_good_input_writes_outputs_and_logs_metrics(workdir, shared_mlflow):
    (workdir / "docs.txt").write_text(DOCS, encoding="utf-8")
    run_stage([mono("docs.txt")])
    stats = json.loads((workdir / "data/metrics/clean.json").read_text())
    assert stats["mono_train.rows"] == 6 and stats["mono_valid.rows"] == 3
    assert sorted(str(p.relative_to("data/clean")) for p in Path("data/clean").rglob("*")) == [
        f"{k}_{s}{part}"
        for k in ("mono", "parallel")
        for s in ("test", "train", "valid")
        for part in ("", "/part-00000.jsonl")
    ]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(shared_mlflow)
    exp = client.get_experiment_by_name("lmops-test-clean")
    run = client.search_runs(
        [exp.experiment_id],
        "tags.`lmops.stage` = 'clean'",
        order_by=["start_time DESC"],
        max_results=1,
    )[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["clean/mono_train.rows"] == 6
    assert run.data.params["clean.seed"] == "1"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "clean")] == ["clean/clean.json"]


def test_held_out_shares_stop_at_max_held_out_rows(workdir, caplog):
    # 25% of 12 documents would be 3 each; the cap holds both shares to 2
    (workdir / "docs.txt").write_text(DOCS, encoding="utf-8")
    with caplog.at_level("INFO", logger="lmops.data.split"):
        run_stage([mono("docs.txt")], {"max_held_out_rows": 2})
    stats = json.loads((workdir / "data/metrics/clean.json").read_text())
    assert (stats["mono_valid.rows"], stats["mono_test.rows"], stats["mono_train.rows"]) == (
        2,
        2,
        8,
    )
    assert "docs: 12 rows; valid and test hold 2 and 2 rows" in caplog.text


def test_failure_removes_previous_outputs(workdir, capsys):
    (workdir / "data/clean").mkdir(parents=True)
    (workdir / "data/clean/mono_train").mkdir()
    (workdir / "data/clean/mono_train/part-00000.jsonl").write_text("{}\n")
    (workdir / "data/metrics").mkdir()
    (workdir / "data/metrics/clean.json").write_text("{}\n")
    msg = assert_fails(capsys, [mono("nowhere.txt")])
    assert msg == "nowhere.txt: file not found"


def test_empty_file(workdir, capsys):
    (workdir / "empty.txt").write_bytes(b"")
    assert assert_fails(capsys, [mono("empty.txt")]) == "empty.txt: file is empty (0 bytes)"


def test_blank_file(workdir, capsys):
    (workdir / "blank.txt").write_text("\n   \n\t\n", encoding="utf-8")
    assert (
        assert_fails(capsys, [mono("blank.txt")]) == "blank.txt: file is empty (no non-blank lines)"
    )


def test_binary_file(workdir, capsys):
    (workdir / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    msg = assert_fails(capsys, [mono("image.txt")])
    assert msg == "image.txt: binary file (NUL byte at byte offset 8); expected UTF-8 text"


def test_wrong_encoding_names_line_and_byte(workdir, capsys):
    text = "First line.\nSecond line.\nUn café noir.\n"
    (workdir / "latin1.txt").write_bytes(text.encode("latin-1"))
    offset = len("First line.\nSecond line.\nUn caf")
    msg = assert_fails(capsys, [mono("latin1.txt")])
    assert msg == (
        f"latin1.txt: line 3: not valid UTF-8 (byte 0xe9 at byte offset {offset}); "
        "re-encode the file as UTF-8"
    )


def test_misaligned_parallel_files(workdir, capsys):
    (workdir / "a.en").write_text("One.\nTwo.\nThree.\n", encoding="utf-8")
    (workdir / "a.fr").write_text("Un.\nDeux.\n", encoding="utf-8")
    msg = assert_fails(
        capsys,
        [{"name": "a", "type": "text", "role": "parallel", "src_path": "a.en", "tgt_path": "a.fr"}],
    )
    assert msg == "a.en has 3 lines but a.fr has 2: parallel files must be aligned line by line"


def test_missing_column(workdir, capsys):
    (workdir / "pairs.jsonl").write_text('{"english": "Hi.", "french": "Salut."}\n')
    msg = assert_fails(
        capsys, [{"name": "p", "type": "json", "role": "parallel", "path": "pairs.jsonl"}]
    )
    assert msg == (
        "pairs.jsonl: missing column(s) 'en', 'fr' (clean.sources[p]); "
        "columns present: english, french"
    )


def test_missing_text_column_in_csv(workdir, capsys):
    (workdir / "docs.csv").write_text("id,body\n1,Hello there.\n", encoding="utf-8")
    msg = assert_fails(
        capsys,
        [{"name": "c", "type": "csv", "role": "monolingual", "lang": "en", "path": "docs.csv"}],
    )
    assert msg == (
        "docs.csv: missing column(s) 'text' (clean.sources[c]); columns present: id, body"
    )


def test_malformed_jsonl(workdir, capsys):
    (workdir / "docs.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    msg = assert_fails(
        capsys,
        [{"name": "j", "type": "json", "role": "monolingual", "lang": "en", "path": "docs.jsonl"}],
    )
    assert msg.startswith("docs.jsonl: cannot be read as json: ArrowInvalid: JSON parse error")


def test_unknown_embedded_dataset(workdir, capsys):
    msg = assert_fails(
        capsys, [{"name": "w", "type": "embedded", "role": "monolingual", "dataset": "wiki_de"}]
    )
    assert msg == (
        "clean.sources[w]: unknown embedded dataset 'wiki_de'; known: wiki_en, wiki_fr, bible_en_fr"
    )


def test_language_outside_the_pair(workdir, capsys):
    (workdir / "docs.txt").write_text(DOCS, encoding="utf-8")
    msg = assert_fails(capsys, [mono("docs.txt", lang="de")])
    assert msg == (
        "clean.sources[docs]: lang 'de' is neither clean.source_lang nor clean.target_lang (en, fr)"
    )


def test_unknown_group(workdir, capsys):
    rows = [
        {"en": f"Sentence {i}.", "fr": f"Phrase {i}.", "book": b}
        for i, b in enumerate(["Genesis", "Exodus", "Ruth", "Ruth"])
    ]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = assert_fails(
        capsys,
        [
            {
                "name": "p",
                "type": "json",
                "role": "parallel",
                "path": "pairs.jsonl",
                "group_column": "book",
            }
        ],
        split={"valid_groups": ["Ruth"], "test_groups": ["Marc"]},
    )
    assert msg == (
        "clean.split: unknown group(s) 'Marc' in valid_groups/test_groups; "
        "known groups: Exodus, Genesis, Ruth"
    )


def test_unreachable_hub_dataset(workdir, capsys, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The library's own offline mode: fails at once instead of retrying for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = assert_fails(
        capsys,
        [
            {
                "name": "h",
                "type": "hub",
                "role": "monolingual",
                "lang": "en",
                "dataset": "someone/nothing",
            }
        ],
    )
    assert msg.startswith(
        "clean.sources[h]: hub dataset 'someone/nothing' (config None, "
        "split 'train') could not be loaded: ConnectionError"
    )


# ------------------------------------------------------------ a corpus's own splits


def pairs_file(path: Path, rows: list[tuple[str, str]], **extra: list) -> None:
    records = [
        {"en": en, "fr": fr, **{k: v[i] for k, v in extra.items()}}
        for i, (en, fr) in enumerate(rows)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_split(workdir: Path, name: str) -> list[tuple[str, str]]:
    lines = (workdir / f"data/clean/{name}/part-00000.jsonl").read_text().splitlines()
    return [(r["src"], r["tgt"]) for r in map(json.loads, lines)]


TRAIN = [
    (f"The farmer sold {i} cows at the market.", f"Le fermier a vendu {i} vaches.")
    for i in range(8)
]
DEV = [("The river is wide today.", "La riviere est large.")]
TEST = [
    ("My brother reads a book.", "Mon frere lit un livre."),
    ("We sing together.", "Nous chantons."),
]


def test_a_corpus_with_its_own_train_dev_and_test_files(workdir):
    # the training file also holds a test pair, and a sentence that contains a test one
    leaky = [*TRAIN, TEST[0], (f"Yes. {TEST[1][0]}", "Oui, nous chantons.")]
    pairs_file(workdir / "train.jsonl", leaky)
    pairs_file(workdir / "dev.jsonl", DEV)
    pairs_file(workdir / "test.jsonl", TEST)
    source = {"type": "json", "role": "parallel"}
    run_stage(
        [
            {**source, "name": "wmt_train", "path": "train.jsonl", "split": "train"},
            {**source, "name": "wmt_dev", "path": "dev.jsonl", "split": "valid"},
            {**source, "name": "wmt_test", "path": "test.jsonl", "split": "test"},
        ]
    )
    # the test and dev files are the test and validation sets, whole, whatever the order
    assert read_split(workdir, "parallel_test") == TEST
    assert read_split(workdir, "parallel_valid") == DEV
    # and the training pairs that repeat or contain them are gone
    assert read_split(workdir, "parallel_train") == TRAIN
    stats = json.loads((workdir / "data/metrics/clean.json").read_text())
    assert stats["source.wmt_train.dropped.duplicate"] == 1
    assert stats["source.wmt_test.dropped.duplicate"] == 0  # every reason counted, 0 too
    assert stats["leaked.parallel_train"] == 1


def test_a_split_column_names_each_rows_split(workdir):
    rows = [*TRAIN[:4], *DEV, *TEST, *TRAIN[4:]]
    names = ["train"] * 4 + ["dev"] + ["test", "Test"] + ["train"] * 4
    pairs_file(workdir / "all.jsonl", rows, split=names)
    run_stage(
        [
            {
                "name": "corpus",
                "type": "json",
                "role": "parallel",
                "path": "all.jsonl",
                "split_column": "split",
            }
        ]
    )
    assert read_split(workdir, "parallel_test") == TEST
    assert read_split(workdir, "parallel_valid") == DEV
    assert read_split(workdir, "parallel_train") == TRAIN


def test_an_unknown_split_name_is_named(workdir, capsys):
    pairs_file(workdir / "all.jsonl", TRAIN[:3], split=["train", "holdout", "tset"])
    source = {"name": "c", "type": "json", "role": "parallel", "path": "all.jsonl"}
    msg = assert_fails(capsys, [{**source, "split_column": "split"}])
    assert msg.endswith(
        "all.jsonl (clean.sources[c]): split column value(s) 'holdout', 'tset' are not a "
        "split; use one of train, valid, validation, dev, test"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"split": "test", "split_column": "s"}, "give 'split' or 'split_column', not both"),
        ({"split": "test", "group_column": "book"}, "'group_column' holds groups out"),
        ({"split": "holdout"}, "split: Input should be 'train', 'valid' or 'test'"),
    ],
)
def test_split_settings_that_conflict_are_named(workdir, capsys, extra, message):
    pairs_file(workdir / "all.jsonl", TRAIN[:3])
    source = {"name": "c", "type": "json", "role": "parallel", "path": "all.jsonl"}
    with pytest.raises(SystemExit):
        run_stage([{**source, **extra}])
    assert message in capsys.readouterr().err
