"""Checkpoints without pickle: safetensors for tensors, JSON for the rest, sha256 to check both.

A checkpoint is a directory::

    model.safetensors      the weights (a tied matrix is stored once)
    optimizer.safetensors  optimiser state tensors keyed "<param index>.<name>" (training only)
    state.json             step, best metric, loss history ... (training only)
    config.json            the resolved config of the run that wrote it
    manifest.json          sha256 of every file above, checked before any of them is read

Nothing is ever unpickled, so loading a checkpoint from elsewhere cannot run code.

A directory is written complete under a hidden temporary name, fsynced, and only then
renamed to its final name, so a crash at any moment leaves either the old checkpoint or
the new one, never half of one. The training loop names its checkpoints ``step-<N>`` and
``best-<N>`` under one root and deletes the older ones only after the new one is in place;
:func:`latest` finds the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmops.errors import DiskFullError, LmopsError
from lmops.io import disk_full_reason

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


class CheckpointError(LmopsError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model."""


# ------------------------------------------------------------------- writing


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    # a directory fd can be fsynced on POSIX only; elsewhere rename durability is best-effort
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {index}.{name} is not a tensor: {value!r}")
            flat[f"{index}.{name}"] = value.detach().cpu().contiguous()
    return flat


def save(
    path: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically, replacing any old one there.

    Pass the plain module (not a DDP or compiled wrapper) so the weight names stay stable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        save_model(model, str(tmp / WEIGHTS))
        if optimizer is not None:
            save_file(_optimizer_tensors(optimizer), str(tmp / OPTIMIZER))
        (tmp / CONFIG).write_bytes(_json_bytes(config))
        if state is not None:
            (tmp / STATE).write_bytes(_json_bytes(state))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {"sha256": {name: sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        _fsync(tmp / MANIFEST)
        if path.exists():
            # a directory cannot be os.replace'd over a non-empty one: swap in two renames
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except Exception as err:
        reason = disk_full_reason(err)  # safetensors wraps the OS error in its own
        if reason is None:
            raise
        raise DiskFullError(path, reason) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_weights(model: nn.Module, path: str | Path, config: dict[str, Any]) -> Path:
    """Export weights and the config that builds the model, for a later stage to load."""
    return save(path, model, config)


# ------------------------------------------------------------------- reading


def verify(path: str | Path) -> None:
    """Check every file of a checkpoint against its manifest; CheckpointError names the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing, so {path} is not a complete checkpoint")
    try:
        expected = json.loads(manifest_path.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, digest in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing")
        if sha256(file) != digest:
            raise CheckpointError(
                f"{file}: sha256 does not match {MANIFEST} (corrupted or truncated file)"
            )


def _read_json(file: Path) -> Any:
    return json.loads(file.read_text(encoding="utf-8"))


def read_config(path: str | Path) -> dict[str, Any]:
    """The resolved config stored in a checkpoint (verified first)."""
    path = Path(path)
    verify(path)
    return _read_json(path / CONFIG)


_NOT_SAFETENSORS = (
    (b"PK\x03\x04", "a zip archive (torch.save writes those)"),
    (b"\x80", "a pickle"),
)


def check_safetensors(file: Path) -> None:
    """Refuse, before any parser sees it, a weights file without a safetensors header: a
    ``torch.save`` archive or a pickle in its place would run code if it were unpickled."""
    with open(file, "rb") as fh:
        head = fh.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if 0 < size <= file.stat().st_size - 8 and head[8:9] == b"{":
        return
    what = next((w for magic, w in _NOT_SAFETENSORS if head.startswith(magic)), "unknown data")
    raise CheckpointError(
        f"{file}: not a safetensors file ({what}); lmops never unpickles "
        "weights: save them with safetensors"
    )


def _load_model(model: nn.Module, path: Path) -> None:
    file = path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: no weights in this checkpoint")
    check_safetensors(file)
    try:
        load_model(model, file, strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{file}: does not fit this model: {err}") from None


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Verify a checkpoint, load its weights into ``model`` in place; return its config."""
    path = Path(path)
    verify(path)
    _load_model(model, path)
    return _read_json(path / CONFIG)


def load(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and optimiser state) from a training checkpoint; return its state."""
    path = Path(path)
    verify(path)
    _load_model(model, path)
    if optimizer is not None:
        file = path / OPTIMIZER
        if not file.is_file():
            raise CheckpointError(f"{file}: no optimizer state in this checkpoint")
        check_safetensors(file)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(file).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        # the param groups (and so their hyper-parameters) come from the same config
        groups = optimizer.state_dict()["param_groups"]
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{file}: does not fit this optimizer: {err}") from None
    state_file = path / STATE
    return _read_json(state_file) if state_file.is_file() else {}


# ------------------------------------------------------------ step-named dirs


def step_path(root: str | Path, prefix: str, step: int) -> Path:
    return Path(root) / f"{prefix}-{step:08d}"


def _numbered(root: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)")
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := pattern.fullmatch(p.name))
    ]
    return sorted(found)


def latest(root: str | Path, prefix: str = "step") -> Path | None:
    """The highest-numbered ``<prefix>-<N>`` checkpoint under ``root``, if any."""
    found = _numbered(Path(root), prefix)
    return found[-1][1] if found else None


def prune(root: str | Path, prefix: str, keep: Path) -> None:
    """Delete every ``<prefix>-<N>`` directory but ``keep``, and leftover temporary dirs."""
    root = Path(root)
    for _, path in _numbered(root, prefix):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
