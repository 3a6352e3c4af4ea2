"""The validate stage: Great Expectations rules on small hand-made clean splits."""

from __future__ import annotations

import importlib.util
import re
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
    pages = sorted(p.parent.parent.parent.name for p in report.glob("validations/**/*.html"))
    assert pages == sorted(SPLIT_NAMES)
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
        "parallel_train",
        "nulls: expect_column_values_to_not_be_null(column='tgt'): 1 of 40 rows unexpected",
    ),
    (
        "too long",
        _set("mono_valid", "text", 0, "word " * 50),
        "mono_valid",
        "length: expect_column_value_lengths_to_be_between(column='text'): "
        "1 of 20 rows unexpected, e.g. 'word word",
    ),
    (
        "duplicates",
        _many(
            *(_copy(("parallel_valid", "src", 0), ("parallel_valid", "src", i)) for i in (1, 2, 3))
        ),
        "parallel_valid",
        "duplicates: expect_column_proportion_of_unique_values_to_be_between(column='src'): "
        "observed 0.85, expected at least 0.99; 3 of 20 rows duplicate an earlier row, "
        "e.g. 'Verse 100: the king went home.'",
    ),
    (
        "cyrillic in en",
        _many(
            _set("mono_train", "text", 1, CYRILLIC), _set("mono_train", "text", 3, CYRILLIC + "!")
        ),
        "mono_train",
        "script (en): expect_column_values_to_match_regex(column='text'): 2 of 20 rows "
        "unexpected (at most 2.00% allowed), e.g. 'Привет, как дела",
    ),
    (
        "cjk in src",
        _set("parallel_test", "src", 5, CJK),
        "parallel_test",
        "script (en): expect_column_values_to_match_regex(column='src'): 1 of 20 rows "
        "unexpected (at most 2.00% allowed), e.g. '東京は",
    ),
    (
        "mis-decoded",
        _set("mono_test", "text", 2, "Caf\ufffd au lait."),
        "mono_test",
        "bad characters: expect_column_values_to_not_match_regex(column='text'): "
        "1 of 20 rows unexpected (at most 2.00% allowed), e.g. 'Caf\ufffd au lait.'",
    ),
    (
        "length ratio",
        _set("parallel_train", "tgt", 7, "Un verset bien trop long. " * 4),
        "parallel_train",
        "length ratio: expect_column_values_to_be_between(column='length_ratio'): "
        "1 of 40 rows unexpected (at most 2.00% allowed), e.g. '0.269'",
    ),
    (
        "leak valid->train",
        _copy(("parallel_train", "src", 5), ("parallel_valid", "src", 2)),
        "parallel_valid",
        "leakage into parallel_train: expect_column_values_to_be_null("
        "column='src_in_parallel_train'): 1 of 20 rows unexpected, "
        "e.g. 'Verse 5: the king went home.'",
    ),
    (
        "leak test->mono_train",
        _copy(("mono_train", "text", 4), ("mono_test", "text", 4)),
        "mono_test",
        "leakage into mono_train: expect_column_values_to_be_null(column='text_in_mono_train'): "
        '1 of 20 rows unexpected, e.g. "La phrase 4 du corpus',
    ),
    (
        "unknown language",
        _set("mono_valid", "lang", 6, "de"),
        "mono_valid",
        "language: expect_column_values_to_be_in_set(column='lang'): 1 of 20 rows unexpected, "
        "e.g. 'de'",
    ),
    (
        "no language",
        _set("mono_train", "lang", 6, None),
        "mono_train",
        "language: expect_column_values_to_not_be_null(column='lang'): 1 of 40 rows unexpected",
    ),
    (
        "too few rows",
        _truncate("parallel_test", 5),
        "parallel_test",
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
    assert lines[1].strip().startswith(f"{tmp_path}/clean/mono_train: nulls: ")
    assert lines[2].strip().startswith(f"{tmp_path}/clean/mono_valid: row count: ")


def test_missing_column_is_a_data_error_and_leaves_no_output(tmp_path):
    frames = good_splits()
    frames["parallel_valid"] = frames["parallel_valid"].drop(columns=["tgt"])
    with pytest.raises(
        DataError,
        match=r"clean/parallel_valid: missing column\(s\) "
        r"\['tgt'\]",
    ):
        run(tmp_path, frames)
    assert not (tmp_path / "report").exists()
    assert not (tmp_path / "metrics" / "validate.json").exists()
    assert leftovers(tmp_path) == []


def test_expectation_that_cannot_run_is_reported(tmp_path):
    # A frame without the derived columns: GX cannot compute those metrics.
    frames = {"mono_valid": good_splits()["mono_valid"].drop(columns=["lang"])}
    layout.write_split(frames["mono_valid"], tmp_path, "mono_valid", "parquet")
    results = quality.run_checks(frames, CFG, LANGS, tmp_path / "site")
    lines = quality.failures(results, frames, tmp_path)
    assert (
        f"{tmp_path}/mono_valid: leakage into mono_train: expect_column_values_to_be_"
        "null(column='text_in_mono_train'): could not be evaluated: " in "\n".join(lines)
    )
    assert any(
        line.startswith(f"{tmp_path}/mono_valid: language: ") and "could not be evaluated" in line
        for line in lines
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
        f"{clean}/mono_valid: leakage into mono_train: expect_column_values_to_be_"
        "null(column='text_in_mono_train'): 1 of 20 rows unexpected, e.g. 'Sentence 9 of"
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
