"""int8 quantisation: ONNX Runtime matches torch, its int8 agrees with fp32 and is small, a
fresh process loads and translates, a damaged model is named, the comparison table is made.

Deprecation warnings fail these tests (the suite ignores them elsewhere): quantise must
not lean on an API that the next torch removes."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lmops.config import ModelConfig
from lmops.core import quantised
from lmops.core.checkpoint import CheckpointError
from lmops.core.model import Transformer
from lmops.pipeline import quantise
from tests.conftest import REPO

WINDOWS = torch.tensor([[5, 7 + (3 * i) % 41, 7 + (11 * i + 4) % 41] for i in range(12)])
PROMPTS = [row[: 2 + i % 2] for i, row in enumerate(WINDOWS.tolist())]

pytestmark = pytest.mark.filterwarnings(
    "error::DeprecationWarning", "error:.*deprecated:UserWarning"
)


@functools.cache  # trained once per seed; no test modifies it
def peaky(seed: int = 0, vocab: int = 48, n_layer: int = 2) -> Transformer:
    """A tiny model trained for a moment on a fixed successor rule (token t -> 7 + (t - 7 + 5)
    mod 41), so its greedy choices are confident and varied, as a trained model's are; a
    random 0.02-std model ties its logits and any rounding flips its argmax."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(n_layer=n_layer, n_embd=32, n_head=2, block_size=32), vocab)
    succ = torch.tensor([7 + (t - 7 + 5) % 41 for t in range(vocab)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        start = torch.randint(7, vocab, (16,), generator=g)
        seq = [start]
        for _ in range(16):
            seq.append(succ[seq[-1]])
        seq = torch.stack(seq, 1)
        loss = torch.nn.functional.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += max(len(x), len(y))
        for s, t in zip(x, y, strict=False):
            if s != t:
                break  # after a divergence the continuations are not comparable
            same += 1
    return same / total


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    """``peaky()`` exported and int8-quantised once; tests that damage it copy it first."""
    return quantised.export_onnx(peaky(), tmp_path_factory.mktemp("onnx") / "int8")


def test_onnx_runtime_matches_torch_and_its_int8_agrees(tmp_path, int8_dir):
    m = peaky()
    fp32 = quantised.load_quantised(quantised.export_onnx(m, tmp_path / "onnx32", int8=False))
    x = WINDOWS
    torch.testing.assert_close(fp32(x), m(x), rtol=1e-4, atol=1e-4)
    ref = m.generate_greedy(PROMPTS, 10, 3, 0)
    threads = torch.get_num_threads()
    assert fp32.generate_greedy(PROMPTS, 10, 3, 0) == ref
    assert torch.get_num_threads() == threads  # one torch thread while decoding, then back
    assert fp32.generate_beam(PROMPTS[:4], 8, 3, 0, beam_size=3) == m.generate_beam(
        PROMPTS[:4], 8, 3, 0, beam_size=3
    )
    int8 = quantised.load_quantised(int8_dir)
    assert int8.num_params() == m.num_params()
    assert agreement(ref, int8.generate_greedy(PROMPTS, 10, 3, 0)) >= 0.9
    # teacher-forced, after the first token (5: never seen in training, so a near tie):
    # the same next-token choice almost everywhere, similar probabilities
    p, r = m(x)[:, 1:].softmax(-1), int8(x)[:, 1:].softmax(-1)
    assert (p.argmax(-1) == r.argmax(-1)).float().mean() >= 0.9
    assert (p - r).abs().sum(-1).mean() < 0.2
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["format"] == "onnx-int8" and config["num_params"] == m.num_params()


def test_small_batches_decode_on_onnxruntime_large_ones_on_torch_with_the_same_tokens(tmp_path):
    m = peaky()
    onnx = quantised.load_quantised(quantised.export_onnx(m, tmp_path / "onnx32", int8=False))
    both = quantised.SmallBatchOnnx(m, onnx, max_rows=8)
    assert both.engine(8) is onnx and both.engine(9) is m
    assert both.cfg is m.cfg and both.vocab_size == m.vocab_size
    assert both.num_params() == m.num_params()
    for prompts in (PROMPTS[:8], PROMPTS):  # 8 rows: onnxruntime; 12: torch
        assert both.generate_greedy(prompts, 10, 3, 0) == m.generate_greedy(prompts, 10, 3, 0)
    for prompts in (PROMPTS[:2], PROMPTS[:3]):  # 2 x 4 beams: onnxruntime; 3 x 4: torch
        assert both.generate_beam(prompts, 8, 3, 0, beam_size=4) == m.generate_beam(
            prompts, 8, 3, 0, beam_size=4
        )


def test_the_int8_file_is_under_a_third_of_fp32(tmp_path):
    """Every matrix int8, the embedding read from the head's int8 matrix (no fp32 copy),
    nothing else of weight: on a model large enough that the graph itself is small."""
    import onnx

    from lmops.core.translation import save_model

    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=2, n_embd=128, n_head=2, block_size=32), 4000).eval()
    int8_dir = quantised.export_onnx(m, tmp_path / "int8")
    fp32_dir = save_model(m, tmp_path / "fp32")
    assert quantised.file_bytes(int8_dir) <= 0.3 * quantised.file_bytes(fp32_dir)
    graph = onnx.load(str(int8_dir / "model.onnx")).graph
    fp32_matrices = [
        i.name
        for i in graph.initializer
        if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT
    ]
    assert fp32_matrices == []
    assert not any(node.metadata_props for node in graph.node)  # no stack traces shipped


