"""The pyfunc translator: logged to a real (sqlite) MLflow store, loaded back, translating
as the model directory does; clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from lmops.config import ModelConfig, ServeConfig, VocabConfig
from lmops.core.model import Transformer
from lmops.core.quantised import SmallBatchOnnx
from lmops.core.translation import collate, example, save_model
from lmops.core.vocab import Tokenizer
from lmops.errors import DeadlineExceeded, LmopsError, RequestError
from lmops.pipeline.vocab import train_vocab
from lmops.tracking import serving

PAIRS = [
    ("Good morning, my friend.", "Bonjour, mon ami."),
    ("Thank you very much.", "Merci beaucoup."),
]
TEXT = [s for pair in PAIRS for s in pair] * 20 + [
    "The house is small and the garden is quiet.",
    "La maison est petite et le jardin calme.",
    "We eat bread, cheese and grapes every evening.",
    "Nous mangeons du pain et du fromage.",
    "Yesterday the children walked by the river.",
    "Hier les enfants marchaient au bord.",
    "Which way goes to the old bridge?",
    "Quel chemin mene au vieux pont?",
    "Jump quickly over the lazy brown fox!",
    "Voyez le brick geant que j'examine pres du wharf.",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A vocabulary and a tiny model that has learnt the two pairs by heart (seconds)."""
    root = tmp_path_factory.mktemp("translator")
    vocab_dir = root / "vocab"
    vocab_dir.mkdir()
    train_vocab(
        TEXT,
        vocab_dir,
        VocabConfig(vocab_size=64, byte_fallback=False, num_threads=1),
        ["en", "fr"],
        seed=1,
    )
    tok = Tokenizer.load(vocab_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=32), tok.vocab_size)
    x, y = collate(
        [
            example(tok, s, t, "fr", 32)
            for s, t in zip(
                tok.encode([p[0] for p in PAIRS]), tok.encode([p[1] for p in PAIRS]), strict=True
            )
        ],
        tok.pad_id,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(
            model(x).flatten(0, 1), y.flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(model.eval(), root / "model", {"target_lang": "fr"}), vocab_dir


def test_a_model_directory_translates(dirs):
    translator = serving.Translator.from_dirs(*dirs)
    assert translator.target_lang == "fr"
    assert translator.translate([p[0] for p in PAIRS], beam_size=1) == [p[1] for p in PAIRS]
    assert translator.translate([]) == []


def test_the_logged_pyfunc_loads_and_translates(dirs, mlflow_store, tmp_path):
    with mlflow.start_run() as run:
        info = serving.log_translator(*dirs, metadata={"note": "test"})
    assert mlflow.get_run(run.info.run_id).data.params == {}  # the run's params stay the run's
    assert info.signature.inputs.input_names() == ["source"]
    assert info.signature.outputs.input_names() == ["translation"]
    assert [p.name for p in info.signature.params] == list(serving.REQUEST_PARAMS)

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    assert (local / "artifacts/model/model.safetensors").is_file()
    assert (local / "artifacts/vocab/spm.model").is_file()
    assert (
        json.loads((local / "artifacts/translator.json").read_text())["decode"]["beam_size"] == 4
    )  # the defaults; the target language comes from the model
    assert (local / "code/lmops/tracking/serving.py").is_file()
    assert (local / "artifacts/onnx/model.onnx").is_file()  # the fp32 export, small requests
    assert not list(local.rglob("*.pkl"))  # nothing pickled: models from code

    model = mlflow.pyfunc.load_model(info.model_uri)
    decoder = serving.pyfunc_translator(model).model
    assert isinstance(decoder, SmallBatchOnnx) and decoder.max_rows == 4
    sources = [p[0] for p in PAIRS]
    out = model.predict(pd.DataFrame({"source": sources}), params={"beam_size": 1})
    assert list(out.columns) == ["translation"]
    assert list(out["translation"]) == [p[1] for p in PAIRS]
    assert serving.translate_with(model, sources) == serving.Translator.from_dirs(*dirs).translate(
        sources
    )


def test_without_onnx_rows_the_pyfunc_decodes_on_torch_alone(dirs, mlflow_store, tmp_path):
    with mlflow.start_run():
        info = serving.log_translator(*dirs, limits=ServeConfig(onnx_max_rows=0))
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    assert not (local / "artifacts/onnx").exists()  # no export logged
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert isinstance(serving.pyfunc_translator(model).model, Transformer)
    sources = [p[0] for p in PAIRS]
    assert serving.translate_with(model, sources, beam_size=1) == [p[1] for p in PAIRS]


def test_inputs_are_read_or_named(dirs):
    assert serving.sources_of(pd.DataFrame({"source": ["a", "b"]})) == ["a", "b"]
    assert serving.sources_of(pd.DataFrame({"text": ["a"]})) == ["a"]
    assert serving.sources_of(["a", "b"]) == serving.sources_of(pd.Series(["a", "b"]))
    assert serving.sources_of("a") == ["a"]
    with pytest.raises(LmopsError, match="needs a 'source' column; got columns"):
        serving.sources_of(pd.DataFrame({"a": ["x"], "b": ["y"]}))
    with pytest.raises(RequestError, match=r"unknown request param\(s\) \['beam'\]; known: "):
        serving.Translator.from_dirs(*dirs).translate(["a"], beam=2)


def test_a_model_without_a_target_language_is_named(dirs, tmp_path):
    model_dir, vocab_dir = dirs
    config = json.loads((model_dir / "config.json").read_text())
    assert config["target_lang"] == "fr"
    from lmops.core.translation import load_model

    model, _ = load_model(model_dir)
    bare = save_model(model, tmp_path / "bare")
    with pytest.raises(LmopsError, match=r"bare/config.json: no target_lang"):
        serving.Translator.from_dirs(bare, vocab_dir)
    with pytest.raises(LmopsError, match="has no tag in this vocabulary"):
        serving.Translator.from_dirs(model_dir, vocab_dir, target_lang="de")
    with pytest.raises(LmopsError, match="nothing-here: not found"):
        serving.log_translator(tmp_path / "nothing-here", vocab_dir)


# --------------------------------------------------------------- request bounds

BLOCK = 32  # the fixture model's block_size: the cap on max_new_tokens by default


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"sources": ["a"] * 257},
            r"257 sources in one request, over the limit of 256 \(serve.max_rows\)",
        ),
        ({"beam_size": 9}, r"beam_size must be between 1 and 8 \(serve.max_beam_size\), got 9"),
        ({"beam_size": 0}, r"beam_size must be between 1 and 8 .*got 0"),
        ({"beam_size": -4}, r"beam_size must be between 1 and 8 .*got -4"),
        ({"beam_size": "four"}, r"beam_size must be a whole number, got 'four'"),
        ({"beam_size": 2.5}, r"beam_size must be a whole number, got 2.5"),
        (
            {"max_new_tokens": 10**9},
            rf"max_new_tokens must be between 1 and {BLOCK} \(the model's block_size\), "
            r"got 1000000000",
        ),
        ({"deadline_s": 31}, r"deadline_s must be over 0 and at most 30 \(serve.deadline_s\)"),
        ({"deadline_s": 0}, r"deadline_s must be over 0"),
        ({"deadline_s": "soon"}, r"deadline_s must be a number of seconds, got 'soon'"),
        ({"sources": ["ok", None]}, r"source 2: expected a string, got NoneType None"),
        ({"sources": ["ok", "fine", 7]}, r"source 3: expected a string, got int 7"),
        (
            {"sources": ["x" * 1_000_000]},
            r"source 1: 1,000,000 characters, over the limit of 2,000 \(serve.max_source_chars\)",
        ),
    ],
)
def test_a_request_over_a_bound_is_refused_naming_the_field_and_the_limit(
    dirs, request_, message, monkeypatch
):
    translator = serving.Translator.from_dirs(*dirs)
    called = []
    monkeypatch.setattr(translator.model, "generate_greedy", lambda *a, **k: called.append(a))
    monkeypatch.setattr(translator.model, "generate_beam", lambda *a, **k: called.append(a))
    sources = request_.pop("sources", ["Thank you very much."])
    with pytest.raises(RequestError, match=message):
        translator.translate(sources, **request_)
    assert called == []  # refused before any decoding


