"""The bad-input matrix: every stage, fed broken inputs, bad params or a full disk, exits 1
with one message that names the file, line or key; leaves none of its outputs behind (and
no temporary ones); and its MLflow run ends FAILED with the message as ``lmops.error``.

Stages run in this process through their scripts' ``main`` and ``stage.run`` (as
``python stages/X.py`` runs them) on tiny upstream artifacts built once with the library.
A full disk is simulated with RLIMIT_FSIZE: a write past the limit fails with EFBIG.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource  # RLIMIT_FSIZE: POSIX, as the whole project
import runpy
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lmops.config import ModelConfig, TokeniseConfig, VocabConfig, deep_merge
from lmops.core import checkpoint
from lmops.core.model import Transformer
from lmops.core.translation import save_model
from lmops.data import layout
from lmops.pipeline import tokenise, vocab
from lmops.tracking import runs as tracking
from lmops.tracking import stage
from tests.conftest import REPO, dvc_env
from tests.support.helpers import make_clean

EXPERIMENT = "lmops-test-bad-input"
# Small enough that every stage's first real output exceeds it, large enough for the
# MLflow file store's own small files (params, tags, meta.yaml, the params file).
DISK_LIMIT = 8 * 1024

# ----------------------------------------------------------------- upstream artifacts

PARAMS: dict[str, Any] = {
    "seed": 7,
    "clean": {
        "sources": [
            {
                "name": "docs",
                "type": "text",
                "role": "monolingual",
                "lang": "en",
                "path": "docs.txt",
            }
        ],
        "split": {"valid_fraction": 0.25, "test_fraction": 0.25},
    },
    "vocab": {"vocab_size": 120, "byte_fallback": False, "num_threads": 1},
    "tokenise": {"num_proc": 1, "batch_size": 100},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
    "pretrain": {
        "max_steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "eval_interval": 1,
        "eval_batches": 1,
        "checkpoint_interval": 1,
        "log_interval": 1,
        "device": "cpu",
    },
    "finetune": {
        "max_steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "eval_interval": 1,
        "eval_batches": 1,
        "checkpoint_interval": 1,
        "log_interval": 1,
        "bleu_samples": 2,
        "device": "cpu",
    },
    "evaluate": {
        "decode": {"beam_size": 1, "max_new_tokens": 4, "batch_size": 64},
        "max_test_pairs": 8,
        "n_samples": 2,
        "device": "cpu",
    },
    "distil": {
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 1, "block_size": 32},
        "max_steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "eval_interval": 1,
        "eval_batches": 1,
        "checkpoint_interval": 1,
        "log_interval": 1,
        "bleu_samples": 2,
        "device": "cpu",
    },
    "quantise": {"teacher": False, "speed_sentences": 2, "speed_batch_sizes": [1]},
}


@dataclass(frozen=True)
class Upstream:
    """What each stage reads, built once: the outputs of the stages before it."""

    clean: Path
    quality: Path
    vocab: Path
    tokens: Path
    model: Path
    translations: Path
    student_metrics: Path


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Upstream:
    root = tmp_path_factory.mktemp("upstream")
    clean = make_clean(root / "clean", n=120)
    quality = root / "validate.json"
    quality.write_text('{"success": true}\n')
    vocab.build_vocab(clean, root / "vocab", VocabConfig(**PARAMS["vocab"]), ["en", "fr"], 7)
    tokenise.tokenise(clean, root / "vocab", root / "tokens", TokeniseConfig(**PARAMS["tokenise"]))
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(**PARAMS["model"]),
        json.loads((root / "vocab/meta.json").read_text())["vocab_size"],
    )
    save_model(model, root / "model", {"stage": "finetune", "target_lang": "fr"})
    test = layout.read_split(clean, "parallel_test").head(PARAMS["evaluate"]["max_test_pairs"])
    translations = root / "translations.tsv"
    pd.DataFrame(
        {"source": test["src"], "reference": test["tgt"], "hypothesis": test["tgt"]}
    ).to_csv(translations, sep="\t", index=False)
    student_metrics = root / "distil.json"
    student_metrics.write_text(
        json.dumps(
            {
                "bleu": 1.0,
                "chrf": 10.0,
                "ppl_en": 100.0,
                "ppl_fr": 100.0,
                "test_pairs": len(test),
                "num_params": model.num_params(),
            }
        )
    )
    return Upstream(
        clean,
        quality,
        root / "vocab",
        root / "tokens",
        root / "model",
        translations,
        student_metrics,
    )


def argv_of(name: str, up: Upstream) -> dict[str, str]:
    """Each stage's arguments as dvc.yaml passes them: inputs upstream, outputs under data/."""
    return {
        "clean": {"--out": "data/clean", "--stats": "data/metrics/clean.json"},
        "validate": {
            "--data": str(up.clean),
            "--report": "data/validate",
            "--summary": "data/metrics/validate.json",
        },
        "vocab": {"--data": str(up.clean), "--quality": str(up.quality), "--out": "data/vocab"},
        "tokenise": {
            "--data": str(up.clean),
            "--vocab": str(up.vocab),
            "--out": "data/tokens",
            "--stats": "data/metrics/tokenise.json",
        },
        "pretrain": {
            "--tokens": str(up.tokens),
            "--vocab": str(up.vocab),
            "--work": "data/train/pretrain",
            "--out": "data/models/pretrain",
            "--metrics": "data/metrics/pretrain.json",
            "--curve": "data/plots/pretrain.csv",
        },
        "finetune": {
            "--tokens": str(up.tokens),
            "--vocab": str(up.vocab),
            "--init": str(up.model),
            "--work": "data/train/finetune",
            "--out": "data/models/finetune",
            "--metrics": "data/metrics/finetune.json",
            "--curve": "data/plots/finetune.csv",
        },
        "evaluate": {
            "--model": str(up.model),
            "--vocab": str(up.vocab),
            "--clean": str(up.clean),
            "--tokens": str(up.tokens),
            "--out": "data/evaluate",
            "--metrics": "data/metrics/evaluate.json",
        },
        "distil": {
            "--tokens": str(up.tokens),
            "--vocab": str(up.vocab),
            "--clean": str(up.clean),
            "--teacher": str(up.model),
            "--teacher-translations": str(up.translations),
            "--work": "data/train/distil",
            "--out": "data/models/distil",
            "--eval-out": "data/distil",
            "--metrics": "data/metrics/distil.json",
            "--curve": "data/plots/distil.csv",
        },
        "quantise": {
            "--student": str(up.model),
            "--teacher": str(up.model),
            "--vocab": str(up.vocab),
            "--clean": str(up.clean),
            "--tokens": str(up.tokens),
            "--student-metrics": str(up.student_metrics),
            "--teacher-translations": str(up.translations),
            "--work": "data/quantise",
            "--out": "data/models/quantised",
            "--metrics": "data/metrics/quantise.json",
            "--table": "data/plots/quantise.csv",
        },
    }[name]


