"""The ``distil`` stage: a smaller student learns to translate from the fine-tuned teacher.

Two methods (``distil.method``):

``word``
    Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016): on every target
    token the student matches the teacher's temperature-softened distribution,
    ``loss = (1 - alpha) * CE(student, reference) + alpha * T^2 * KL(teacher_T || student_T)``.
    The T^2 keeps the KL term's gradients on the scale of the CE term's as T changes. Like
    finetune's loss, only the target tokens (and ``</s>``) are scored, never the prompt.
``sequence``
    Sequence-level distillation (Kim & Rush 2016): the teacher translates the training
    sources once with beam search; the student learns those translations with plain
    cross-entropy. The translations are cached in the stage's work directory under a
    digest of everything that shapes them, so a resumed or repeated run reuses them.

The student starts from random weights or as a copy of the teacher pruned to its shape
(``distil.init``): some of its layers and, in those, the residual channels, heads and MLP
neurons the teacher uses most (Minitron-style activation importance). Training goes
through the shared loop (:func:`lmops.core.train.fit`: resume, checkpoints, divergence guard,
curves); as in finetune, each evaluation scores the validation loss and the BLEU of greedy
translations (with ``evaluate.decode``'s guards). The weights with the lowest validation
loss are the stage's output: the student's validation BLEU moves by a point from one
evaluation to the next while its loss falls steadily, and on the default data the
checkpoint it picked by 0.01 BLEU scored 2 test BLEU less than the last one
(docs/performance.md, "Translation quality").
The student is then scored by the same :func:`lmops.pipeline.evaluate.evaluate_model` as the
teacher, on the same test pairs, and compared with the teacher's figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lmops.config import DecodeConfig, ModelConfig, Params
from lmops.core.checkpoint import CheckpointError
from lmops.core.losses import word_loss
from lmops.core.model import Block, Transformer, mlp_hidden
from lmops.core.train import TrainLog, fit, lm_loss, seed_everything
from lmops.core.translation import (
    check_vocab,
    generate,
    load_model,
    pair_batches,
    read_pairs,
)
from lmops.core.vocab import Tokenizer
from lmops.errors import LmopsError
from lmops.io import atomic_output, file_digest, write_json
from lmops.pipeline import Result, path
from lmops.pipeline.evaluate import (
    TRANSLATIONS_FILE,
    evaluate_model,
    read_translations,
    score_translations,
)
from lmops.pipeline.training import VALID_LOSS, bleu_validation, keep_best

log = logging.getLogger(__name__)

N_SAMPLES = 20  # sample translations kept (MLflow table); evaluate.n_samples is evaluate's
SEQKD_PREFIX = "seqkd-"
CALIBRATION_BATCHES = 8  # training batches the teacher runs to rank what pruning keeps


class DistilError(LmopsError):
    """The teacher or the student configuration cannot be used for distillation."""


# ------------------------------------------------------------------ the student


def default_keep_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` evenly spaced teacher layers, the first and the last included."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _shape_errors(teacher: ModelConfig, student: ModelConfig) -> list[str]:
    errors = [
        f"distil.model.{key} is {getattr(student, key)}, the teacher's is "
        f"{getattr(teacher, key)}; a pruned copy keeps it"
        for key in ("block_size", "rope_theta")
        if getattr(student, key) != getattr(teacher, key)
    ]
    if student.n_embd // student.n_head != teacher.n_embd // teacher.n_head:
        errors.append(
            f"distil.model head width n_embd / n_head is "
            f"{student.n_embd // student.n_head}, the teacher's is "
            f"{teacher.n_embd // teacher.n_head}; a pruned copy keeps whole heads"
        )
    for key in ("n_layer", "n_embd", "n_head"):
        if getattr(student, key) > getattr(teacher, key):
            errors.append(
                f"distil.model.{key} is {getattr(student, key)}, more than the "
                f"teacher's {getattr(teacher, key)}"
            )
    if mlp_hidden(student) > mlp_hidden(teacher):
        errors.append(
            f"distil.model MLP width {mlp_hidden(student)} (mlp_ratio "
            f"{student.mlp_ratio}) is more than the teacher's {mlp_hidden(teacher)}"
        )
    return errors


class Importance:
    """How much the teacher uses each residual channel, head and MLP neuron (Minitron).

    Measured on calibration batches (Muralidharan et al. 2024, "Compact language models
    via pruning and knowledge distillation"): a channel by the mean magnitude of every
    RMSNorm's output in it, a head by the mean norm of its attention output, a neuron by
    the mean magnitude of its SwiGLU activation; padding positions do not count. The mean
    square of each norm's input per channel is kept as well: cutting channels changes the
    root mean square a norm divides by, and :func:`pruned_student` rescales for it.
    """

    def __init__(self, teacher: Transformer, batches: list[Tensor], pad_id: int):
        cfg = teacher.cfg
        self.head_dim = cfg.n_embd // cfg.n_head
        blocks = cast("list[Block]", teacher.blocks)  # an nn.ModuleList of Block
        norms = [n for b in blocks for n in (b.attn_norm, b.mlp_norm)] + [teacher.norm]
        self.channels = torch.zeros(cfg.n_embd)
        self.norm_inputs = torch.zeros(len(norms), cfg.n_embd)  # mean x^2 per channel
        self.heads = torch.zeros(cfg.n_layer, cfg.n_head)
        self.neurons = torch.zeros(cfg.n_layer, mlp_hidden(cfg))
        keep: Tensor | None = None  # real-token positions of the batch being run
        hooks = []

        def rows(x: Tensor) -> Tensor:
            return x.detach().float()[keep]

        def on_norm(i: int, inputs: Tensor, out: Tensor) -> None:
            self.channels.add_(rows(out).abs().sum(0))
            self.norm_inputs[i].add_(rows(inputs).square().sum(0))

        def on_heads(i: int, y: Tensor) -> None:  # attn.proj's input: heads side by side
            self.heads[i].add_(
                rows(y).unflatten(-1, (cfg.n_head, self.head_dim)).norm(dim=-1).sum(0)
            )

        def on_neurons(i: int, h: Tensor) -> None:  # mlp.down's input: silu(gate) * up
            self.neurons[i].add_(rows(h).abs().sum(0))

        # hooks return None: a forward hook that returns a value replaces the output
        for i, norm in enumerate(norms):
            hooks.append(
                norm.register_forward_hook(lambda _m, args, out, i=i: on_norm(i, args[0], out))
            )
        for i, block in enumerate(blocks):
            hooks.append(
                block.attn.proj.register_forward_pre_hook(
                    lambda _m, args, i=i: on_heads(i, args[0])
                )
            )
            hooks.append(
                block.mlp.down.register_forward_pre_hook(
                    lambda _m, args, i=i: on_neurons(i, args[0])
                )
            )
        tokens = 0
        try:
            with torch.no_grad():
                for inputs in batches:
                    keep = inputs != pad_id
                    tokens += int(keep.sum())
                    teacher(inputs)
        finally:
            for hook in hooks:
                hook.remove()
        if not tokens:
            raise DistilError("distil.init pruned: the calibration batches hold no tokens")
        for sums in (self.channels, self.norm_inputs, self.heads, self.neurons):
            sums /= tokens  # means per real token, as the doc says


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


def pruned_student(
    teacher: Transformer,
    cfg: ModelConfig,
    keep: list[int] | None = None,
    importance: Importance | None = None,
) -> Transformer:
    """A copy of ``teacher`` cut to the shape ``cfg``: its layers ``keep`` (in that order,
    evenly spaced by default) and, within them, its most important residual channels,
    attention heads and MLP neurons (``importance``; needed only where ``cfg`` is narrower).

    Every weight is the teacher's own, sliced; each RMSNorm's gain is scaled by the ratio
    of the root mean squares of its input over the kept and over all channels, so the
    normalised activations keep the teacher's scale. A student of the teacher's width is
    the teacher with layers dropped, exactly.
    """
    t = teacher.cfg
    errors = _shape_errors(t, cfg)
    if errors:
        raise DistilError("distil.init pruned: " + "; ".join(errors))
    keep = default_keep_layers(t.n_layer, cfg.n_layer) if keep is None else list(keep)
    if len(keep) != cfg.n_layer:
        raise DistilError(
            f"distil.keep_layers has {len(keep)} entries for {cfg.n_layer} student layers"
        )
    bad = [i for i in keep if not 0 <= i < t.n_layer]
    if bad:
        raise DistilError(
            f"distil.keep_layers: {bad} out of range, the teacher has "
            f"{t.n_layer} layers (0..{t.n_layer - 1})"
        )
    hidden_t, hidden = mlp_hidden(t), mlp_hidden(cfg)
    narrower = (cfg.n_embd, cfg.n_head, hidden) != (t.n_embd, t.n_head, hidden_t)
    if narrower and importance is None:
        raise DistilError("distil.init pruned: a narrower student needs importance scores")
    if narrower:
        assert importance is not None
        ch = _top(importance.channels, cfg.n_embd)
        share = importance.norm_inputs[:, ch].mean(1) / importance.norm_inputs.mean(1)
        gain = share.clamp_min(1e-12).sqrt()  # rms(kept) / rms(all), per norm
    else:
        ch, gain = torch.arange(t.n_embd), torch.ones(2 * t.n_layer + 1)
    hd = t.n_embd // t.n_head
    src = teacher.state_dict()
    state = {
        "tok_emb.weight": src["tok_emb.weight"][:, ch],
        "norm.weight": src["norm.weight"][ch] * gain[-1],
    }
    for j, i in enumerate(keep):
        heads = (
            _top(cast(Importance, importance).heads[i], cfg.n_head)
            if narrower
            else torch.arange(t.n_head)
        )
        cols = (heads[:, None] * hd + torch.arange(hd)).flatten()  # the heads' dims
        neurons = (
            _top(cast(Importance, importance).neurons[i], hidden)
            if narrower
            else torch.arange(hidden_t)
        )
        qkv = torch.cat([part * t.n_embd + cols for part in range(3)])
        theirs, mine = f"blocks.{i}.", f"blocks.{j}."
        state.update(
            {
                mine + "attn_norm.weight": src[theirs + "attn_norm.weight"][ch] * gain[2 * i],
                mine + "attn.qkv.weight": src[theirs + "attn.qkv.weight"][qkv][:, ch],
                mine + "attn.proj.weight": src[theirs + "attn.proj.weight"][ch][:, cols],
                mine + "mlp_norm.weight": src[theirs + "mlp_norm.weight"][ch] * gain[2 * i + 1],
                mine + "mlp.gate_up.weight": src[theirs + "mlp.gate_up.weight"][
                    torch.cat([neurons, hidden_t + neurons])
                ][:, ch],
                mine + "mlp.down.weight": src[theirs + "mlp.down.weight"][ch][:, neurons],
            }
        )
    student = Transformer(cfg, teacher.vocab_size)
    student.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = set(student.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:  # a model change this function does not know about yet
        raise DistilError(f"distil.init pruned: no rule for {sorted(missing)}")
    return student


def build_student(
    teacher: Transformer, params: Params, calibration: list[Tensor] | None = None, pad_id: int = 0
) -> Transformer:
    """The student ``distil.model``: random (``init: scratch``) or pruned from the teacher
    (``init: pruned``, its importance measured on ``calibration`` input batches)."""
    cfg = params.distil
    if cfg.model.block_size != teacher.cfg.block_size:
        raise DistilError(
            f"distil.model.block_size ({cfg.model.block_size}) must equal the "
            f"teacher's ({teacher.cfg.block_size}): both read the same examples"
        )
    if cfg.init == "pruned":
        scores = Importance(teacher, calibration, pad_id) if calibration else None
        return pruned_student(teacher, cfg.model, cfg.keep_layers, scores)
    return Transformer(cfg.model, teacher.vocab_size)


def load_teacher(path: str | Path) -> tuple[Transformer, dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise DistilError(
            f"{path}: teacher model not found (run the finetune stage first: dvc repro finetune)"
        )
    try:
        return load_model(path)
    except CheckpointError as err:
        raise DistilError(f"teacher model: {err}") from None


# ------------------------------------------------------- sequence-level data


def teacher_translations(
    teacher: Transformer,
    tok: Tokenizer,
    pairs: pd.DataFrame,
    tgt_lang: str,
    decode: DecodeConfig,
    cache_dir: str | Path,
    key: dict[str, Any],
) -> pd.DataFrame:
    """``pairs`` with ``tgt``/``tgt_ids`` replaced by the teacher's translations: the
    token ids it generated, as they are (not its text tokenised again), and their text.

    Cached as ``<cache_dir>/seqkd-<digest>.parquet``, the digest taken over ``key`` (what
    shapes the translations: teacher weights, data, decoding); a cache with another digest
    is stale and removed. Pairs the teacher translates to nothing (no token) are dropped.
    """
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{SEQKD_PREFIX}{digest}.parquet"
    if path.is_file():
        log.info("sequence-level KD: reusing the teacher's translations in %s", path)
        return pd.read_parquet(path)
    for stale in cache_dir.glob(f"{SEQKD_PREFIX}*.parquet"):
        stale.unlink()
    ids = generate(
        teacher,
        tok,
        list(pairs["src_ids"]),
        tgt_lang,
        decode,
        progress=True,
        desc="teacher translates",
    )
    out = pd.DataFrame(
        {
            "src": pairs["src"].to_numpy(),
            "src_ids": pairs["src_ids"].to_numpy(),
            "tgt": tok.decode(ids),
            "tgt_ids": ids,
        }
    )
    out = out[out["tgt_ids"].map(len) > 0].reset_index(drop=True)
    if out.empty:
        raise DistilError("sequence-level KD: the teacher translated every source to nothing")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        out.to_parquet(tmp, index=False)
    return out


def sequence_pairs(train: pd.DataFrame, max_pairs: int | None, seed: int) -> pd.DataFrame:
    """The training pairs the teacher translates: all, or a seeded sample in data order."""
    if max_pairs is None or max_pairs >= len(train):
        return train
    rows = np.sort(np.random.default_rng(seed).choice(len(train), max_pairs, replace=False))
    return train.iloc[rows].reset_index(drop=True)


# ------------------------------------------------------------------ the stage


def compare(
    student: dict[str, Any], teacher: dict[str, Any], student_params: int, teacher_params: int
) -> dict[str, Any]:
    """Teacher-relative figures of the student (same test pairs, same decoding)."""
    if student["test_pairs"] != teacher.get("test_pairs"):
        raise DistilError(
            f"the student was scored on {student['test_pairs']} test pairs, "
            f"the teacher on {teacher.get('test_pairs')}: not comparable"
        )
    for key in ("bleu_signature", "chrf_signature"):
        if key in teacher and teacher[key] != student.get(key):
            raise DistilError(
                f"{key} differs: student {student.get(key)!r}, teacher "
                f"{teacher[key]!r}: not comparable"
            )
    out: dict[str, Any] = {
        "teacher_bleu": teacher["bleu"],
        "teacher_chrf": teacher["chrf"],
        "teacher_params": teacher_params,
        "student_params": student_params,
        "param_ratio": student_params / teacher_params,
        "bleu_retained": student["bleu"] / teacher["bleu"] if teacher["bleu"] else None,
        "chrf_retained": student["chrf"] / teacher["chrf"] if teacher["chrf"] else None,
    }
    return out


def distil(
    paths: Paths, params: Params, log: TrainLog | None = None
) -> tuple[dict[str, Any] | None, pd.DataFrame]:
    """Train the student (or resume), write its model dir, score it; metrics and samples.

    ``paths.teacher_translations`` is the evaluate stage's ``translations.tsv`` of the
    teacher: the student is scored on the same pairs and compared with the teacher's BLEU
    and chrF.
    """
    tokens_dir, vocab_dir, clean_dir = paths.tokens, paths.vocab, paths.clean
    teacher_dir, teacher_tsv = paths.teacher, paths.teacher_translations
    work_dir, out_model, eval_dir, curve_path = paths.work, paths.out, paths.eval_out, paths.curve
    cfg, tgt_lang = params.distil, params.clean.target_lang
    teacher, _ = load_teacher(teacher_dir)
    teacher_scores = score_translations(teacher_tsv)
    tok = Tokenizer.load(vocab_dir)
    check_vocab(teacher, tok, teacher_dir)
    block = cfg.model.block_size
    train = read_pairs(tokens_dir / "parallel_train.parquet")
    evaluate, greedy = bleu_validation(
        tok, tokens_dir / "parallel_valid.parquet", tgt_lang, block, cfg, params.evaluate.decode
    )
    teacher_digest = file_digest(teacher_dir / "model.safetensors")
    data_digests = {
        name: file_digest(tokens_dir / f"{name}.parquet")
        for name in ("parallel_train", "parallel_valid")
    }

    if cfg.method == "word":
        loss_fn = word_loss(teacher, cfg.alpha, cfg.temperature)
        train_pairs = train
    else:
        key = {
            "teacher": teacher_digest,
            "data": data_digests["parallel_train"],
            "decode": cfg.sequence_decode.model_dump(),
            "max_pairs": cfg.sequence_max_pairs,
            "seed": params.seed,
            "target_lang": tgt_lang,
        }
        chosen = sequence_pairs(train, cfg.sequence_max_pairs, params.seed)
        train_pairs = teacher_translations(
            teacher, tok, chosen, tgt_lang, cfg.sequence_decode, work_dir, key
        )
        loss_fn = lm_loss

    batches = pair_batches(train_pairs, tok, tgt_lang, block, params.seed)
    calibration = None
    if cfg.init == "pruned":  # the first training batches: what the student will see
        calibration = [batches(step, cfg.batch_size)[0] for step in range(CALIBRATION_BATCHES)]
    seed_everything(params.seed)
    student = build_student(teacher, params, calibration, tok.pad_id)
    resolved = {
        "model": student.cfg.model_dump(),
        "vocab_size": tok.vocab_size,
        "target_lang": tgt_lang,
        "bleu_decode": greedy.model_dump(),
        "teacher": teacher_digest,
        "data": data_digests,
    }
    result = fit(
        student,
        batches,
        loss_fn,
        cfg,
        work_dir,
        seed=params.seed,
        stage="distil",
        resolved_config=resolved,
        evaluate=evaluate,
        select_metric=VALID_LOSS,
        select_mode="min",
        curve_path=curve_path,
        log=log,
    )
    out = keep_best(
        student,
        result,
        out_model,
        {"stage": "distil", "method": cfg.method, "init": cfg.init},
        tgt_lang,
        metric=VALID_LOSS,
    )
    if out is None:
        return None, pd.DataFrame()
    scores, samples = evaluate_model(
        student,
        tok,
        clean_dir,
        tokens_dir,
        params.evaluate.model_copy(update={"n_samples": N_SAMPLES}),
        tgt_lang,
        eval_dir,
    )
    out.update({"method": cfg.method, "init": cfg.init, "train_pairs": len(train_pairs)})
    out.update({k: v for k, v in scores.items() if k not in out})
    theirs = read_translations(teacher_tsv)["source"]
    mine = read_translations(Path(eval_dir) / TRANSLATIONS_FILE)["source"]
    if list(mine) != list(theirs):
        raise DistilError(
            f"{teacher_tsv}: the teacher was scored on other test "
            "pairs than the student; rerun the evaluate stage"
        )
    out.update(compare(scores, teacher_scores, student.num_params(), teacher.num_params()))
    return out, samples


@dataclass(frozen=True)
class Paths:
    tokens: Path = path("tokenise stage output dir")
    vocab: Path = path("vocab stage output dir")
    clean: Path = path("clean stage output dir (mono_test)")
    teacher: Path = path("fine-tuned teacher model dir")
    teacher_translations: Path = path("the teacher's translations.tsv (evaluate stage)")
    work: Path = path("checkpoint dir (kept between runs)")
    out: Path = path("student model dir to write")
    eval_out: Path = path("dir for the student's translations")
    metrics: Path = path("metrics JSON to write")
    curve: Path = path("loss and BLEU curve CSV (dvc plots)")


def run(paths: Paths, params: Params, log: TrainLog | None = None) -> Result:
    """The distil stage (reads ``seed``, ``distil``, ``evaluate`` and the target language
    of ``clean``); the table holds the student's sample translations."""
    metrics, samples = distil(paths, params, log)
    if metrics is not None:
        write_json(paths.metrics, metrics)
    return Result(metrics, samples)
