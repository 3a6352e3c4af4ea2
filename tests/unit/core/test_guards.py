"""Decoding guards (no repeated n-grams, repetition penalty) and the degenerate-output check."""

from __future__ import annotations

import math

import pytest
import torch

from lmops.core import guards
from tests.unit.core.test_model import EOS, PAD, naive_greedy, prompts, tiny


def ngram_repeats(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize(
    ("history", "n", "banned"),
    [
        ([5, 6, 7, 5, 6], 3, {7}),  # "5 6" was followed by 7 before
        ([5, 6, 7, 5, 6, 8, 5, 6], 3, {7, 8}),
        ([1, 2, 1], 2, {2}),
        ([1, 2, 3], 2, set()),
        ([4, 4, 9], 1, {4, 9}),
        ([1], 3, set()),  # too short to complete anything
    ],
)
def test_banned_tokens_complete_an_ngram_already_generated(history, n, banned):
    assert guards.banned_tokens(history, n) == banned


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    out = guards.apply_guards(logits.clone(), [[0, 1, 1], []], repetition_penalty=2.0)
    # row 0 generated tokens 0 and 1 (1 twice: penalised once, as Hugging Face does)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]]
    banned = guards.apply_guards(logits.clone(), [[2, 3, 2], [1]], no_repeat_ngram_size=2)
    assert banned[0].tolist() == [2.0, -1.0, 3.0, -math.inf]
    assert banned[1].tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_no_output_repeats_an_ngram_with_the_guard(beam_size):
    model = tiny()  # near-uniform random weights: greedy decoding loops
    batch = prompts(6)
    kwargs = {"beam_size": beam_size} if beam_size > 1 else {}
    decode = model.generate_beam if beam_size > 1 else model.generate_greedy
    free = decode(batch, 24, EOS, PAD, **kwargs)
    guarded = decode(batch, 24, EOS, PAD, no_repeat_ngram_size=2, **kwargs)
    assert sum(ngram_repeats(seq, 2) for seq in free) >= 3  # they loop without it
    assert not any(ngram_repeats(seq, 2) for seq in guarded)
    assert all(len(seq) > 2 for seq in guarded)
    # off, the guard changes nothing
    assert decode(batch, 24, EOS, PAD, no_repeat_ngram_size=0, **kwargs) == free


def test_guarded_greedy_in_a_batch_equals_each_prompt_alone():
    model = tiny(peaky=True)
    batch = prompts(5)
    together = model.generate_greedy(batch, 20, EOS, PAD, no_repeat_ngram_size=3)
    alone = [model.generate_greedy([p], 20, EOS, PAD, no_repeat_ngram_size=3)[0] for p in batch]
    assert together == alone
    assert together != [naive_greedy(model, p, 20, EOS) for p in batch]  # it did something


def test_a_repetition_penalty_lowers_repeats():
    model = tiny()
    batch = prompts(6)
    free = model.generate_greedy(batch, 24, EOS, PAD)
    penalised = model.generate_greedy(batch, 24, EOS, PAD, repetition_penalty=1.5)

    def repeats(seqs: list[list[int]]) -> int:
        return sum(len(s) - len(set(s)) for s in seqs)

    assert repeats(penalised) < repeats(free)


@pytest.mark.parametrize(
    ("ids", "looping"),
    [
        ([7, 7, 7], True),  # one token three times
        ([1, 2, 1, 2, 1, 2], True),
        ([3, 4, 5, 3, 4, 5, 3, 4, 5, 9], True),
        ([1, 2, 3, 1, 2, 3], False),  # twice is not a loop
        ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5], False),  # 5-grams are not checked
        ([], False),
    ],
)
def test_loops_are_an_ngram_three_times_in_a_row(ids, looping):
    assert guards.loops(ids) is looping


def test_degenerate_outputs_are_named_and_counted():
    flags = [
        guards.degenerate([1, 2, 3], max_new_tokens=3),
        guards.degenerate([1, 1, 1, 2], max_new_tokens=10),
        guards.degenerate([1, 1, 1], max_new_tokens=3),
        guards.degenerate([1, 2, 3], max_new_tokens=10),
    ]
    assert flags == ["hit max_new_tokens", "loops", "hit max_new_tokens, loops", ""]
    assert guards.shares(flags) == {
        "hit_max_new_tokens_share": 0.5,
        "looping_share": 0.5,
        "degenerate_share": 0.75,
    }
