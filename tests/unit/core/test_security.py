"""Security: weights never unpickled, servers on the loopback interface, credentials masked."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from lmops.config import ModelConfig
from lmops.core import checkpoint, translation
from lmops.core.checkpoint import CheckpointError
from lmops.core.model import Transformer
from lmops.tracking.redact import public_url, redact, redact_uri
from tests.conftest import REPO
from tests.support.ddp_worker import TinyLM

# --------------------------------------------------------------- no unpickling


class _Payload:
    """Unpickling this creates ``marker``: what a malicious weights file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(file: Path, marker: Path, fix_manifest: bool) -> None:
    """Replace ``file`` with a torch.save archive holding the payload; with ``fix_manifest``
    the manifest is rewritten to match, as an attacker who controls the directory would."""
    torch.save({"weight": _Payload(marker)}, file)
    if fix_manifest:
        manifest = file.parent / checkpoint.MANIFEST
        data = json.loads(manifest.read_text())
        data["sha256"][file.name] = checkpoint.sha256(file)
        manifest.write_text(json.dumps(data))


def test_the_payload_is_live(tmp_path):
    # the test's pickle does run code when unpickled: the checks below are not vacuous
    marker = tmp_path / "marker"
    torch.save({"weight": _Payload(marker)}, tmp_path / "w.pt")
    torch.load(tmp_path / "w.pt", weights_only=False)
    assert marker.exists()


def _tiny() -> Transformer:
    return Transformer(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=16), 32)


def _model_dir(tmp_path: Path) -> tuple[Path, Path]:
    return translation.save_model(_tiny(), tmp_path / "model"), checkpoint.WEIGHTS


def _training_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return (
        checkpoint.save(tmp_path / "step-1", model, {"m": 1}, state={"step": 1}, optimizer=opt),
        checkpoint.OPTIMIZER,
    )


LOADERS = {
    "model dir": (_model_dir, lambda p: translation.load_model(p)),
    "training checkpoint": (
        _training_checkpoint,
        lambda p: checkpoint.load(p, TinyLM(), torch.optim.AdamW(TinyLM().parameters())),
    ),
}


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["manifest-as-is", "manifest-fixed"])
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_pickle_in_place_of_the_weights_is_refused_unopened(tmp_path, kind, fix_manifest):
    make, load = LOADERS[kind]
    path, name = make(tmp_path)
    load(path)  # loads as written
    marker = tmp_path / "marker"
    _plant_pickle(path / name, marker, fix_manifest)
    expected = (
        "sha256 does not match" if not fix_manifest else r"not a safetensors file \(a zip archive"
    )
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path / name))}: {expected}"):
        load(path)
    assert not marker.exists()


def test_a_raw_pickle_is_named_as_such(tmp_path):
    import pickle

    path = translation.save_model(_tiny(), tmp_path / "model")
    (path / checkpoint.WEIGHTS).write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(a pickle\)"):
        checkpoint.check_safetensors(path / checkpoint.WEIGHTS)


_UNPICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            found += [f"import {n}" for n in names if n.split(".")[0] in _UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("read_pickle"):
            found.append(name)
        elif name == "torch.load" and kwargs.get("weights_only") != "True":
            found.append(f"{name} without weights_only=True")
        elif name in ("np.load", "numpy.load") and kwargs.get("allow_pickle") not in (
            None,
            "False",
        ):
            found.append(f"{name} with allow_pickle")
    return found


def test_no_code_path_can_unpickle():
    files = [p for folder in ("src", "stages", "flows") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 20
    bad = {
        str(f.relative_to(REPO)): calls
        for f in files
        if (calls := _unsafe_calls(ast.parse(f.read_text(encoding="utf-8"))))
    }
    assert bad == {}
    # and the scan does see them
    sample = (
        "import pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
        "np.load(f, allow_pickle=True)\npd.read_pickle(f)\ntorch.load(f, weights_only=True)"
    )
    assert len(_unsafe_calls(ast.parse(sample))) == 5


# ------------------------------------------------------ servers on the loopback

_SERVER_CMD = re.compile(r"(mlflow (server|ui|models serve)|prefect server start)\b(.*)")


def test_every_documented_server_binds_the_loopback_interface():
    found = 0
    for name in ("README.md", "Makefile", "prefect.yaml", "bench/README.md"):
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")  # join continued lines
        for line in text.splitlines():
            m = _SERVER_CMD.search(line)
            if m is None or "`" in m.group(3)[:1] or line.lstrip().startswith(("|", "-")):
                continue
            found += 1
            assert "0.0.0.0" not in line, f"{name}: {line}"
            if m.group(1) != "mlflow ui":  # mlflow ui binds 127.0.0.1 unless told otherwise
                assert re.search(r"(--host|-h) 127\.0\.0\.1", line), f"{name}: {line}"
    assert found >= 3
    code = [
        p for folder in ("src", "flows", "stages", "bench") for p in (REPO / folder).rglob("*.py")
    ]
    assert [str(p) for p in code if "0.0.0.0" in p.read_text(encoding="utf-8")] == []


# ------------------------------------------------------------------- redaction


def test_credentials_are_masked(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdef123456")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter22")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a credential
    monkeypatch.setenv("LMOPS_SHORT_SECRET", "abc")  # too short to mask text safely
    uri = "https://alice:s3cr3t@mlflow.example.com:8443/base?token=xyz&x=1"
    assert redact_uri(uri) == "https://***@mlflow.example.com:8443/base?token=***&x=1"
    assert public_url(uri) == "https://mlflow.example.com:8443/base"
    text = f"GET {uri} failed; token hf_abcdef123456, pw hunter22, parallelism false, abc"
    assert redact(text) == (
        "GET https://***@mlflow.example.com:8443/base?token=***&x=1 "
        "failed; token ***, pw ***, parallelism false, abc"
    )
    assert redact("http://127.0.0.1:5000/api") == "http://127.0.0.1:5000/api"