# what dvc.yaml lists as each stage's outs, metrics and plots; a persist: true work dir
# (checkpoints kept so that a killed run resumes) is not among them
OUTS = {
    "clean": ["data/clean", "data/metrics/clean.json"],
    "validate": ["data/validate", "data/metrics/validate.json"],
    "vocab": ["data/vocab"],
    "tokenise": ["data/tokens", "data/metrics/tokenise.json"],
    "pretrain": ["data/models/pretrain", "data/metrics/pretrain.json", "data/plots/pretrain.csv"],
    "finetune": ["data/models/finetune", "data/metrics/finetune.json", "data/plots/finetune.csv"],
    "evaluate": ["data/evaluate", "data/metrics/evaluate.json"],
    "distil": [
        "data/models/distil",
        "data/distil",
        "data/metrics/distil.json",
        "data/plots/distil.csv",
    ],
    "quantise": [
        "data/models/quantised",
        "data/quantise",
        "data/metrics/quantise.json",
        "data/plots/quantise.csv",
    ],
}
STAGES = list(OUTS)
SCRIPTS = {name: runpy.run_path(str(REPO / "stages" / f"{name}.py")) for name in STAGES}


# ----------------------------------------------------------------------- the faults

Setup = Callable[[Path, Upstream], dict[str, str]]


