"""Training throughput and FLOP utilisation: lmops' training step against HF Llama.

Run with: make bench   (or: python bench/train_throughput.py [--quick])

The peer is a ``transformers`` ``LlamaForCausalLM`` of the same shape (layers, width,
heads, SwiGLU width, vocab, context, tied embeddings, no biases, RMSNorm eps 1e-6),
trained by a plain AdamW loop with HF's own loss on the same batches. Both sides clip the
gradient norm at 1.0, as ``lmops.core.train`` and the HF Trainer do by default. Precision
policies: fp32 eager and bf16 autocast on both sides, plus lmops with bf16 + torch.compile.
Utilisation = tokens/s x ``lmops.core.model.flops_per_token`` / the matmul peak this script
measures with ``torch.matmul`` on large square matrices.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import (
    interleaved,
    machine,
    matmul_peak,
    median,
    paired_ratio,
    pick_device,
    setup_threads,
    spread,
    sync,
    write_results,
)

from lmops.config import ModelConfig, TrainConfig
from lmops.core.hardware import autocast_dtype, bf16_native
from lmops.core.model import NORM_EPS, Transformer, flops_per_token, mlp_hidden
from lmops.core.train import lm_loss, make_optimizer, window_batches

VOCAB = 8000  # params.yaml vocab.vocab_size
BATCH = 16  # TrainConfig.batch_size default
SIZES = {  # name -> ModelConfig overrides; "default" is ModelConfig()'s own
    "small": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    "default": {},
    "large": {"n_layer": 6, "n_embd": 384, "n_head": 6},
}
GOALS = {
    "bf16_vs_hf_fp32": 1.6,
    "bf16_vs_hf_bf16": 1.2,
    "util_of_bf16_peak": 0.55,
    # a CPU without native bf16, where `precision: auto` trains in fp32
    "util_of_fp32_peak": 0.65,
}


def hf_llama(cfg: ModelConfig, vocab: int) -> torch.nn.Module:
    """The HF peer with lmops' shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.n_embd,
        intermediate_size=mlp_hidden(cfg),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=NORM_EPS,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=0.0,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


class Case:
    """One model + optimiser under one precision policy; ``measure`` returns tokens/s."""

    def __init__(
        self,
        model: torch.nn.Module,
        step: Callable[[tuple], None],
        get_batch: Callable[[int, int], tuple],
        device: torch.device,
        steps: int,
    ):
        self.model, self.step, self.get_batch = model, step, get_batch
        self.device, self.steps, self.next = device, steps, 1

    def batch(self) -> tuple:
        x, y = self.get_batch(self.next, BATCH)
        self.next += 1
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def warm_up(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.step(self.batch())
        sync(self.device)
        return time.perf_counter() - start

    def measure(self) -> float:
        batches = [self.batch() for _ in range(self.steps)]  # sampling is not timed
        sync(self.device)
        start = time.perf_counter()
        for b in batches:
            self.step(b)
        sync(self.device)
        return self.steps * b[0].numel() / (time.perf_counter() - start)


def lmops_case(
    cfg: ModelConfig, precision: str, compile_: bool, get_batch, device, steps: int
) -> Case:
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).to(device).train()
    tcfg = TrainConfig(precision=precision, compile=compile_)
    opt = make_optimizer(model, tcfg, device)
    dtype = autocast_dtype(precision, device)
    fwd = torch.compile(model) if compile_ else model

    def step(batch: tuple) -> None:  # what lmops.core.train._Trainer.train_step does per step
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = lm_loss(fwd, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Case(model, step, get_batch, device, steps)


def hf_case(cfg: ModelConfig, bf16: bool, get_batch, device, steps: int) -> Case:
    torch.manual_seed(0)
    model = hf_llama(cfg, VOCAB).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if bf16
        else (contextlib.nullcontext)
    )

    def step(batch: tuple) -> None:
        x, y = batch
        with ctx():
            # shift_labels: y is already the next token of each x (HF's own loss path)
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Case(model, step, get_batch, device, steps)