def test_configured_bounds_replace_the_defaults(dirs):
    limits = ServeConfig(max_rows=2, max_source_chars=5, max_beam_size=2, max_new_tokens=4)
    translator = serving.Translator.from_dirs(*dirs, limits=limits.model_dump())
    assert translator.max_new_tokens == 4
    with pytest.raises(RequestError, match=r"3 sources .* limit of 2 \(serve.max_rows\)"):
        translator.translate(["a", "b", "c"])
    with pytest.raises(RequestError, match=r"source 2: 6 characters, over the limit of 5"):
        translator.translate(["12345", "123456"])
    with pytest.raises(RequestError, match=r"between 1 and 4 \(serve.max_new_tokens\), got 5"):
        translator.translate(["a"], max_new_tokens=5)
    # at the bounds, it translates; a whole float or numpy integer counts as whole
    assert len(translator.translate(["hello", "hi"], beam_size=2, max_new_tokens=4)) == 2
    import numpy as np

    assert translator.settings(beam_size=np.int64(2)).beam_size == 2


def test_empty_sources_translate_to_empty_strings_without_decoding(dirs, monkeypatch):
    translator = serving.Translator.from_dirs(*dirs)
    assert translator.translate(["", "  ", PAIRS[0][0], ""], beam_size=1) == [
        "",
        "",
        PAIRS[0][1],
        "",
    ]
    monkeypatch.setattr(translator.model, "generate_greedy", lambda *a, **k: pytest.fail("ran"))
    assert translator.translate(["", "\t"], beam_size=1) == ["", ""]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_stops_at_the_deadline(dirs, beam_size, monkeypatch):
    translator = serving.Translator.from_dirs(*dirs)
    from lmops.core import model as model_module

    steps = []
    real = model_module.check_deadline

    def counted(deadline):
        steps.append(deadline)
        real(deadline)

    monkeypatch.setattr(model_module, "check_deadline", counted)
    # a deadline no forward pass can meet: the first decoding step stops it
    with pytest.raises(DeadlineExceeded, match=r"passed the deadline of 1e-09 s"):
        translator.translate([PAIRS[0][0]], beam_size=beam_size, deadline_s=1e-9)
    assert len(steps) == 1
    slow = serving.Translator.from_dirs(*dirs, limits={"deadline_s": 1e-9})
    with pytest.raises(DeadlineExceeded, match=r"\(serve.deadline_s\) and was stopped"):
        slow.translate([PAIRS[0][0]], beam_size=beam_size)