@dataclass(frozen=True)
class Case:
    stage: str
    fault: str
    expect: tuple[str, ...]  # parts of the message, in order
    setup: Setup = lambda tmp, up: {}
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.fault}"


def copy_of(src: Path, tmp: Path) -> Path:
    dst = tmp / "in" / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not what it should be\n" * 4)


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def raw_file(content: bytes, name: str = "docs.txt") -> Setup:
    def setup(tmp: Path, up: Upstream) -> dict[str, str]:
        (tmp / name).write_bytes(content)
        return {}

    return setup


def clean_with(change: Callable[[Path], None], arg: str = "--data") -> Setup:
    """A copy of the clean stage's output with one change."""

    def setup(tmp: Path, up: Upstream) -> dict[str, str]:
        clean = copy_of(up.clean, tmp)
        change(clean)
        return {arg: str(clean)}

    return setup


def tokens_with(change: Callable[[Path], None]) -> Setup:
    def setup(tmp: Path, up: Upstream) -> dict[str, str]:
        tokens = copy_of(up.tokens, tmp)
        change(tokens)
        return {"--tokens": str(tokens)}

    return setup


def model_with(change: Callable[[Path], None], arg: str) -> Setup:
    def setup(tmp: Path, up: Upstream) -> dict[str, str]:
        model = copy_of(up.model, tmp)
        change(model)
        return {arg: str(model)}

    return setup


def missing(arg: str, path: str = "data/nothing-here") -> Setup:
    return lambda tmp, up: {arg: path}


def no_rows(split: str) -> Callable[[Path], None]:
    return lambda clean: layout.write_split(
        layout.read_split(clean, split).iloc[:0], clean, split, "parquet"
    )


def other_vocab(tmp: Path, up: Upstream) -> dict[str, str]:
    """A vocabulary of another size than the tokens and the model were made with."""
    out = tmp / "in" / "vocab"
    vocab.build_vocab(
        up.clean, out, VocabConfig(**{**PARAMS["vocab"], "vocab_size": 110}), ["en", "fr"], 7
    )
    return {"--vocab": str(out)}


def corrupted_resume_checkpoint(tmp: Path, up: Upstream) -> dict[str, str]:
    """A pretrain work dir whose last checkpoint has a damaged weights file."""
    torch.manual_seed(0)
    ckpt = checkpoint.step_path(Path("data/train/pretrain/ckpt"), "step", 1)
    checkpoint.save(
        ckpt, Transformer(ModelConfig(**PARAMS["model"]), 120), {"any": "config"}, state={"step": 1}
    )
    flip_byte(ckpt / checkpoint.WEIGHTS)
    return {}


UTF16 = "Hello there.\nGood morning.\n".encode("utf-16")
LONG_LINE = b"Short line one.\n" + b"x" * 9000 + b"\nShort line two.\n"

