"""The shared training loop: schedule, pinned losses, accumulation, resume, guard, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lmops.config import ModelConfig, TrainConfig
from lmops.core import checkpoint
from lmops.core.model import Transformer
from lmops.core.train import (
    curve_panels,
    lm_loss,
    lr_at,
    make_optimizer,
    plot_curves,
    seed_everything,
    window_batches,
    write_curve,
)
from lmops.errors import DataError, LmopsError, OutOfMemoryError
from lmops.pipeline.training import SELECT_METRIC, VALID_LOSS, VALID_PPL
from tests.conftest import REPO
from tests.support.ddp_worker import BLOCK, SEED, VOCAB, TinyLM, config, run, tokens

# losses of the first six steps of run(config()), computed once on this code
PINNED = [4.028967, 3.834935, 3.718930, 3.459739, 3.338010, 3.241924]


def losses(result) -> list[float]:
    return [row["train_loss"] for row in result.history]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway through the decay
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    no_warmup = TrainConfig(max_steps=10, warmup_steps=0, lr=1e-3, min_lr=0.0)
    assert lr_at(1, no_warmup) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 10)) / 2)


def test_weight_decay_applies_to_matrices_only():
    model = TinyLM()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # the tied embedding/head matrix once; LayerNorm weight+bias and the head bias
    assert [p.shape for p in decay["params"]] == [(VOCAB, 16)]
    assert sorted(p.numel() for p in no_decay["params"]) == [16, 16, VOCAB]
    # a parameter named in no_decay (one whose frozen rows must not shrink) joins the rest
    (group,) = make_optimizer(
        model, TrainConfig(weight_decay=0.1), torch.device("cpu"), no_decay=[model.emb.weight]
    ).param_groups
    assert group["weight_decay"] == 0.0
    assert sorted(p.numel() for p in group["params"]) == [16, 16, VOCAB, VOCAB * 16]


def test_trainable_rows_learn_and_the_other_rows_keep_their_values(tmp_path):
    """Rows a mask leaves out keep their values bit for bit, weight decay included, while
    every row changes in the same run without the mask; the hook is gone after the run."""
    seed_everything(SEED)
    before = weights(TinyLM())["emb.weight"]
    plain, _ = run(tmp_path / "plain", config())
    assert (weights(plain)["emb.weight"] != before).any(dim=1).all()
    rows = torch.arange(VOCAB) % 3 != 0
    model, result = run(tmp_path / "masked", config(), trainable_rows={"emb.weight": rows})
    after = weights(model)["emb.weight"]
    assert torch.equal(after[~rows], before[~rows])
    assert (after[rows] != before[rows]).any(dim=1).all()
    assert losses(result)[-1] < losses(result)[0] - 0.5
    model.zero_grad()
    model(torch.arange(VOCAB)[None]).logsumexp(-1).sum().backward()
    assert (model.emb.weight.grad[~rows] != 0).any(dim=1).all()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"emb.bias": torch.ones(VOCAB, dtype=torch.bool)}, "no parameter 'emb.bias'"),
        ({"emb.weight": torch.ones(VOCAB)}, r"bool mask of shape \(32,\), not torch.float32"),
        ({"emb.weight": torch.ones(3, dtype=torch.bool)}, r"not torch.bool \(3,\)"),
    ],
)
def test_a_bad_trainable_rows_mask_names_the_parameter(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, config(), trainable_rows=rows)


def test_window_batches_are_a_pure_function_of_the_step():
    get = window_batches(tokens(), BLOCK, seed=7)
    x, y = get(3, 5)
    assert x.shape == y.shape == (5, BLOCK) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    x2, _ = get(3, 5)
    x3, _ = get(4, 5)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    with pytest.raises(DataError, match=r"shard.bin: 8 tokens, need more than block_size \(8\)"):
        window_batches(np.arange(8), 8, seed=0, name="shard.bin")


def test_seeded_steps_pin_the_loss_and_it_decreases(tmp_path):
    _, result = run(tmp_path, config())
    assert losses(result) == pytest.approx(PINNED, abs=1e-4)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.5
    assert result.step == 6 and result.tokens_seen == 6 * 16 * BLOCK
    assert result.checkpoint == tmp_path / "ckpt" / "step-00000006"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000006"]


def test_the_pinned_losses_are_those_of_a_plain_adamw_loop():
    """What backs PINNED: torch's own AdamW (unfused), cross-entropy, gradient clipping and
    the documented schedule (linear warm-up to lr, cosine down to min_lr) written out here,
    on the same batches, give the same losses."""
    cfg = config()
    seed_everything(SEED)
    model = TinyLM()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        betas=(cfg.beta1, cfg.beta2),
    )
    get = window_batches(tokens(), BLOCK, SEED)
    got = []
    for step in range(1, cfg.max_steps + 1):
        if step <= cfg.warmup_steps:
            lr = cfg.lr * step / cfg.warmup_steps
        else:
            done = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
            lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * done)) / 2
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get(step, cfg.batch_size)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        got.append(loss.item())
    assert got == pytest.approx(PINNED, abs=1e-4)


def test_a_compiled_transformer_trains_as_the_eager_one(tmp_path):
    """torch.compile (inductor), as the default pretrain runs it where it pays, on the real
    model: the same losses and weights as eager, to float rounding."""
    mcfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=BLOCK)
    runs = {}
    for compiled in (False, True):
        seed_everything(SEED)
        model = Transformer(mcfg, VOCAB)
        cfg = config(max_steps=3, lr=1e-2, compile=compiled)
        runs[compiled] = run(tmp_path / str(compiled), cfg, model=model)
    (eager, r_eager), (comp, r_comp) = runs[False], runs[True]
    assert (r_eager.hardware["compile"], r_comp.hardware["compile"]) == (False, True)
    assert losses(r_comp) == pytest.approx(losses(r_eager), abs=1e-4)
    assert losses(r_comp)[-1] < losses(r_comp)[0]
    for name, w in weights(eager).items():
        torch.testing.assert_close(weights(comp)[name], w, atol=1e-4, rtol=1e-3)


def test_grad_accumulation_2x8_equals_one_batch_of_16(tmp_path):
    one, r1 = run(tmp_path / "one", config(batch_size=16, grad_accum=1))
    acc, r2 = run(tmp_path / "acc", config(batch_size=8, grad_accum=2))
    assert losses(r2) == pytest.approx(losses(r1), abs=1e-6)
    for name, w in weights(one).items():
        torch.testing.assert_close(weights(acc)[name], w, atol=1e-6, rtol=1e-5)


class Crash(Exception):
    pass


def crash_at(step: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise Crash(f"killed during step {step}")
        return lm_loss(model, batch)

    return loss_fn


def test_resume_after_a_crash_replays_the_uninterrupted_run(tmp_path, caplog):
    curves = {name: tmp_path / f"{name}.csv" for name in ("straight", "resumed")}
    straight, r_straight = run(tmp_path / "straight", config(), curve_path=curves["straight"])
    with pytest.raises(Crash):  # checkpointed at step 3
        run(tmp_path / "resumed", config(), loss_fn=crash_at(4), curve_path=curves["resumed"])
    assert checkpoint.latest(tmp_path / "resumed" / "ckpt").name == "step-00000003"
    crashed = checkpoint.load(checkpoint.latest(tmp_path / "resumed" / "ckpt"), TinyLM())
    # a differently initialised model: everything must come from the checkpoint
    torch.manual_seed(999)
    with caplog.at_level(logging.INFO, logger="lmops.core.train"):
        resumed, r_resumed = run(
            tmp_path / "resumed", config(), model=TinyLM(), curve_path=curves["resumed"]
        )
    assert "resuming from" in caplog.text and "at step 3" in caplog.text
    assert r_resumed.resumed_from == 3 and r_resumed.step == 6
    assert losses(r_resumed) == losses(r_straight)  # all six, the first three restored
    assert r_resumed.tokens_seen == r_straight.tokens_seen
    # the curve too, its columns in the same order though the first rows came back from JSON
    assert curves["resumed"].read_text() == curves["straight"].read_text()
    assert curves["straight"].read_text().startswith("step,train_loss,lr,grad_norm\n")
    # the time of the crashed call, up to its checkpoint, counts in the run's
    assert 0 < crashed["seconds"] < r_resumed.wall_seconds
    assert r_resumed.tokens_per_sec == pytest.approx(r_resumed.tokens_seen / r_resumed.wall_seconds)
    for name, w in weights(straight).items():
        assert torch.equal(weights(resumed)[name], w), name


def test_a_changed_config_starts_afresh_and_says_why(tmp_path, caplog):
    run(tmp_path, config(max_steps=3, warmup_steps=1))
    with caplog.at_level(logging.WARNING, logger="lmops.core.train"):
        _, result = run(tmp_path, config(max_steps=3, warmup_steps=1, lr=1e-2))
    assert result.resumed_from == 0
    assert "different config (changed: fit.train.lr); starting afresh" in caplog.text
    assert checkpoint.read_config(result.checkpoint)["fit"]["train"]["lr"] == 1e-2


def test_a_corrupted_checkpoint_stops_the_rerun_naming_the_file(tmp_path):
    _, result = run(tmp_path, config(max_steps=3, warmup_steps=1))
    weights_file = result.checkpoint / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0x01
    weights_file.write_bytes(bytes(data))
    with pytest.raises(
        LmopsError,
        match=rf"{weights_file}: sha256 does not match .*; "
        rf"delete {result.checkpoint} to start train afresh",
    ):
        run(tmp_path, config(max_steps=6))
    assert checkpoint.latest(tmp_path / "ckpt") == result.checkpoint  # left for the user


def test_rerunning_a_finished_run_does_no_more_steps(tmp_path):
    x, y = window_batches(tokens(), BLOCK, seed=99)(0, 32)
    evals = []

    def evaluate(model, step):
        evals.append(step)
        return {VALID_LOSS: lm_loss(model, (x, y)).item()}

    cfg = config(max_steps=3, warmup_steps=1, eval_interval=2)
    _, first = run(tmp_path, cfg, evaluate=evaluate)
    model, again = run(tmp_path, cfg, model=TinyLM(), evaluate=evaluate)
    assert again.resumed_from == 3 and again.step == 3 and losses(again) == losses(first)
    assert evals == [2, 3]  # none on the rerun, yet it reports the last evaluation
    assert again.metrics == first.metrics and first.metrics[VALID_LOSS] > 0
    # it reports the run's time, not its own few milliseconds
    finished = checkpoint.load(first.checkpoint, TinyLM())["seconds"]
    assert 0 < finished <= first.wall_seconds and again.wall_seconds >= finished
    assert again.tokens_per_sec == pytest.approx(again.tokens_seen / again.wall_seconds)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 25.0])
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return loss * 0 + bad if calls["n"] == 5 else loss

    message = rf"train: loss diverged at step 5: {bad} \(max_loss 20.0\); last good checkpoint: "
    with pytest.raises(LmopsError, match=message + ".*step-00000004"):
        run(tmp_path, config(checkpoint_interval=2), loss_fn=loss_fn)
    last = checkpoint.latest(tmp_path / "ckpt")
    assert last.name == "step-00000004"
    model = TinyLM()
    state = checkpoint.load(last, model, make_optimizer(model, config(), torch.device("cpu")))
    assert state["step"] == 4 and len(state["history"]) == 4
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def _allocates_too_much_at(step: int):
    """A loss that, on ``step``, asks torch's allocator for 4 EiB: a real allocation failure."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            torch.empty(1 << 62, dtype=torch.uint8)
        return lm_loss(model, batch)

    return loss_fn


