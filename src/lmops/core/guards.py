"""Guards against degenerate decoding, and a check for outputs that degenerated anyway.

Both guards look at the tokens a row has generated so far (not at its source: a
translation may well repeat the names and numbers of its source):

- ``no_repeat_ngram_size`` n: a token that would complete an n-gram the row has already
  generated is barred;
- ``repetition_penalty`` p (CTRL, as Hugging Face ``generate``): the logit of every token
  the row has generated is divided by p where positive and multiplied by p where negative.

:func:`degenerate` names what went wrong with an output that ran to ``max_new_tokens``
or loops (one n-gram several times in a row), for ``evaluate``'s report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

LOOP_MAX_N = 4  # n-grams of up to this many tokens count as a loop ...
LOOP_REPEATS = 3  # ... when they occur this many times in a row
HIT_LIMIT = "hit max_new_tokens"
LOOPS = "loops"


def banned_tokens(history: Sequence[int], n: int) -> set[int]:
    """The tokens that would complete an n-gram already in ``history``."""
    if n < 1 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    prefix = tuple(history[len(history) - n + 1 :])
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


def apply_guards(
    logits: Tensor,
    history: Sequence[Sequence[int]],
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """``logits`` (one row per entry of ``history``) with both guards applied, in place."""
    if repetition_penalty != 1.0:
        rows = [r for r, seen in enumerate(history) for _ in seen]
        if rows:
            cols = [t for seen in history for t in seen]
            idx = (
                torch.tensor(rows, device=logits.device),
                torch.tensor(cols, device=logits.device),
            )
            picked = logits[idx]
            logits[idx] = torch.where(
                picked > 0, picked / repetition_penalty, picked * repetition_penalty
            )
    if no_repeat_ngram_size > 0:
        for r, seen in enumerate(history):
            banned = banned_tokens(seen, no_repeat_ngram_size)
            if banned:
                logits[r, sorted(banned)] = -math.inf
    return logits


def loops(ids: Sequence[int], max_n: int = LOOP_MAX_N, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some n-gram (n <= ``max_n``) occurs ``repeats`` times in a row in ``ids``."""
    ids = list(ids)
    for n in range(1, max_n + 1):
        span = n * repeats
        for start in range(len(ids) - span + 1):
            gram = ids[start : start + n]
            if all(ids[start + k * n : start + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def degenerate(ids: Sequence[int], max_new_tokens: int) -> str:
    """What is wrong with an output (its tokens, end-of-sentence removed): ``HIT_LIMIT``,
    ``LOOPS``, both (comma-separated), or ``""``."""
    found = [HIT_LIMIT] if len(ids) >= max_new_tokens else []
    if loops(ids):
        found.append(LOOPS)
    return ", ".join(found)


def shares(flags: Sequence[str]) -> dict[str, float]:
    """The shares of outputs :func:`degenerate` flagged: ran to the limit, loop, either."""
    n = max(1, len(flags))
    return {
        "hit_max_new_tokens_share": sum(HIT_LIMIT in f for f in flags) / n,
        "looping_share": sum(LOOPS in f for f in flags) / n,
        "degenerate_share": sum(bool(f) for f in flags) / n,
    }
