"""Knowledge distillation: the loss as defined, pruned students, cached teacher data."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lmops.config import DecodeConfig, ModelConfig
from lmops.core import losses as distil_losses
from lmops.core.model import Transformer
from lmops.core.train import IGNORE_INDEX, lm_loss
from lmops.core.translation import save_model
from lmops.errors import DataError
from lmops.pipeline import distil, evaluate


def tiny(n_layer: int = 4, n_embd: int = 16, seed: int = 0, vocab: int = 40) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=2, block_size=16), vocab)


def batch(seed: int = 1, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(7, vocab, (3, 12), generator=g)
    targets = torch.randint(7, vocab, (3, 12), generator=g)
    targets[:, :5] = IGNORE_INDEX  # the prompt
    targets[2, 9:] = IGNORE_INDEX  # padding
    return inputs, targets


def test_without_distillation_weight_the_loss_is_cross_entropy():
    student, teacher = tiny(seed=0), tiny(seed=1)
    inputs, targets = batch()
    loss = distil_losses.word_loss(teacher, alpha=0.0, temperature=3.0)(student, (inputs, targets))
    torch.testing.assert_close(loss, lm_loss(student, (inputs, targets)))
    logits = student(inputs)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, plain)


def test_kl_is_zero_for_a_student_identical_to_the_teacher():
    teacher = tiny(seed=3)
    student = tiny(seed=3)
    inputs, targets = batch()
    s, t = student(inputs), teacher(inputs)
    ce, kl = distil_losses.distil_terms(s, t, targets, temperature=2.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    # all weight on the KL: zero loss, so nothing to learn from a copy of oneself
    loss = distil_losses.word_loss(teacher, alpha=1.0, temperature=2.0)(student, (inputs, targets))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert ce.item() > 1.0


def test_kl_term_by_hand_scaled_by_t_squared_on_target_tokens_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    targets = torch.tensor([[IGNORE_INDEX] * 3 + [1, 2, 3], [IGNORE_INDEX] * 4 + [4, 5]])
    temp, alpha = 2.5, 0.3
    keep = targets != IGNORE_INDEX
    p = F.softmax(t[keep] / temp, -1)
    kl = (p * (p.log() - F.log_softmax(s[keep] / temp, -1))).sum(-1).mean()
    ce = F.cross_entropy(s[keep], targets[keep])
    loss = distil_losses.distil_loss(s, t, targets, alpha, temp)
    torch.testing.assert_close(loss, (1 - alpha) * ce + alpha * temp**2 * kl)
    # logits at prompt and padding positions do not matter
    s2, t2 = s.clone(), t.clone()
    s2[~keep], t2[~keep] = 100.0, -100.0
    torch.testing.assert_close(distil_losses.distil_loss(s2, t2, targets, alpha, temp), loss)


def test_word_loss_trains_the_student_not_the_teacher():
    student, teacher = tiny(n_layer=1, seed=0), tiny(seed=1)
    before = [p.clone() for p in teacher.parameters()]
    loss = distil_losses.word_loss(teacher, 0.5, 2.0)(student, batch())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    # logits only at target positions go through the head; both heads are back in place
    assert teacher.lm_head.weight is teacher.tok_emb.weight
    assert student.lm_head.weight is student.tok_emb.weight


def test_a_student_of_the_teachers_width_is_the_teacher_with_layers_dropped():
    teacher = tiny(n_layer=4)
    cfg = ModelConfig(n_layer=2, n_embd=16, n_head=2, block_size=16)
    student = distil.pruned_student(teacher, cfg, [0, 3])
    for mine, theirs in ((0, 0), (1, 3)):
        a, b = student.blocks[mine].state_dict(), teacher.blocks[theirs].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    assert torch.equal(student.norm.weight, teacher.norm.weight)
    assert student.lm_head.weight is student.tok_emb.weight  # still tied
    assert student.tok_emb.weight.data_ptr() != teacher.tok_emb.weight.data_ptr()  # a copy
    # a one-layer student of a one-layer teacher is the teacher
    one = tiny(n_layer=1, seed=5)
    same = distil.pruned_student(one, one.cfg)
    x = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(same(x), one(x), rtol=0, atol=0)


def half_used_teacher() -> Transformer:
    """A 32-wide, 4-head teacher that uses only 16 residual channels, 2 heads per layer and
    half its MLP neurons: nothing writes to the other channels, the other heads' values and
    the other neurons' gates are zero."""
    torch.manual_seed(3)
    teacher = Transformer(ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16), 40)
    g = torch.Generator().manual_seed(0)
    dead = torch.randperm(32, generator=g)[:16]
    with torch.no_grad():
        for p in teacher.parameters():  # far from the default init: a stronger check
            p.normal_(0, 0.3, generator=g)
        teacher.tok_emb.weight[:, dead] = 0
        for i, block in enumerate(teacher.blocks):
            block.attn.proj.weight[dead] = 0
            block.mlp.down.weight[dead] = 0
            for head in ((1, 2), (0, 3))[i]:  # value rows of the unused heads
                block.attn.qkv.weight[64 + 8 * head : 64 + 8 * head + 8] = 0
            hidden = block.mlp.down.weight.shape[1]
            unused = torch.randperm(hidden, generator=g)[: hidden // 2]
            block.mlp.gate_up.weight[unused] = 0
    return teacher


def test_pruning_keeps_what_the_teacher_uses_and_then_computes_what_it_computes():
    teacher = half_used_teacher()
    calibration = [
        torch.randint(1, 40, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    scores = distil.Importance(teacher, calibration, pad_id=0)
    cfg = ModelConfig(n_layer=2, n_embd=16, n_head=2, block_size=16)
    student = distil.pruned_student(teacher, cfg, importance=scores)
    assert student.num_params() < 0.4 * teacher.num_params()
    assert set(scores.heads[0].topk(2).indices.tolist()) == {0, 3}
    assert set(scores.heads[1].topk(2).indices.tolist()) == {1, 2}
    x = torch.randint(1, 40, (3, 11))
    # the RMSNorm gains were rescaled: the kept channels hold all of the signal
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-4, atol=1e-4)
    assert scores.channels.count_nonzero() == 16  # the dead channels scored nothing


def test_default_layers_are_evenly_spaced():
    assert distil.default_keep_layers(4, 2) == [0, 3]
    assert distil.default_keep_layers(6, 3) == [0, 2, 5] or distil.default_keep_layers(6, 3) == [
        0,
        3,
        5,
    ]
    assert distil.default_keep_layers(4, 1) == [0]
    assert distil.default_keep_layers(4, 4) == [0, 1, 2, 3]


def test_pruning_needs_whole_heads_no_larger_shapes_and_valid_layers():
    teacher = tiny(n_layer=4)
    with pytest.raises(
        distil.DistilError,
        match=r"distil.model.n_embd is 32, more than the "
        r"teacher's 16",
    ):
        distil.pruned_student(teacher, ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16))
    with pytest.raises(
        distil.DistilError,
        match=r"head width n_embd / n_head is 4, the "
        r"teacher's is 8",
    ):
        distil.pruned_student(teacher, ModelConfig(n_layer=2, n_embd=16, n_head=4, block_size=16))
    with pytest.raises(distil.DistilError, match=r"\[7\] out of range, the teacher has 4"):
        distil.pruned_student(
            teacher, ModelConfig(n_layer=2, n_embd=16, n_head=2, block_size=16), [0, 7]
        )
    with pytest.raises(distil.DistilError, match="needs importance scores"):
        distil.pruned_student(teacher, ModelConfig(n_layer=2, n_embd=8, n_head=1, block_size=16))


def test_a_missing_or_corrupted_teacher_is_named(tmp_path):
    with pytest.raises(distil.DistilError, match=f"{tmp_path / 'nope'}: teacher model not found"):
        distil.load_teacher(tmp_path / "nope")
    path = save_model(tiny(n_layer=1), tmp_path / "teacher")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(distil.DistilError, match=r"teacher/model.safetensors: sha256 does not"):
        distil.load_teacher(path)


class FakeTok:
    pad_id, eos_id, sep_id, vocab_size = 0, 3, 6, 40

    def lang_id(self, lang: str) -> int:
        return 5

    def encode(self, texts):
        return [[7 + int(w) % 30 for w in t.split()] for t in texts]

    def decode(self, ids):
        return [" ".join(str(i) for i in seq) for seq in ids]


def test_teacher_translations_are_generated_once_and_cached(tmp_path, monkeypatch):
    pairs = pd.DataFrame(
        {
            "src": [f"s{i}" for i in range(5)],
            "src_ids": [[7 + i, 8] for i in range(5)],
            "tgt": ["x"] * 5,
            "tgt_ids": [[9]] * 5,
        }
    )
    calls = []

    def fake_generate(model, tok, sources, tgt_lang, cfg, **kw):
        calls.append(len(sources))
        return [[] if i == 2 else [20 + i, 21 + i] for i in range(len(sources))]

    monkeypatch.setattr(distil, "generate", fake_generate)
    key = {"teacher": "abc", "decode": DecodeConfig().model_dump()}
    first = distil.teacher_translations(None, FakeTok(), pairs, "fr", DecodeConfig(), tmp_path, key)
    again = distil.teacher_translations(None, FakeTok(), pairs, "fr", DecodeConfig(), tmp_path, key)
    assert calls == [5]  # the second call read the cache
    pd.testing.assert_frame_equal(first, again)
    # the teacher's ids as they are, and their text; the empty translation is dropped
    assert [list(x) for x in first["tgt_ids"]] == [[20, 21], [21, 22], [23, 24], [24, 25]]
    assert list(first["tgt"]) == ["20 21", "21 22", "23 24", "24 25"]
    assert list(first["src"]) == ["s0", "s1", "s3", "s4"]
    # another teacher: new translations, the stale cache is removed
    distil.teacher_translations(
        None, FakeTok(), pairs, "fr", DecodeConfig(), tmp_path, {**key, "teacher": "def"}
    )
    assert calls == [5, 5]
    assert len(list(tmp_path.glob("seqkd-*.parquet"))) == 1


def test_sequence_pairs_is_a_seeded_sample_in_data_order():
    train = pd.DataFrame({"src_ids": [[i] for i in range(100)]})
    a, b = distil.sequence_pairs(train, 10, 3), distil.sequence_pairs(train, 10, 3)
    assert a.equals(b) and len(a) == 10
    firsts = [x[0] for x in a["src_ids"]]
    assert firsts == sorted(firsts)
    assert distil.sequence_pairs(train, None, 3) is train


def test_compare_needs_the_same_test_pairs_and_scorer():
    student = {"bleu": 9.0, "chrf": 30.0, "test_pairs": 10, "bleu_signature": "b"}
    teacher = {"bleu": 10.0, "chrf": 40.0, "test_pairs": 10, "bleu_signature": "b"}
    out = distil.compare(student, teacher, 100, 400)
    assert out["bleu_retained"] == pytest.approx(0.9) and out["param_ratio"] == 0.25
    assert out["chrf_retained"] == pytest.approx(0.75)
    with pytest.raises(distil.DistilError, match="5 test pairs, the teacher on 10"):
        distil.compare({**student, "test_pairs": 5}, teacher, 100, 400)
    with pytest.raises(distil.DistilError, match="bleu_signature differs"):
        distil.compare({**student, "bleu_signature": "x"}, teacher, 100, 400)
    assert distil.compare(student, {**teacher, "bleu": 0.0}, 1, 4)["bleu_retained"] is None


def test_teacher_scores_come_from_its_translations(tmp_path):
    table = pd.DataFrame(
        {
            "source": ["a", "b", "c"],
            "reference": ["le chat dort .", "NA", "il pleut ."],
            "hypothesis": ["le chat dort .", "NA", ""],
        }
    )
    path = tmp_path / "translations.tsv"
    table.to_csv(path, sep="\t", index=False)
    got = evaluate.score_translations(path)
    want = evaluate.bleu_chrf(list(table["hypothesis"]), list(table["reference"]))
    assert got == {**want, "test_pairs": 3}
    assert list(evaluate.read_translations(path)["hypothesis"]) == ["le chat dort .", "NA", ""]
    with pytest.raises(DataError, match="nothing.tsv: not found"):
        evaluate.score_translations(tmp_path / "nothing.tsv")
