"""Decoding throughput: lmops' cached greedy and beam search against HF ``generate``.

Run with: make bench   (or: python bench/decode.py [--quick])

Both sides are the default-size model with random weights (the HF side a
``LlamaForCausalLM`` of the same shape, ``use_cache=True``), the same prompts, and exactly
``--new-tokens`` new tokens per prompt: lmops gets an eos id the model can never emit (the
vocab size), HF gets ``min_new_tokens = max_new_tokens``. Tokens/s counts the new tokens of
the returned sequences (batch x new tokens; beam search's extra hypotheses are work, not
output). Each lmops row is compared with the HF peer of its precision: fp32 eager on both
sides, bf16 autocast on both sides where the CPU has native bf16; the same model exported
to ONNX and run by onnxruntime, in fp32 and with int8 weights (which has no HF peer).

Variants: :data:`VARIANTS` maps a row name to a function building the ``generate``
callable from the shared lmops model and to its precision, so another lmops variant is one
more entry; every variant is interleaved with the HF peers and the rest.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from common import (
    interleaved,
    machine,
    median,
    paired_ratio,
    pick_device,
    setup_threads,
    spread,
    write_results,
)
from train_throughput import VOCAB, hf_llama

from lmops.config import ModelConfig
from lmops.core import hardware
from lmops.core.model import Transformer

PAD_ID = 0
BEAM = 4
GOAL_AT_BATCH_16 = 2.0

# generate(prompts: list[list[int]], mode: "greedy" | "beam", new_tokens) -> token rows
Generate = Callable[[list[list[int]], str, int], list[list[int]]]


def lmops_generate(model: Transformer) -> Generate:
    never = model.vocab_size  # an id the model cannot emit: every row runs to the end

    def generate(prompts: list[list[int]], mode: str, new_tokens: int) -> list[list[int]]:
        if mode == "greedy":
            return model.generate_greedy(prompts, new_tokens, never, PAD_ID)
        return model.generate_beam(prompts, new_tokens, never, PAD_ID, beam_size=BEAM)

    return generate


def autocast_bf16(generate: Generate, device: torch.device) -> Generate:
    """``generate`` under bf16 autocast: what the bf16 matmul peak buys decoding."""

    def bf16(prompts: list[list[int]], mode: str, new_tokens: int) -> list[list[int]]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return generate(prompts, mode, new_tokens)

    return bf16


def lmops_onnx_generate(model: Transformer, int8: bool = False) -> Generate:
    """The same model exported to ONNX and run by onnxruntime (fp32, or int8 weights)."""
    from lmops.core.quantised import export_onnx, load_quantised

    tmp = tempfile.TemporaryDirectory(prefix="lmops-decode-")
    weakref.finalize(model, tmp.cleanup)
    export_onnx(model, Path(tmp.name) / "model", int8=int8)
    return lmops_generate(cast(Transformer, load_quantised(Path(tmp.name) / "model")))


# name -> (builder from the shared lmops model, precision); add a variant here. Each row's
# "x hf" is against the HF peer of its precision (PEERS), fp32 where there is none.
VARIANTS: dict[str, tuple[Callable[[Transformer], Generate], str]] = {
    "lmops": (lmops_generate, "fp32"),
    "lmops bf16": (lambda m: autocast_bf16(lmops_generate(m), m.device), "bf16"),
    "lmops onnx": (lmops_onnx_generate, "fp32"),
    "lmops onnx int8": (functools.partial(lmops_onnx_generate, int8=True), "int8 weights"),
}
PEERS = {"fp32": "hf", "bf16": "hf bf16"}


def hf_generate(cfg: ModelConfig, device: torch.device) -> Generate:
    torch.manual_seed(0)
    model = hf_llama(cfg, VOCAB).to(device).eval()
    eos = 2  # banned until min_new_tokens, so never emitted

    @torch.no_grad()
    def generate(prompts: list[list[int]], mode: str, new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=BEAM if mode == "beam" else 1,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=PAD_ID,
        )
        return out[:, ids.shape[1] :].tolist()

    return generate


def timed(generate: Generate, prompts: list[list[int]], mode: str, new_tokens: int) -> float:
    start = time.perf_counter()
    rows = generate(prompts, mode, new_tokens)
    elapsed = time.perf_counter() - start
    n = sum(len(r) for r in rows)
    if n != len(prompts) * new_tokens:
        raise RuntimeError(f"{mode}: {n} tokens, expected {len(prompts)} x {new_tokens}")
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--modes", nargs="+", default=["greedy", "beam"], choices=["greedy", "beam"])
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="3 rounds, 16 new tokens")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 3, 16
    device = pick_device(args.device)
    setup_threads()
    info = machine(device)
    cfg = ModelConfig()
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).to(device).eval()
    # bf16 only where the hardware has it: emulated, it is many times slower than fp32
    with_bf16 = hardware.bf16_native(device)
    variants = {n: v for n, v in VARIANTS.items() if with_bf16 or v[1] != "bf16"}
    precision = {name: p for name, (_, p) in variants.items()}
    peers: dict[str, Generate] = {name: build(model) for name, (build, _) in variants.items()}
    peers["hf"] = hf_generate(cfg, device)
    precision["hf"] = "fp32"
    if with_bf16:
        peers["hf bf16"] = autocast_bf16(peers["hf"], device)
        precision["hf bf16"] = "bf16"
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        for batch in args.batches:
            prompts = torch.randint(
                3, VOCAB, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)
            ).tolist()
            for gen in peers.values():  # warm-up: first-call allocations, lazy imports
                gen(prompts, mode, 4)
            print(f"\n[{mode} batch {batch}] prompt {args.prompt_len}, {args.new_tokens} new")
            results = interleaved(
                {
                    name: functools.partial(timed, gen, prompts, mode, args.new_tokens)
                    for name, gen in peers.items()
                },
                args.rounds,
            )
            for name, values in results.items():
                peer = PEERS.get(precision[name], "hf")
                rows.append(
                    {
                        "mode": mode if mode == "greedy" else f"beam {BEAM}",
                        "batch": batch,
                        "impl": name,
                        "precision": precision[name],
                        "new tokens/s": median(values),
                        "best": max(values),
                        "spread": spread(values),
                        "x hf": paired_ratio(values, results[peer]),
                        "against": peer,
                    }
                )
    goals = [
        {
            "check": f"{r['impl']} {r['mode']} batch 16 / hf",
            "measured": r["x hf"],
            "goal": GOAL_AT_BATCH_16,
            "met": "yes" if r["x hf"] >= GOAL_AT_BATCH_16 else "no",
        }
        for r in rows
        # at equal precision only: an int8 model has no HF peer here
        if r["batch"] == 16 and r["impl"] not in PEERS.values() and r["precision"] in PEERS
    ]
    write_results(
        "decode",
        "Decoding: lmops generate_greedy / generate_beam vs HF generate",
        info,
        {"Decoding throughput (median of interleaved rounds)": rows, "Goals": goals},
        extra={
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "vocab": VOCAB,
        },
        notes=[
            f"default model size, random weights; fp32, or bf16 autocast on both sides where "
            f"the CPU has native bf16 ('hf bf16'), or int8 weights through onnxruntime "
            f"(no HF peer: its 'x hf' is against fp32 and it has no goal row); "
            f"prompt {args.prompt_len} tokens, "
            f"exactly {args.new_tokens} new tokens per prompt on both sides",
            "new tokens/s = batch x new tokens / wall time of one generate call; "
            "best = the fastest round; x hf = median of the paired per-round ratios "
            "against the HF row named in 'against'",
        ],
    )


if __name__ == "__main__":
    main()
