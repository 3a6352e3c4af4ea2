"""Checkpoints: pickle-free round trip, tied weights, checksums, atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmops.config import TrainConfig
from lmops.core import checkpoint
from lmops.core.checkpoint import CheckpointError
from lmops.core.train import lm_loss, make_optimizer, seed_everything, window_batches
from lmops.errors import LmopsError
from tests.support.ddp_worker import BLOCK, TinyLM, tokens


def trained(steps: int = 2):
    """A TinyLM and its AdamW after a few steps, so the optimiser has state to save."""
    seed_everything(0)
    model = TinyLM()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    get = window_batches(tokens(), BLOCK, seed=0)
    for step in range(1, steps + 1):
        lm_loss(model, get(step, 8)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_weights_optimizer_state_and_json(tmp_path):
    model, opt = trained()
    path = checkpoint.save(
        tmp_path / "step-2",
        model,
        {"model": {"dim": 16}},
        state={"step": 2, "best_metric": None},
        optimizer=opt,
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    model2 = TinyLM()
    opt2 = make_optimizer(model2, TrainConfig(), torch.device("cpu"))
    state = checkpoint.load(path, model2, opt2)
    assert state == {"step": 2, "best_metric": None}
    assert checkpoint.read_config(path) == {"model": {"dim": 16}}
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() == {0, 1, 2, 3}
    for i in s1:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1[i][name], s2[i][name]), (i, name)
    # the next step from the restored pair equals the next step from the original
    batch = window_batches(tokens(), BLOCK, seed=0)(3, 8)
    for m, o in ((model, opt), (model2, opt2)):
        lm_loss(m, batch).backward()
        o.step()
    assert torch.equal(model.emb.weight, model2.emb.weight)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model, _ = trained(1)
    checkpoint.save_weights(model, tmp_path / "export", {"vocab_size": 32})
    stored = load_file(tmp_path / "export" / "model.safetensors")
    assert len([k for k in stored if k in ("emb.weight", "head.weight")]) == 1
    fresh = TinyLM()
    assert checkpoint.load_weights(fresh, tmp_path / "export") == {"vocab_size": 32}
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh.head.weight, model.head.weight)


@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.safetensors", "state.json", "config.json"]
)
def test_a_flipped_byte_is_an_error_naming_the_file(tmp_path, name):
    model, opt = trained(1)
    path = checkpoint.save(tmp_path / "step-1", model, {"a": 1}, state={"step": 1}, optimizer=opt)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match=rf"{path / name}: sha256 does not match "
        r"manifest.json \(corrupted or truncated file\)",
    ):
        checkpoint.load(
            path, TinyLM(), make_optimizer(TinyLM(), TrainConfig(), torch.device("cpu"))
        )


def test_truncated_missing_and_unlisted_files_are_errors(tmp_path):
    model, _ = trained(1)
    path = checkpoint.save_weights(model, tmp_path / "w", {})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LmopsError, match=rf"{weights}: sha256 does not match"):
        checkpoint.load_weights(TinyLM(), path)
    weights.unlink()
    with pytest.raises(LmopsError, match=rf"{weights}: listed in manifest.json but missing"):
        checkpoint.verify(path)
    (path / "manifest.json").unlink()
    with pytest.raises(
        LmopsError,
        match=rf"{path}/manifest.json: missing, so {path} is not a "
        "complete checkpoint",
    ):
        checkpoint.load_weights(TinyLM(), path)
    with pytest.raises(LmopsError, match=rf"{tmp_path}/nope: checkpoint directory not found"):
        checkpoint.load_weights(TinyLM(), tmp_path / "nope")


def test_weights_of_another_shape_do_not_load(tmp_path):
    path = checkpoint.save_weights(TinyLM(dim=16), tmp_path / "w", {})
    with pytest.raises(LmopsError, match=r"model.safetensors: does not fit this model"):
        checkpoint.load_weights(TinyLM(dim=8), path)


def test_a_weights_export_has_no_optimizer_state(tmp_path):
    path = checkpoint.save_weights(TinyLM(), tmp_path / "w", {})
    model = TinyLM()
    with pytest.raises(LmopsError, match=r"optimizer.safetensors: no optimizer state"):
        checkpoint.load(path, model, make_optimizer(model, TrainConfig(), torch.device("cpu")))


def test_saving_over_a_checkpoint_replaces_it_whole_and_leaves_no_temp_dirs(tmp_path):
    first = checkpoint.save(tmp_path / "best", TinyLM(), {"v": 1}, state={"step": 1})
    checkpoint.save(tmp_path / "best", TinyLM(), {"v": 2})
    assert checkpoint.read_config(first) == {"v": 2}
    assert not (first / "state.json").exists()  # nothing of the old one survives
    assert json.loads((first / "manifest.json").read_text())["sha256"].keys() == {
        "config.json",
        "model.safetensors",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_latest_and_prune(tmp_path):
    for step in (3, 12, 6):
        checkpoint.save(checkpoint.step_path(tmp_path, "step", step), TinyLM(), {})
    checkpoint.save(checkpoint.step_path(tmp_path, "best", 6), TinyLM(), {})
    (tmp_path / ".tmp-step-00000015.abc").mkdir()  # left by a crash mid-save
    assert checkpoint.latest(tmp_path).name == "step-00000012"
    assert checkpoint.latest(tmp_path, "best").name == "best-00000006"
    checkpoint.prune(tmp_path, "step", keep=checkpoint.latest(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-00000006", "step-00000012"]
    assert checkpoint.latest(tmp_path / "missing") is None