def test_the_pyfunc_answers_bad_requests_400_and_late_ones_504(dirs, mlflow_store):
    from mlflow.exceptions import MlflowException

    with mlflow.start_run():
        info = serving.log_translator(*dirs, limits=ServeConfig(max_rows=3, deadline_s=20))
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert serving.pyfunc_translator(model).limits.max_rows == 3
    assert {p.name: p.default for p in info.signature.params}["deadline_s"] == 20
    frame = pd.DataFrame({"source": [PAIRS[0][0]]})
    with pytest.raises(MlflowException, match=r"beam_size must be between 1 and 8") as bad:
        model.predict(frame, params={"beam_size": 50})
    assert bad.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"4 sources .* limit of 3") as many:
        model.predict(pd.DataFrame({"source": ["a"] * 4}))
    assert many.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"passed the deadline") as late:
        model.predict(frame, params={"deadline_s": 1e-9})
    assert late.value.get_http_status_code() == 504
    # and the next request is answered as usual
    assert list(model.predict(frame, params={"beam_size": 1})["translation"]) == [PAIRS[0][1]]


# --------------------------------------------------------------- files


def test_a_file_translates_line_for_line_and_bad_lines_are_named(dirs):
    import io

    translator = serving.Translator.from_dirs(*dirs, limits={"max_source_chars": 40})
    lines = [
        PAIRS[0][0].encode(),
        b"",  # blank stays blank
        b"caf\xe9 au lait",  # latin-1, not UTF-8
        ("x" * 41).encode(),  # over the limit once decoded
        b"y" * 1000,  # over four bytes a character: skipped unread
        PAIRS[1][0].encode(),
    ]
    source = io.BytesIO(b"\n".join(lines))  # the last line has no line end
    sink, problems = io.StringIO(), []
    translator.decode = translator.decode.model_copy(update={"batch_size": 2})
    bad = serving.translate_stream(translator, source, sink, "in.txt", problems.append, beam_size=1)
    assert sink.getvalue().split("\n") == [PAIRS[0][1], "", "", "", "", PAIRS[1][1], ""]
    assert bad == 3
    assert problems == [
        "in.txt:3: not UTF-8 (byte 4); left empty",
        "in.txt:4: over 40 characters (serve.max_source_chars); left empty",
        "in.txt:5: over 40 characters (serve.max_source_chars); left empty",
    ]
    with pytest.raises(RequestError, match="beam_size must be between"):
        serving.translate_stream(translator, io.BytesIO(b"a\n"), sink, "x", print, beam_size=0)
    # batches never exceed the rows one request may hold
    few = serving.Translator.from_dirs(*dirs, limits={"max_rows": 1})
    sink = io.StringIO()
    three = io.BytesIO(b"\n".join([lines[0], b"", lines[-1]]))
    assert serving.translate_stream(few, three, sink, "y", print, beam_size=1) == 0
    assert sink.getvalue().split("\n") == [PAIRS[0][1], "", PAIRS[1][1], ""]


def test_lmops_translate_streams_a_file_and_names_its_bad_lines(dirs, tmp_path):
    import subprocess
    import sys

    model_dir, vocab_dir = dirs
    src, out = tmp_path / "in.txt", tmp_path / "out" / "fr.txt"
    src.write_bytes(f"{PAIRS[0][0]}\n\xff\xfe\n\n{PAIRS[1][0]}\n".encode("latin-1"))
    args = ["translate", "--model", str(model_dir), "--vocab", str(vocab_dir), "--beam-size", "1"]
    cli = [sys.executable, "-m", "lmops", *args]
    run = subprocess.run(
        [*cli, "--input", str(src), "--output", str(out)], capture_output=True, text=True
    )
    # the rest is translated, the bad line named and left empty, and the status says so
    assert run.returncode == 1
    assert f"lmops: {src}:2: not UTF-8 (byte 1); left empty" in run.stderr
    assert f"lmops: error: {src}: 1 line(s) not translated" in run.stderr
    assert out.read_text().split("\n") == [PAIRS[0][1], "", "", PAIRS[1][1], ""]
    assert f"translate {src}: 100%" in run.stderr  # the progress bar
    assert "Warning" not in run.stderr

    # a bad setting stops it before any work, and leaves no output behind
    out.unlink()
    run = subprocess.run(
        [*cli, "--input", str(src), "--output", str(out), "--max-new-tokens", "100000"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "max_new_tokens must be between 1 and 32 (the model's block_size)" in run.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []
