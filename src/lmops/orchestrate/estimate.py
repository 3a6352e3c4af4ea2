"""``lmops estimate``: how long ``dvc repro`` will take on this machine, before it starts.

The same model on the same params takes 6 minutes on one 2-core CPU and hours on
another, so the estimate measures this machine rather than quoting a table:

- training stages: optimiser steps of the stage's real model, at its batch shape,
  resolved precision and device (distil: its loss, the teacher's pass included), and
  forward passes for the validation batches; times the steps left and the evaluations.
  A checkpoint counts where the trainer would resume from it: the same training and
  model params, vocabulary size and seed, and the inputs it recorded still the stage's,
  with no stage of the run rebuilding them first (:func:`steps_done`);
- decoding (validation BLEU, ``evaluate``, ``quantise``): greedy and beam steps of the
  model at the decoding batch size over two spans, extrapolated to the batch's length;
- data stages and each stage's fixed cost: rates measured with the embedded corpora on
  a reference machine, scaled by this CPU's speed on a fixed scalar workload (they do
  not use torch's kernels).

A measurement takes a second or two, so the estimate takes 10-20 s on a 2-core CPU.

Sizes of the data (pairs, tokens) come from the tokenise stage's statistics when a
previous run left them, else from the embedded corpora's. Constants below say where
each was measured; ``bench/estimate.py`` checks predictions against measured stage times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch

from lmops.config import ModelConfig, Params, TrainConfig, load_params
from lmops.core import hardware
from lmops.errors import LmopsError

# ------------------------------------------------------------- constants
# Measured with bench/estimate.py on the reference machine: a 2-core AMD EPYC (Zen 3,
# AVX2, no native bf16), where the scalar probe below takes REFERENCE_PROBE_S. Other
# machines scale the data stages and the fixed costs by their probe time over this one.
REFERENCE_PROBE_S = 0.015
# data stages: seconds per MB of raw corpus (the text clean keeps, 23.4 MB for the
# embedded corpora) on top of the fixed cost of a stage; vocab reads a capped sample
# (vocab.input_sentence_size), so its time is fixed
DATA_SECONDS_PER_MB = {"clean": 0.53, "validate": 0.41, "tokenise": 0.175}
DATA_FIXED_SECONDS = {"vocab": 35.5}
# a stage's fixed cost: dvc, the process and its imports, the MLflow run, the outputs
STAGE_OVERHEAD_S = 10.0
# a model stage's on top of that: torch, the estimate it prints, exports and logging
MODEL_STAGE_OVERHEAD_S = 10.5
# quantise: the ONNX export (torch.export-based, about 20 s a model of the distil size on a
# 2-core AVX2 EPYC) and int8 conversion of each model; the ONNX int8 student decodes in
# about 0.4 of the fp32 student's time (bench/quantise.py: 2.0-2.8x as fast)
QUANTISE_EXPORT_S = 20.0
ONNX_INT8_SHARE = 0.4
# compile: (step time factor, seconds of a cold-cache compile), bf16, by kind of machine.
# "amx": a 2-core Xeon with AMX tiles, the fast profile's pretrain model (0.055 s a step
# compiled against 0.10 s eager, 25 s to compile; bench/estimate.py put pretrain at +41%
# with the figures of the other class). "other": an AVX-512 BF16 EPYC without AMX
# (bench/train_throughput.py: 1.15-1.2x), also used on CUDA, where the speed-up is larger.
COMPILE_COST = {"amx": (0.55, 25.0), "other": (0.87, 40.0)}
# sizes of the embedded default corpora, for a first run that has no statistics yet
DEFAULT_SIZES = {
    "corpus_mb": 23.4,
    "test_pairs": 663,
    "valid_pairs": 133,
    "src_tokens": 30.0,
    "tgt_tokens": 33.0,
    "pair_tokens": 75.0,
    "mono_test_tokens": 46062,
}
# a translation decoded alone runs this many times the mean target length (the quantise
# stage's batch-1 timings of the fast profile's student: 149 ms a sentence)
SINGLE_LENGTH_FACTOR = 1.5
LONG_RUN_MINUTES = 45
FAST_PROFILE = "params.fast.yaml"


@dataclasses.dataclass
class StageEstimate:
    stage: str
    seconds: float
    detail: str


# ----------------------------------------------------------- the machine


def scalar_probe() -> float:
    """Seconds for a fixed pure-Python workload (string and dict work, as in the data
    stages): the best of 10 short runs, since a shared machine's speed varies by half
    from one moment to the next."""
    best = math.inf
    for _ in range(10):
        started = time.perf_counter()
        counts: dict[str, int] = {}
        for i in range(20_000):
            word = f"mot{i % 997} Wort{i % 113}".lower().strip()
            counts[word] = counts.get(word, 0) + len(word.split())
        best = min(best, time.perf_counter() - started)
    return best


def _timed(fn: Callable[[], Any], calls: int = 2, seconds: float = 0.5) -> float:
    """Mean seconds of a call, over at least ``calls`` calls and ``seconds``: one step
    varies by +-20% from the next on a shared 2-core machine."""
    n, started = 0, time.perf_counter()
    while n < calls or time.perf_counter() - started < seconds:
        fn()
        n += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / n


def _model(cfg: ModelConfig, vocab: int, device: torch.device) -> torch.nn.Module:
    from lmops.core.model import Transformer

    return Transformer(cfg, vocab).to(device)


def _memo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Measure once per process: stages share models and shapes (quantise decodes what
    evaluate and distil decode), and each measurement costs a second or two."""
    seen: dict[str, Any] = {}

    def wrapper(*args: Any) -> Any:
        key = repr([a.model_dump_json() if hasattr(a, "model_dump_json") else a for a in args])
        if key not in seen:
            seen[key] = fn(*args)
        return seen[key]

    return wrapper


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = hardware.autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@_memo
def compile_cost(device: torch.device) -> tuple[float, float]:
    """:data:`COMPILE_COST` for this machine: (step time factor, compile seconds)."""
    amx = device.type == "cpu" and bool(torch.cpu._is_amx_tile_supported())
    return COMPILE_COST["amx" if amx else "other"]


@_memo
def train_step_seconds(
    cfg: ModelConfig,
    vocab: int,
    rows: int,
    width: int,
    train: TrainConfig,
    device: torch.device,
    teacher: ModelConfig | None = None,
    target_share: float = 1.0,
) -> float:
    """Seconds per optimiser step of one micro-batch of ``rows`` x ``width`` tokens,
    eager, at the stage's resolved precision (distil: its loss, the teacher's pass
    included):
    one step of one row first (kernels chosen, optimiser state made), then the mean of
    full steps."""
    from lmops.core.train import IGNORE_INDEX, LossFn, lm_loss, make_optimizer

    torch.manual_seed(0)
    model = _model(cfg, vocab, device)
    opt = make_optimizer(model, train, device)
    loss_fn: LossFn = lm_loss
    if teacher is not None and getattr(train, "method", "word") == "word":
        from lmops.core.losses import word_loss
        from lmops.core.model import Transformer

        teacher_model = _model(teacher, vocab, device)
        assert isinstance(teacher_model, Transformer)
        loss_fn = word_loss(
            teacher_model, getattr(train, "alpha", 0.5), getattr(train, "temperature", 2.0)
        )
    ids = torch.randint(4, vocab, (rows, width + 1), device=device)
    targets = ids[:, 1:].clone()  # translation pairs: the loss is on the target side only
    targets[:, : round(width * (1 - target_share))] = IGNORE_INDEX

    def step(n: int = rows) -> None:
        batch = (ids[:n, :-1], targets[:n])
        with _autocast(device, train.precision):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    return _timed(step)


@_memo
def forward_seconds(
    cfg: ModelConfig, vocab: int, rows: int, width: int, precision: str, device: torch.device
) -> float:
    """Seconds per loss forward pass of ``rows`` x ``width`` tokens (validation,
    perplexity)."""
    from lmops.core.train import lm_loss

    model = _model(cfg, vocab, device).eval()
    ids = torch.randint(4, vocab, (rows, width + 1), device=device)

    def forward() -> None:
        with torch.no_grad(), _autocast(device, precision):
            lm_loss(model, (ids[:, :-1], ids[:, 1:]))

    forward()
    return _timed(forward, calls=1, seconds=0.2)


@_memo
def decode_seconds(
    cfg: ModelConfig,
    vocab: int,
    device: torch.device,
    precision: str,
    sentences: int,
    batch_size: int,
    beam_size: int,
    src_tokens: float,
    new_tokens: int,
) -> float:
    """Seconds to translate ``sentences`` in batches of ``batch_size``, each batch running
    ``new_tokens`` decoding steps (a batch runs until its longest translation ends: for
    the models a pipeline trains, often the limit). A step costs more as the cache
    grows, so steps are timed over two spans (2 to 18, 18 to 34) and the cost is
    extrapolated along that line."""
    if sentences <= 0:
        return 0.0
    from lmops.core.model import Transformer

    model = _model(cfg, vocab, device).eval()
    assert isinstance(model, Transformer)
    n = min(batch_size, sentences)
    prompts = [
        [5 + (i * 7 + j) % (vocab - 5) for j in range(max(1, round(src_tokens)))] for i in range(n)
    ]
    eos = vocab + 1  # never emitted: every batch runs all its steps

    def run(steps: int) -> None:
        with torch.inference_mode(), _autocast(device, precision):
            if beam_size > 1:
                model.generate_beam(prompts, steps, eos, 0, beam_size=beam_size)
            else:
                model.generate_greedy(prompts, steps, eos, 0)

    run(1)
    t2, t18, t34 = (
        _timed(cast("Callable[[], None]", lambda k=k: run(k)), 1, 0.05) for k in (2, 18, 34)
    )
    early, late = max(t18 - t2, 1e-6) / 16, max(t34 - t18, 1e-6) / 16  # a step at 10, at 26
    slope = max(0.0, (late - early) / 16)
    rest = max(0, new_tokens - 2)  # steps 3 .. new_tokens, each early + slope * (t - 10)
    per_batch = t2 + rest * early + slope * (rest * (rest + 1) / 2 - 8 * rest)
    return max(per_batch, t2) * math.ceil(sentences / n)


# ------------------------------------------------------------ the data


def data_sizes(root: Path) -> dict[str, float]:
    """Sizes the estimate needs: from ``data/metrics`` of an earlier run, else defaults."""
    sizes = dict(DEFAULT_SIZES)
    tok_stats = root / "data" / "metrics" / "tokenise.json"
    clean_stats = root / "data" / "metrics" / "clean.json"
    try:
        stats = json.loads(tok_stats.read_text())
        test, valid = stats["parallel_test"], stats["parallel_valid"]
        train = stats["parallel_train"]
        sizes.update(
            {
                "test_pairs": test["pairs"],
                "valid_pairs": valid["pairs"],
                "src_tokens": test["src_tokens"] / max(1, test["pairs"]),
                "tgt_tokens": test["tgt_tokens"] / max(1, test["pairs"]),
                # <2xx> src <sep> tgt </s>
                "pair_tokens": (train["src_tokens"] + train["tgt_tokens"]) / max(1, train["pairs"])
                + 3,
                "mono_test_tokens": stats["pretrain_valid"]["tokens"],
            }
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # the text clean kept, in every split: close to what it reads
        kept = sum(
            v for k, v in json.loads(clean_stats.read_text()).items() if k.endswith(".bytes")
        )
        if kept:
            sizes["corpus_mb"] = kept / 2**20
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return sizes


# the keys under which a training stage's checkpoint config records the digests
# (:func:`lmops.io.file_digest`) of what it read: ``data`` the token files, ``init`` and
# ``teacher`` the weights of a model dir (the ``resolved`` config of pretrain, finetune
# and distil)
INPUT_KEYS = ("data", "init", "teacher")


def recorded_inputs(saved: dict[str, Any]) -> set[str]:
    """The input digests a checkpoint's config recorded."""
    out: set[str] = set()
    for key in INPUT_KEYS:
        value = saved.get(key)
        if isinstance(value, dict):
            out |= {str(v) for v in value.values()}
        elif value is not None:
            out.add(str(value))
    return out


@_memo
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """:func:`lmops.io.file_digest`, once per version of a file: the estimate's two passes
    ask for the same token files, which may be gigabytes."""
    from lmops.io import file_digest

    return file_digest(path)


def input_digests(root: Path, spec: dict[str, Any]) -> dict[str, str]:
    """Digests of what a stage (``spec``, its ``dvc.yaml`` entry) reads now, by dep: those
    that are files, and the weights of those that are model dirs (a directory's other
    files are not hashed: a corpus may be gigabytes)."""
    from lmops.core import checkpoint
    from lmops.orchestrate.dag import stage_deps

    out = {}
    for dep in stage_deps(spec):
        path = root / dep
        if path.is_dir():
            path = path / checkpoint.WEIGHTS
        if path.is_file():
            stat = path.stat()
            out[dep] = _digest(str(path), stat.st_size, stat.st_mtime_ns)
    return out


def steps_done(
    root: Path,
    work_dir: Path,
    stage: str,
    cfg: TrainConfig,
    model: ModelConfig,
    vocab_size: int,
    seed: int,
    running: Iterable[str] = (),
) -> int:
    """The step a rerun of ``stage`` resumes from: that of the last checkpoint in
    ``work_dir``, if the trainer will resume from it: its config records this ``stage``,
    ``seed``, training and model params and ``vocab_size``, and inputs that are the
    stage's deps now, none of them an output of a stage of ``running`` (the stages run
    with it, which rebuild those first); else 0, a whole run."""
    from lmops.core import checkpoint
    from lmops.core.train import fit_config
    from lmops.orchestrate.dag import load_dvc_yaml, producers

    last = checkpoint.latest(work_dir / "ckpt")
    if last is None:
        return 0
    try:
        saved = checkpoint.read_config(last)
    except checkpoint.CheckpointError:
        return 0
    wanted = json.loads(
        json.dumps(
            {
                "fit": fit_config(stage, seed, cfg),
                "model": model.model_dump(),
                "vocab_size": vocab_size,
            }
        )
    )
    if any(saved.get(k) != v for k, v in wanted.items()):
        return 0
    dvc_yaml = load_dvc_yaml(root)
    spec = (dvc_yaml.get("stages") or {}).get(stage) or {}
    recorded, now = recorded_inputs(saved), input_digests(root, spec)
    if not recorded <= set(now.values()):
        return 0
    others = set(running) - {stage}
    if any(producers(dvc_yaml, dep) & others for dep, digest in now.items() if digest in recorded):
        return 0
    match = re.search(r"(\d+)$", last.name)
    return int(match.group(1)) if match else 0


# ----------------------------------------------------------- the stages


@dataclasses.dataclass
class _Context:
    root: Path
    params: Params
    sizes: dict[str, float]
    cpu_factor: float
    vocab: int
    work_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)
    running: list[str] = dataclasses.field(default_factory=list)  # the stages estimated

    def work_dir(self, stage: str) -> Path:
        """Where ``stage`` keeps its checkpoints: its ``--work``, else dvc.yaml's."""
        return self.work_dirs.get(stage, self.root / "data" / "train" / stage)

    def steps_done(self, stage: str, cfg: TrainConfig, model: ModelConfig) -> int:
        return steps_done(
            self.root,
            self.work_dir(stage),
            stage,
            cfg,
            model,
            self.vocab,
            self.params.seed,
            self.running,
        )

    def device(self, name: str) -> torch.device:
        return hardware.resolve_device(name)

    def overhead(self, model_stage: bool) -> float:
        return (
            STAGE_OVERHEAD_S + (MODEL_STAGE_OVERHEAD_S if model_stage else 0.0)
        ) * self.cpu_factor


def _training(
    ctx: _Context,
    stage: str,
    cfg: TrainConfig,
    model: ModelConfig,
    width: int,
    bleu: bool,
    teacher: ModelConfig | None = None,
) -> StageEstimate:
    # pair stages (bleu) train on "<2xx> source <sep> target </s>", the loss on the target
    share = (ctx.sizes["tgt_tokens"] + 1) / ctx.sizes["pair_tokens"] if bleu else 1.0
    device = ctx.device(cfg.device)
    nproc = hardware.resolve_nproc(cfg.nproc, cfg.device)
    dtype = hardware.autocast_dtype(cfg.precision, device)
    precision = hardware.precision_name(dtype)  # the resolved one: measurements are shared
    step = train_step_seconds(
        model, ctx.vocab, cfg.batch_size, width, cfg, device, teacher, min(1.0, share)
    )
    fwd = forward_seconds(model, ctx.vocab, cfg.batch_size, width, precision, device)
    compiled = hardware.compile_enabled(cfg.compile, device, dtype)
    factor, compile_s = compile_cost(device) if compiled else (1.0, 0.0)
    step *= cfg.grad_accum / nproc * factor
    done = ctx.steps_done(stage, cfg, model)
    left = max(0, cfg.max_steps - done)
    evals = sum(
        1
        for s in range(done + 1, cfg.max_steps + 1)
        if s % cfg.eval_interval == 0 or s == cfg.max_steps
    )
    eval_s = cfg.eval_batches * fwd
    if bleu:
        dec = ctx.params.evaluate.decode
        n = min(getattr(cfg, "bleu_samples", 0), int(ctx.sizes["valid_pairs"]))
        eval_s += decode_seconds(
            model,
            ctx.vocab,
            device,
            precision,
            n,
            dec.batch_size,
            1,
            ctx.sizes["src_tokens"],
            dec.max_new_tokens,
        )
    total = (
        left * step + evals * eval_s + ctx.overhead(model_stage=True) + (compile_s if left else 0.0)
    )
    resume = f", resuming at step {done}" if done else ""
    detail = (
        f"{left} steps x {step:.3g} s + {evals} evaluations x {eval_s:.3g} s "
        f"({hardware.precision_name(dtype)}{', compiled' if compiled else ''}, "
        f"{device.type}{f' x {nproc}' if nproc > 1 else ''}{resume})"
    )
    return StageEstimate(stage, total, detail)


