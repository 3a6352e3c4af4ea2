"""Great Expectations checks on the clean stage's output (the ``validate`` stage).

Each of the six splits (``mono_*``, ``parallel_*``) gets its own expectation
suite and validation definition in an ephemeral GX context; the Data Docs site
built from their results is the stage's HTML report. Rules that span two
columns or two splits (length ratio, leakage) become derived columns first, so
GX checks a plain per-row value and the Data Docs list only the offending rows,
never the whole training set.

The regexes are RE2 syntax: pandas 3 stores text as pyarrow strings, and GX's
pandas regex check runs through pyarrow's RE2 engine (linear time, and it knows
Unicode scripts such as ``\\p{Latin}``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lmops.config import Params, ValidateConfig
from lmops.data.layout import MONO_COLUMNS, PARALLEL_COLUMNS, SPLITS, read_split, split_path
from lmops.errors import DataError, QualityError
from lmops.io import atomic_output, write_json
from lmops.pipeline import Result, path

# Letters each language is expected to be written in. Greek is allowed for the
# Latin-script languages because Wikipedia prose uses it for etymologies and
# symbols (it cut the share of rejected French articles from 3.0% to 1.8%).
_LATIN = r"\p{Latin}\p{Greek}"
SCRIPT_LETTERS: dict[str, str] = {
    "en": _LATIN,
    "fr": _LATIN,
    "de": _LATIN,
    "es": _LATIN,
    "it": _LATIN,
    "pt": _LATIN,
    "nl": _LATIN,
    "ru": r"\p{Cyrillic}",
    "uk": r"\p{Cyrillic}",
    "el": r"\p{Greek}",
    "ar": r"\p{Arabic}",
    "zh": r"\p{Han}",
    "ja": r"\p{Han}\p{Hiragana}\p{Katakana}",
}
# Unknown languages: letters of any script; the check then only rejects control
# characters and other non-text code points.
FALLBACK_LETTERS = r"\p{L}"
# Script-neutral characters every language may use: modifier letters (IPA stress
# marks), combining accents, digits, punctuation, symbols, spaces, and invisible
# format characters (word joiners occur in real Wikipedia text).
NEUTRAL_CHARS = r"\p{Lm}\p{M}\p{N}\p{P}\p{S}\p{Z}\p{Cf}\s"
# Mis-decoded bytes (U+FFFD) and control characters other than tab/newline.
BAD_CHARS = r"[\x{FFFD}\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"

TEXT_COLUMNS = {"mono": ("text",), "parallel": ("src", "tgt")}
REQUIRED_COLUMNS = {"mono": MONO_COLUMNS, "parallel": PARALLEL_COLUMNS}
SITE_NAME = "lmops"
EXAMPLES = 3
EXAMPLE_CHARS = 60

log = logging.getLogger(__name__)


def _gx() -> Any:
    """Import Great Expectations quietly (it is slow to import, so only when used)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX logs its plugin registry at INFO while importing, and one module pins its own
    # logger to INFO; the stage log is for our lines.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx


def script_regex(lang: str) -> str:
    """Regex a whole text in ``lang`` must match (RE2 syntax).

    A parenthesised aside may hold any script: Wikipedia gives native names
    that way ("Setsuko Hara (原 節子) est une actrice"), and rejecting those
    articles would fail real data (it cut rejected French articles to 0.6%).
    """
    base = lang.lower().replace("_", "-").split("-")[0]
    letters = SCRIPT_LETTERS.get(base, FALLBACK_LETTERS)
    return rf"^(?:\([^()]*\)|[{letters}{NEUTRAL_CHARS}])*$"


def split_names(kind: str) -> list[str]:
    return [f"{kind}_{split}" for split in SPLITS]


