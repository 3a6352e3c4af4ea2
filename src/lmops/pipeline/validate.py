"""Great Expectations checks on the clean stage's output (the ``validate`` stage).

Every split is checked shard by shard, so memory is bounded by a shard, not by the corpus:
the rules that look at one row at a time (nulls, lengths, script, language, length ratio,
leakage) run on every row of each shard (one GX validation named ``<split>.part-NNNNN``);
the rules that need the whole split (row count, duplicate rate) run on a seeded sample of
up to ``validate.sample_rows`` rows (``<split>.sample``: every row of a smaller split), and
their Data Docs entries say so. Rules that span two columns or two splits (length ratio,
leakage) become derived columns first, so GX checks a plain per-row value and the Data Docs
list only the offending rows, never the whole training set.

The regexes are RE2 syntax: pandas 3 stores text as pyarrow strings, and GX's
pandas regex check runs through pyarrow's RE2 engine (linear time, and it knows
Unicode scripts such as ``\\p{Latin}``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm.auto import tqdm

from lmops.config import Params, ValidateConfig
from lmops.data import layout
from lmops.data.layout import MONO_COLUMNS, PARALLEL_COLUMNS, SPLITS
from lmops.data.sample import sample_rows
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


@dataclass
class Batch:
    """What one GX validation checks: a shard's rows, or a split's sample."""

    name: str  # the validation's name: <split>.part-NNNNN or <split>.sample
    split: str
    where: str  # for messages: the shard's path, or the split's and the sample's size
    frame: pd.DataFrame
    rules: Literal["rows", "sample"]


def _check_columns(df: pd.DataFrame, where: Path | str, kind: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} (expected {list(REQUIRED_COLUMNS[kind])})"
        )


def _text(series: pd.Series) -> pd.Series:
    # pandas 3 "str" dtype keeps missing values missing (astype(object) would not).
    return series.astype("str")


def _matches(values: pd.Series, pool: set[str]) -> pd.Series:
    """The value where it also occurs in ``pool``, else missing."""
    found = values.map(lambda v: isinstance(v, str) and v in pool).astype(bool)
    return values.where(found)


# the training split (and its column) a held-out text column must not occur in
_LEAK_TARGETS = {
    "mono": {"text": [("mono_train", "text")]},
    "parallel": {
        "src": [("parallel_train", "src"), ("mono_train", "text")],
        "tgt": [("parallel_train", "tgt"), ("mono_train", "text")],
    },
}


def leaked_texts(data_dir: str | Path) -> dict[tuple[str, str], set[str]]:
    """For each training split and column, the held-out texts that occur in it: the held-out
    texts are collected first, then each training split streams past them once."""
    held: dict[tuple[str, str], set[str]] = {}
    for kind, targets in _LEAK_TARGETS.items():
        for split in SPLITS[1:]:
            for col, trains in targets.items():
                for _, _, df in layout.iter_split(data_dir, f"{kind}_{split}", columns=[col]):
                    if col in df.columns:
                        texts = set(df[col].dropna().astype(object))
                        for target in trains:
                            held.setdefault(target, set()).update(texts)
    found: dict[tuple[str, str], set[str]] = {t: set() for t in held}
    for (train, col), texts in held.items():
        for _, _, df in layout.iter_split(data_dir, train, columns=[col]):
            if col in df.columns:
                found[(train, col)].update(texts.intersection(df[col].dropna().astype(object)))
    return found


def add_derived_columns(
    name: str, df: pd.DataFrame, leaked: dict[tuple[str, str], set[str]]
) -> pd.DataFrame:
    """Per-row columns for the rules that span two columns or two splits.

    ``length_ratio`` = len(src) / len(tgt). ``<col>_in_<train split>`` holds the
    text where a valid/test text also occurs in that training split, so a
    "values to be null" expectation lists exactly the leaked texts.
    """
    df = df.copy()
    for col in ("text", "src", "tgt"):
        if col in df.columns:
            df[col] = _text(df[col])
    kind, split = name.split("_", 1)
    if kind == "parallel":
        # pandas-stubs want an int for an int Series; NaN upcasts it to float
        tgt_len = df["tgt"].str.len().replace(0, float("nan"))  # type: ignore[arg-type]
        df["length_ratio"] = (df["src"].str.len() / tgt_len).round(3)
    if split != "train":
        for col, trains in _LEAK_TARGETS[kind].items():
            for train, train_col in trains:
                df[f"{col}_in_{train}"] = _matches(df[col], leaked.get((train, train_col), set()))
    return df


def batches(
    data_dir: str | Path, cfg: ValidateConfig, leaked: dict[tuple[str, str], set[str]]
) -> Iterator[Batch]:
    """Every shard of every split (its columns checked, derived columns added), then each
    split's sample."""
    for kind in ("mono", "parallel"):
        for name in split_names(kind):
            for shard in layout.split_files(data_dir, name):
                df = layout.read_shard(shard, name)
                _check_columns(df, shard, kind)
                frame = add_derived_columns(name, df, leaked)
                yield Batch(f"{name}.{shard.stem}", name, str(shard), frame, "rows")
            sample, n = sample_rows(
                data_dir, name, cfg.sample_rows, cfg.sample_seed, TEXT_COLUMNS[kind]
            )
            where = f"{layout.split_path(data_dir, name)} (sample: {len(sample)} of {n} rows)"
            frame = sample.assign(**{c: _text(sample[c]) for c in TEXT_COLUMNS[kind]})
            yield Batch(f"{name}.sample", name, where, frame, "sample")