def _batch_length(ctx: _Context, batch_size: int) -> int:
    """Decoding steps of a batch: one sentence stops at its end of sentence, about
    SINGLE_LENGTH_FACTOR times the mean target length; a batch runs until its longest
    stops, for the models a pipeline trains often the limit."""
    limit = ctx.params.evaluate.decode.max_new_tokens
    if batch_size > 1:
        return limit
    return min(limit, math.ceil(ctx.sizes["tgt_tokens"] * SINGLE_LENGTH_FACTOR))


def _evaluate_like(
    ctx: _Context, stage: str, model: ModelConfig, precision: str, device_name: str
) -> tuple[float, str]:
    ev = ctx.params.evaluate
    dec = ev.decode
    device = ctx.device(device_name)
    precision = hardware.precision_name(hardware.autocast_dtype(precision, device))
    n = int(ctx.sizes["test_pairs"])
    if ev.max_test_pairs is not None:
        n = min(n, ev.max_test_pairs)
    seconds = decode_seconds(
        model,
        ctx.vocab,
        device,
        precision,
        n,
        dec.batch_size,
        dec.beam_size,
        ctx.sizes["src_tokens"],
        dec.max_new_tokens,
    )
    # perplexity: forward passes over the held-out text, ppl_batch_size windows at a time
    fwd = forward_seconds(model, ctx.vocab, ev.ppl_batch_size, model.block_size, precision, device)
    windows = ctx.sizes["mono_test_tokens"] / model.block_size
    seconds += fwd * math.ceil(windows / ev.ppl_batch_size)
    return seconds, f"{n} test sentences, beam {dec.beam_size}"


def estimate_stage(ctx: _Context, stage: str) -> StageEstimate:
    p, sizes = ctx.params, ctx.sizes
    if stage in DATA_SECONDS_PER_MB or stage in DATA_FIXED_SECONDS:
        seconds = (
            DATA_SECONDS_PER_MB.get(stage, 0.0) * sizes["corpus_mb"]
            + DATA_FIXED_SECONDS.get(stage, 0.0)
        ) * ctx.cpu_factor
        return StageEstimate(
            stage, seconds + ctx.overhead(model_stage=False), f"{sizes['corpus_mb']:.0f} MB of text"
        )
    pair_width = min(p.model.block_size, math.ceil(sizes["pair_tokens"]))
    if stage == "pretrain":
        return _training(ctx, stage, p.pretrain, p.model, p.model.block_size, bleu=False)
    if stage == "finetune":
        return _training(ctx, stage, p.finetune, p.model, pair_width, bleu=True)
    if stage == "distil":
        est = _training(
            ctx, stage, p.distil, p.distil.model, pair_width, bleu=True, teacher=p.model
        )
        scored, _ = _evaluate_like(ctx, stage, p.distil.model, p.distil.precision, p.distil.device)
        return StageEstimate(stage, est.seconds + scored, est.detail + ", then scored")
    if stage == "evaluate":
        seconds, detail = _evaluate_like(
            ctx, stage, p.model, p.evaluate.precision, p.evaluate.device
        )
        return StageEstimate(stage, seconds + ctx.overhead(model_stage=True), detail)
    if stage == "quantise":
        # int8 variants decode on the cpu with onnxruntime (ONNX_INT8_SHARE of fp32's
        # time), scored on the test set: the student and the teacher; then the speed
        # rounds and one export per variant
        student, _ = _evaluate_like(ctx, stage, p.distil.model, "fp32", "cpu")
        teacher, _ = (
            _evaluate_like(ctx, stage, p.model, "fp32", "cpu") if p.quantise.teacher else (0.0, "")
        )
        variants = ONNX_INT8_SHARE * (student + teacher)
        q = p.quantise
        speed = (
            q.speed_rounds
            * sum(
                decode_seconds(
                    m,
                    ctx.vocab,
                    torch.device("cpu"),
                    "fp32",
                    q.speed_sentences,
                    b,
                    1,
                    sizes["src_tokens"],
                    _batch_length(ctx, b),
                )
                for m in (p.model, p.distil.model)
                for b in q.speed_batch_sizes
            )
            * 2
        )
        export = QUANTISE_EXPORT_S * (1 + int(q.teacher)) * ctx.cpu_factor
        return StageEstimate(
            stage,
            variants + speed + export + ctx.overhead(model_stage=True),
            f"{1 + int(q.teacher)} int8 variants scored and timed",
        )
    raise LmopsError(f"no estimate for stage {stage!r}")


