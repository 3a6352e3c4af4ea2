"""The transformer: shapes, masking, parameter accounting, cached and batched decoding."""

from __future__ import annotations

import math

import pytest
import torch

from lmops.config import ModelConfig
from lmops.core import model as model_module
from lmops.core.model import Transformer, flops_per_token, mlp_hidden

VOCAB = 37
EOS, PAD = 1, 0


def tiny(vocab_size: int = VOCAB, peaky: bool = False, **overrides) -> Transformer:
    cfg = ModelConfig(**{"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 32, **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size).eval()
    if peaky:
        # at init every next-token distribution is close to uniform, so argmax and beam
        # rankings hinge on near-ties; large weights give confident, varied predictions
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 if name == "tok_emb.weight" else 0.5)
    return model


def prompts(n: int, lengths=(3, 7, 1, 5, 9, 2)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(2, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()
        for i in range(n)
    ]


def naive_greedy(model: Transformer, prompt: list[int], max_new: int, eos: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new):
        tok = model(torch.tensor([seq[-model.cfg.block_size :]]))[0, -1].argmax().item()
        if tok == eos:
            break
        seq.append(tok)
    return seq[len(prompt) :]


def naive_beam(
    model: Transformer, prompt: list[int], max_new: int, eos: int, k: int, alpha: float
) -> list[int]:
    """Beam search by the book, one prompt, no cache: every step scores each beam's whole
    sequence afresh. The k best of the top 2k continuations go on; an eos among the top k
    finishes its hypothesis; at the end the best by GNMT-normalised log-prob wins."""

    def norm(score: float, length: int) -> float:
        return score / ((5 + length) / 6) ** alpha

    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new):
        cands = []
        for score, seq in beams:
            logp = model(torch.tensor([prompt + seq]))[0, -1].log_softmax(-1).tolist()
            cands += [(score + lp, seq, t) for t, lp in enumerate(logp)]
        cands.sort(key=lambda c: -c[0])
        beams = []
        for rank, (score, seq, t) in enumerate(cands[: 2 * k]):
            if t == eos:
                if rank < k:
                    finished.append((norm(score, step + 1), seq))
            elif len(beams) < k:
                beams.append((score, seq + [t]))
        if not beams:
            break
    finished += [(norm(score, max_new), seq) for score, seq in beams]
    return max(finished, key=lambda f: f[0])[1]


def log_prob(
    model: Transformer, prompt: list[int], new: list[int], eos: int, max_new: int
) -> float:
    """Log-probability of ``new`` after ``prompt``, plus eos when it stopped early."""
    ended = new + [eos] if len(new) < max_new else new
    logits = model(torch.tensor([prompt + ended]))[0].float().log_softmax(-1)
    return sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(ended))


def test_forward_shapes_and_dtype():
    model = tiny()
    logits = model(torch.randint(0, VOCAB, (3, 11)))
    assert logits.shape == (3, 11, VOCAB)
    assert logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(torch.randint(0, VOCAB, (2, 32)))
    assert low.shape == (2, 32, VOCAB) and low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()


