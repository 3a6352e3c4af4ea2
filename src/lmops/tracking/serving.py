"""The translator as an MLflow ``pyfunc`` model: sentences in, translations out.

The logged model is a directory that carries everything it needs and nothing pickled::

    MLmodel              signature (column ``source`` -> column ``translation``; request
                         params ``beam_size``, ``max_new_tokens`` and ``deadline_s``)
    translator.py        the model code (MLflow "models from code"): builds TranslatorModel
    code/lmops/          this package, so the model loads where lmops is not installed
    artifacts/model/     the model directory (safetensors, config.json, sha256 manifest)
    artifacts/vocab/     the SentencePiece model and meta.json
    artifacts/onnx/      the same network exported to ONNX (fp32), for small requests
    artifacts/translator.json   target language, decode defaults and request bounds

``load_context`` rebuilds the network from ``config.json`` and loads the safetensors
weights, checksums verified: loading never unpickles a training object. Decoding of up to
``serve.onnx_max_rows`` rows (sentences x beams) at a time runs on the ONNX export with
onnxruntime, which has far less overhead per step (2.6-3.3x torch for one sentence), and
larger batches on torch (:class:`lmops.core.quantised.SmallBatchOnnx`): the same fp32
network, the same translations. The same :class:`Translator` serves ``lmops translate``
from local directories (on torch alone: there is no export there).

Every request is checked against the bounds of ``params.yaml``'s ``serve`` section (logged
with the model) before any work: rows, characters per source, ``beam_size`` and
``max_new_tokens``. One over a bound is answered HTTP 400 with the field and the limit;
decoding that passes ``serve.deadline_s`` stops and is answered HTTP 504. Empty sources
translate to empty strings without decoding.

    mlflow models serve -m models:/lmops-translator@champion --env-manager local \\
        -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["source"], "data": [["Hello."]]},
             "params": {"beam_size": 1}}'
"""

from __future__ import annotations

import importlib.metadata
import json
import numbers
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel
from pydantic import ValidationError
from tqdm.auto import tqdm

from lmops.config import DecodeConfig, EvaluateConfig, ServeConfig
from lmops.errors import DeadlineExceeded, LmopsError, RequestError
from lmops.tracking import tags as tag