def estimate(
    stages: Iterable[str],
    root: str | Path = ".",
    params_path: str | Path = "params.yaml",
    params: Params | None = None,
    work_dirs: dict[str, Path] | None = None,
) -> list[StageEstimate]:
    """An estimate for each of ``stages`` (:func:`lmops.orchestrate.stages_to_run` says
    which ``dvc repro`` would run), with ``params`` or those of ``params_path``; a
    training stage resumes from the checkpoints in ``work_dirs[stage]`` where given."""
    root = Path(root)
    params = params or load_params(root / params_path)
    todo = list(stages)
    ctx = _Context(
        root,
        params,
        data_sizes(root),
        1.0,
        params.vocab.vocab_size,
        work_dirs or {},
        todo,
    )
    # the probe between measurements, its best time kept: one probe can fall in a slow
    # moment of a shared machine; the second pass reuses the (memoised) measurements
    probes = [scalar_probe()]
    for stage in todo:
        estimate_stage(ctx, stage)
        probes.append(scalar_probe())
    ctx.cpu_factor = min(probes) / REFERENCE_PROBE_S
    return [estimate_stage(ctx, s) for s in todo]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def render(estimates: list[StageEstimate]) -> str:
    if not estimates:
        return "dvc repro: every stage is up to date, nothing to run"
    width = max(len(e.stage) for e in estimates)
    lines = [f"  {e.stage:<{width}}  {_minutes(e.seconds):>9}   {e.detail}" for e in estimates]
    total = sum(e.seconds for e in estimates)
    lines.append(f"  {'total':<{width}}  {_minutes(total):>9}")
    cpu = (
        f"{hardware.cpu_model()}, {hardware.cpu_capability()}, "
        f"bf16 {'native' if hardware.cpu_native_bf16() else 'emulated: fp32 used'}"
    )
    head = f"Estimated time of dvc repro on this machine ({cpu}; within about 30%):"
    text = "\n".join([head, *lines])
    if total > LONG_RUN_MINUTES * 60:
        text += (
            f"\nThat is over {LONG_RUN_MINUTES} minutes. For a scored translator in about "
            f"20, run the fast profile instead (`lmops estimate --profile "
            f"{FAST_PROFILE}` times it):\n"
            f"  dvc exp run $(lmops params set-args {FAST_PROFILE})"
        )
    return text


def log_stage_estimate(
    stage: str, params_path: str | Path, work_dir: str | Path | None = None
) -> None:
    """A training stage's own estimate, printed as it starts (a few seconds to measure);
    ``work_dir``: the stage's checkpoint dir, where it resumes from."""
    work_dirs = {stage: Path(work_dir)} if work_dir is not None else None
    try:
        est = estimate([stage], Path.cwd(), params_path, work_dirs=work_dirs)[0]
    except (LmopsError, OSError, RuntimeError) as err:  # never stops the stage itself
        print(f"[{stage}] no estimate: {err}", file=sys.stderr)
        return
    print(
        f"[{stage}] estimated {_minutes(est.seconds)} on this machine: {est.detail}",
        file=sys.stderr,
        flush=True,
    )


def training_stage_start(stage: str, params_path: str, argv: list[str]) -> None:
    """The training stages' ``before`` hook of :func:`lmops.stage.run`: the stage's
    estimate, printed once, then the relaunch under torchrun where ``nproc`` asks for it
    (:func:`lmops.core.hardware.relaunch_data_parallel`)."""
    if "WORLD_SIZE" in os.environ:  # one of torchrun's processes: the parent printed it
        return
    try:
        load_params(params_path)
    except LmopsError:
        return  # the stage reports it, with a FAILED run
    work = argparse.ArgumentParser(add_help=False)
    work.add_argument("--work")
    log_stage_estimate(stage, params_path, work.parse_known_args(argv)[0].work)
    hardware.relaunch_data_parallel(stage, params_path, argv)
