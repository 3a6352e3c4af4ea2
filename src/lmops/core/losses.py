"""Word-level distillation losses: the student learns the teacher's softened
distribution on the target tokens (see :mod:`lmops.pipeline.distil`). Apart from the stage so
that ``lmops.orchestrate.estimate`` can time a distillation step without importing the stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmops.core.model import Transformer
from lmops.core.train import IGNORE_INDEX, LossFn

__all__ = ["distil_loss", "distil_terms", "word_loss"]


def distil_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and mean KL(teacher_T || student_T) over the target tokens.

    Logits are [..., V], targets [...]; positions whose target is IGNORE_INDEX (the prompt,
    padding) count in neither term. Both are computed in fp32 whatever the logits' dtype.
    """
    keep = targets != IGNORE_INDEX
    s = student_logits[keep].float()
    t = teacher_logits[keep].float()
    ce = F.cross_entropy(s, targets[keep])
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return ce, kl


def distil_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """``(1 - alpha) * CE + alpha * T^2 * KL`` on the target tokens (see the module doc)."""
    ce, kl = distil_terms(student_logits, teacher_logits, targets, temperature)
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@contextlib.contextmanager
def _without_head(model: nn.Module) -> Iterator[Tensor]:
    """``model`` returns its final hidden states instead of logits; yields the head's weight.

    Only target positions need logits, a third of them or fewer in translation pairs: the
    output projection over the whole vocabulary is then a third of the work, for the
    teacher and the student alike. ``model`` may be wrapped (DDP, torch.compile).
    """
    raw = model
    while hasattr(raw, "module") or hasattr(raw, "_orig_mod"):
        raw = cast(nn.Module, getattr(raw, "module", None) or raw._orig_mod)
    head = cast(nn.Linear, raw.lm_head)
    raw.lm_head = nn.Identity()
    try:
        yield head.weight
    finally:
        raw.lm_head = head


def word_loss(teacher: Transformer, alpha: float, temperature: float) -> LossFn:
    """``loss_fn`` for :func:`lmops.core.train.fit`: the teacher scores each batch, frozen."""
    teacher.eval().requires_grad_(False)

    def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        if teacher.device != inputs.device:
            teacher.to(inputs.device)
        keep = targets != IGNORE_INDEX
        with torch.no_grad(), _without_head(teacher) as weight:
            teacher_logits = F.linear(teacher(inputs)[keep], weight)
        with _without_head(model) as weight:
            student_logits = F.linear(model(inputs)[keep], weight)
        return distil_loss(student_logits, teacher_logits, targets[keep], alpha, temperature)

    return loss_fn
