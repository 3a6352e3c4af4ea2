"""The validate stage: Great Expectations rules on small hand-made clean splits."""

from __future__ import annotations

import gc
import importlib.util
import re
import weakref
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from lmops.config import ValidateConfig
from lmops.data import layout
from lmops.errors import DataError, QualityError
from lmops.io import read_json
from lmops.pipeline import validate as quality
from lmops.tracking import stage

REPO = Path(__file__).resolve().parents[3]
LANGS = ["en", "fr"]
CFG = ValidateConfig(
    min_rows=10,
    min_chars=1,
    max_chars=200,
    max_duplicate_rate=0.01,
    min_script_fraction=0.98,
    max_length_ratio=3.0,
    min_length_ratio_fraction=0.98,
)
SPLIT_NAMES = [f"{k}_{s}" for k in ("mono", "parallel") for s in layout.SPLITS]
# Expectations per suite: mono 10 (train 9: no leakage), parallel 16 (train 12).
N_EXPECTATIONS = 9 + 10 + 10 + 12 + 16 + 16


def _en(i: int) -> str:
    return f"Sentence {i} of the corpus is written in plain English."


def _fr(i: int) -> str:
    return f"La phrase {i} du corpus est écrite en français, à l'évidence."


def _mono(start: int, n: int) -> pd.DataFrame:
    rows = [(_en(i), "en") if i % 2 else (_fr(i), "fr") for i in range(start, start + n)]
    return pd.DataFrame(
        {"text": [r[0] for r in rows], "lang": [r[1] for r in rows], "source": "wiki"}
    )


def _parallel(start: int, n: int) -> pd.DataFrame:
    idx = range(start, start + n)
    return pd.DataFrame(
        {
            "src": [f"Verse {i}: the king went home." for i in idx],
            "tgt": [f"Verset {i} : le roi rentra chez lui." for i in idx],
            "group": "Ruth",
            "source": "bible",
        }
    )


def good_splits() -> dict[str, pd.DataFrame]:
    """40 train and 20 held-out rows per kind, all distinct, all within every rule."""
    return {
        "mono_train": _mono(0, 40),
        "mono_valid": _mono(100, 20),
        "mono_test": _mono(200, 20),
        "parallel_train": _parallel(0, 40),
        "parallel_valid": _parallel(100, 20),
        "parallel_test": _parallel(200, 20),
    }


def write(frames: dict[str, pd.DataFrame], root: Path, fmt: str = "parquet") -> Path:
    out = root / "clean"
    out.mkdir()
    for name, df in frames.items():
        layout.write_split(df, out, name, fmt)
    return out


def run(tmp_path: Path, frames: dict[str, pd.DataFrame], fmt: str = "parquet") -> dict:
    return quality.validate_clean(
        write(frames, tmp_path, fmt),
        tmp_path / "report",
        tmp_path / "metrics" / "validate.json",
        CFG,
        LANGS,
    )


def leftovers(tmp_path: Path) -> list[str]:
    """Temp files that atomic_output would have left behind on a crash."""
    return [p.name for p in tmp_path.rglob(".*.tmp")]


def test_good_data_passes_and_writes_report(tmp_path):
    summary = run(tmp_path, good_splits())
    assert summary["success"] is True
    assert summary["evaluated"] == N_EXPECTATIONS
    assert summary["failed"] == 0
    assert summary["suites"]["parallel_valid"] == {"success": True, "evaluated": 16, "failed": 0}
    assert summary["suites"]["mono_train"] == {"success": True, "evaluated": 9, "failed": 0}
    assert read_json(tmp_path / "metrics" / "validate.json") == summary
    report = tmp_path / "report"
    assert (report / "index.html").is_file()
    pages = sorted(
        p.relative_to(report / "validations").parts[:2]
        for p in report.glob("validations/**/*.html")
    )
    # each shard's per-row rules, and each split's sample for the whole-split rules
    assert pages == [(s, part) for s in sorted(SPLIT_NAMES) for part in ("part-00000", "sample")]
    assert "Привет" not in (report / "index.html").read_text()
    assert leftovers(tmp_path) == []