def load_splits(data_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read all six splits, checking each has the columns of the clean layout."""
    frames = {}
    for kind in ("mono", "parallel"):
        for name in split_names(kind):
            df = read_split(data_dir, name)
            missing = [c for c in REQUIRED_COLUMNS[kind] if c not in df.columns]
            if missing:
                raise DataError(
                    f"{split_path(data_dir, name)}: missing column(s) {missing} "
                    f"(expected {list(REQUIRED_COLUMNS[kind])})"
                )
            frames[name] = df
    return frames


def _text(series: pd.Series) -> pd.Series:
    # pandas 3 "str" dtype keeps missing values missing (astype(object) would not).
    return series.astype("str")


def _matches(values: pd.Series, pool: pd.Series) -> pd.Series:
    """The value where it also occurs in ``pool``, else missing."""
    # pandas 3's isin on pyarrow strings converts value by value: ~30x slower than object.
    found = values.astype(object).isin(pool.dropna().astype(object))
    return values.where(found)


def add_derived_columns(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per-row columns for the rules that span two columns or two splits.

    ``length_ratio`` = len(src) / len(tgt). ``<col>_in_<train split>`` holds the
    text where a valid/test text also occurs in that training split, so a
    "values to be null" expectation lists exactly the leaked texts.
    """
    out = {name: df.copy() for name, df in frames.items()}
    for name, df in out.items():
        for col in ("text", "src", "tgt"):
            if col in df.columns:
                df[col] = _text(df[col])
        if name.startswith("parallel_"):
            # pandas-stubs want an int for an int Series; NaN upcasts it to float
            tgt_len = df["tgt"].str.len().replace(0, float("nan"))  # type: ignore[arg-type]
            df["length_ratio"] = (df["src"].str.len() / tgt_len).round(3)
    mono_train = out["mono_train"]["text"]
    par_train = out["parallel_train"]
    for split in SPLITS[1:]:
        mono = out[f"mono_{split}"]
        mono["text_in_mono_train"] = _matches(mono["text"], mono_train)
        par = out[f"parallel_{split}"]
        for col in ("src", "tgt"):
            par[f"{col}_in_parallel_train"] = _matches(par[col], par_train[col])
            par[f"{col}_in_mono_train"] = _matches(par[col], mono_train)
    return out


def build_suite(name: str, cfg: ValidateConfig, languages: list[str]) -> Any:
    """The expectation suite for split ``name`` (e.g. ``parallel_valid``)."""
    gx = _gx()
    from great_expectations.expectations.row_conditions import Column

    ex = gx.expectations
    kind, split = name.split("_", 1)
    items: list[Any] = [
        ex.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, meta={"rule": "row count"})
    ]
    for col in TEXT_COLUMNS[kind]:
        items += [
            ex.ExpectColumnValuesToNotBeNull(column=col, meta={"rule": "nulls"}),
            ex.ExpectColumnValueLengthsToBeBetween(
                column=col,
                min_value=cfg.min_chars,
                max_value=cfg.max_chars,
                meta={"rule": "length"},
            ),
            ex.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column=col, min_value=1 - cfg.max_duplicate_rate, meta={"rule": "duplicates"}
            ),
            ex.ExpectColumnValuesToNotMatchRegex(
                column=col,
                regex=BAD_CHARS,
                mostly=cfg.min_script_fraction,
                meta={"rule": "bad characters"},
            ),
        ]
        if kind == "mono":
            # Each language's rows are held to that language's script.
            items += [
                ex.ExpectColumnValuesToMatchRegex(
                    column=col,
                    regex=script_regex(lang),
                    mostly=cfg.min_script_fraction,
                    row_condition=Column("lang") == lang,
                    meta={"rule": f"script ({lang})"},
                )
                for lang in languages
            ]
        else:
            lang = languages[0] if col == "src" else languages[1]
            items.append(
                ex.ExpectColumnValuesToMatchRegex(
                    column=col,
                    regex=script_regex(lang),
                    mostly=cfg.min_script_fraction,
                    meta={"rule": f"script ({lang})"},
                )
            )
    if kind == "mono":
        items += [
            ex.ExpectColumnValuesToNotBeNull(column="lang", meta={"rule": "language"}),
            ex.ExpectColumnValuesToBeInSet(
                column="lang", value_set=list(languages), meta={"rule": "language"}
            ),
        ]
    else:
        items.append(
            ex.ExpectColumnValuesToBeBetween(
                column="length_ratio",
                min_value=1 / cfg.max_length_ratio,
                max_value=cfg.max_length_ratio,
                mostly=cfg.min_length_ratio_fraction,
                meta={"rule": "length ratio"},
                notes="Derived column: characters in src / characters in tgt.",
            )
        )
    if split != "train":
        trains = ["mono_train"] if kind == "mono" else ["parallel_train", "mono_train"]
        items += [
            ex.ExpectColumnValuesToBeNull(
                column=f"{col}_in_{train}",
                meta={"rule": f"leakage into {train}"},
                notes=f"Derived column: the {col} where it also occurs in {train}.",
            )
            for col in TEXT_COLUMNS[kind]
            for train in trains
        ]
    return gx.ExpectationSuite(name=name, expectations=items)