INPUT_COLUMN = "source"
OUTPUT_COLUMN = "translation"
MODEL_ARTIFACT = "model"
VOCAB_ARTIFACT = "vocab"
ONNX_ARTIFACT = "onnx"
SETTINGS_ARTIFACT = "settings"
SETTINGS_FILE = "translator.json"
# decode settings a request may override (signature params); the rest are fixed at logging
DECODE_PARAMS = ("beam_size", "max_new_tokens")
# and the request's own deadline, which may only be shorter than serve.deadline_s
REQUEST_PARAMS = (*DECODE_PARAMS, "deadline_s")
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
    "onnxruntime",
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
        self,
        model: Any,
        tokenizer: Any,
        target_lang: str,
        decode: DecodeConfig | None = None,
        limits: ServeConfig | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.target_lang = target_lang
        self.decode = decode or EvaluateConfig().decode
        self.limits = limits or ServeConfig()

    @property
    def max_new_tokens(self) -> int:
        """The largest ``max_new_tokens`` a request may ask: ``serve.max_new_tokens``, or
        the model's ``block_size`` (the longest output it was trained to attend to)."""
        return self.limits.max_new_tokens or int(self.model.cfg.block_size)

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | Path,
        vocab_dir: str | Path,
        target_lang: str | None = None,
        decode: DecodeConfig | Mapping[str, Any] | None = None,
        limits: ServeConfig | Mapping[str, Any] | None = None,
        onnx_dir: str | Path | None = None,
    ) -> Translator:
        """Load a model directory (``data/models/finetune``) and a vocab dir (``data/vocab``).

        The target language defaults to the one the model was fine-tuned for (its
        ``config.json``). With ``onnx_dir`` (the model's fp32 ONNX export), calls of up to
        ``serve.onnx_max_rows`` rows decode on onnxruntime."""
        from lmops.core.quantised import SmallBatchOnnx, load_quantised
        from lmops.core.translation import check_vocab, load_model
        from lmops.core.vocab import Tokenizer

        tok = Tokenizer.load(vocab_dir)
        model, config = load_model(model_dir)
        check_vocab(model, tok, model_dir)
        if isinstance(decode, Mapping):
            decode = DecodeConfig(**decode)
        if isinstance(limits, Mapping):
            limits = ServeConfig(**limits)
        limits = limits or ServeConfig()
        lang = target_lang or config.get("target_lang")
        if not lang:
            raise LmopsError(
                f"{Path(model_dir) / 'config.json'}: no target_lang (not a "
                "fine-tuned translator?); name the target language"
            )
        tok.lang_id(lang)  # an unknown language fails here, with the vocabulary's languages
        decoder: Any = model
        if onnx_dir is not None and limits.onnx_max_rows > 0:  # a session only once all is well
            decoder = SmallBatchOnnx(model, load_quantised(onnx_dir), limits.onnx_max_rows)
        return cls(decoder, tok, lang, decode, limits)

    def settings(self, **overrides: Any) -> DecodeConfig:
        """The decode settings of a request: the defaults with ``overrides`` (``None`` keeps a
        default), or :class:`RequestError` naming the field and its limit."""
        unknown = set(overrides) - set(DECODE_PARAMS)
        if unknown:
            raise RequestError(
                f"unknown request param(s) {sorted(unknown)}; known: {list(REQUEST_PARAMS)}"
            )
        limit = {"beam_size": self.limits.max_beam_size, "max_new_tokens": self.max_new_tokens}
        where = {"beam_size": "serve.max_beam_size", "max_new_tokens": "serve.max_new_tokens"}
        if not self.limits.max_new_tokens:
            where["max_new_tokens"] = "the model's block_size"
        given: dict[str, int] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise RequestError(f"{key} must be a whole number, got {value!r}")
            given[key] = value = int(value)
            # the logged default (what evaluate scored; MLflow sends it) is always allowed
            if value == getattr(self.decode, key):
                continue
            if not 1 <= value <= limit[key]:
                raise RequestError(
                    f"{key} must be between 1 and {limit[key]} ({where[key]}), got {value}"
                )
        try:
            return DecodeConfig(**{**self.decode.model_dump(), **given})
        except ValidationError as err:
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise RequestError(f"decode settings {given}: {problems}") from None

    def deadline_s(self, requested: Any = None) -> float:
        """Seconds a request may decode: ``serve.deadline_s``, or less if it asks."""
        limit = self.limits.deadline_s
        if requested is None:
            return limit
        if isinstance(requested, bool) or not isinstance(requested, numbers.Real):
            raise RequestError(f"deadline_s must be a number of seconds, got {requested!r}")
        if not 0 < float(requested) <= limit:
            raise RequestError(
                f"deadline_s must be over 0 and at most {limit:g} (serve.deadline_s), "
                f"got {requested}"
            )
        return float(requested)

    def check_sources(self, sources: Sequence[Any]) -> list[str]:
        """``sources`` as strings, or :class:`RequestError` naming the first one (by its
        place, from 1) that is not a string or is too long."""
        texts = []
        for line, text in enumerate(sources, 1):
            if not isinstance(text, str):
                raise RequestError(
                    f"source {line}: expected a string, got {type(text).__name__} {text!r:.40}"
                )
            if len(text) > self.limits.max_source_chars:
                raise RequestError(
                    f"source {line}: {len(text):,} characters, over the limit of "
                    f"{self.limits.max_source_chars:,} (serve.max_source_chars)"
                )
            texts.append(text)
        return texts

    def translate(self, sources: Sequence[Any], **overrides: Any) -> list[str]:
        """Translate ``sources``; ``overrides`` replace decode settings (``beam_size=1``).

        Checked first, before any work: at most ``serve.max_rows`` sources, each a string
        of at most ``serve.max_source_chars``, and the overrides within their bounds
        (:class:`RequestError`). Empty sources translate to ``""``. Decoding stops with
        :class:`DeadlineExceeded` after ``serve.deadline_s``, or the shorter ``deadline_s``
        the request asks for."""
        from lmops.core.translation import translate

        if len(sources) > self.limits.max_rows:
            raise RequestError(
                f"{len(sources):,} sources in one request, over the limit of "
                f"{self.limits.max_rows:,} (serve.max_rows); send them in smaller batches"
            )
        deadline_s = self.deadline_s(overrides.pop("deadline_s", None))
        cfg = self.settings(**overrides)
        texts = self.check_sources(sources)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        out = [""] * len(texts)
        if not todo:
            return out
        try:
            done = translate(
                self.model,
                self.tokenizer,
                [texts[i] for i in todo],
                self.target_lang,
                cfg,
                deadline=time.monotonic() + deadline_s,
            )
        except DeadlineExceeded:
            raise DeadlineExceeded(
                f"decoding {len(todo)} source(s) passed the deadline of {deadline_s:g} s "
                "(serve.deadline_s) and was stopped; send fewer sources, or a smaller "
                "beam_size or max_new_tokens"
            ) from None
        for i, text in zip(todo, done, strict=True):
            out[i] = text
        return out


