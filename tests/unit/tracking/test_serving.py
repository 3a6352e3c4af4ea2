"""The pyfunc translator: logged to a real (sqlite) MLflow store, loaded back, translating
as the model directory does; clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from lmops.config import ModelConfig, VocabConfig
from lmops.core.model import Transformer
from lmops.core.translation import collate, example, save_model
from lmops.core.vocab import Tokenizer
from lmops.errors import LmopsError
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
    assert {p.name for p in info.signature.params} == {"beam_size", "max_new_tokens"}

    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    assert (local / "artifacts/model/model.safetensors").is_file()
    assert (local / "artifacts/vocab/spm.model").is_file()
    assert (
        json.loads((local / "artifacts/translator.json").read_text())["decode"]["beam_size"] == 4
    )  # the defaults; the target language comes from the model
    assert (local / "code/lmops/tracking/serving.py").is_file()
    assert not list(local.rglob("*.pkl"))  # nothing pickled: models from code

    model = mlflow.pyfunc.load_model(info.model_uri)
    sources = [p[0] for p in PAIRS]
    out = model.predict(pd.DataFrame({"source": sources}), params={"beam_size": 1})
    assert list(out.columns) == ["translation"]
    assert list(out["translation"]) == [p[1] for p in PAIRS]
    assert serving.translate_with(model, sources) == serving.Translator.from_dirs(*dirs).translate(
        sources
    )


def test_inputs_are_read_or_named(dirs):
    assert serving.sources_of(pd.DataFrame({"source": ["a", "b"]})) == ["a", "b"]
    assert serving.sources_of(pd.DataFrame({"text": ["a"]})) == ["a"]
    assert serving.sources_of(["a", "b"]) == serving.sources_of(pd.Series(["a", "b"]))
    assert serving.sources_of("a") == ["a"]
    with pytest.raises(LmopsError, match="needs a 'source' column; got columns"):
        serving.sources_of(pd.DataFrame({"a": ["x"], "b": ["y"]}))
    with pytest.raises(LmopsError, match=r"unknown decode setting\(s\) \['beam'\]"):
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