def bench_size(
    name: str,
    overrides: dict[str, Any],
    device: torch.device,
    rounds: int,
    steps: int,
    warmup: int,
    compile_: bool,
    peaks: dict[str, float],
) -> list[dict[str, Any]]:
    cfg = ModelConfig(**overrides)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=200_000).astype(np.uint16)
    get_batch = window_batches(tokens, cfg.block_size, seed=0)
    cases = {
        "hf fp32": hf_case(cfg, False, get_batch, device, steps),
        "lmops fp32": lmops_case(cfg, "fp32", False, get_batch, device, steps),
    }
    if "bf16" in peaks:  # only where bf16 is native: emulated, it is ~80x slower
        cases["hf bf16"] = hf_case(cfg, True, get_batch, device, steps)
        cases["lmops bf16"] = lmops_case(cfg, "bf16", False, get_batch, device, steps)
    if compile_ and "bf16" in peaks:
        cases["lmops bf16+compile"] = lmops_case(cfg, "bf16", True, get_batch, device, steps)
    print(
        f"\n[{name}] {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, "
        f"mlp {mlp_hidden(cfg)}, context {cfg.block_size}, vocab {VOCAB}, batch {BATCH}"
    )
    for case_name, case in cases.items():
        print(f"  warm-up {case_name}: {case.warm_up(warmup):.1f}s")
    results = interleaved({k: c.measure for k, c in cases.items()}, rounds)
    fpt = flops_per_token(cfg, VOCAB)
    rows = []
    for case_name, values in results.items():
        tps = median(values)
        gflops = tps * fpt / 1e9
        own = peaks["fp32"] if "fp32" in case_name else peaks["bf16"]
        same = results["hf bf16" if "bf16" in case_name else "hf fp32"]
        top, top_best = (
            (peaks["bf16"], peaks["bf16 best"])
            if "bf16" in peaks
            else (peaks["fp32"], peaks["fp32 best"])
        )  # the fastest arithmetic this machine has
        rows.append(
            {
                "size": name,
                "case": case_name,
                "tokens/s": tps,
                "best tokens/s": max(values),
                "spread": spread(values),
                "GFLOP/s": gflops,
                "util (own-dtype peak)": gflops / own,
                "util (bf16 peak)": gflops / top,
                "util best (bf16 best peak)": max(values) * fpt / 1e9 / top_best,
                "x hf fp32": paired_ratio(values, results["hf fp32"]),
                "x hf same policy": paired_ratio(values, same),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median)")
    p.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="default size only, 3 rounds x 2 steps")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.steps = ["default"], 3, 2
    device = pick_device(args.device)
    setup_threads()
    info = machine(device)
    peaks: dict[str, float] = {}
    native = bf16_native(device)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not native:
            print("bf16 is emulated on this CPU (about 80x slower than fp32): fp32 cases only")
            continue
        rates = matmul_peak(dtype, device)
        peaks[name], peaks[f"{name} best"] = median(rates), max(rates)
    print(
        "matmul peak: "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items() if "best" not in k)
    )
    rows: list[dict[str, Any]] = []
    for name in args.sizes:
        rows += bench_size(
            name,
            SIZES[name],
            device,
            args.rounds,
            args.steps,
            args.warmup,
            not args.no_compile,
            peaks,
        )
    goals = []
    for name in args.sizes:
        by = {r["case"]: r for r in rows if r["size"] == name}
        best = max(
            (r for r in by.values() if r["case"].startswith("lmops")), key=lambda r: r["tokens/s"]
        )
        if not native:
            goals += [
                {
                    "size": name,
                    "check": c,
                    "measured": v,
                    "goal": g,
                    "met": "yes" if v >= g else "no",
                }
                for c, v, g in [
                    (
                        "lmops fp32 (the default policy here) util of fp32 peak",
                        by["lmops fp32"]["util (own-dtype peak)"],
                        GOALS["util_of_fp32_peak"],
                    )
                ]
            ]
            continue
        checks = [
            (
                "lmops bf16 (default policy) / hf fp32",
                by["lmops bf16"]["x hf fp32"],
                GOALS["bf16_vs_hf_fp32"],
            ),
            (
                "lmops bf16 / hf bf16",
                by["lmops bf16"]["x hf same policy"],
                GOALS["bf16_vs_hf_bf16"],
            ),
            (
                "lmops bf16 util of bf16 peak",
                by["lmops bf16"]["util (bf16 peak)"],
                GOALS["util_of_bf16_peak"],
            ),
            (
                f"best lmops ({best['case']}) util of bf16 peak",
                best["util (bf16 peak)"],
                GOALS["util_of_bf16_peak"],
            ),
            (
                f"best lmops ({best['case']}) util, best round / best peak",
                best["util best (bf16 best peak)"],
                GOALS["util_of_bf16_peak"],
            ),
        ]
        goals += [
            {"size": name, "check": c, "measured": v, "goal": g, "met": "yes" if v >= g else "no"}
            for c, v, g in checks
        ]
    # one file per CPU class: the other class's figures stay beside these
    write_results(
        "train_throughput" if native else "train_throughput_no_bf16",
        "Training throughput: lmops vs HF LlamaForCausalLM"
        + ("" if native else " (a CPU without native bf16: fp32)"),
        info,
        {"Throughput (median of interleaved rounds)": rows, "Goals": goals},
        extra={
            "matmul_peak_gflops": peaks,
            "rounds": args.rounds,
            "steps": args.steps,
            "batch": BATCH,
            "vocab": VOCAB,
        },
        notes=[
            "matmul peak (torch.matmul, square, median): "
            + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items() if "best" not in k)
            + (
                ""
                if native
                else "; bf16 emulated on this CPU, not measured; the util "
                "(bf16 peak) columns are of the fp32 peak"
            ),
            "spread = (max - min) / median over the rounds; best = the fastest round",
            "x hf ... = median over rounds of the paired per-round ratio",
            "FLOPs per token from lmops.core.model.flops_per_token (6N + attention), "
            "the same for both models",
        ],
    )


if __name__ == "__main__":
    main()
