"""Translation examples and batches, model directories, perplexity and BLEU arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lmops.config import DecodeConfig, EvaluateConfig, ModelConfig
from lmops.core import translation
from lmops.core.checkpoint import CheckpointError
from lmops.core.model import Transformer
from lmops.core.train import IGNORE_INDEX
from lmops.pipeline import evaluate


class FakeTok:
    """The Tokenizer surface translation.py uses, with fixed special ids."""

    pad_id, eos_id, sep_id, vocab_size = 0, 3, 6, 40
    lang_ids = {"en": 4, "fr": 5}

    def lang_id(self, lang: str) -> int:
        return self.lang_ids[lang]

    def encode(self, texts):
        return [[7 + (ord(c) % 30) for c in t] for t in texts]

    def decode(self, ids):
        return [" ".join(str(i) for i in seq) for seq in ids]


def model(vocab: int = 40, block: int = 16, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layer=1, n_embd=16, n_head=2, block_size=block), vocab)


def test_example_scores_only_the_target_and_eos():
    tok = FakeTok()
    x, y = translation.example(tok, [10, 11, 12], [20, 21], "fr", block_size=16)
    assert x == [5, 10, 11, 12, 6, 20, 21]
    # the prompt (<2fr> src <sep>) predicts nothing until <sep>, which predicts the target
    assert y == [IGNORE_INDEX] * 4 + [20, 21, 3]


def test_long_pairs_are_cut_to_the_context():
    tok = FakeTok()
    x, y = translation.example(tok, list(range(7, 47)), list(range(7, 37)), "fr", block_size=16)
    assert len(x) == len(y) == 16
    assert x[:1] == [5] and x[7] == 6  # source cut to 16 // 2 - 2 = 6 tokens
    assert y[-1] != IGNORE_INDEX and IGNORE_INDEX not in y[7:]


def test_collate_pads_to_a_multiple_of_16_and_ignores_padding():
    x, y = translation.collate([([1, 2, 3], [2, 3, 4]), ([1] * 17, [2] * 17)], pad_id=0)
    assert x.shape == y.shape == (2, 32)
    assert x[0, 3:].eq(0).all() and y[0, 3:].eq(IGNORE_INDEX).all()
    assert y[1, :17].eq(2).all()


def test_pair_batches_are_a_function_of_the_step():
    pairs = pd.DataFrame(
        {"src_ids": [[7 + i, 8] for i in range(20)], "tgt_ids": [[9, 10 + i] for i in range(20)]}
    )
    get = translation.pair_batches(pairs, FakeTok(), "fr", 16, seed=3)
    a, b = get(5, 8), get(5, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(get(6, 8)[0], a[0])
    assert a[0].shape[0] == 8
    assert get(0, 30)[0].shape[0] == 30  # fewer pairs than a batch: pairs repeat


def test_pair_batches_see_each_pair_once_per_epoch_in_batches_of_like_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=400)
    pairs = pd.DataFrame(
        {
            "src_ids": [[7 + i % 20] * n for i, n in enumerate(lengths)],
            "tgt_ids": [[9, 10 + i % 20] for i in range(400)],
        }
    )
    tok = FakeTok()
    get = translation.pair_batches(pairs, tok, "fr", 256, seed=3)
    epoch = [get(step, 16) for step in range(25)]  # 400 pairs / 16 = 25 batches per epoch
    seen = sorted(int(n) for x, _ in epoch for n in x.ne(tok.pad_id).sum(1))
    sizes = np.array(
        [
            len(translation.example(tok, s, t, "fr", 256)[0])
            for s, t in zip(pairs["src_ids"], pairs["tgt_ids"], strict=True)
        ]
    )
    assert seen == sorted(sizes)  # every pair once
    padded = sum(x.numel() for x, _ in epoch)
    random_width = 16 * np.mean([max(rng.choice(sizes, 16)) for _ in range(200)])
    assert padded < 0.75 * 25 * random_width  # like lengths pad far less than random ones
    assert not torch.equal(get(25, 16)[0], epoch[0][0])  # the next epoch is reshuffled


def test_model_dir_round_trip_and_clear_errors(tmp_path):
    m = model()
    path = translation.save_model(m, tmp_path / "m", {"stage": "test"})
    loaded, config = translation.load_model(path)
    assert config["stage"] == "test" and config["vocab_size"] == 40
    x = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(loaded(x), m.eval()(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing")):
        translation.load_model(tmp_path / "missing")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 does not match"):
        translation.load_model(path)


def test_translate_keeps_input_order_across_length_sorted_batches():
    m, tok = model(), FakeTok()
    sources = [[7 + i] * (1 + i % 5) for i in range(9)]
    cfg = DecodeConfig(beam_size=1, max_new_tokens=4, batch_size=3)
    batched = translation.translate_ids(m, tok, sources, "fr", cfg)
    alone = [translation.translate_ids(m, tok, [s], "fr", cfg)[0] for s in sources]
    assert batched == alone


def test_stream_nll_scores_every_token_once():
    m = model(block=8).eval()
    ids = np.arange(30) % 40
    nll, count = evaluate.stream_nll(m, ids, batch_size=2)
    assert count == len(ids) - 1
    # by hand: windows of 8 predictions, the last one shorter
    expected = 0.0
    for s in range(0, len(ids) - 1, 8):
        w = torch.tensor(ids[s : s + 9])
        expected += F.cross_entropy(m(w[None, :-1])[0], w[1:], reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    m = model(vocab=40)
    with torch.no_grad():
        m.tok_emb.weight.zero_()  # tied head: every logit 0, a uniform distribution
    texts = pd.DataFrame({"text": ["hello there", "bonjour à tous"], "lang": ["en", "fr"]})
    out = evaluate.perplexity(m, FakeTok(), texts, EvaluateConfig(precision="fp32"))
    assert out["ppl_en"] == pytest.approx(40.0, rel=1e-5)
    assert out["ppl_fr"] == pytest.approx(40.0, rel=1e-5)
    # "bonjour à tous": 14 chars + tag + eos - 1 = 15 predictions; 15 utf-8 bytes (à is 2)
    assert out["tokens_fr"] == 15
    assert out["bpb_fr"] == pytest.approx(15 * math.log2(40) / 15, rel=1e-5)


def test_bleu_and_chrf_with_signatures():
    refs = ["le chat est sur le tapis .", "il fait beau aujourd'hui ."]
    perfect = evaluate.bleu_chrf(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert "version:2.6" in perfect["bleu_signature"] and "nc:6" in perfect["chrf_signature"]
    poor = evaluate.bleu_chrf(["le chien dort .", "il pleut ."], refs)
    assert poor["bleu"] < 20 and 0 < poor["chrf"] < 60


def test_mixed_batches_hold_the_share_of_text_rows_cut_to_the_pairs_width():
    pairs = lambda step, n: translation.collate(  # noqa: E731
        [([5, 7, 6, 9], [-100, -100, 9, 3])] * n, pad_id=0
    )
    text = lambda step, n: (torch.full((n, 24), 11), torch.full((n, 24), 12))  # noqa: E731
    get = translation.mix_batches(pairs, text, share=0.25, seed=1)
    x, y = get(3, 16)
    assert x.shape == y.shape == (16, 16)  # the pairs pad to 16; text windows are cut to it
    is_text = x[:, 0].eq(11)
    assert int(is_text.sum()) == 4 and y[is_text].eq(12).all()
    assert y[~is_text][:, 4:].eq(IGNORE_INDEX).all()  # pair rows padded, not scored
    assert torch.equal(get(3, 16)[0], x) and not torch.equal(get(4, 16)[0][:, 0], x[:, 0])
    short_text = lambda step, n: (torch.full((n, 8), 11), torch.full((n, 8), 12))  # noqa: E731
    x, y = translation.mix_batches(pairs, short_text, share=0.25, seed=1)(3, 16)
    assert x.shape == (16, 16) and y[x[:, 0].eq(11)][:, 8:].eq(IGNORE_INDEX).all()
    assert translation.mix_batches(pairs, text, 0.0, seed=1) is pairs