def test_out_of_memory_names_the_step_the_batch_and_what_to_lower(tmp_path):
    cfg = config(checkpoint_interval=2, batch_size=8, grad_accum=2)
    with pytest.raises(OutOfMemoryError) as caught:
        run(tmp_path, cfg, loss_fn=_allocates_too_much_at(9))  # step 5, first micro-batch
    last = tmp_path / "ckpt" / "step-00000004"
    assert str(caught.value) == (
        "train: training step 5 with batch_size 8: out of host memory on cpu (RuntimeError); "
        "lower train.batch_size and raise train.grad_accum by the same factor (the effective "
        f"batch stays 16), or model.block_size; the last checkpoint ({last}) is kept"
    )
    assert checkpoint.latest(tmp_path / "ckpt") == last
    assert checkpoint.load(last, TinyLM())["step"] == 4


def test_out_of_memory_in_an_evaluation_says_so(tmp_path):
    def evaluate(model, step):
        torch.empty(1 << 62, dtype=torch.uint8)
        return {}

    with pytest.raises(OutOfMemoryError, match=r"^train: the evaluation at step 3 with batch"):
        run(tmp_path, config(), evaluate=evaluate)


def test_evaluation_keeps_the_best_weights_and_writes_the_curve(tmp_path):
    x, y = window_batches(tokens(), BLOCK, seed=99)(0, 32)
    seen = []

    def evaluate(model, step):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(step)
        # step 4 is made to look best, so the best checkpoint is not simply the last one
        return {VALID_LOSS: lm_loss(model, (x, y)).item() - (5.0 if step == 4 else 0.0)}

    curve = tmp_path / "curve.csv"
    _, result = run(
        tmp_path,
        config(eval_interval=2),
        evaluate=evaluate,
        select_metric=VALID_LOSS,
        select_mode="min",
        curve_path=curve,
    )
    assert seen == [2, 4, 6]
    assert result.best_step == 4 and result.best_checkpoint.name == "best-00000004"
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == [
        "best-00000004",
        "step-00000006",
    ]
    best = TinyLM()
    checkpoint.load_weights(best, result.best_checkpoint)
    assert lm_loss(best, (x, y)).item() - 5.0 == pytest.approx(result.best_metric, abs=1e-6)
    lines = curve.read_text().splitlines()
    assert lines[0] == f"step,train_loss,lr,grad_norm,{VALID_LOSS}"
    assert len(lines) == 7 and lines[1].endswith(",") and not lines[2].endswith(",")
    assert float(lines[1].split(",")[1]) == pytest.approx(PINNED[0], abs=1e-4)