def test_forward_rejects_more_than_block_size():
    model = tiny()
    with pytest.raises(ValueError, match="33 tokens exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_causal_future_token_does_not_change_earlier_logits():
    model = tiny()
    idx = torch.randint(2, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-3


def test_embeddings_tied_and_no_biases():
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    # tied: the state dict lists the matrix under both names, parameters() once
    assert sum(n.endswith("tok_emb.weight") for n in names) == 1


def test_param_count_matches_hand_formula():
    model = tiny()
    e, layers, hidden = 32, 2, 128  # SwiGLU: 8/3 * 32 = 85.3 -> next multiple of 64
    per_layer = 2 * e + 3 * e * e + e * e + 2 * e * hidden + hidden * e
    expected = VOCAB * e + layers * per_layer + e
    assert expected == 1184 + 2 * 16448 + 32 == 34112
    assert model.num_params() == expected
    assert model.num_params(exclude_embedding=True) == expected - VOCAB * e
    assert flops_per_token(model.cfg, VOCAB) == 6 * expected + 12 * layers * e * 32


def test_mlp_hidden_rounds_up_to_64():
    assert mlp_hidden(ModelConfig(n_embd=256)) == 704  # 682.7
    assert mlp_hidden(ModelConfig(n_embd=192, n_head=4)) == 512  # exactly 8/3 * 192
    assert mlp_hidden(ModelConfig(n_embd=64, mlp_ratio=4.0)) == 256


def test_gpt2_init_scales_residual_projections():
    model = tiny(n_layer=4, n_embd=64)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(8)
    assert block.attn.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(64))


def test_kv_cache_incremental_logits_equal_full_pass():
    model = tiny()
    idx = torch.randint(2, VOCAB, (2, 20))
    full = model(idx)
    cache = model.new_cache(2, 20)
    pieces = [model(idx[:, :6], cache), model(idx[:, 6:9], cache)]
    pieces += [model(idx[:, t : t + 1], cache) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache overflow: 20 \\+ 1 tokens > max_len 20"):
        model(idx[:, :1], cache)


def test_kv_cache_under_bf16_autocast_tracks_full_pass():
    """Under bf16 the cached pass rounds differently from the full one. Over 16 x 12
    positions it must be as close to the fp32 logits as the full bf16 pass is, on average
    and at its worst (give or take one bf16 rounding step, 2^-8 of the logits' scale), and
    pick the same tokens about as often: a cache that lost or misplaced a position is off
    by the logits' whole scale."""
    model = tiny(peaky=True)  # confident logits, some 20 in size, not near-ties at 0
    idx = torch.randint(2, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx).float()
        cache = model.new_cache(16, 12)
        steps = [model(idx[:, :4], cache)] + [model(idx[:, t : t + 1], cache) for t in range(4, 12)]
    assert cache.keys[0].dtype == torch.bfloat16
    got = torch.cat(steps, 1).float()
    scale = ref.abs().max().item()
    assert scale > 5
    got_err, full_err = (got - ref).abs(), (full - ref).abs()
    assert got_err.mean() <= 1.1 * full_err.mean()
    assert got_err.max() <= full_err.max() + scale * 2**-8
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert same >= (full.argmax(-1) == ref.argmax(-1)).float().mean() - 0.02


def test_greedy_with_cache_equals_naive_full_recomputation():
    model = tiny(peaky=True)
    batch = prompts(6)
    got = model.generate_greedy(batch, max_new_tokens=12, eos_id=EOS, pad_id=PAD)
    want = [naive_greedy(model, p, 12, EOS) for p in batch]
    assert got == want
    assert [len(g) for g in got] != [12] * 6  # some rows stopped at eos, some did not
    assert 12 in [len(g) for g in got]


def test_left_padded_batch_gives_same_tokens_as_each_prompt_alone():
    model = tiny(peaky=True)
    batch = prompts(6)
    together = model.generate_greedy(batch, 15, eos_id=EOS, pad_id=PAD)
    alone = [model.generate_greedy([p], 15, eos_id=EOS, pad_id=PAD)[0] for p in batch]
    assert together == alone
    beams = model.generate_beam(batch, 15, eos_id=EOS, pad_id=PAD, beam_size=3)
    assert beams == [model.generate_beam([p], 15, EOS, PAD, beam_size=3)[0] for p in batch]


def test_prompt_longer_than_block_size_keeps_its_last_block_size_tokens():
    model = tiny(peaky=True)
    long = torch.randint(2, VOCAB, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    # eos = -1 never matches, so decoding runs 40 tokens past block_size (sliding window)
    got = model.generate_greedy([long], 40, eos_id=-1, pad_id=PAD)
    assert got == model.generate_greedy([long[-32:]], 40, eos_id=-1, pad_id=PAD)
    assert len(got[0]) == 40
    # within the window the cache agrees with nanoGPT-style recomputation on the last 32
    assert got[0][:1] == naive_greedy(model, long, 1, eos=-1)


def test_eos_stops_each_row_and_ends_the_loop():
    model = tiny(peaky=True)
    batch = prompts(4)
    free = model.generate_greedy(batch, 10, eos_id=-1, pad_id=PAD)
    eos = free[0][2]  # the third token of row 0 becomes the stop token
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    got = model.generate_greedy(batch, 10, eos_id=eos, pad_id=PAD)
    hook.remove()
    for row, full in zip(got, free, strict=True):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert got[0] == free[0][:2]
    # prefill + one pass per step until the last row stops
    last_stop = max(f.index(eos) if eos in f else 9 for f in free)
    assert len(calls) == 1 + last_stop


def test_beam_size_one_equals_greedy():
    model = tiny(peaky=True)
    batch = prompts(6)
    greedy = model.generate_greedy(batch, 12, eos_id=EOS, pad_id=PAD)
    beam = model.generate_beam(batch, 12, eos_id=EOS, pad_id=PAD, beam_size=1, length_penalty=0.0)
    assert beam == greedy


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_naive_beam_search(alpha):
    """Batched, cached beam search (left padding, beams reshuffled in the cache, prompts
    leaving the batch as they finish) returns what the uncached, one-prompt-at-a-time
    search does."""
    model = tiny(peaky=True)
    batch = prompts(6)
    got = model.generate_beam(batch, 10, EOS, PAD, beam_size=3, length_penalty=alpha)
    assert got == [naive_beam(model, p, 10, EOS, 3, alpha) for p in batch]
    assert len({len(g) for g in got}) > 1 and min(map(len, got)) < 10  # some stopped early


def test_beam_search_log_prob_at_least_greedy():
    model = tiny(peaky=True)
    batch = prompts(6)
    greedy = model.generate_greedy(batch, 10, eos_id=EOS, pad_id=PAD)
    beam = model.generate_beam(batch, 10, eos_id=EOS, pad_id=PAD, beam_size=4, length_penalty=0.0)
    g = [log_prob(model, p, s, EOS, 10) for p, s in zip(batch, greedy, strict=True)]
    b = [log_prob(model, p, s, EOS, 10) for p, s in zip(batch, beam, strict=True)]
    assert all(bs >= gs - 1e-4 for bs, gs in zip(b, g, strict=True)), (b, g)
    assert sum(bs > gs + 1e-3 for bs, gs in zip(b, g, strict=True)) >= 2  # and often better
    assert all(EOS not in s and len(s) <= 10 for s in beam)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_translation_ends_before_min_new_tokens(beam_size):
    """With eos made every step's clear favourite, decoding stops at once; min_new_tokens
    bars eos for that many steps, and then the model stops."""
    model = tiny(peaky=True)
    head = torch.nn.Linear(model.cfg.n_embd, VOCAB)  # the tied head, plus a bias on eos
    with torch.no_grad():
        head.weight.copy_(model.tok_emb.weight)
        head.bias.zero_()
        head.bias[EOS] = 1e4
    model.lm_head = head

    def decode(**kw):
        if beam_size == 1:
            return model.generate_greedy(prompts(6), 12, EOS, PAD, **kw)
        return model.generate_beam(prompts(6), 12, EOS, PAD, beam_size, 0.0, **kw)

    assert decode() == [[]] * 6
    out = decode(min_new_tokens=4)
    assert [len(s) for s in out] == [4] * 6  # and eos as soon as it is allowed
    assert all(EOS not in s for s in out)


def test_beam_length_penalty_prefers_longer_hypotheses():
    model = tiny(peaky=True)
    batch = prompts(6)
    plain = model.generate_beam(batch, 12, EOS, PAD, beam_size=4, length_penalty=0.0)
    long = model.generate_beam(batch, 12, EOS, PAD, beam_size=4, length_penalty=2.0)
    assert sum(map(len, long)) > sum(map(len, plain))


def test_generation_restores_training_mode_and_rejects_empty_prompts():
    model = tiny(dropout=0.5).train()
    model.generate_greedy([[3, 4]], 3, EOS, PAD)
    assert model.training
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate_beam([[3], []], 3, EOS, PAD)
    assert model.generate_greedy([[3], [4, 5]], 0, EOS, PAD) == [[], []]


def test_attention_window_is_block_size_past_the_trained_context():
    model = tiny(block_size=8)
    idx = torch.randint(2, VOCAB, (1, 30))
    changed = idx.clone()
    changed[0, 0] += 1
    runs = []
    for seq in (idx, changed):
        cache = model.new_cache(1, 30)
        runs.append(model(seq, cache))
    # each of the 2 layers looks back at most 7 tokens, so token 0 reaches position 14 only
    assert (runs[0][0, 14] - runs[1][0, 14]).abs().amax() > 1e-4
    torch.testing.assert_close(runs[0][:, 15:], runs[1][:, 15:], rtol=0, atol=0)
    # inside the window the cached pass is the plain causal pass
    torch.testing.assert_close(runs[0][:, :8], model(idx[:, :8]), rtol=0, atol=1e-5)
    cache = model.new_cache(1, 30)
    steps = [model(idx[:, :5], cache)] + [model(idx[:, t : t + 1], cache) for t in range(5, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), runs[0], rtol=0, atol=1e-5)


def test_decoding_multiplies_with_prepacked_weights_made_in_each_call():
    """Decoding on the CPU multiplies with oneDNN-prepacked copies of the weights, made in
    each decoding call and dropped after it: after fused AdamW steps between two decodes
    (which leave the weights' version counters as they were, as in training with
    validation decodes) the tokens are still those of the plain forward pass."""
    from lmops.config import TrainConfig
    from lmops.core.train import lm_loss, make_optimizer

    model = tiny(peaky=True)
    batch = prompts(6)
    opt = make_optimizer(model, TrainConfig(lr=0.05, min_lr=0.0), torch.device("cpu"))
    ids = torch.randint(2, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    before = None
    for _ in range(3):
        with model_module._prepacked_weights():  # the outermost call: its copies are seen
            out = model.generate_greedy(batch, 8, EOS, PAD)
            packs = dict(model_module._decoding.packs)
        assert (id(model.lm_head.weight), torch.float32) in packs  # the packed path ran
        assert model_module._decoding.packs is None  # dropped with the call
        assert out == [naive_greedy(model, p, 8, EOS) for p in batch]
        if before is not None:
            assert out != before  # the steps changed the translations
        before = out
        versions = [p._version for p in model.parameters()]
        for _ in range(5):
            lm_loss(model, (ids[:, :-1], ids[:, 1:])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert [p._version for p in model.parameters()] == versions  # no version to go by


def test_bf16_decoding_with_prepacked_weights_picks_the_tokens_autocast_does(monkeypatch):
    """Where the CPU has native bf16, bf16 decoding multiplies with bf16-prepacked weights
    and picks autocast's tokens; elsewhere it packs nothing in bf16 and is autocast."""
    model = tiny(peaky=True)
    batch = prompts(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with model_module._prepacked_weights():
            packed = model.generate_beam(batch, 10, EOS, PAD, beam_size=3)
            packs = dict(model_module._decoding.packs)
        key = (id(model.lm_head.weight), torch.bfloat16)
        assert (key in packs) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
        monkeypatch.setattr(model_module, "_onednn_linear", lambda dtype: False)
        plain = model.generate_beam(batch, 10, EOS, PAD, beam_size=3)
    assert packed == plain


def test_decoding_in_one_thread_leaves_training_in_another_on_plain_linear():
    """The prepacked path is per thread: a request decoding beside a training step (or a
    second request) does not switch the other thread's layers, whose gradients flow."""
    import threading

    model = tiny()
    inside, release = threading.Event(), threading.Event()

    def decode_and_hold():
        with model_module._prepacked_weights():
            inside.set()
            release.wait()

    thread = threading.Thread(target=decode_and_hold)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        model(torch.randint(2, VOCAB, (2, 6))).sum().backward()
        assert (
            model.lm_head.weight.grad is not None
            and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        )
    finally:
        release.set()
        thread.join()