def build_suite(
    name: str, cfg: ValidateConfig, languages: list[str], rules: str = "rows", suite: str = ""
) -> Any:
    """The expectation suite for split ``name`` (e.g. ``parallel_valid``): the per-row rules
    (``rows``, for each shard) or the whole-split ones (``sample``, for its sample)."""
    gx = _gx()
    from great_expectations.expectations.row_conditions import Column

    ex = gx.expectations
    kind, split = name.split("_", 1)
    if rules == "sample":
        note = (
            f"On a seeded sample of up to validate.sample_rows ({cfg.sample_rows}) rows of "
            f"{name}: every row when the split is smaller."
        )
        sampled: list[Any] = [
            ex.ExpectTableRowCountToBeBetween(
                min_value=cfg.min_rows, meta={"rule": "row count"}, notes=note
            )
        ]
        sampled += [
            ex.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column=col,
                min_value=1 - cfg.max_duplicate_rate,
                meta={"rule": "duplicates"},
                notes=note,
            )
            for col in TEXT_COLUMNS[kind]
        ]
        return gx.ExpectationSuite(name=suite or f"{name}.sample", expectations=sampled)
    items: list[Any] = []
    for col in TEXT_COLUMNS[kind]:
        items += [
            ex.ExpectColumnValuesToNotBeNull(column=col, meta={"rule": "nulls"}),
            ex.ExpectColumnValueLengthsToBeBetween(
                column=col,
                min_value=cfg.min_chars,
                max_value=cfg.max_chars,
                meta={"rule": "length"},
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
    return gx.ExpectationSuite(name=suite or name, expectations=items)


def run_checks(
    checks: Iterable[Batch], cfg: ValidateConfig, languages: list[str], site_dir: str | Path
) -> dict[str, tuple[Batch, Any]]:
    """Validate every batch with GX and write the Data Docs site into ``site_dir``.

    Each shard's frame is let go once checked (only a failed sample's is kept, for its
    examples). Returns each batch (by its name) with its GX validation result.
    """
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # One bar over the batches instead of GX's bar per metric batch.
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
    for check in tqdm(checks, desc="validate", unit=" batch"):
        name = check.name
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(build_suite(check.split, cfg, languages, check.rules, name))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        # Each batch is its own DataFrame, passed at run time. (A Checkpoint gives all
        # its definitions the same batch parameters, and one Checkpoint per batch with
        # an UpdateDataDocsAction re-renders the site each time: twice as slow.)
        result = definition.run(batch_parameters={"dataframe": check.frame})
        # GX's execution engine keeps every batch's data and every metric it resolves
        # (per-row Series included) for the rest of the run, keyed by batch: no later
        # batch can use them, and kept they would grow the stage's memory by more than the
        # corpus's size. GX 1.24 has no switch for either.
        engine = source.get_execution_engine()
        engine.batch_manager.batch_data_cache.clear()
        engine.batch_manager.reset_batch_cache()
        engine._metric_cache.clear()
        result.meta.get("batch_spec", {}).pop("batch_data", None)  # the frame itself
        if result.success or check.rules == "rows":
            check.frame = pd.DataFrame()  # its examples are in the result (a slice would
            # keep the shard's buffers alive)
        results[name] = (check, result)
    context.build_data_docs(site_names=[SITE_NAME])
    return results


def summarise(results: dict[str, tuple[Batch, Any]]) -> dict[str, Any]:
    """Numbers and flags for ``dvc metrics``: overall and per split (its shards and its
    sample together)."""
    suites: dict[str, dict[str, Any]] = {}
    for check, result in results.values():
        stats = result.statistics
        suite = suites.setdefault(check.split, {"success": True, "evaluated": 0, "failed": 0})
        suite["success"] = suite["success"] and bool(result.success)
        suite["evaluated"] += int(stats["evaluated_expectations"])
        suite["failed"] += int(stats["unsuccessful_expectations"])
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


def failures(results: dict[str, tuple[Batch, Any]]) -> list[str]:
    """One line per failed expectation, naming the shard (or the split's sample)."""
    return [
        describe_failure(check.where, item, check.frame)
        for check, result in results.values()
        for item in result.results
        if not item.success
    ]


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
    for kind in ("mono", "parallel"):  # every split is there before any work starts
        for name in split_names(kind):
            layout.split_files(data_dir, name)
    with atomic_output(report_dir, is_dir=True) as site:
        leaked = leaked_texts(data_dir)
        results = run_checks(batches(data_dir, cfg, leaked), cfg, languages, site)
    summary = summarise(results)
    if not summary["success"]:
        raise QualityError(
            f"{data_dir}: {summary['failed']} of {summary['evaluated']} data quality "
            f"expectations failed (report: {Path(report_dir) / 'index.html'}):\n  "
            + "\n  ".join(failures(results))
        )
    write_json(summary_path, summary)
    rows = sum(layout.split_rows(data_dir, name) for name in summary["suites"])
    log.info(
        "%d expectations on %d rows passed; report: %s",
        summary["evaluated"],
        rows,
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
