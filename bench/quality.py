"""Translation quality against a same-budget peer: lmops' translator vs a MarianMT model
trained from scratch for the same time on the same pairs.

Run with: python bench/quality.py [--root WORKSPACE ...]   (after ``dvc repro evaluate``)

Each ``--root`` is a workspace the pipeline has run to ``evaluate`` (the defaults: this
checkout; a second one, at another budget, shows how each side scales with compute, for
example a copy run with ``params.fast.yaml``). For each it reads lmops' side from the
workspace's metrics: test BLEU and chrF (``data/metrics/evaluate.json``), the parameter
count, and the budget, the wall seconds of ``pretrain`` plus ``finetune``
(``data/metrics/{pretrain,finetune}.json``) on this machine's threads.

The peer is Hugging Face ``MarianMTModel`` built from a config, no pretrained weights:
``d_model`` and heads of the teacher, half its layers in the encoder and half in the
decoder, and the feed-forward width that brings its parameter count to the teacher's
(:func:`peer_config`). It uses the workspace's SentencePiece vocabulary and its training
pairs (``data/tokens/parallel_train.parquet``, the same ids lmops fine-tunes on), and
trains with a plain AdamW loop at the usual settings for a Transformer trained from
scratch (:data:`PEER_RECIPE`) for the same wall time on the same number of threads,
timed from its first step, so its start-up is free. It is scored like lmops: beam search
with ``evaluate.decode``'s beam size, length penalty, no-repeat n-gram size and
``max_new_tokens`` on ``data/tokens/parallel_test.parquet``, and
:func:`lmops.pipeline.evaluate.bleu_chrf` (sacreBLEU defaults).

Writes ``results/quality.{json,md}``; ``--name`` and ``--title`` label another budget's
results, as for the fast profile's pair::

    python bench/quality.py --root WS_FAST --name quality_fast \
        --title "Translation quality at the fast profile's budget (params.fast.yaml)"
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from common import machine, setup_threads, write_results

from lmops.config import load_params
from lmops.core.translation import max_source_tokens, read_pairs
from lmops.core.vocab import Tokenizer
from lmops.pipeline.evaluate import bleu_chrf

ROOT = Path(__file__).resolve().parent.parent
GOAL_RATIO = 1.1
GOAL_BLEU = 15.0
TITLE = "Translation quality: lmops vs a MarianMT peer trained for the same time"
# AdamW as in the Transformer base recipe (betas, eps), lr for a small model trained from
# scratch, linear warm-up over the first share of the time budget then linear decay to 0,
# label smoothing 0.1 and MarianConfig's own dropout (0.1)
PEER_RECIPE = {
    "lr": 5e-4,
    "betas": (0.9, 0.98),
    "eps": 1e-9,
    "weight_decay": 0.01,
    "warmup_share": 0.05,
    "label_smoothing": 0.1,
    "grad_clip": 1.0,
}


# ------------------------------------------------------------------ the peer


def _marian(vocab_size: int, pad: int, eos: int, d_model: int, heads: int, layers: int, ffn: int):
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=256,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,  # Marian's convention
        forced_eos_token_id=eos,
    )
    return MarianMTModel(cfg)


def peer_config(model_cfg: dict[str, Any], target_params: int, tok: Tokenizer) -> dict[str, Any]:
    """Sizes for the peer: the teacher's width and heads, its layers split between encoder
    and decoder, and the feed-forward width (a multiple of 64) closest to its parameters."""
    base = {
        "vocab_size": tok.vocab_size,
        "pad": tok.pad_id,
        "eos": tok.eos_id,
        "d_model": model_cfg["n_embd"],
        "heads": model_cfg["n_head"],
        "layers": max(1, model_cfg["n_layer"] // 2),
    }

    def count(ffn: int) -> int:
        return _marian(**base, ffn=ffn).num_parameters()

    # parameters grow linearly with the feed-forward width: two counts give the line
    a, b = count(64), count(128)
    ffn = max(64, 64 * round((64 + (target_params - a) * 64 / (b - a)) / 64))
    return {**base, "ffn": ffn, "params": count(ffn)}


def length_batches(pairs: pd.DataFrame, batch_size: int, rng: np.random.Generator):
    """Endless batches of row indices, shuffled each epoch, sorted by length 50 batches'
    worth at a time (as lmops' fine-tuning batches are): less padding on both sides."""
    lengths = np.array([len(s) + len(t) for s, t in zip(pairs["src"], pairs["tgt"], strict=True)])
    pool = 50 * batch_size
    while True:
        order = rng.permutation(len(pairs))
        batches = []
        for lo in range(0, len(order), pool):
            chunk = order[lo : lo + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for i in rng.permutation(len(batches)):
            yield batches[i]


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def encode_pairs(pairs: pd.DataFrame, tok: Tokenizer, block_size: int) -> pd.DataFrame:
    """Source and target ids with eos, cut to lmops' limits: sources as in its prompts,
    targets to the rest of its context."""
    src_max = max_source_tokens(block_size)
    tgt_max = block_size - src_max - 2
    return pd.DataFrame(
        {
            "src": [list(s[:src_max]) + [tok.eos_id] for s in pairs["src_ids"]],
            "tgt": [list(t[:tgt_max]) + [tok.eos_id] for t in pairs["tgt_ids"]],
        }
    )


def train_peer(
    model: Any, pairs: pd.DataFrame, batch_size: int, seconds: float, pad: int, seed: int
) -> dict[str, Any]:
    """Train for ``seconds`` of wall time (from the first step); steps and final loss."""
    r = PEER_RECIPE
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=r["lr"],
        betas=r["betas"],
        eps=r["eps"],
        weight_decay=r["weight_decay"],
    )
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=r["label_smoothing"])
    batches = length_batches(pairs, batch_size, np.random.default_rng(seed))
    model.train()
    start = time.perf_counter()
    step, loss_value = 0, math.nan
    while (elapsed := time.perf_counter() - start) < seconds:
        # the schedule runs on the clock: warm-up over the first share of the budget, then
        # linear decay to 0 at its end, whatever the steps turn out to cost
        done = elapsed / seconds
        warm = r["warmup_share"]
        scale = min(done / warm, (1 - done) / (1 - warm))
        for group in opt.param_groups:
            group["lr"] = r["lr"] * max(scale, 0.0)
        idx = next(batches)
        src = _pad([pairs["src"][i] for i in idx], pad)
        labels = _pad([pairs["tgt"][i] for i in idx], pad)
        labels[labels == pad] = -100
        out = model(input_ids=src, attention_mask=src != pad, labels=labels)
        loss = loss_fn(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        loss_value = loss.detach().item()
        step += 1
        if step % 100 == 0:
            print(
                f"  peer step {step} loss {loss_value:.3f} "
                f"{time.perf_counter() - start:.0f}/{seconds:.0f} s",
                flush=True,
            )
    return {"steps": step, "final_loss": loss_value, "seconds": time.perf_counter() - start}


@torch.inference_mode()
def translate_peer(model: Any, tok: Tokenizer, sources: list[list[int]], decode: Any) -> list[str]:
    """Beam search with lmops' decoding settings, shortest sources first in batches."""
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hyps: list[str] = [""] * len(sources)
    for lo in range(0, len(order), decode.batch_size):
        idx = order[lo : lo + decode.batch_size]
        src = _pad([sources[i] for i in idx], tok.pad_id)
        out = model.generate(
            input_ids=src,
            attention_mask=src != tok.pad_id,
            num_beams=decode.beam_size,
            length_penalty=decode.length_penalty,
            no_repeat_ngram_size=decode.no_repeat_ngram_size,
            max_new_tokens=decode.max_new_tokens,
            do_sample=False,
        )
        for i, text in zip(idx, tok.decode(out.tolist()), strict=True):
            hyps[i] = text
    return hyps


# ------------------------------------------------------------------ one workspace


def _metrics(root: Path, stage: str) -> dict[str, Any]:
    path = root / "data" / "metrics" / f"{stage}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `dvc repro evaluate` in {root} first")
    return json.loads(path.read_text())