def sources_of(model_input: Any) -> list[Any]:
    """The sentences of a pyfunc input: a frame with a ``source`` column (or one column),
    a series, a list of strings, or one string. (Whether each is a string is
    :meth:`Translator.check_sources`'s to say.)"""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return list(model_input[INPUT_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise RequestError(
            f"input needs a {INPUT_COLUMN!r} column; got columns {list(model_input.columns)}"
        )
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, Mapping) and INPUT_COLUMN in model_input:
        return sources_of(model_input[INPUT_COLUMN])
    if isinstance(model_input, Sequence):
        return list(model_input)
    raise RequestError(
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
            limits=config.get("limits"),  # models logged before the bounds: the defaults
            onnx_dir=context.artifacts.get(ONNX_ARTIFACT),  # and before the ONNX export
        )

    # a DataFrame hint is one MLflow infers no schema from: the logged signature holds it
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE

        if self.translator is None:
            raise LmopsError("the translator is not loaded (load it with mlflow.pyfunc.load_model)")
        overrides = {k: v for k, v in (params or {}).items() if k in REQUEST_PARAMS}
        try:
            out = self.translator.translate(sources_of(model_input), **overrides)
        except RequestError as err:  # the scoring server answers these 400, with the message
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        except DeadlineExceeded as err:  # 504
            raise MlflowException(str(err), error_code=DEADLINE_EXCEEDED) from None
        return pd.DataFrame({OUTPUT_COLUMN: out})


def signature(decode: DecodeConfig, limits: ServeConfig | None = None) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    limits = limits or ServeConfig()
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]),
        params=ParamSchema(
            [ParamSpec(k, "long", int(getattr(decode, k))) for k in DECODE_PARAMS]
            + [ParamSpec("deadline_s", "double", float(limits.deadline_s))]
        ),
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


def settings(
    target_lang: str | None, decode: DecodeConfig, limits: ServeConfig | None = None
) -> dict[str, Any]:
    """What ``load_context`` reads besides the directories; without a target language, the
    model's config.json names the one it was fine-tuned for. (A file, not MLflow's
    ``model_config``, which MLflow would also log as params of the run.)"""
    return {
        **({"target_lang": target_lang} if target_lang else {}),
        "decode": decode.model_dump(),
        "limits": (limits or ServeConfig()).model_dump(),
    }


