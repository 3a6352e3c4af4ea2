"""The ``quantise`` stage: the distilled student (and the teacher) as ONNX int8, compared
with their fp32 forms on size, decoding speed and quality. The smallest int8 variant whose
BLEU is within ``quantise.max_bleu_drop`` of the fp32 student's is shipped.

The int8 models are :mod:`lmops.core.quantised`'s; quality is scored by
:func:`lmops.pipeline.evaluate.evaluate_model`, the evaluate stage's own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from lmops.config import EvaluateConfig, Params
from lmops.core.hardware import facts
from lmops.core.model import Transformer
from lmops.core.quantised import (
    QuantiseError,
    decode_speed,
    export_onnx,
    file_bytes,
    load_quantised,
    read_config,
)
from lmops.io import atomic_output, read_json, write_json
from lmops.pipeline import Result, path

# --------------------------------------------------------------- the stage

TABLE_COLUMNS = ["variant", "format", "bleu", "chrf", "ppl_en", "ppl_fr", "num_params", "file_mb"]


def comparison_table(rows: dict[str, dict[str, Any]], baseline: str) -> pd.DataFrame:
    """One row per variant; ``speedup_b<n>`` and ``bleu_delta`` against ``baseline``."""
    table = pd.DataFrame([{"variant": name, **row} for name, row in rows.items()])
    base = rows[baseline]
    for col in [c for c in table.columns if c.startswith("tokens_per_sec_b")]:
        table[f"speedup_{col.rsplit('_', 1)[1]}"] = table[col] / base[col]
    table["bleu_delta"] = table["bleu"] - base["bleu"]
    table["size_ratio"] = table["file_mb"] / base["file_mb"]
    first = [c for c in TABLE_COLUMNS if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def plot_comparison(table: pd.DataFrame, png_path: str | Path) -> Path:
    """Bar charts of BLEU, file size and decoding speed, one bar per variant."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    speed = sorted(c for c in table.columns if c.startswith("tokens_per_sec_b"))
    panels = [("bleu", "BLEU"), ("file_mb", "file size (MB)")] + [
        (c, f"greedy tokens/s, batch {c.rsplit('_b', 1)[1]}") for c in speed
    ]
    fig = Figure(figsize=(4 * len(panels), 4), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (col, title) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.barh(table["variant"], table[col], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp)
    return Path(png_path)


def _scores(path: str | Path, what: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise QuantiseError(f"{path}: the {what}'s metrics are missing (dvc repro distil)")
    return read_json(path)


def _load_fp32(path: str | Path, what: str) -> Transformer:
    from lmops.core.translation import load_model

    path = Path(path)
    if not path.is_dir():
        raise QuantiseError(f"{path}: {what} model not found (dvc repro distil)")
    return load_model(path)[0]


COMPARISON_CSV = "comparison.csv"
COMPARISON_PNG = "comparison.png"
QUALITY_KEYS = ("bleu", "chrf", "ppl_en", "ppl_fr", "test_pairs", "num_params")
STUDENT_INT8 = "student onnx int8"
TEACHER_INT8 = "teacher onnx int8"
BASELINE = "student fp32"


def int8_eval_config(ev: EvaluateConfig) -> EvaluateConfig:
    """Evaluate's settings as the int8 variants are scored: onnxruntime runs on the cpu,
    in fp32 activations; no samples table."""
    return ev.model_copy(update={"precision": "fp32", "device": "cpu", "n_samples": 0})


def choose_shipped(table: pd.DataFrame, max_bleu_drop: float) -> str:
    """The variant to ship: of the int8 variants whose test BLEU is at most
    ``max_bleu_drop`` below the fp32 student's (``bleu_delta``), the smallest file; of
    equal files, the higher BLEU. Raises :class:`QuantiseError` when none is within it."""
    int8 = table[table["format"] != "torch-fp32"]
    within = int8[int8["bleu_delta"] >= -max_bleu_drop]
    if within.empty:
        base = table.loc[table["variant"] == BASELINE, "bleu"].iloc[0]
        fell = ", ".join(
            f"{r.variant} {r.bleu:.2f} ({r.bleu_delta:+.2f})" for r in int8.itertuples()
        )
        raise QuantiseError(
            f"quantise.max_bleu_drop: no int8 variant is within {max_bleu_drop:g} BLEU of the "
            f"fp32 student's {base:.2f}: {fell}. Nothing was shipped; raise "
            "quantise.max_bleu_drop to accept the loss"
        )
    best = within.sort_values(["file_mb", "bleu"], ascending=[True, False], kind="stable")
    return str(best["variant"].iloc[0])


def compare_variants(paths: Paths, params: Params) -> tuple[dict[str, Any], pd.DataFrame]:
    """Quantise, score and time every variant; ship the one :func:`choose_shipped` picks.

    The fp32 student's scores come from its metrics (distil stage), the fp32 teacher's
    BLEU and chrF from its test translations (evaluate stage) and its perplexity is
    measured here. Writes every variant's model dir and test translations under
    ``paths.work``, the shipped model dir at ``paths.out``; returns the metrics and the
    comparison table.
    """
    student_dir, teacher_dir, vocab_dir = paths.student, paths.teacher, paths.vocab
    clean_dir, tokens_dir, student_metrics = paths.clean, paths.tokens, paths.student_metrics
    teacher_translations, work_dir, out_model = paths.teacher_translations, paths.work, paths.out
    from lmops.core.translation import check_vocab, prompt, read_pairs
    from lmops.core.vocab import Tokenizer
    from lmops.data.layout import read_split
    from lmops.pipeline.evaluate import (
        MONO_TEST,
        PAIRS_TEST,
        evaluate_model,
        perplexity,
        score_translations,
    )

    cfg, ev = params.quantise, params.evaluate
    tgt_lang = params.clean.target_lang
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    student = _load_fp32(student_dir, "student")
    teacher = _load_fp32(teacher_dir, "teacher")
    tok = Tokenizer.load(vocab_dir)
    check_vocab(student, tok, student_dir)
    teacher_scores = {
        **score_translations(teacher_translations),
        **perplexity(teacher, tok, read_split(clean_dir, MONO_TEST), ev),
    }
    fp32_scores = {
        "student fp32": _scores(student_metrics, "student"),
        "teacher fp32": {**teacher_scores, "num_params": teacher.num_params()},
    }
    pairs = read_pairs(Path(tokens_dir) / PAIRS_TEST)
    prompts = [
        prompt(tok, s, tgt_lang, student.cfg.block_size)
        for s in pairs["src_ids"].iloc[: cfg.speed_sentences]
    ]
    int8_eval = int8_eval_config(ev)
    work_dir = Path(work_dir)
    with atomic_output(work_dir, is_dir=True) as tmp:
        dirs = {
            STUDENT_INT8: export_onnx(student, tmp / "student_onnx_int8", meta={"of": "student"})
        }
        if cfg.teacher:
            dirs[TEACHER_INT8] = export_onnx(
                teacher, tmp / "teacher_onnx_int8", meta={"of": "teacher"}
            )
        # score what was written: each variant is rebuilt from its files
        models = {name: load_quantised(path, cfg.num_threads) for name, path in dirs.items()}
        scores = dict(fp32_scores)
        for name, model in models.items():
            # OrtTransformer runs its session behind the Transformer's decoding API
            scores[name], _ = evaluate_model(
                cast(Transformer, model),
                tok,
                clean_dir,
                tokens_dir,
                int8_eval,
                tgt_lang,
                tmp / "eval" / name.replace(" ", "_"),
            )
        pairs_scored = {name: s.get("test_pairs") for name, s in scores.items()}
        if len(set(pairs_scored.values())) != 1:
            raise QuantiseError(f"variants were scored on different test pairs: {pairs_scored}")
        timed: dict[str, nn.Module] = {
            "teacher fp32": teacher.cpu().eval(),
            "student fp32": student.cpu().eval(),
            **models,
        }
        if not cfg.teacher:
            del timed["teacher fp32"]
        speed = decode_speed(
            timed,
            prompts,
            cfg.speed_batch_sizes,
            ev.decode.max_new_tokens,
            tok.eos_id,
            tok.pad_id,
            cfg.speed_rounds,
        )
        sizes = {
            "teacher fp32": file_bytes(teacher_dir),
            "student fp32": file_bytes(student_dir),
            **{name: file_bytes(path) for name, path in dirs.items()},
        }
        formats = {
            "teacher fp32": "torch-fp32",
            "student fp32": "torch-fp32",
            **{name: read_config(path)["format"] for name, path in dirs.items()},
        }
        rows = {
            name: {
                "format": formats[name],
                **{k: scores[name].get(k) for k in QUALITY_KEYS},
                "file_mb": sizes[name] / 2**20,
                **speed.get(name, {}),
            }
            for name in timed
        }
        table = comparison_table(rows, baseline=BASELINE)
        speed_cols = [c for c in table.columns if c.startswith("speedup_b")]
        shipped = choose_shipped(table, cfg.max_bleu_drop)
        table["shipped"] = table["variant"] == shipped
        table.to_csv(tmp / COMPARISON_CSV, index=False)
        plot_comparison(table, tmp / COMPARISON_PNG)
    _copy_dir(work_dir / dirs[shipped].name, out_model)
    metrics = _metrics(table, shipped, speed_cols)
    # every variant is timed on the cpu in fp32 activations (see decode_speed)
    metrics["hardware"] = facts(torch.device("cpu"), None, compiled=False)
    return metrics, table


def _copy_dir(src: Path, dst: str | Path) -> None:
    import shutil

    with atomic_output(dst, is_dir=True) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)


def _metrics(table: pd.DataFrame, shipped: str, speed_cols: list[str]) -> dict[str, Any]:
    """Per-variant figures under their names, and the shipped variant's goal figures."""
    out: dict[str, Any] = {"shipped": shipped}
    for row in table.to_dict("records"):
        key = str(row.pop("variant")).replace(" ", "_")
        out[key] = {
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in row.items()
            if v is not None and not (isinstance(v, float) and np.isnan(v))
        }
    ship = out[shipped.replace(" ", "_")]
    out["shipped_size_ratio"] = ship["size_ratio"]
    out["shipped_bleu_delta"] = ship["bleu_delta"]
    for col in speed_cols:
        out[f"shipped_{col}"] = ship[col]
    return out


@dataclass(frozen=True)
class Paths:
    student: Path = path("distil stage model dir")
    teacher: Path = path("finetune stage model dir")
    vocab: Path = path("vocab stage output dir")
    clean: Path = path("clean stage output dir (mono_test)")
    tokens: Path = path("tokenise stage output dir (parallel_test)")
    student_metrics: Path = path("the student's metrics (distil)")
    teacher_translations: Path = path("the teacher's test translations (evaluate stage)")
    work: Path = path("dir for every variant and its translations")
    out: Path = path("the shipped int8 model dir")
    metrics: Path = path("metrics JSON to write")
    table: Path = path("comparison CSV, one row per variant")


def run(paths: Paths, params: Params, log: object = None) -> Result:
    """The quantise stage (reads ``quantise``, ``evaluate`` and the target language of
    ``clean``); the table compares every variant."""
    metrics, table = compare_variants(paths, params)
    with atomic_output(paths.table) as tmp:
        table.to_csv(tmp, index=False)
    write_json(paths.metrics, metrics)
    return Result(metrics, table)
