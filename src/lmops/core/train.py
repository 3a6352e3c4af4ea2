"""The one training loop shared by every stage (pretrain, finetune, distil).

:func:`fit` takes two callables from the stage:

``get_batch(step, size) -> batch``
    The *global* batch of optimiser step ``step`` (1-based): ``size`` rows, where ``size``
    is ``batch_size * grad_accum`` whatever the number of processes. It must be a pure
    function of the step and the seed (see :func:`window_batches`), which is what makes a
    resumed run, or one spread over several processes, see exactly the batches of an
    uninterrupted single process. A batch is a tensor, or a tuple/list/dict of tensors,
    with rows first.
``loss_fn(model, micro_batch) -> loss``
    The scalar mean loss of one micro-batch (see :func:`lm_loss`).

The global batch is the same for 1 or N processes, so N processes train the model one
process would, up to the rounding of a different summation order. Under ``torchrun``
(``WORLD_SIZE`` = N > 1; a stage relaunches itself so when ``nproc`` asks for it, see
:mod:`lmops.stage`) each process takes one N-th of the rows: ``grad_accum / N`` whole
micro-batches of ``batch_size`` rows when N divides ``grad_accum``, else ``grad_accum``
micro-batches of ``batch_size / N`` rows. The gradient is the mean over all of them
(DDP; gloo on cpu, nccl on cuda); only rank 0 writes checkpoints, curves and MLflow
metrics. A checkpoint written by N processes resumes under any other count.

Everything random is seeded from ``(seed, step, rank)`` at the start of each step, so
dropout and any randomness in the callbacks replay exactly after a resume without
carrying generator states in the checkpoint. The learning rate is a pure function of
the step (:func:`lr_at`), so the optimiser moments and the step are all a resume needs.

Checkpoints go to ``out_dir/ckpt/step-<N>`` (the last one only) and, when a metric is
selected, ``out_dir/ckpt/best-<N>`` (weights only); see :mod:`lmops.core.checkpoint`. A rerun
whose resolved config equals the stored one continues from the last checkpoint; any
other config starts afresh, and the log says which keys changed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from lmops.config import TrainConfig, flatten
from lmops.core import checkpoint
from lmops.core.hardware import (
    autocast_dtype,
    compile_enabled,
    facts,
    memory_errors,
    resolve_device,
)
from lmops.errors import DataError, LmopsError
from lmops.io import atomic_output

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # target id that lm_loss skips (prompt tokens, padding)
CKPT_DIR = "ckpt"

Batch = Any
BatchFn = Callable[[int, int], Batch]
LossFn = Callable[[nn.Module, Batch], Tensor]
EvalFn = Callable[[nn.Module, int], dict[str, float]]


class TrainLog(Protocol):
    """Where :func:`fit` reports as it goes; a stage script passes its tracking run's.

    ``enabled`` is False when nothing records: fit then skips drawing the loss plot.
    """

    enabled: bool

    def metrics(self, values: Mapping[str, float], step: int) -> None: ...

    def figure(self, path: Path) -> None: ...


class NoLog:
    """A :class:`TrainLog` that records nothing (library use, tests, benchmarks)."""

    enabled = False

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        pass

    def figure(self, path: Path) -> None:
        pass


# --------------------------------------------------------------- pure pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (1-based): linear warm-up, then cosine to ``min_lr``."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); call it before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int, rank: int) -> int:
    # SeedSequence takes non-negative ints only; the modulo keeps a negative seed usable
    return int(np.random.SeedSequence([seed % 2**64, step, rank]).generate_state(1)[0])


def make_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    no_decay: Collection[nn.Parameter] = (),
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or other vectors,
    nor on the parameters in ``no_decay``)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def decays(p: nn.Parameter) -> bool:
        return p.dim() >= 2 and not any(p is q for q in no_decay)

    groups = [
        {"params": [p for p in params if decays(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=lr_at(1, cfg),
        betas=(cfg.beta1, cfg.beta2),
        # the fused kernel (cuda and cpu) does the whole update in one pass over each tensor
        fused=True if device.type in ("cuda", "cpu") else None,
    )


# ---------------------------------------------------------- data and losses


def window_batches(
    tokens: np.ndarray, block_size: int, seed: int, name: str = "token stream"
) -> BatchFn:
    """``get_batch`` for language modelling: random windows of a 1-D token array.

    Row i of step s is ``tokens[start : start + block_size]`` with the next tokens as
    targets, ``start`` drawn by a generator seeded with ``(seed, step)``. ``tokens`` may be
    an ``np.memmap``; only the sampled windows are read.
    """
    n_windows = len(tokens) - block_size
    if n_windows < 1:
        raise DataError(
            f"{name}: {len(tokens)} tokens, need more than block_size "
            f"({block_size}) for one training window"
        )

    def get_batch(step: int, size: int) -> tuple[Tensor, Tensor]:
        starts = np.random.default_rng([seed % 2**64, step]).integers(0, n_windows, size=size)
        rows = np.stack([np.asarray(tokens[s : s + block_size + 1]) for s in starts])
        ids = torch.from_numpy(rows.astype(np.int64))
        return ids[:, :-1], ids[:, 1:]

    return get_batch


_CE_CHUNK = 256  # rows of logits upcast to fp32 at a time: 8 MB at vocab 8000


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [N, V] (any float dtype) computed in fp32 row chunks,
    with optional label smoothing.

    Equal to ``F.cross_entropy(logits.float(), target, ignore_index=-100,
    label_smoothing=smoothing)`` to fp32 rounding, gradient included, without
    materialising an fp32 copy of all the logits, their log-softmax and its gradient:
    under bf16 autocast on the CPU that memory traffic cost more than the model's
    attention. The backward recomputes the softmax chunk by chunk and writes the gradient
    straight into the logits' dtype.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
        valid = target != IGNORE_INDEX
        safe = target.masked_fill(~valid, 0)
        count = valid.sum()
        lse, mean = [], []
        for i in range(0, logits.shape[0], _CE_CHUNK):  # one fp32 chunk alive at a time
            chunk = logits[i : i + _CE_CHUNK].float()
            lse.append(chunk.logsumexp(-1))
            if smoothing:
                mean.append(chunk.mean(-1))
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        # -log p(target) with weight 1 - smoothing, the mean of -log p over the vocabulary
        # with weight smoothing
        loss = torch.cat(lse) - (1.0 - smoothing) * picked
        if smoothing:
            loss = loss - smoothing * torch.cat(mean)
        ctx.save_for_backward(logits, safe, valid, count)
        ctx.smoothing = smoothing
        return (loss * valid).sum() / count

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, safe, valid, count = ctx.saved_tensors
        smoothing = ctx.smoothing
        scale = (grad_out / count) * valid  # [N]: 0 on skipped rows
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], _CE_CHUNK):
            rows = slice(i, i + _CE_CHUNK)
            p = logits[rows].float().softmax(-1)
            if smoothing:
                p.sub_(smoothing / logits.shape[1])
            p.scatter_add_(
                1, safe[rows].unsqueeze(1), p.new_full((p.shape[0], 1), smoothing - 1.0)
            )  # softmax - smoothed one_hot(target)
            grad[rows] = p.mul_(scale[rows].unsqueeze(1))
        return grad, None, None


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """Next-token cross-entropy of ``(inputs, targets)``; targets equal to -100 are skipped.

    Computed in fp32 whatever the logits' dtype (see :class:`_ChunkedCrossEntropy`);
    ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`.
    """
    inputs, targets = batch
    logits = model(inputs)
    return _ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), label_smoothing)


def _map(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_map(v, fn) for v in batch)
    raise TypeError(f"a batch holds tensors, tuples, lists or dicts, not {type(batch).__name__}")


def _first(batch: Batch) -> Tensor:
    if torch.is_tensor(batch):
        return batch
    return _first(next(iter(batch.values() if isinstance(batch, dict) else batch)))


# ------------------------------------------------------------------- output


# what the loop records itself at each log interval; everything else in a history row
# came from the stage's evaluate(): its validation metrics
LOGGED_KEYS = ("train_loss", "lr", "grad_norm")


def write_curve(history: list[dict[str, float]], path: str | Path) -> None:
    """Loss curve for ``dvc plots``: ``.csv`` (empty cell = not measured) or ``.json`` rows.

    CSV columns: ``step``, what the loop logs (:data:`LOGGED_KEYS`), then the validation
    metrics by name, so a resumed run's file (its rows read back from a checkpoint) has the
    columns of an uninterrupted one's."""
    path = Path(path)
    seen = {k for row in history for k in row}
    first = ("step", *LOGGED_KEYS)
    keys = [k for k in first if k in seen] + sorted(seen - set(first))
    with atomic_output(path) as tmp:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(history, indent=1) + "\n")
        elif path.suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(history)
        else:
            raise ValueError(f"{path}: loss curve must be .csv or .json")


def curve_panels(history: list[dict[str, float]]) -> dict[str, list[str]]:
    """The panels of the loss-curve PNG and the series each plots: ``loss``, the training
    loss and every validation loss (a key ending in ``loss``); then one panel for each
    other validation metric recorded (perplexity, BLEU ...), each on its own scale."""
    keys = list(dict.fromkeys(k for row in history for k in row if k != "step"))
    losses = [k for k in keys if k.endswith("loss")]
    panels = {"loss": losses} if losses else {}
    panels.update({k: [k] for k in keys if k not in LOGGED_KEYS and not k.endswith("loss")})
    return panels


def plot_curves(history: list[dict[str, float]], png_path: str | Path) -> Path:
    """PNG of the training loss and every validation metric against step
    (:func:`curve_panels`): losses together, each other metric in a panel of its own."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    panels = curve_panels(history) or {"loss": []}
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110, layout="constrained")
    for ax, (title, series) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True
    ):
        for key in series:
            points = [(row["step"], row[key]) for row in history if key in row]
            style = "-" if key in LOGGED_KEYS else "o-"
            ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
        ax.set_title(title.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp)
    return Path(png_path)


# -------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistEnv:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process when they are unset."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank = int(os.environ["RANK"])
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def split_batch(cfg: TrainConfig, world_size: int, stage: str = "train") -> tuple[int, int]:
    """Each process's share of the global batch: (rows per micro-batch, micro-batches)."""
    if cfg.grad_accum % world_size == 0:
        return cfg.batch_size, cfg.grad_accum // world_size
    if cfg.batch_size % world_size == 0:
        return cfg.batch_size // world_size, cfg.grad_accum
    raise LmopsError(
        f"{stage}.batch_size ({cfg.batch_size}) x {stage}.grad_accum "
        f"({cfg.grad_accum}) rows cannot be shared evenly by {world_size} "
        f"processes: make batch_size or grad_accum a multiple of {world_size}, "
        f"or set {stage}.nproc"
    )


@contextlib.contextmanager
def _process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    if env.world_size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------- loop


def fit_config(stage: str, seed: int, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's config records of the run, beside the stage's resolved config:
    a run resumes only where this is the same (the process count changes no result, so
    a run resumes under another one)."""
    return {"stage": stage, "seed": seed, "train": cfg.model_dump(exclude={"nproc"})}


@dataclass
class TrainResult:
    step: int  # optimiser steps done, resumed ones included
    train_loss: float | None  # last logged mean train loss
    metrics: dict[str, float]  # last evaluation
    best_metric: float | None
    best_step: int | None
    tokens_seen: int  # over the whole run, resumed steps included
    wall_seconds: float  # training time over the whole run, resumed calls included
    tokens_per_sec: float  # tokens_seen / wall_seconds
    history: list[dict[str, float]]  # one row per logged or evaluated step
    checkpoint: Path | None  # the last training checkpoint
    best_checkpoint: Path | None  # weights with the best selected metric
    resumed_from: int  # 0 for a fresh start
    hardware: dict[str, Any] = field(default_factory=dict)  # lmops.core.hardware.facts


@dataclass
class _State:
    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    seconds: float = 0.0  # wall time of the calls that did these steps, up to this one

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "history": list(self.history.values()),
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        history = {int(row["step"]): row for row in data.get("history", [])}
        return cls(
            int(data["step"]),
            int(data["tokens_seen"]),
            data.get("best_metric"),
            data.get("best_step"),
            history,
            dict(data.get("metrics", {})),
            float(data.get("seconds", 0.0)),
        )

    def record(self, step: int, values: dict[str, float]) -> None:
        self.history.setdefault(step, {"step": step}).update(values)


def fit(
    model: nn.Module,
    get_batch: BatchFn,
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    seed: int,
    stage: str,
    resolved_config: dict[str, Any],
    evaluate: EvalFn | None = None,
    select_metric: str | None = None,
    select_mode: Literal["max", "min"] = "max",
    curve_path: str | Path | None = None,
    log: TrainLog | None = None,
    trainable_rows: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimiser steps, resuming if possible.

    ``resolved_config`` (JSON-able) describes everything that shapes the run besides
    ``cfg`` and ``seed`` (model config, vocab size, data digests ...); it is stored in every
    checkpoint and decides whether a rerun resumes. ``evaluate(model, step)`` runs on rank 0
    every ``cfg.eval_interval`` steps and at the end, in eval mode without gradients; with
    ``select_metric`` the weights with its best value (``select_mode``) are kept as well.
    ``curve_path`` (.csv or .json) receives the loss curve for ``dvc plots``; ``log``
    receives the metrics as they come and the loss plot at the end. ``trainable_rows`` maps
    a parameter name to a bool mask over its first dimension: only the marked rows learn,
    the others keep their values (the parameter is left out of weight decay for that).
    Raises LmopsError when the loss is NaN/inf or above ``cfg.max_loss``; the last
    checkpoint written before that stays intact.
    """
    if select_mode not in ("max", "min"):
        raise ValueError(f"select_mode must be 'max' or 'min', not {select_mode!r}")
    if select_metric is not None and evaluate is None:
        raise ValueError("select_metric needs an evaluate callback")
    env = DistEnv.from_env()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, env.local_rank, key=f"{stage}.device")
    with _process_group(env, device), contextlib.ExitStack() as hooks:
        frozen = _freeze_rows(model, trainable_rows or {}, device, hooks)
        trainer = _Trainer(
            model,
            get_batch,
            loss_fn,
            cfg,
            Path(out_dir),
            seed,
            stage,
            resolved_config,
            evaluate,
            select_metric,
            select_mode,
            curve_path,
            env,
            device,
            log or NoLog(),
            no_decay=frozen,
        )
        return trainer.run()


def _freeze_rows(
    model: nn.Module,
    trainable_rows: Mapping[str, Tensor],
    device: torch.device,
    hooks: contextlib.ExitStack,
) -> list[nn.Parameter]:
    """A gradient hook per named parameter that zeroes the rows its mask leaves out, removed
    when ``hooks`` closes; returns those parameters."""
    named = dict(model.named_parameters())
    frozen = []
    for name, rows in trainable_rows.items():
        if name not in named:
            raise ValueError(f"trainable_rows: the model has no parameter {name!r}")
        param = named[name]
        if rows.dtype != torch.bool or tuple(rows.shape) != tuple(param.shape[:1]):
            raise ValueError(
                f"trainable_rows[{name!r}]: need a bool mask of shape ({param.shape[0]},), "
                f"not {rows.dtype} {tuple(rows.shape)}"
            )
        keep = rows.to(device).view(-1, *[1] * (param.dim() - 1))
        hooks.callback(param.register_hook(lambda grad, keep=keep: grad * keep).remove)
        frozen.append(param)
    return frozen


class _Trainer:
    def __init__(
        self,
        model: nn.Module,
        get_batch: BatchFn,
        loss_fn: LossFn,
        cfg: TrainConfig,
        out_dir: Path,
        seed: int,
        stage: str,
        resolved_config: dict[str, Any],
        evaluate: EvalFn | None,
        select_metric: str | None,
        select_mode: str,
        curve_path: str | Path | None,
        env: DistEnv,
        device: torch.device,
        log: TrainLog,
        no_decay: Collection[nn.Parameter] = (),
    ):
        self.log = log
        self.cfg, self.seed, self.stage, self.env, self.device = cfg, seed, stage, env, device
        self.get_batch, self.loss_fn, self.evaluate_fn = get_batch, loss_fn, evaluate
        self.select_metric, self.select_mode = select_metric, select_mode
        self.curve_path = Path(curve_path) if curve_path is not None else None
        self.root = out_dir / CKPT_DIR
        self.global_batch = cfg.batch_size * cfg.grad_accum
        self.micro_size, self.micro_count = split_batch(cfg, env.world_size, stage)
        # a JSON round trip, so the comparison with a stored config is like for like
        self.config = json.loads(
            json.dumps({**resolved_config, "fit": fit_config(stage, seed, cfg)}, sort_keys=True)
        )
        self.raw = model.to(device)
        self.optimizer = make_optimizer(self.raw, cfg, device, no_decay)
        dtype = autocast_dtype(cfg.precision, device, key=f"{stage}.precision")
        compiled = compile_enabled(cfg.compile, device, dtype)
        self.hardware = facts(device, dtype, compiled, env.world_size)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                self.raw, device_ids=[device.index] if device.type == "cuda" else None
            )
            if env.world_size > 1
            else None
        )
        self.train_model = self.ddp or self.raw
        if compiled:
            # an OptimizedModule: torch types compile() as returning a plain callable
            self.train_model = cast(nn.Module, torch.compile(self.train_model))
        self.state = _State()
        self.last_ckpt: Path | None = None
        self.best_ckpt: Path | None = None
        self.metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- resume

    def resume(self) -> None:
        last = checkpoint.latest(self.root)
        fresh = False
        if last is not None:
            try:
                saved = checkpoint.read_config(last)
            except checkpoint.CheckpointError as err:
                raise checkpoint.CheckpointError(
                    f"{err}; delete {last} to start {self.stage} afresh"
                ) from None
            if saved == self.config:
                self.state = _State.from_json(checkpoint.load(last, self.raw, self.optimizer))
                self.metrics = dict(self.state.metrics)  # a finished run evaluates no more
                self.last_ckpt = last
                self.best_ckpt = checkpoint.latest(self.root, "best")
                log.info("%s: resuming from %s at step %d", self.stage, last, self.state.step)
            else:
                old, new = flatten(saved), flatten(self.config)
                changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
                log.warning(
                    "%s: %s was written with a different config (changed: %s); starting afresh",
                    self.stage,
                    last,
                    ", ".join(changed),
                )
                fresh = True
        # every rank has read the old checkpoint before rank 0 may delete it
        self.env.barrier()
        if fresh and self.env.is_main:
            shutil.rmtree(self.root)

    # ------------------------------------------------------------------ step

    def train_step(self, step: int) -> tuple[float, Tensor, int]:
        cfg, env = self.cfg, self.env
        seed_everything(_step_seed(self.seed, step, env.rank))
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.get_batch(step, self.global_batch)
        rows = _first(batch).shape[0]
        if rows != self.global_batch:
            raise ValueError(f"get_batch({step}, {self.global_batch}) returned {rows} rows")
        total = torch.zeros((), device=self.device)
        size, count = self.micro_size, self.micro_count
        for micro in range(count):
            lo = (env.rank * count + micro) * size
            part = _map(
                batch,
                cast(
                    "Callable[[Tensor], Tensor]", lambda t, lo=lo: t[lo : lo + size].to(self.device)
                ),
            )
            # DDP all-reduces gradients on the last micro-batch only
            last = micro == count - 1
            sync = (
                self.ddp.no_sync()
                if self.ddp is not None and not last
                else (contextlib.nullcontext())
            )
            with sync:
                with self.autocast():
                    loss = self.loss_fn(self.train_model, part)
                (loss / count).backward()
            total += loss.detach().float()
        if env.world_size > 1:
            dist.all_reduce(total)  # gloo has no AVG: sum, then divide below
        loss_value = total.item() / (count * env.world_size)
        if not math.isfinite(loss_value) or loss_value > cfg.max_loss:
            where = self.last_ckpt or "none written yet"
            raise LmopsError(
                f"{self.stage}: loss diverged at step {step}: {loss_value} "
                f"(max_loss {cfg.max_loss}); last good checkpoint: {where}"
            )
        grad_norm = nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, _first(batch).numel()

    # ------------------------------------------------------ eval, checkpoints

    def evaluate(self, step: int) -> None:
        assert self.evaluate_fn is not None  # run() calls this only when there is one
        self.raw.eval()
        try:
            with torch.no_grad(), self.autocast():
                metrics = {k: float(v) for k, v in self.evaluate_fn(self.raw, step).items()}
        finally:
            self.raw.train()
        self.metrics = self.state.metrics = metrics
        self.state.record(step, metrics)
        # a stage's log buffers: a tracking server that went away loses nothing
        self.log.metrics({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)
        if self.select_metric is None:
            return
        if self.select_metric not in metrics:
            raise LmopsError(
                f"{self.stage}: evaluate() returned no '{self.select_metric}' "
                f"(got {sorted(metrics)})"
            )
        value, best = metrics[self.select_metric], self.state.best_metric
        better = best is None or (value > best if self.select_mode == "max" else value < best)
        if better:
            self.state.best_metric, self.state.best_step = value, step
            path = checkpoint.step_path(self.root, "best", step)
            checkpoint.save(
                path, self.raw, self.config, state={"step": step, self.select_metric: value}
            )
            checkpoint.prune(self.root, "best", keep=path)
            self.best_ckpt = path

    def save(self, step: int) -> None:
        path = checkpoint.step_path(self.root, "step", step)
        checkpoint.save(
            path, self.raw, self.config, state=self.state.to_json(), optimizer=self.optimizer
        )
        checkpoint.prune(self.root, "step", keep=path)
        self.last_ckpt = path
        if self.curve_path is not None:
            write_curve(list(self.state.history.values()), self.curve_path)

    def _memory_guard(self, step: int, what: str) -> contextlib.AbstractContextManager:
        """An allocation that fails in ``what`` becomes one line: stage, step, batch size,
        what to lower, and the last checkpoint, which stays."""

        def describe() -> tuple[str, str]:
            cfg, stage = self.cfg, self.stage
            micro = (
                f" in micro-batches of {self.micro_size}"
                if self.micro_size != cfg.batch_size
                else ""
            )
            resume = self.last_ckpt or "none written yet"
            return (
                f"{stage}: {what} {step} with batch_size {cfg.batch_size}{micro}",
                f"{stage}.batch_size and raise {stage}.grad_accum by the same factor (the "
                f"effective batch stays {self.global_batch}), or model.block_size; "
                f"the last checkpoint ({resume}) is kept",
            )

        return memory_errors(self.device, describe)

    # ------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        self.resume()
        state = self.state
        start, earlier = state.step, state.seconds  # a resumed run counts its calls' time
        self.raw.train()
        started = time.perf_counter()
        run_tokens, window_tokens, window_losses = 0, 0, []
        window_start = started
        bar = tqdm(
            total=cfg.max_steps,
            initial=start,
            desc=self.stage,
            unit="step",
            disable=not env.is_main,
            dynamic_ncols=True,
        )
        with bar:
            for step in range(start + 1, cfg.max_steps + 1):
                with self._memory_guard(step, "training step"):
                    loss, grad_norm, tokens = self.train_step(step)
                state.step, state.tokens_seen = step, state.tokens_seen + tokens
                run_tokens += tokens
                window_tokens += tokens
                window_losses.append(loss)
                final = step == cfg.max_steps
                if env.is_main and (step % cfg.log_interval == 0 or final):
                    now = time.perf_counter()
                    speed = window_tokens / max(now - window_start, 1e-9)
                    values = {
                        "train_loss": sum(window_losses) / len(window_losses),
                        "lr": lr_at(step, cfg),
                        "grad_norm": grad_norm.item(),
                    }
                    state.record(step, values)
                    self.log.metrics(
                        {
                            f"{self.stage}/{k}": v
                            for k, v in {**values, "tokens_per_sec": speed}.items()
                        },
                        step=step,
                    )
                    window_tokens, window_losses, window_start = 0, [], now
                if (
                    self.evaluate_fn is not None
                    and env.is_main
                    and (step % cfg.eval_interval == 0 or final)
                ):
                    with self._memory_guard(step, "the evaluation at step"):
                        self.evaluate(step)
                if env.is_main and (step % cfg.checkpoint_interval == 0 or final):
                    state.seconds = earlier + time.perf_counter() - started
                    self.save(step)
                elapsed = time.perf_counter() - started
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{lr_at(step, cfg):.2e}",
                    tok_s=f"{run_tokens / max(elapsed, 1e-9):,.0f}",
                    refresh=False,
                )
                bar.update(1)
        wall = earlier + time.perf_counter() - started
        history = list(state.history.values())
        if env.is_main:
            if self.curve_path is not None:
                write_curve(history, self.curve_path)
            if history and self.log.enabled:
                self._log_plot(history)
        env.barrier()
        train_losses = [row["train_loss"] for row in history if "train_loss" in row]
        return TrainResult(
            step=state.step,
            train_loss=train_losses[-1] if train_losses else None,
            metrics=self.metrics,
            best_metric=state.best_metric,
            best_step=state.best_step,
            tokens_seen=state.tokens_seen,
            wall_seconds=wall,
            tokens_per_sec=state.tokens_seen / wall if wall > 0 else 0.0,
            history=history,
            checkpoint=self.last_ckpt or checkpoint.latest(self.root),
            best_checkpoint=self.best_ckpt or checkpoint.latest(self.root, "best"),
            resumed_from=start,
            hardware=self.hardware,
        )

    def _log_plot(self, history: list[dict[str, float]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(history, Path(tmp) / f"{self.stage}_loss_curves.png")
            self.log.figure(png)