def log_translator(
    model_dir: str | Path,
    vocab_dir: str | Path,
    name: str = "translator",
    target_lang: str | None = None,
    decode: DecodeConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    limits: ServeConfig | None = None,
) -> Any:
    """Log the translator as a pyfunc model to the active run; returns MLflow's ModelInfo.

    The model and vocab directories are copied in as artifacts, with this package as code,
    and, unless ``serve.onnx_max_rows`` is 0, the model's fp32 ONNX export (a few seconds).
    """
    import lmops
    from lmops.core.quantised import export_onnx
    from lmops.core.translation import load_model

    decode = decode or EvaluateConfig().decode
    model_dir, vocab_dir = Path(model_dir), Path(vocab_dir)
    for path in (model_dir, vocab_dir):
        if not path.is_dir():
            raise LmopsError(f"{path}: not found (run the pipeline up to evaluate first)")
    config = settings(target_lang, decode, limits)
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
        if (limits or ServeConfig()).onnx_max_rows > 0:
            staged[ONNX_ARTIFACT] = Path(tmp) / "artifacts" / ONNX_ARTIFACT
            export_onnx(load_model(model_dir)[0], staged[ONNX_ARTIFACT], int8=False)
        staged[SETTINGS_ARTIFACT] = Path(tmp) / "artifacts" / SETTINGS_FILE
        staged[SETTINGS_ARTIFACT].write_text(json.dumps(config, indent=1), encoding="utf-8")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            code_paths=[str(package)],
            artifacts={k: str(v) for k, v in staged.items()},
            signature=signature(decode, limits),
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
    params = {k: v for k, v in overrides.items() if v is not None}
    out = model.predict(pd.DataFrame({INPUT_COLUMN: list(sources)}), params=params or None)
    return [str(t) for t in out[OUTPUT_COLUMN]]


def pyfunc_translator(model: Any) -> Translator:
    """The :class:`Translator` inside a loaded pyfunc translator, with its logged decode
    settings and bounds."""
    inner = model.unwrap_python_model()
    if not isinstance(inner, TranslatorModel) or inner.translator is None:
        raise LmopsError(f"{model.metadata.model_uuid}: not an lmops translator")
    return inner.translator


def _lines(stream: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """``stream``'s lines without their line ends, and the bytes each took; ``None`` for a
    line over ``limit`` bytes, which is skipped unread: memory stays within ``limit``."""
    while chunk := stream.readline(limit + 1):
        if chunk.endswith(b"\n") or len(chunk) <= limit:
            yield chunk.rstrip(b"\r\n"), len(chunk)
            continue
        skipped = len(chunk)
        while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
            skipped += len(rest)
        yield None, skipped + len(rest)


def translate_stream(
    translator: Translator,
    source: BinaryIO,
    sink: TextIO,
    name: str,
    report: Callable[[str], None],
    total_bytes: int | None = None,
    **overrides: Any,
) -> int:
    """Translate ``source`` line by line into ``sink``, in batches of the decode
    ``batch_size``, with a progress bar over its bytes; returns how many lines were bad.

    Output line N is the translation of input line N; a blank line stays blank. A bad line
    (not UTF-8, over ``serve.max_source_chars``, or in a batch that passed the deadline) is
    reported as ``name:N: reason`` and gives an empty line; the rest go on. Memory stays
    flat whatever the file's size. Bad ``overrides`` stop it before any work."""
    deadline_s = translator.deadline_s(overrides.pop("deadline_s", None))
    translator.settings(**overrides)  # a bad setting fails here, not on every batch
    size = min(translator.decode.batch_size, translator.limits.max_rows)
    max_chars = translator.limits.max_source_chars
    limit = 4 * max_chars  # UTF-8: a longer line is over max_chars however it decodes
    bad = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"translate {name}")

    def flush(batch: list[tuple[int, str | None]]) -> None:
        nonlocal bad
        good = [text for _, text in batch if text is not None]
        try:
            done = iter(translator.translate(good, deadline_s=deadline_s, **overrides))
        except DeadlineExceeded as err:
            first, last = batch[0][0], batch[-1][0]
            report(f"{name}:{first}-{last}: {err}")
            bad += len(good)
            done = iter([""] * len(good))
        for _, text in batch:
            sink.write((next(done) if text is not None else "") + "\n")

    with bar:
        batch: list[tuple[int, str | None]] = []
        for number, (raw, taken) in enumerate(_lines(source, limit), 1):
            bar.update(taken)
            text: str | None = None
            too_long = f"over {max_chars:,} characters (serve.max_source_chars)"
            problem = too_long if raw is None else ""
            if raw is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    problem = f"not UTF-8 (byte {err.start + 1})"
            if text is not None and len(text) > max_chars:
                text, problem = None, too_long
            if problem:
                report(f"{name}:{number}: {problem}; left empty")
            bad += text is None
            batch.append((number, text))
            if len(batch) == size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    return bad