def _set(frame: str, col: str, row: int, value):
    def mutate(frames):
        frames[frame].loc[row, col] = value

    return mutate


def _copy(src: tuple[str, str, int], dst: tuple[str, str, int]):
    def mutate(frames):
        frames[dst[0]].loc[dst[2], dst[1]] = frames[src[0]].loc[src[2], src[1]]

    return mutate


def _many(*mutations):
    def mutate(frames):
        for m in mutations:
            m(frames)

    return mutate


def _truncate(frame: str, n: int):
    def mutate(frames):
        frames[frame] = frames[frame].head(n)

    return mutate


CYRILLIC = "Привет, как дела сегодня у всех нас?"
CJK = "東京は日本の首都です。人口は約千四百万人で、世界最大の都市圏です。"

# (id, change to good data, the one failure line expected: split file, then text)
FAILURES = [
    (
        "nulls",
        _set("parallel_train", "tgt", 3, None),
        "parallel_train/part-00000.parquet",
        "nulls: expect_column_values_to_not_be_null(column='tgt'): 1 of 40 rows unexpected",
    ),
    (
        "too long",
        _set("mono_valid", "text", 0, "word " * 50),
        "mono_valid/part-00000.parquet",
        "length: expect_column_value_lengths_to_be_between(column='text'): "
        "1 of 20 rows unexpected, e.g. 'word word",
    ),
    (
        "duplicates",
        _many(
            *(_copy(("parallel_valid", "src", 0), ("parallel_valid", "src", i)) for i in (1, 2, 3))
        ),
        "parallel_valid (sample: 20 of 20 rows)",
        "duplicates: expect_column_proportion_of_unique_values_to_be_between(column='src'): "
        "observed 0.85, expected at least 0.99; 3 of 20 rows duplicate an earlier row, "
        "e.g. 'Verse 100: the king went home.'",
    ),
    (
        "cyrillic in en",
        _many(
            _set("mono_train", "text", 1, CYRILLIC), _set("mono_train", "text", 3, CYRILLIC + "!")
        ),
        "mono_train/part-00000.parquet",
        "script (en): expect_column_values_to_match_regex(column='text'): 2 of 20 rows "
        "unexpected (at most 2.00% allowed), e.g. 'Привет, как дела",
    ),
    (
        "cjk in src",
        _set("parallel_test", "src", 5, CJK),
        "parallel_test/part-00000.parquet",
        "script (en): expect_column_values_to_match_regex(column='src'): 1 of 20 rows "
        "unexpected (at most 2.00% allowed), e.g. '東京は",
    ),
    (
        "mis-decoded",
        _set("mono_test", "text", 2, "Caf\ufffd au lait."),
        "mono_test/part-00000.parquet",
        "bad characters: expect_column_values_to_not_match_regex(column='text'): "
        "1 of 20 rows unexpected (at most 2.00% allowed), e.g. 'Caf\ufffd au lait.'",
    ),
    (
        "length ratio",
        _set("parallel_train", "tgt", 7, "Un verset bien trop long. " * 4),
        "parallel_train/part-00000.parquet",
        "length ratio: expect_column_values_to_be_between(column='length_ratio'): "
        "1 of 40 rows unexpected (at most 2.00% allowed), e.g. '0.269'",
    ),
    (
        "leak valid->train",
        _copy(("parallel_train", "src", 5), ("parallel_valid", "src", 2)),
        "parallel_valid/part-00000.parquet",
        "leakage into parallel_train: expect_column_values_to_be_null("
        "column='src_in_parallel_train'): 1 of 20 rows unexpected, "
        "e.g. 'Verse 5: the king went home.'",
    ),
    (
        "leak test->mono_train",
        _copy(("mono_train", "text", 4), ("mono_test", "text", 4)),
        "mono_test/part-00000.parquet",
        "leakage into mono_train: expect_column_values_to_be_null(column='text_in_mono_train'): "
        '1 of 20 rows unexpected, e.g. "La phrase 4 du corpus',
    ),
    (
        "unknown language",
        _set("mono_valid", "lang", 6, "de"),
        "mono_valid/part-00000.parquet",
        "language: expect_column_values_to_be_in_set(column='lang'): 1 of 20 rows unexpected, "
        "e.g. 'de'",
    ),
    (
        "no language",
        _set("mono_train", "lang", 6, None),
        "mono_train/part-00000.parquet",
        "language: expect_column_values_to_not_be_null(column='lang'): 1 of 40 rows unexpected",
    ),
    (
        "too few rows",
        _truncate("parallel_test", 5),
        "parallel_test (sample: 5 of 5 rows)",
        "row count: expect_table_row_count_to_be_between: 5 rows, expected at least 10",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "split_file", "expected"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_each_rule_fails_with_a_readable_message(tmp_path, mutate, split_file, expected):
    summary_file = tmp_path / "metrics" / "validate.json"
    summary_file.parent.mkdir()
    summary_file.write_text('{"success": true}')  # a stale pass from an earlier run
    frames = good_splits()
    mutate(frames)
    with pytest.raises(QualityError) as err:
        run(tmp_path, frames)
    message = str(err.value)
    first, *lines = message.splitlines()
    assert re.fullmatch(
        r".*/clean: 1 of \d+ data quality expectations failed "
        r"\(report: .*/report/index\.html\):",
        first,
    ), first
    assert len(lines) == 1, message
    assert lines[0].strip().startswith(f"{tmp_path}/clean/{split_file}: {expected}"), message
    assert not summary_file.exists()
    # The report of the failed run is complete, for debugging.
    assert (tmp_path / "report" / "index.html").is_file()
    assert leftovers(tmp_path) == []


def test_failures_are_listed_one_per_line_and_jsonl_is_read(tmp_path):
    frames = good_splits()
    _set("mono_train", "text", 0, None)(frames)
    _truncate("mono_valid", 3)(frames)
    with pytest.raises(QualityError) as err:
        run(tmp_path, frames, fmt="jsonl")
    lines = str(err.value).splitlines()
    assert "2 of" in lines[0]
    assert lines[1].strip().startswith(f"{tmp_path}/clean/mono_train/part-00000.jsonl: nulls: ")
    assert (
        lines[2]
        .strip()
        .startswith(f"{tmp_path}/clean/mono_valid (sample: 3 of 3 rows): row count: ")
    )


def test_missing_column_is_a_data_error_and_leaves_no_output(tmp_path):
    frames = good_splits()
    frames["parallel_valid"] = frames["parallel_valid"].drop(columns=["tgt"])
    with pytest.raises(
        DataError,
        match=r"clean/parallel_valid/part-00000\.parquet: missing column\(s\) "
        r"\['tgt'\]",
    ):
        run(tmp_path, frames)
    assert not (tmp_path / "report").exists()
    assert not (tmp_path / "metrics" / "validate.json").exists()
    assert leftovers(tmp_path) == []


def test_expectation_that_cannot_run_is_reported(tmp_path):
    # A frame without the derived columns: GX cannot compute those metrics.
    frame = good_splits()["mono_valid"].drop(columns=["lang"])
    check = quality.Batch("mono_valid.part-00000", "mono_valid", "here", frame, "rows")
    results = quality.run_checks([check], CFG, LANGS, tmp_path / "site")
    lines = quality.failures(results)
    assert (
        "here: leakage into mono_train: expect_column_values_to_be_"
        "null(column='text_in_mono_train'): could not be evaluated: " in "\n".join(lines)
    )
    assert any(
        line.startswith("here: language: ") and "could not be evaluated" in line for line in lines
    )
    assert (tmp_path / "site" / "index.html").is_file()


def _matches(regex: str, texts: list[str]) -> list[bool]:
    # The same engine GX uses on pandas 3 string columns.
    return pc.match_substring_regex(pa.array(texts), regex).to_pylist()


def test_script_table_and_fallback():
    texts = [
        "Œuvre d'art « ici » à 3½ °C – 5 €.",
        "Setsuko Hara (原 節子) est une actrice.",
        "Привет мир",
        "你好世界",
        "hello\x00world",
        "ˈæpəl and α-decay",
    ]
    assert _matches(quality.script_regex("en"), texts) == [True, True, False, False, False, True]
    assert _matches(quality.script_regex("FR-ca"), texts) == _matches(
        quality.script_regex("en"), texts
    )
    assert _matches(quality.script_regex("ru"), texts)[2] is True
    # Unknown language: any script, but still no control characters.
    assert _matches(quality.script_regex("xx"), texts) == [True, True, True, True, False, True]
    assert _matches(quality.BAD_CHARS, ["ok", "bad\ufffd", "tab\tnewline\n"]) == [
        False,
        True,
        False,
    ]


def _stage(args: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("validate_stage", REPO / "stages" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage.run("validate", module.main, module.build_parser(), args)


def _params(tmp_path: Path) -> Path:
    """The project's params.yaml with this file's validate thresholds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["validate"] = CFG.model_dump()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_logs_report_and_metrics_to_mlflow(tmp_path, mlflow_store):
    import mlflow

    clean = write(good_splits(), tmp_path)
    _stage(
        [
            "--params",
            str(_params(tmp_path)),
            "--data",
            str(clean),
            "--report",
            "report",
            "--summary",
            "metrics/validate.json",
        ]
    )
    assert read_json(tmp_path / "metrics" / "validate.json")["success"] is True
    (run,) = mlflow.search_runs(
        experiment_names=["lmops-test"],
        filter_string="tags.`lmops.stage` = 'validate'",
        output_format="list",
    )
    assert run.info.status == "FINISHED"
    assert run.data.metrics["validate/success"] == 1.0
    assert run.data.metrics["validate/evaluated"] == N_EXPECTATIONS
    assert run.data.metrics["validate/suites.parallel_test.failed"] == 0.0
    assert run.data.params["validate.max_chars"] == "200"
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "gx_report")]
    assert "gx_report/index.html" in names
    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/validate/summary.json")
    assert logged["evaluated"] == N_EXPECTATIONS


def test_stage_failure_exits_1_and_keeps_the_report(tmp_path, mlflow_store, capsys):
    import mlflow

    frames = good_splits()
    _copy(("mono_train", "text", 9), ("mono_valid", "text", 0))(frames)
    clean = write(frames, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _stage(
            [
                "--params",
                str(_params(tmp_path)),
                "--data",
                str(clean),
                "--report",
                "report",
                "--summary",
                "metrics/validate.json",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"lmops validate: error: {clean}: 1 of {N_EXPECTATIONS} data quality" in err
    assert (
        f"{clean}/mono_valid/part-00000.parquet: leakage into mono_train: "
        "expect_column_values_to_be_null(column='text_in_mono_train'): 1 of 20 rows "
        "unexpected, e.g. 'Sentence 9 of"
    ) in err
    assert not (tmp_path / "metrics" / "validate.json").exists()
    (run,) = mlflow.search_runs(
        experiment_names=["lmops-test"],
        filter_string="tags.`lmops.stage` = 'validate'",
        output_format="list",
    )
    assert run.info.status == "FAILED"
    assert "leakage into mono_train" in run.data.tags["lmops.error"]
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "gx_report")]
    assert "gx_report/index.html" in names


def _write_sharded(frames: dict[str, pd.DataFrame], root: Path, shard_rows: int) -> Path:
    out = root / "clean"
    for name, df in frames.items():
        with layout.ShardWriter(out, name, "parquet", shard_rows) as writer:
            writer.write(df)
    return out


def test_every_shard_is_checked_and_a_failure_names_its_shard(tmp_path):
    frames = good_splits()
    _set("mono_train", "text", 33, None)(frames)  # the third shard's fourth row
    clean = _write_sharded(frames, tmp_path, shard_rows=15)
    assert len(layout.split_files(clean, "mono_train")) == 3
    with pytest.raises(QualityError) as err:
        quality.validate_clean(clean, tmp_path / "report", tmp_path / "v.json", CFG, LANGS)
    first, *lines = str(err.value).splitlines()
    # per-row rules (mono 7 or 8, parallel 9 or 13) once per shard; row count and duplicates
    # once per split: every split here has one or two shards more than in N_EXPECTATIONS
    assert f"1 of {N_EXPECTATIONS + 2 * 7 + 2 * 8 + 2 * 9 + 2 * 13} data quality" in first
    assert [line.strip() for line in lines] == [
        f"{clean}/mono_train/part-00002.parquet: nulls: expect_column_values_to_not_be_null"
        "(column='text'): 1 of 10 rows unexpected"
    ]


def test_whole_split_rules_run_on_a_seeded_bounded_sample(tmp_path):
    frames = good_splits()
    for row in range(1, 9):  # 8 of 40 source sentences repeat the first
        _copy(("parallel_train", "src", 0), ("parallel_train", "src", row))(frames)
    clean = _write_sharded(frames, tmp_path, shard_rows=15)
    cfg = CFG.model_copy(update={"sample_rows": 25})
    messages = []
    for attempt in ("a", "b"):
        with pytest.raises(QualityError) as err:
            quality.validate_clean(clean, tmp_path / attempt, tmp_path / "v.json", cfg, LANGS)
        messages.append(str(err.value).replace(f"{tmp_path}/{attempt}", "REPORT"))
    assert messages[0] == messages[1]  # the same sample every run
    (line,) = messages[0].splitlines()[1:]
    assert line.strip().startswith(
        f"{clean}/parallel_train (sample: 25 of 40 rows): duplicates: "
        "expect_column_proportion_of_unique_values_to_be_between(column='src'): observed "
    )
    assert "rows duplicate an earlier row, e.g. 'Verse 0: the king went home.'" in line
    # the Data Docs name the sample's validation apart from the shards'
    assert "parallel_train.sample" in (tmp_path / "a" / "index.html").read_text()
    suite = quality.build_suite("parallel_train", cfg, LANGS, "sample")
    assert {e.notes for e in suite.expectations} == {
        "On a seeded sample of up to validate.sample_rows (25) rows of parallel_train: every "
        "row when the split is smaller."
    }


def test_sample_rows_below_min_rows_is_refused():
    with pytest.raises(ValueError, match=r"validate.sample_rows \(5\) must be at least"):
        ValidateConfig(sample_rows=5, min_rows=10)


def test_a_checked_shard_is_not_kept_in_memory(tmp_path):
    # GX caches each batch's data and metrics for the whole run unless told otherwise: the
    # stage's memory would then grow with the corpus, shard after shard.
    seen: list[weakref.ref] = []
    alive_before = []

    def checks():
        for i in range(4):
            gc.collect()
            alive_before.append(sum(ref() is not None for ref in seen))
            frame = quality.add_derived_columns("mono_train", _mono(40 * i, 40), {})
            seen.append(weakref.ref(frame))
            yield quality.Batch(f"mono_train.part-{i:05d}", "mono_train", "here", frame, "rows")
            del frame

    results = quality.run_checks(checks(), CFG, LANGS, tmp_path / "site")
    assert all(result.success for _, result in results.values())
    assert alive_before == [0, 0, 0, 0]
