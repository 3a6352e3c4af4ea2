"""The validation shared by the translation training stages (finetune, distil)."""

from __future__ import annotations

import pandas as pd
import pytest
import sacrebleu

from lmops.config import DecodeConfig, FinetuneConfig
from lmops.core.translation import translate_ids
from lmops.pipeline.training import SELECT_METRIC, VALID_LOSS, bleu_validation
from tests.unit.core.test_translation import FakeTok, model


@pytest.fixture
def looping_valid(tmp_path):
    """Validation pairs whose references are what an untrained model decodes greedily
    without guards: runs of the same few tokens up to max_new_tokens."""
    net, tok = model(block=48, seed=1), FakeTok()
    sources = [[7 + (3 * i + j) % 30 for j in range(6)] for i in range(8)]
    plain = DecodeConfig(beam_size=1, max_new_tokens=24)
    refs = translate_ids(net, tok, sources, "fr", plain)
    assert any(len(set(r.split())) < len(r.split()) // 2 for r in refs)  # they loop
    path = tmp_path / "parallel_valid.parquet"
    pd.DataFrame(
        {"src": ["-"] * 8, "tgt": refs, "src_ids": sources, "tgt_ids": [[8, 9]] * 8}
    ).to_parquet(path)
    return net, tok, path


def test_validation_bleu_decodes_with_evaluates_guards(looping_valid):
    net, tok, path = looping_valid
    cfg = FinetuneConfig(bleu_samples=8, batch_size=4, eval_batches=2)
    scores = {}
    for guard in (0, 2):
        decode = DecodeConfig(beam_size=4, max_new_tokens=24, no_repeat_ngram_size=guard)
        evaluate, used = bleu_validation(tok, path, "fr", 48, cfg, decode)
        assert used == decode.model_copy(update={"beam_size": 1})  # greedy, guards kept
        scores[guard] = evaluate(net, 0)
        assert scores[guard][VALID_LOSS] > 0
    # unguarded, the model reproduces its own loops; the guard cuts every repeated bigram
    assert scores[0][SELECT_METRIC] == pytest.approx(100.0)
    valid = pd.read_parquet(path)
    guarded = translate_ids(net, tok, list(valid["src_ids"]), "fr", used)
    assert scores[2][SELECT_METRIC] == pytest.approx(
        sacrebleu.corpus_bleu(guarded, [list(valid["tgt"])]).score
    )
    assert scores[2][SELECT_METRIC] < 90
    assert scores[0][VALID_LOSS] == scores[2][VALID_LOSS]  # the loss needs no decoding
