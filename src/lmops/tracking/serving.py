"""The translator as an MLflow ``pyfunc`` model: sentences in, translations out.

The logged model is a directory that carries everything it needs and nothing pickled::

    MLmodel              signature (column ``source`` -> column ``translation``, decode
                         params ``beam_size`` and ``max_new_tokens``)
    translator.py        the model code (MLflow "models from code"): builds TranslatorModel
    code/lmops/          this package, so the model loads where lmops is not installed
    artifacts/model/     the model directory (safetensors, config.json, sha256 manifest)
    artifacts/vocab/     the SentencePiece model and meta.json
    artifacts/translator.json   target language and decode defaults

``load_context`` rebuilds the network from ``config.json`` and loads the safetensors
weights, checksums verified: loading never unpickles a training object. The same
:class:`Translator` serves ``lmops translate`` from local directories.

    mlflow models serve -m models:/lmops-translator@champion --env-manager local \\
        -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["source"], "data": [["Hello."]]},
             "params": {"beam_size": 1}}'
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from lmops.config import DecodeConfig
from lmops.errors import LmopsError
from lmops.tracking import tags as tag

INPUT_COLUMN = "source"
OUTPUT_COLUMN = "translation"
MODEL_ARTIFACT = "model"
VOCAB_ARTIFACT = "vocab"
SETTINGS_ARTIFACT = "settings"
SETTINGS_FILE = "translator.json"
# decode settings a request may override (signature params); the rest are fixed at logging
REQUEST_PARAMS = ("beam_size", "max_new_tokens")
# what importing the Translator pulls in; pinned to the versions logging ran with
REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "sentencepiece",
    "safetensors",
    "pydantic",
    "pyyaml",
    "tqdm",
)
# the "models from code" file: executed when the model loads, so it must only build
MODEL_CODE = '''"""lmops translator (MLflow models from code), from lmops.tracking.serving."""
import mlflow

from lmops.tracking.serving import TranslatorModel

mlflow.models.set_model(TranslatorModel())
'''


class Translator:
    """A model directory plus its vocabulary, ready to translate into ``target_lang``."""

    def __init__(
        self, model: Any, tokenizer: Any, target_lang: str, decode: DecodeConfig | None = None
    ):
        self.model, self.tokenizer = model, tokenizer
        self.target_lang = target_lang
        self.decode = decode or DecodeConfig()

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | Path,
        vocab_dir: str | Path,
        target_lang: str | None = None,
        decode: DecodeConfig | Mapping[str, Any] | None = None,
    ) -> Translator:
        """Load a model directory (``data/models/finetune``) and a vocab dir (``data/vocab``).

        The target language defaults to the one the model was fine-tuned for (its
        ``config.json``)."""
        from lmops.core.translation import check_vocab, load_model
        from lmops.core.vocab import Tokenizer

        tok = Tokenizer.load(vocab_dir)
        model, config = load_model(model_dir)
        check_vocab(model, tok, model_dir)
        lang = target_lang or config.get("target_lang")
        if not lang:
            raise LmopsError(
                f"{Path(model_dir) / 'config.json'}: no target_lang (not a "
                "fine-tuned translator?); name the target language"
            )
        tok.lang_id(lang)  # an unknown language fails here, with the vocabulary's languages
        if isinstance(decode, Mapping):
            decode = DecodeConfig(**decode)
        return cls(model, tok, lang, decode)

    def translate(self, sources: Sequence[str], **overrides: Any) -> list[str]:
        """Translate ``sources``; ``overrides`` replace decode settings (``beam_size=1``)."""
        from lmops.core.translation import translate

        unknown = set(overrides) - set(DecodeConfig.model_fields)
        if unknown:
            raise LmopsError(
                f"unknown decode setting(s) {sorted(unknown)}; "
                f"known: {sorted(DecodeConfig.model_fields)}"
            )
        cfg = DecodeConfig(
            **{**self.decode.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
        texts = [str(s) for s in sources]
        return translate(self.model, self.tokenizer, texts, self.target_lang, cfg) if texts else []


def sources_of(model_input: Any) -> list[str]:
    """The sentences of a pyfunc input: a frame with a ``source`` column (or one column),
    a series, a list of strings, or one string."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return [str(s) for s in model_input[INPUT_COLUMN]]
        if len(model_input.columns) == 1:
            return [str(s) for s in model_input.iloc[:, 0]]
        raise LmopsError(
            f"input needs a {INPUT_COLUMN!r} column; got columns {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return [str(s) for s in model_input]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, Mapping) and INPUT_COLUMN in model_input:
        return sources_of(model_input[INPUT_COLUMN])
    if isinstance(model_input, Sequence):
        return [str(s) for s in model_input]
    raise LmopsError(
        f"cannot read sentences from a {type(model_input).__name__}; send a {INPUT_COLUMN!r} column"
    )


class TranslatorModel(PythonModel):
    """The pyfunc: ``predict`` takes a ``source`` column and returns a ``translation`` one."""

    def __init__(self) -> None:
        self.translator: Translator | None = None

    def load_context(self, context: Any) -> None:
        config = json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text("utf-8"))
        self.translator = Translator.from_dirs(
            context.artifacts[MODEL_ARTIFACT],
            context.artifacts[VOCAB_ARTIFACT],
            target_lang=config.get("target_lang"),
            decode=config.get("decode"),
        )

    # no type hints: MLflow would read them as a schema; the signature holds the schema
    def predict(self, context, model_input, params=None):
        if self.translator is None:
            raise LmopsError("the translator is not loaded (load it with mlflow.pyfunc.load_model)")
        overrides = {
            k: int(v) for k, v in (params or {}).items() if k in REQUEST_PARAMS and v is not None
        }
        return pd.DataFrame(
            {OUTPUT_COLUMN: self.translator.translate(sources_of(model_input), **overrides)}
        )