CASES = [
    # raw inputs of the clean stage (more in test_clean_bad_input.py)
    Case("clean", "empty-file", ("docs.txt: file is empty (0 bytes)",), raw_file(b"")),
    Case(
        "clean",
        "binary-file",
        ("docs.txt: binary file (NUL byte at byte offset 8)",),
        raw_file(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ),
    Case(
        "clean",
        "latin-1",
        ("docs.txt: line 2: not valid UTF-8 (byte 0xe9", "re-encode the file as UTF-8"),
        raw_file("A line.\nUn café.\n".encode("latin-1")),
    ),
    Case(
        "clean",
        "utf-16",
        ("docs.txt: encoded as UTF-16LE, expected UTF-8", "iconv -f UTF-16LE -t UTF-8"),
        raw_file(UTF16),
    ),
    Case(
        "clean",
        "misaligned-pairs",
        ("a.en has 3 lines but a.fr has 2: parallel files must be aligned line by line",),
        lambda tmp, up: {
            **raw_file(b"One.\nTwo.\nThree.\n", "a.en")(tmp, up),
            **raw_file(b"Un.\nDeux.\n", "a.fr")(tmp, up),
        },
        {
            "clean": {
                "sources": [
                    {
                        "name": "a",
                        "type": "text",
                        "role": "parallel",
                        "src_path": "a.en",
                        "tgt_path": "a.fr",
                    }
                ]
            }
        },
    ),
    Case(
        "clean",
        "line-over-max-bytes",
        ("docs.txt: line 2 is over 8000 bytes (clean.max_line_bytes)",),
        raw_file(LONG_LINE),
        {"clean": {"max_line_bytes": 8000}},
    ),
    Case(
        "clean",
        "no-line-breaks",
        ("docs.txt: line 1 is over 8000 bytes",),
        raw_file(b"word " * 4000),
        {"clean": {"max_line_bytes": 8000}},
    ),
    Case(
        "clean",
        "params-file-missing",
        ("nowhere.yaml: parameters file not found",),
        lambda tmp, up: {"--params": "nowhere.yaml"},
    ),
    Case(
        "clean",
        "params-not-yaml",
        ("params.yaml: not valid YAML",),
        raw_file(b"clean: [unclosed\n", "params.yaml"),
    ),
    # the clean stage's output, read by validate, vocab and tokenise
    Case(
        "validate",
        "missing-upstream",
        ("data/nothing-here/mono_train: missing (did the clean stage run?)",),
        missing("--data"),
    ),
    Case(
        "validate",
        "corrupted-parquet",
        (
            "mono_valid/part-00000.parquet: cannot be read as parquet",
            "rerun the clean stage",
        ),
        clean_with(lambda d: garbage(d / "mono_valid/part-00000.parquet")),
    ),
    Case(
        "validate",
        "empty-parquet",
        ("parallel_test/part-00000.parquet: file is empty (0 bytes)",),
        clean_with(lambda d: (d / "parallel_test/part-00000.parquet").write_bytes(b"")),
    ),
    Case(
        "validate",
        "missing-column",
        ("parallel_train/part-00000.parquet: missing column(s) ['group']",),
        clean_with(
            lambda d: layout.write_split(
                layout.read_split(d, "parallel_train").drop(columns="group"),
                d,
                "parallel_train",
                "parquet",
            )
        ),
    ),
    Case(
        "vocab",
        "missing-upstream",
        ("data/nothing-here/mono_train: missing",),
        missing("--data"),
    ),
    Case(
        "vocab",
        "truncated-parquet",
        ("mono_train/part-00000.parquet: cannot be read as parquet",),
        clean_with(lambda d: truncate(d / "mono_train/part-00000.parquet")),
    ),
    Case(
        "vocab",
        "no-rows",
        ("mono_train: no text to train the vocabulary on",),
        clean_with(no_rows("mono_train")),
    ),
    Case(
        "vocab",
        "validation-failed",
        ("v.json: data validation failed",),
        lambda tmp, up: {
            **raw_file(b'{"success": false}', "v.json")(tmp, up),
            "--quality": "v.json",
        },
    ),
    Case(
        "tokenise", "missing-vocab", ("data/nothing-here/meta.json: not found",), missing("--vocab")
    ),
    Case(
        "tokenise",
        "corrupted-parquet",
        ("mono_train/part-00000.parquet: cannot be read as parquet",),
        clean_with(lambda d: garbage(d / "mono_train/part-00000.parquet")),
    ),
    Case(
        "tokenise",
        "no-rows",
        ("mono_train: no rows, so no pretraining text",),
        clean_with(no_rows("mono_train")),
    ),
    Case(
        "tokenise",
        "misaligned-pairs",
        ("parallel_train: row 3: 'tgt' is missing",),
        clean_with(
            lambda d: layout.write_split(
                layout.read_split(d, "parallel_train").assign(
                    tgt=lambda df: df["tgt"].where(df.index != 3)
                ),
                d,
                "parallel_train",
                "parquet",
            )
        ),
    ),
    # the token streams, read by pretrain (and finetune)
    Case(
        "pretrain",
        "truncated-tokens",
        (
            "pretrain_train.bin: expected",
            "tokens (",
            "but the file has",
            "rerun the tokenise stage",
        ),
        tokens_with(lambda d: truncate(d / "pretrain_train.bin")),
    ),
    Case("pretrain", "missing-tokens", ("data/nothing-here: not found",), missing("--tokens")),
    Case(
        "pretrain",
        "corrupted-sidecar",
        ("pretrain_valid.json: not a token stream sidecar",),
        tokens_with(lambda d: garbage(d / "pretrain_valid.json")),
    ),
    Case(
        "pretrain",
        "tokens-of-another-vocab",
        (
            "pretrain_train.json: tokens made with a vocabulary of 120 pieces, but this "
            "vocabulary has 110",
        ),
        other_vocab,
    ),
    Case(
        "pretrain",
        "corrupted-checkpoint",
        (
            "step-00000001/model.safetensors: sha256 does not match manifest.json",
            "delete data/train/pretrain/ckpt/step-00000001 to start pretrain afresh",
        ),
        corrupted_resume_checkpoint,
    ),
    # model directories (safetensors + sha256 manifest), read by the later stages
    Case("finetune", "missing-model", ("data/nothing-here: not found",), missing("--init")),
    Case(
        "finetune",
        "corrupted-model",
        ("model.safetensors: sha256 does not match manifest.json (corrupted or truncated file)",),
        model_with(lambda d: flip_byte(d / checkpoint.WEIGHTS), "--init"),
    ),
    Case(
        "finetune",
        "incomplete-model",
        ("manifest.json: missing, so", "is not a complete checkpoint"),
        model_with(lambda d: (d / checkpoint.MANIFEST).unlink(), "--init"),
    ),
    Case(
        "finetune",
        "corrupted-pairs",
        ("parallel_train.parquet: cannot be read as parquet", "rerun the tokenise stage"),
        tokens_with(lambda d: garbage(d / "parallel_train.parquet")),
    ),
    Case("evaluate", "missing-model", ("data/nothing-here: not found",), missing("--model")),
    Case(
        "evaluate",
        "truncated-model",
        ("model.safetensors: sha256 does not match",),
        model_with(lambda d: truncate(d / checkpoint.WEIGHTS), "--model"),
    ),
    Case(
        "evaluate",
        "model-of-another-vocab",
        ("model has 120 token embeddings but the vocabulary has 110",),
        other_vocab,
    ),
    Case("distil", "missing-teacher", ("data/nothing-here: not found",), missing("--teacher")),
    Case(
        "distil",
        "corrupted-teacher",
        ("teacher model:", "model.safetensors: sha256 does not match"),
        model_with(lambda d: flip_byte(d / checkpoint.WEIGHTS), "--teacher"),
    ),
    Case(
        "distil",
        "missing-teacher-translations",
        ("data/nothing-here: not found",),
        missing("--teacher-translations"),
    ),
    Case("quantise", "missing-student", ("data/nothing-here: not found",), missing("--student")),
    Case(
        "quantise",
        "corrupted-student",
        ("model.safetensors: sha256 does not match",),
        model_with(lambda d: flip_byte(d / checkpoint.WEIGHTS), "--student"),
    ),
    Case(
        "quantise",
        "missing-student-metrics",
        ("data/nothing-here: the student's metrics are missing",),
        missing("--student-metrics"),
    ),
]

# every stage: a key that is not in the schema, and a value out of its range
UNKNOWN_KEY = {
    "clean": "min_char",
    "validate": "min_row",
    "vocab": "vocab_sise",
    "tokenise": "batchsize",
    "pretrain": "learning_rate",
    "finetune": "bleu_sample",
    "evaluate": "beam_size",
    "distil": "temprature",
    "quantise": "onx",
}
OUT_OF_RANGE = {
    "clean": ("max_length_ratio", 0.5, "greater than 1"),
    "validate": ("max_duplicate_rate", 1.5, "less than or equal to 1"),
    "vocab": ("vocab_size", 0, "greater than or equal to 64"),
    "tokenise": ("batch_size", 0, "greater than or equal to 1"),
    "pretrain": ("lr", -0.001, "greater than 0"),
    "finetune": ("batch_size", 0, "greater than or equal to 1"),
    "evaluate": ("ppl_batch_size", 0, "greater than or equal to 1"),
    "distil": ("temperature", 0, "greater than 0"),
    "quantise": ("speed_rounds", 0, "greater than or equal to 1"),
}
for _name in STAGES:
    _key = UNKNOWN_KEY[_name]
    CASES.append(
        Case(
            _name,
            "unknown-param",
            ("params.yaml: invalid parameters", f"{_name}.{_key}: unknown key"),
            params={_name: {_key: 1}},
        )
    )
    _key, _value, _why = OUT_OF_RANGE[_name]
    CASES.append(
        Case(
            _name,
            "param-out-of-range",
            (
                "params.yaml: invalid parameters",
                f"{_name}.{_key}: Input should be {_why} (got {_value})",
            ),
            params={_name: {_key: _value}},
        )
    )


# ------------------------------------------------------------------------ running

DOCS = "".join(
    f"Document number {i} says something about topic {i * 7 % 13}.\n" for i in range(400)
)


def write_params(overrides: dict[str, Any]) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(deep_merge(PARAMS, overrides)))