def test_a_missing_selected_metric_is_an_error(tmp_path):
    with pytest.raises(LmopsError, match=r"evaluate\(\) returned no 'bleu' \(got \['chrf'\]\)"):
        run(
            tmp_path,
            config(max_steps=3, warmup_steps=1),
            evaluate=lambda m, s: {"chrf": 1.0},
            select_metric="bleu",
        )


def test_metrics_and_the_curve_plot_go_to_the_active_mlflow_run(tmp_path, mlflow_store):
    """fit logs through the callback it is given: a stage's StageLog reaches MLflow."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lmops.tracking.runs import StageLog

    with mlflow.start_run() as active:
        run(
            tmp_path,
            config(max_steps=4, warmup_steps=1, eval_interval=2),
            evaluate=lambda m, s: {VALID_LOSS: 3.0 - s / 10},
            log=StageLog(),
        )
    client = MlflowClient()
    train_loss = client.get_metric_history(active.info.run_id, "train/train_loss")
    assert [m.step for m in train_loss] == [1, 2, 3, 4]
    assert train_loss[0].value == pytest.approx(PINNED[0], abs=1e-4)
    val = client.get_metric_history(active.info.run_id, f"train/{VALID_LOSS}")
    assert [(m.step, round(m.value, 6)) for m in val] == [(2, 2.8), (4, 2.6)]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_sec"):
        assert len(client.get_metric_history(active.info.run_id, key)) == 4
    artifacts = [a.path for a in client.list_artifacts(active.info.run_id)]
    assert artifacts == ["train_loss_curves.png"]


def test_the_curves_plot_every_validation_metric_the_stages_record(tmp_path):
    """The keys the training stages' evaluate() callbacks return (lmops.pipeline.training):
    losses share a panel, perplexity and BLEU get one each."""
    logged = {"train_loss": 3.0, "lr": 1e-3, "grad_norm": 0.5}
    pretrain = [{"step": 1, **logged}, {"step": 2, **logged, VALID_LOSS: 2.7, VALID_PPL: 14.9}]
    finetune = [{"step": 1, **logged}, {"step": 2, **logged, VALID_LOSS: 2.7, SELECT_METRIC: 3.1}]
    assert curve_panels(pretrain) == {"loss": ["train_loss", VALID_LOSS], VALID_PPL: [VALID_PPL]}
    assert curve_panels(finetune) == {
        "loss": ["train_loss", VALID_LOSS],
        SELECT_METRIC: [SELECT_METRIC],
    }
    one = plot_curves([{"step": 1, "train_loss": 3.0}], tmp_path / "one.png")
    three = plot_curves(finetune, tmp_path / "curves.png")
    assert three.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(three).width == 2 * Image.open(one).width  # two panels side by side


def test_json_curve(tmp_path):
    history = [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5, VALID_LOSS: 2.7}]
    write_curve(history, tmp_path / "curve.json")
    assert json.loads((tmp_path / "curve.json").read_text()) == history
    with pytest.raises(ValueError, match="curve.txt: loss curve must be .csv or .json"):
        write_curve(history, tmp_path / "curve.txt")
    assert not (tmp_path / "curve.txt").exists()


def test_real_transformer_trains_in_bf16_and_round_trips(tmp_path):
    mcfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=BLOCK)
    seed_everything(SEED)
    model = Transformer(mcfg, VOCAB)
    cfg = config(max_steps=8, lr=1e-2, precision="bf16")  # forced: also where emulated
    _, result = run(tmp_path, cfg, model=model)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.1
    assert all(math.isfinite(v) for v in losses(result))
    loaded = Transformer(mcfg, VOCAB)
    config_back = checkpoint.load_weights(loaded, result.checkpoint)
    assert config_back["fit"]["train"]["precision"] == "bf16"
    assert result.hardware["precision"] == "bf16"
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied after loading
    x, _ = window_batches(tokens(), BLOCK, seed=1)(0, 4)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(x), model(x))


def test_two_ddp_processes_match_one_process(tmp_path):
    """torchrun, 2 CPU ranks each taking 2 of the 4 micro-batches of 4 rows == 1 process
    with the same params; the checkpoint resumes under either process count."""
    single, r_single = run(tmp_path / "single", config(batch_size=4, grad_accum=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = REPO / "tests/support/ddp_worker.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path / "ddp"),
            "4",
            "4",
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = checkpoint.latest(tmp_path / "ddp" / "ckpt")
    assert last.name == "step-00000006"
    ddp = TinyLM()
    state = checkpoint.load(last, ddp)
    assert [row["train_loss"] for row in state["history"]] == pytest.approx(
        losses(r_single), abs=1e-5
    )
    assert state["history"][-1]["step"] == 6
    # no process count in the resume key: a run of 2 processes resumes under 1 and back
    # (the worker's one thread per process aside)
    ddp_config, single_config = (checkpoint.read_config(p) for p in (last, r_single.checkpoint))
    assert ddp_config["fit"]["train"].pop("num_threads") == 1
    single_config["fit"]["train"].pop("num_threads")
    assert ddp_config == single_config
    for name, w in weights(single).items():
        torch.testing.assert_close(weights(ddp)[name], w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_is_torch_cross_entropy_with_label_smoothing(smoothing, dtype):
    # 600 rows: three chunks of the fp32 computation, a fifth of them skipped
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(600, 50, generator=gen)
    targets = torch.randint(0, 50, (600,), generator=gen)
    logits[torch.arange(600), targets] += 8  # a confident model: smoothing costs it
    logits = logits.to(dtype)
    targets[torch.rand(600, generator=gen) < 0.2] = -100

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z = torch.nn.Parameter(logits.clone())

        def forward(self, _inputs):
            return self.z[None]

    ours, ref = Logits(), Logits()
    loss = lm_loss(ours, (None, targets[None]), label_smoothing=smoothing)
    expected = torch.nn.functional.cross_entropy(
        ref.z.float(), targets, ignore_index=-100, label_smoothing=smoothing
    )
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert ours.z.grad.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 1e-4} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ours.z.grad, ref.z.grad, **tol)
    if smoothing:  # the smoothing term moved the loss: the test can tell them apart
        plain = torch.nn.functional.cross_entropy(ref.z.float(), targets, ignore_index=-100)
        assert loss.item() - plain.item() > 0.5