def signature(decode: DecodeConfig) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]),
        params=ParamSchema([ParamSpec(k, "long", int(getattr(decode, k))) for k in REQUEST_PARAMS]),
    )


def requirements() -> list[str]:
    """The packages loading needs, at the versions installed here."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def settings(target_lang: str | None, decode: DecodeConfig) -> dict[str, Any]:
    """What ``load_context`` reads besides the directories; without a target language, the
    model's config.json names the one it was fine-tuned for. (A file, not MLflow's
    ``model_config``, which MLflow would also log as params of the run.)"""
    return {**({"target_lang": target_lang} if target_lang else {}), "decode": decode.model_dump()}


def log_translator(
    model_dir: str | Path,
    vocab_dir: str | Path,
    name: str = "translator",
    target_lang: str | None = None,
    decode: DecodeConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log the translator as a pyfunc model to the active run; returns MLflow's ModelInfo.

    The model and vocab directories are copied in as artifacts, with this package as code.
    Nothing is loaded here: a model directory that does not load fails where it is served.
    """
    import lmops

    decode = decode or DecodeConfig()
    model_dir, vocab_dir = Path(model_dir), Path(vocab_dir)
    for path in (model_dir, vocab_dir):
        if not path.is_dir():
            raise LmopsError(f"{path}: not found (run the pipeline up to evaluate first)")
    config = settings(target_lang, decode)
    with tempfile.TemporaryDirectory(prefix="lmops-pyfunc-") as tmp:
        code_file = Path(tmp) / "translator.py"
        code_file.write_text(MODEL_CODE, encoding="utf-8")
        package = Path(tmp) / "code" / "lmops"
        shutil.copytree(
            Path(lmops.__file__).parent,
            package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        # copies named as the artifacts: the model's layout is artifacts/model, artifacts/vocab
        # (MLflow refuses symlinks that point outside the directory it copies from)
        staged = {k: Path(tmp) / "artifacts" / k for k in (MODEL_ARTIFACT, VOCAB_ARTIFACT)}
        shutil.copytree(model_dir, staged[MODEL_ARTIFACT])
        shutil.copytree(vocab_dir, staged[VOCAB_ARTIFACT])
        staged[SETTINGS_ARTIFACT] = Path(tmp) / "artifacts" / SETTINGS_FILE
        staged[SETTINGS_ARTIFACT].write_text(json.dumps(config, indent=1), encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            code_paths=[str(package)],
            artifacts={k: str(v) for k, v in staged.items()},
            signature=signature(decode),
            pip_requirements=requirements(),
            metadata={**(metadata or {}), tag.TRANSLATOR: config},
        )


def load_translator(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` of a logged translator, e.g. by its registry alias."""
    from lmops.tracking import runs as tracking

    tracking.setup()
    return mlflow.pyfunc.load_model(model_uri)


def translate_with(model: Any, sources: Sequence[str], **overrides: Any) -> list[str]:
    """Translate with a loaded pyfunc translator; ``overrides`` are its decode params."""
    params = {k: int(v) for k, v in overrides.items() if v is not None}
    out = model.predict(pd.DataFrame({INPUT_COLUMN: list(sources)}), params=params or None)
    return [str(t) for t in out[OUTPUT_COLUMN]]