def run_stage(name: str, args: dict[str, str]) -> None:
    argv = [part for item in {"--params": "params.yaml", **args}.items() for part in item]
    stage.run(name, SCRIPTS[name]["main"], SCRIPTS[name]["build_parser"](), argv)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory, mlflow_template) -> str:
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copy(mlflow_template, path)
    return f"sqlite:///{path}"


def enter(tmp_path: Path, monkeypatch, params: dict[str, Any]) -> None:
    """Run from ``tmp_path``: params.yaml, a raw text file for clean, a dir for inputs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "docs.txt").write_text(DOCS, encoding="utf-8")
    write_params(params)


def tracking_to(uri: str, monkeypatch) -> tuple[MlflowClient, str]:
    """Point stages at ``uri``, under a fresh pipeline run: a client and that run's id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    client = MlflowClient(uri)
    parent = client.create_run(tracking.setup(), run_name="bad-input").info.run_id
    monkeypatch.setenv("LMOPS_PARENT_RUN_ID", parent)
    return client, parent


def assert_failed_cleanly(
    name: str, capsys, client: MlflowClient, parent: str, expect: tuple[str, ...]
) -> str:
    """Exit 1 was raised by the caller; check the message, the outputs and the MLflow runs."""
    err = capsys.readouterr().err
    prefix = f"lmops {name}: error: "
    assert prefix in err, err[-3000:]
    msg = err[err.index(prefix) + len(prefix) :].strip()
    at = 0
    for part in expect:
        found = msg.find(part, at)
        assert found >= 0, f"{part!r} not in {msg!r}"
        at = found + len(part)
    for out in OUTS[name]:
        assert not Path(out).exists(), f"{out} left behind"
    temporary = [
        str(p)
        for p in Path().rglob(".*")  # atomic_output's, checkpoint.save's
        if p.name.endswith(".tmp") or p.name.startswith(checkpoint.TMP_PREFIX)
    ]
    assert temporary == []
    (run,) = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["lmops.stage"] == name
    assert msg in run.data.tags["lmops.error"]
    assert client.get_run(parent).info.status == "FAILED"  # never left RUNNING
    return msg


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, up, sqlite_store, tmp_path, monkeypatch, capsys):
    enter(tmp_path, monkeypatch, case.params)
    args = {**argv_of(case.stage, up), **case.setup(tmp_path, up)}
    client, parent = tracking_to(sqlite_store, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        run_stage(case.stage, args)
    assert exit_.value.code == 1
    assert_failed_cleanly(case.stage, capsys, client, parent, case.expect)


def test_a_text_over_max_chars_is_dropped_and_counted(up, sqlite_store, tmp_path, monkeypatch):
    """Oversized, but within clean.max_line_bytes: not an error, a row dropped and counted."""
    enter(tmp_path, monkeypatch, {})
    (tmp_path / "docs.txt").write_text(DOCS + "y" * 3000 + "\n", encoding="utf-8")
    client, parent = tracking_to(sqlite_store, monkeypatch)
    run_stage("clean", argv_of("clean", up))
    stats = json.loads(Path("data/metrics/clean.json").read_text())
    assert (stats["source.docs.loaded"], stats["source.docs.kept"]) == (401, 400)
    assert stats["source.docs.dropped.too_long"] == 1
    (run,) = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.metrics["clean/source.docs.dropped.too_long"] == 1


# ---------------------------------------------------------------------- full disk


@contextlib.contextmanager
def file_size_limit(limit: int) -> Any:
    """Writes past ``limit`` bytes of any file fail with EFBIG (SIGXFSZ ignored), as on a
    full disk; only the soft limit is lowered, so it can be raised back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def more_test_pairs(tmp: Path, up: Upstream) -> dict[str, str]:
    """Enough test pairs that the translations outgrow the limit."""
    tokens = copy_of(up.tokens, tmp)
    pairs = pd.read_parquet(tokens / "parallel_test.parquet")
    pd.concat([pairs] * 30, ignore_index=True).to_parquet(tokens / "parallel_test.parquet")
    return {"--tokens": str(tokens)}


# stage -> the output its first write past the limit goes to, and what it needs for that
DISK_FULL: dict[str, tuple[str, Setup, dict[str, Any]]] = {
    # datasets' Arrow cache of the raw files (in TMPDIR): the first thing clean writes
    "clean": ("/lmops-clean-", lambda tmp, up: {}, {"clean": {"format": "jsonl"}}),
    "validate": ("data/validate", lambda tmp, up: {}, {}),
    "vocab": ("data/vocab", lambda tmp, up: {}, {}),
    "tokenise": ("data/tokens", lambda tmp, up: {}, {}),
    "pretrain": ("data/train/pretrain/ckpt/step-00000001", lambda tmp, up: {}, {}),
    "finetune": ("data/train/finetune/ckpt/best-00000001", lambda tmp, up: {}, {}),
    "evaluate": ("data/evaluate", more_test_pairs, {"evaluate": {"max_test_pairs": None}}),
    "distil": ("data/train/distil/ckpt/best-00000001", lambda tmp, up: {}, {}),
    "quantise": ("data/quantise", lambda tmp, up: {}, {}),
}


@pytest.mark.parametrize("name", STAGES)
def test_full_disk(name, up, tmp_path, monkeypatch, capsys):
    """The MLflow store is a file store here: its files stay small, under the limit, where
    a sqlite database (about 1 MB empty) would need a limit no tiny output reaches."""
    where, setup, params = DISK_FULL[name]
    enter(tmp_path, monkeypatch, params)
    args = {**argv_of(name, up), **setup(tmp_path, up)}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, parent = tracking_to((tmp_path / "mlruns").as_uri(), monkeypatch)
    with file_size_limit(DISK_LIMIT), pytest.raises(SystemExit) as exit_:
        run_stage(name, args)
    assert exit_.value.code == 1
    msg = assert_failed_cleanly(
        name,
        capsys,
        client,
        parent,
        ("disk full writing ", where, ": File too large; free some space"),
    )
    assert "\n" not in msg


def test_a_full_disk_outside_the_outputs_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A write that is no stage output (not under atomic_output) still exits 1, one line."""
    enter(tmp_path, monkeypatch, {})

    def main(args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "scratch/big.bin")

    with pytest.raises(SystemExit) as exit_:
        stage.run("clean", main, stage.parser("a stage"), ["--params", "params.yaml"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == (
        "lmops clean: error: disk full writing scratch/big.bin: No space left on device; "
        "free some space (or raise the quota or file size limit) and rerun"
    )


def test_full_disk_in_the_stage_script(up, tmp_path, monkeypatch):
    """``python stages/tokenise.py`` under the limit, as dvc runs it: exit 1, one line."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    args = argv_of("tokenise", up)
    env = dvc_env(
        {
            "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "TQDM_DISABLE": "1",
        }
    )  # this tree's src first on PYTHONPATH

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT, hard))

    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/tokenise.py"),
            "--params",
            "params.yaml",
            *[part for item in args.items() for part in item],
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "lmops tokenise: error: disk full writing data/tokens: File too large; free some "
        "space (or raise the quota or file size limit) and rerun"
    )
    assert not (tmp_path / "data/tokens").exists()
    assert not (tmp_path / "data/metrics/tokenise.json").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.`lmops.stage` = 'tokenise'"
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["lmops.error"].startswith("DiskFullError: disk full writing data/")