LOAD_IN_A_FRESH_PROCESS = """
import json, sys
from lmops.core.quantised import load_quantised
m = load_quantised(sys.argv[1])
print(json.dumps({"out": m.generate_greedy(json.loads(sys.argv[2]), 10, 3, 0),
                  "beam": m.generate_beam(json.loads(sys.argv[2])[:3], 6, 3, 0, beam_size=2),
                  "params": m.num_params()}))
"""


def test_the_saved_int8_model_translates_in_a_fresh_process(int8_dir):
    m = peaky()
    out = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(int8_dir), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    here = quantised.load_quantised(int8_dir)
    assert got["out"] == here.generate_greedy(PROMPTS, 10, 3, 0)
    assert got["beam"] == here.generate_beam(PROMPTS[:3], 6, 3, 0, beam_size=2)
    assert got["params"] == m.num_params()
    assert agreement(m.generate_greedy(PROMPTS, 10, 3, 0), got["out"]) >= 0.9


def test_a_corrupted_or_missing_quantised_model_is_named(tmp_path, int8_dir):
    path = tmp_path / "int8"
    shutil.copytree(int8_dir, path)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'none'}: no quantised model"):
        quantised.load_quantised(tmp_path / "none")
    data = bytearray((path / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"int8/model.onnx: sha256 does not match manifest"):
        quantised.load_quantised(path)
    # an fp32 model dir is not a quantised one
    from lmops.core.translation import save_model

    plain = save_model(peaky(), tmp_path / "fp32")
    with pytest.raises(CheckpointError, match="not a quantised model"):
        quantised.load_quantised(plain)


def test_decode_speed_and_the_comparison_table(tmp_path, int8_dir):
    m = peaky()
    speed = quantised.decode_speed(
        {"fp32": m, "int8": quantised.load_quantised(int8_dir)},
        PROMPTS[:4],
        [1, 2],
        5,
        3,
        0,
        rounds=2,
    )
    assert set(speed) == {"fp32", "int8"}
    assert set(speed["int8"]) == {
        f"{k}_b{n}" for k in ("ms_per_sentence", "tokens_per_sec", "ms_per_token") for n in (1, 2)
    }
    assert all(v > 0 for v in speed["int8"].values())
    rows = {
        "student fp32": {
            "format": "torch-fp32",
            "bleu": 10.0,
            "file_mb": 4.0,
            "tokens_per_sec_b1": 100.0,
            "tokens_per_sec_b16": 400.0,
        },
        "student onnx int8": {
            "format": "onnx-int8",
            "bleu": 9.8,
            "file_mb": 1.0,
            "tokens_per_sec_b1": 200.0,
            "tokens_per_sec_b16": 720.0,
        },
    }
    table = quantise.comparison_table(rows, baseline="student fp32")
    assert list(table["variant"]) == ["student fp32", "student onnx int8"]
    row = table.set_index("variant").loc["student onnx int8"]
    assert row["speedup_b1"] == 2.0 and row["speedup_b16"] == 1.8
    assert row["bleu_delta"] == pytest.approx(-0.2) and row["size_ratio"] == 0.25
    png = quantise.plot_comparison(table, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = quantise._metrics(
        table.assign(shipped=[False, True]), "student onnx int8", ["speedup_b1", "speedup_b16"]
    )
    assert metrics["shipped"] == "student onnx int8" and metrics["shipped_speedup_b16"] == 1.8
    assert metrics["student_fp32"]["bleu"] == 10.0
    assert np.isfinite(table["speedup_b1"]).all()


def _variants(student_int8_bleu: float, teacher_int8_bleu: float) -> pd.DataFrame:
    """A made-up comparison: fp32 student at BLEU 10 in 4 MB, teacher at 12 in 12 MB; the
    int8 forms in a quarter of that, at the given BLEU."""
    rows = {
        name: {"format": fmt, "bleu": bleu, "file_mb": mb}
        for name, fmt, bleu, mb in [
            ("teacher fp32", "torch-fp32", 12.0, 12.0),
            ("student fp32", "torch-fp32", 10.0, 4.0),
            ("student onnx int8", "onnx-int8", student_int8_bleu, 1.0),
            ("teacher onnx int8", "onnx-int8", teacher_int8_bleu, 3.0),
        ]
    }
    return quantise.comparison_table(rows, baseline=quantise.BASELINE)


@pytest.mark.parametrize(
    ("student_int8", "teacher_int8", "bound", "shipped"),
    [
        (9.8, 11.9, 0.5, "student onnx int8"),  # within the bound, and the smallest
        (9.5, 11.9, 0.5, "student onnx int8"),  # exactly at the bound still ships
        (9.4, 11.9, 0.5, "teacher onnx int8"),  # fell past it: the next smallest within
        (9.4, 11.9, 0.7, "student onnx int8"),  # a looser bound takes it back
        (10.4, 9.0, 0.0, "student onnx int8"),  # a gain is within any bound
    ],
)
def test_the_smallest_int8_variant_within_the_bleu_bound_ships(
    student_int8, teacher_int8, bound, shipped
):
    table = _variants(student_int8, teacher_int8)
    assert quantise.choose_shipped(table, bound) == shipped


def test_no_int8_variant_within_the_bound_ships_nothing_and_names_the_key():
    table = _variants(8.0, 9.0)  # -2.0 and -1.0 against the fp32 student's 10
    with pytest.raises(quantise.QuantiseError) as err:
        quantise.choose_shipped(table, 0.5)
    assert str(err.value) == (
        "quantise.max_bleu_drop: no int8 variant is within 0.5 BLEU of the fp32 student's "
        "10.00: student onnx int8 8.00 (-2.00), teacher onnx int8 9.00 (-1.00). Nothing was "
        "shipped; raise quantise.max_bleu_drop to accept the loss"
    )
    assert quantise.choose_shipped(table, 1.0) == "teacher onnx int8"
