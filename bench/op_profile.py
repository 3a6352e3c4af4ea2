"""Where the time goes: torch.profiler tables of lmops' training step and decoding.

Run with: make bench   (or: python bench/op_profile.py)

The figures in train_throughput.md and decode.md say how fast; these say why. For the
default model size (the same set-up as those scripts): a training step in fp32 and in bf16
autocast, and greedy decoding at batch 16. Each table lists the operators with the most
self CPU time, and a summary splits the time into matrix multiplies (the FLOPs the
utilisation figure counts) and everything else (elementwise work, softmax, the optimiser,
framework overhead), which is what keeps utilisation below the matmul peak.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import machine, pick_device, setup_threads, write_results
from torch.profiler import ProfilerActivity, profile
from train_throughput import BATCH, VOCAB, lmops_case

from lmops.config import ModelConfig
from lmops.core.model import Transformer
from lmops.core.train import window_batches

MATMUL = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_mkldnn",
    "mkldnn",
    "onednn",
    "aten::_scaled_dot_product",
    "aten::linear",
    "aten::matmul",
)


def is_matmul(name: str) -> bool:
    return name.startswith(MATMUL)


def profiled(run: Callable[[], None], top: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [
        {
            "operator": e.key,
            "self ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
            "matmul": "yes" if is_matmul(e.key) else "",
        }
        for e in events[:top]
    ]
    mm = sum(e.self_cpu_time_total for e in events if is_matmul(e.key))
    summary = {
        "total ms": total / 1e3,
        "matmul share": mm / total,
        "other share": 1 - mm / total,
        "operators": len(events),
    }
    return rows, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="training steps profiled")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    device = pick_device("cpu")
    setup_threads()
    info = machine(device)
    cfg = ModelConfig()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=200_000).astype(np.uint16)
    get_batch = window_batches(tokens, cfg.block_size, seed=0)
    tables: dict[str, list[dict[str, Any]]] = {}
    summaries = []
    for name, precision in (("training step, fp32", "fp32"), ("training step, bf16", "bf16")):
        case = lmops_case(cfg, precision, False, get_batch, device, args.steps)
        case.warm_up(2)
        batches = [case.batch() for _ in range(args.steps)]
        rows, summary = profiled(lambda c=case, b=batches: [c.step(x) for x in b], args.top)
        tables[f"{name} ({args.steps} steps, batch {BATCH})"] = rows
        summaries.append({"case": name, **summary})

    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).eval()
    prompts = torch.randint(3, VOCAB, (16, 24), generator=torch.Generator().manual_seed(16))
    prompts = prompts.tolist()
    model.generate_greedy(prompts, 4, VOCAB, 0)  # warm-up
    rows, summary = profiled(
        lambda: model.generate_greedy(prompts, args.new_tokens, VOCAB, 0), args.top
    )
    tables[f"greedy decoding, batch 16, {args.new_tokens} new tokens, fp32"] = rows
    summaries.append({"case": "greedy decoding b16, fp32", **summary})
    write_results(
        "op_profile",
        "Profile: where lmops' training step and decoding spend their time",
        info,
        {"Summary": summaries, **tables},
        notes=[
            "default model size (4 layers, width 256, 4 heads, context 128, vocab 8000), "
            "random weights; torch.profiler, CPU activities, self time per operator",
            "matmul = aten::mm/addmm/bmm/linear/matmul, oneDNN kernels and SDPA attention; "
            "everything else is time the FLOP count does not see",
        ],
    )


if __name__ == "__main__":
    main()