def one_workspace(root: Path, seed: int) -> dict[str, Any]:
    params = load_params(root / "params.yaml")
    tok = Tokenizer.load(root / "data" / "vocab")
    pre, fine, ev = (_metrics(root, s) for s in ("pretrain", "finetune", "evaluate"))
    budget = float(pre["wall_seconds"]) + float(fine["wall_seconds"])
    model_cfg = json.loads((root / "data" / "models" / "finetune" / "config.json").read_text())
    sizes = peer_config(model_cfg["model"], int(ev["num_params"]), tok)
    print(f"\n[{root}] budget {budget:.0f} s; peer {sizes}", flush=True)
    block = int(model_cfg["model"]["block_size"])
    train = encode_pairs(
        read_pairs(root / "data" / "tokens" / "parallel_train.parquet"), tok, block
    )
    test = read_pairs(root / "data" / "tokens" / "parallel_test.parquet")
    decode = params.evaluate.decode
    if params.evaluate.max_test_pairs is not None:
        test = test.iloc[: params.evaluate.max_test_pairs]
    model = _marian(**{k: v for k, v in sizes.items() if k != "params"})
    trained = train_peer(model, train, params.finetune.batch_size, budget, tok.pad_id, seed)
    start = time.perf_counter()
    sources = encode_pairs(test, tok, block)["src"].tolist()
    hyps = translate_peer(model, tok, sources, decode)
    decode_s = time.perf_counter() - start
    peer = bleu_chrf(hyps, list(test["tgt"]))
    threads = torch.get_num_threads()
    lmops_row = {
        "workspace": root.name,
        "model": "lmops (decoder-only, pretrain + finetune)",
        "params": int(ev["num_params"]),
        "train minutes": budget / 60,
        "threads": threads,
        "BLEU": float(ev["bleu"]),
        "chrF": float(ev["chrf"]),
    }
    peer_row = {
        "workspace": root.name,
        "model": f"MarianMT {sizes['layers']}+{sizes['layers']} layers, ffn {sizes['ffn']}",
        "params": sizes["params"],
        "train minutes": trained["seconds"] / 60,
        "threads": threads,
        "BLEU": peer["bleu"],
        "chrF": peer["chrf"],
        "steps": trained["steps"],
        "decode seconds": decode_s,
    }
    return {
        "rows": [lmops_row, peer_row],
        "samples": list(zip(test["src"][:5], hyps[:5], strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root", type=Path, nargs="+", default=[ROOT], help="workspaces after dvc repro evaluate"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="quality", help="writes results/NAME.{json,md}")
    ap.add_argument("--title", default=TITLE, help="the report's heading")
    args = ap.parse_args()
    setup_threads()
    info = machine(torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    samples = {}
    for root in args.root:
        found = one_workspace(root.resolve(), args.seed)
        rows += found["rows"]
        samples[str(root)] = found["samples"]
    goals = []
    for i in range(0, len(rows), 2):
        ours, peer = rows[i], rows[i + 1]
        ratio = ours["BLEU"] / peer["BLEU"] if peer["BLEU"] > 0 else None
        goals.append(
            {
                "check": f"{ours['workspace']}: lmops BLEU / peer BLEU at equal time",
                "measured": "peer BLEU 0" if ratio is None else ratio,
                "goal": f">= {GOAL_RATIO}",
                "met": "n/a" if ratio is None else ("yes" if ratio >= GOAL_RATIO else "no"),
            }
        )
    goals.append(
        {
            "check": f"{rows[0]['workspace']}: lmops test BLEU (the goal at the default params)",
            "measured": rows[0]["BLEU"],
            "goal": f">= {GOAL_BLEU}",
            "met": "yes" if rows[0]["BLEU"] >= GOAL_BLEU else "no",
        }
    )
    write_results(
        args.name,
        args.title,
        info,
        {"Side by side": rows, "Goals": goals},
        extra={"peer_recipe": PEER_RECIPE, "samples": samples},
        notes=[
            "train minutes: lmops = wall time of pretrain + finetune from the workspace's "
            "metrics (its validation passes included); the peer trains for that long on the "
            "same threads, from its first step: run it on the machine, and as quiet a one, "
            "as the workspace's pipeline ran on",
            "both scored on the workspace's test pairs with evaluate.decode's beam size, "
            "length penalty, no-repeat n-gram size and max_new_tokens, sacreBLEU defaults",
            "peer: MarianMTModel from a config (no pretrained weights), the teacher's width "
            "and heads, its layers split between encoder and decoder, the feed-forward width "
            "matching its parameters; AdamW " + json.dumps(PEER_RECIPE),
        ],
    )


if __name__ == "__main__":
    main()