def run_checks(
    frames: dict[str, pd.DataFrame], cfg: ValidateConfig, languages: list[str], site_dir: str | Path
) -> dict[str, Any]:
    """Validate every split with GX and write the Data Docs site into ``site_dir``.

    ``frames`` must already carry :func:`add_derived_columns`. Returns the GX
    validation result of each split, by split name.
    """
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # One bar over the splits instead of GX's bar per metric batch.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # The ephemeral context comes with a site in a fresh temp dir; use ours only.
    for site in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        SITE_NAME,
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(site_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("clean")
    results = {}
    for name, df in tqdm(frames.items(), desc="validate", unit="split"):
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(build_suite(name, cfg, languages))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        # Each split is its own DataFrame, passed at run time. (A Checkpoint gives all
        # its definitions the same batch parameters, and one Checkpoint per split with
        # an UpdateDataDocsAction re-renders the site each time: twice as slow.)
        results[name] = definition.run(batch_parameters={"dataframe": df})
    context.build_data_docs(site_names=[SITE_NAME])
    return results


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Numbers and flags for ``dvc metrics``: overall and per split."""
    suites = {}
    for name, result in results.items():
        stats = result.statistics
        suites[name] = {
            "success": bool(result.success),
            "evaluated": int(stats["evaluated_expectations"]),
            "failed": int(stats["unsuccessful_expectations"]),
        }
    return {
        "success": all(s["success"] for s in suites.values()),
        "evaluated": sum(s["evaluated"] for s in suites.values()),
        "failed": sum(s["failed"] for s in suites.values()),
        "suites": suites,
    }


def _short(value: Any) -> str:
    text = str(value)
    if len(text) > EXAMPLE_CHARS:
        text = text[: EXAMPLE_CHARS - 1] + "…"
    return repr(text)


def _examples(values: Iterable[Any]) -> str:
    shown = list(dict.fromkeys(_short(v) for v in values))[:EXAMPLES]
    return f", e.g. {', '.join(shown)}" if shown else ""


def describe_failure(where: str, item: Any, frame: pd.DataFrame) -> str:
    """One readable line for a failed expectation: rule, split/column, count, examples."""
    config = item.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column")
    head = f"{where}: {config.meta.get('rule', config.type)}: {config.type}"
    if column:
        head += f"(column={column!r})"
    info = item.exception_info or {}
    # A metric that fails to compute is reported in an entry per metric.
    entries = [info] if "raised_exception" in info else list(info.values())
    crashed = [e for e in entries if isinstance(e, dict) and e.get("raised_exception")]
    if crashed:
        return f"{head}: could not be evaluated: {crashed[0].get('exception_message')}"
    res = item.result
    if "unexpected_count" in res:
        total = res.get("element_count", 0)
        line = f"{head}: {res['unexpected_count']} of {total} rows unexpected"
        if kwargs.get("mostly") is not None:
            line += f" (at most {1 - kwargs['mostly']:.2%} allowed)"
        if config.type == "expect_column_values_to_not_be_null":
            return line
        return line + _examples(res.get("partial_unexpected_list") or [])
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    expected = (
        f"between {low} and {high}"
        if low is not None and high is not None
        else f"at least {low}"
        if low is not None
        else f"at most {high}"
    )
    observed = res.get("observed_value")
    if config.type == "expect_table_row_count_to_be_between":
        return f"{head}: {observed} rows, expected {expected}"
    line = f"{head}: observed {observed}, expected {expected}"
    if config.type == "expect_column_proportion_of_unique_values_to_be_between":
        values = frame[column]
        dupes = values[values.duplicated() & values.notna()]
        line += f"; {len(dupes)} of {len(values)} rows duplicate an earlier row"
        line += _examples(dupes)
    return line


def failures(
    results: dict[str, Any], frames: dict[str, pd.DataFrame], data_dir: str | Path
) -> list[str]:
    lines = []
    for name, result in results.items():
        where = str(split_path(data_dir, name))
        lines += [
            describe_failure(where, item, frames[name])
            for item in result.results
            if not item.success
        ]
    return lines


def validate_clean(
    data_dir: str | Path,
    report_dir: str | Path,
    summary_path: str | Path,
    cfg: ValidateConfig,
    languages: list[str],
) -> dict[str, Any]:
    """The validate stage: check ``data_dir``, write the report and the summary.

    The Data Docs report is written (atomically) whether or not the data pass,
    since it is what one reads to debug a failure. The summary, which later
    stages require, is written only when every expectation passed; otherwise a
    :class:`QualityError` lists each failure on its own line.
    """
    # A summary left from an earlier, passing run must not outlive a failing one.
    Path(summary_path).unlink(missing_ok=True)
    with atomic_output(report_dir, is_dir=True) as site:
        frames = add_derived_columns(load_splits(data_dir))
        results = run_checks(frames, cfg, languages, site)
    summary = summarise(results)
    if not summary["success"]:
        lines = failures(results, frames, data_dir)
        raise QualityError(
            f"{data_dir}: {summary['failed']} of {summary['evaluated']} data quality "
            f"expectations failed (report: {Path(report_dir) / 'index.html'}):\n  "
            + "\n  ".join(lines)
        )
    write_json(summary_path, summary)
    log.info(
        "%d expectations on %d rows passed; report: %s",
        summary["evaluated"],
        sum(len(df) for df in frames.values()),
        Path(report_dir) / "index.html",
    )
    return summary


@dataclass(frozen=True)
class Paths:
    data: Path = path("clean stage output dir")
    report: Path = path("Data Docs site dir to write")
    summary: Path = path("summary JSON to write (DVC metrics)")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The validate stage (reads ``validate`` and the languages of ``clean``)."""
    return Result(
        validate_clean(
            paths.data, paths.report, paths.summary, params.validate_, params.clean.languages
        )
    )
