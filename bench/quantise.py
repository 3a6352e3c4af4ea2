"""Distil and quantise goals: student size and BLEU, int8 file size, speed and BLEU.

Run with: python bench/quantise.py [--quick]   (after `dvc repro quantise` for the BLEU goals)

Speed and size are measured here, the fp32 student against its int8 variant (the ONNX
export quantised by onnxruntime, embedding read from the output head's int8 matrix),
interleaved round by round, greedy decoding of exactly ``--new-tokens`` tokens per prompt
(eos is an id the model never emits, as in decode.py) at batch 1 and 16, fp32 activations.
The student is the pipeline's (``data/models/distil``) when there is one, else a
random-weight student of the ``distil.model`` size in params.yaml (speed and size do not
depend on the weights).
BLEU figures come from the pipeline's metrics (``data/metrics/distil.json``,
``data/metrics/quantise.json``): beam search over the test set is the stage's job.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import interleaved, machine, median, paired_ratio, setup_threads, spread, write_results

from lmops.config import load_params
from lmops.core import quantised
from lmops.core.model import Transformer
from lmops.core.translation import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
GOALS = {
    "param_ratio": 1 / 3,
    "bleu_retained": 0.90,
    "size_ratio": 0.30,
    "speedup": 1.8,
    "bleu_delta": 0.5,
}
PAD_ID = 0


def student_model(path: Path, params_file: Path) -> tuple[Transformer, str]:
    if (path / "config.json").is_file():
        where = path.resolve()
        return load_model(path)[0], str(
            where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        )
    params = load_params(params_file)
    meta = ROOT / "data/vocab/meta.json"
    vocab = json.loads(meta.read_text())["vocab_size"] if meta.is_file() else 8000
    torch.manual_seed(0)
    return (
        Transformer(params.distil.model, vocab).eval(),
        f"random weights, distil.model of {params_file.name}, vocab {vocab}",
    )


def timed(model: torch.nn.Module, prompts: list[list[int]], batch: int, new_tokens: int) -> float:
    """new tokens/s of greedy decoding of every prompt, ``batch`` at a time."""
    never = model.vocab_size  # an id the model cannot emit: every row runs to the end
    start = time.perf_counter()
    n = 0
    for lo in range(0, len(prompts), batch):
        out = model.generate_greedy(prompts[lo : lo + batch], new_tokens, never, PAD_ID)
        n += sum(len(r) for r in out)
    elapsed = time.perf_counter() - start
    if n != len(prompts) * new_tokens:
        raise RuntimeError(f"{n} tokens, expected {len(prompts)} x {new_tokens}")
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, default=ROOT / "data/models/distil")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--distil-metrics", type=Path, default=ROOT / "data/metrics/distil.json")
    p.add_argument("--quantise-metrics", type=Path, default=ROOT / "data/metrics/quantise.json")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sentences", type=int, default=32, help="prompts per timing")
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/onnxruntime threads (0: one per physical core)",
    )
    p.add_argument("--quick", action="store_true", help="3 rounds, 16 sentences")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.sentences = 3, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        setup_threads()
    info = machine(torch.device("cpu"))
    student, source = student_model(args.student, args.params)
    print(f"student: {source}, {student.num_params():,} parameters")

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            "fp32": save_model(student, Path(tmp) / "fp32"),
            "onnx int8": quantised.export_onnx(student, Path(tmp) / "onnx"),
        }
        sizes = {name: quantised.file_bytes(d) for name, d in dirs.items()}
        models = {
            "fp32": student,
            **{
                name: quantised.load_quantised(d, torch.get_num_threads())
                for name, d in dirs.items()
                if name != "fp32"
            },
        }
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        7, student.vocab_size, (args.sentences, args.prompt_len), generator=g
    ).tolist()
    rows: list[dict[str, Any]] = []
    speedups: dict[str, dict[int, float]] = {}
    for batch in args.batches:
        for model in models.values():  # warm-up: first-call allocations, lazy imports
            timed(model, prompts[:batch], batch, 4)
        print(
            f"\n[greedy batch {batch}] {args.sentences} prompts of {args.prompt_len}, "
            f"{args.new_tokens} new tokens each"
        )
        with torch.inference_mode():
            results = interleaved(
                {
                    name: functools.partial(timed, m, prompts, batch, args.new_tokens)
                    for name, m in models.items()
                },
                args.rounds,
            )
        for name, values in results.items():
            rate = median(values)
            ratio = paired_ratio(values, results["fp32"])
            speedups.setdefault(name, {})[batch] = ratio
            rows.append(
                {
                    "batch": batch,
                    "variant": name,
                    "new tokens/s": rate,
                    "best": max(values),
                    "ms per sentence": 1000 * args.new_tokens / rate,
                    "ms per batch": 1000 * args.new_tokens * batch / rate,
                    "spread": spread(values),
                    "x fp32": ratio,
                }
            )
    size_rows = [
        {"variant": name, "file MB": b / 2**20, "x fp32": b / sizes["fp32"]}
        for name, b in sizes.items()
    ]

    goals: list[dict[str, Any]] = []

    def goal(check: str, measured: float | None, target: float, higher: bool) -> None:
        met = None if measured is None else (measured >= target if higher else measured <= target)
        goals.append(
            {
                "check": check,
                "measured": "n/a" if measured is None else measured,
                "goal": f"{'>=' if higher else '<='} {target:.3g}",
                "met": {None: "not measured", True: "yes", False: "no"}[met],
            }
        )

    dis = json.loads(args.distil_metrics.read_text()) if args.distil_metrics.is_file() else {}
    qua = json.loads(args.quantise_metrics.read_text()) if args.quantise_metrics.is_file() else {}
    goal("student params / teacher params", dis.get("param_ratio"), GOALS["param_ratio"], False)
    goal("student BLEU / teacher BLEU", dis.get("bleu_retained"), GOALS["bleu_retained"], True)
    goal(
        "onnx int8 file / fp32 file", sizes["onnx int8"] / sizes["fp32"], GOALS["size_ratio"], False
    )
    for batch in args.batches:
        goal(
            f"onnx int8 greedy speed-up at batch {batch}",
            speedups["onnx int8"][batch],
            GOALS["speedup"],
            True,
        )
    shipped = qua.get("shipped")
    delta = qua.get("shipped_bleu_delta")
    goal(
        f"|BLEU({shipped or 'int8'}) - BLEU(fp32 student)|",
        None if delta is None else abs(delta),
        GOALS["bleu_delta"],
        False,
    )
    quality = [
        {
            "variant": k.replace("_", " "),
            "bleu": v.get("bleu"),
            "chrf": v.get("chrf"),
            "params": v.get("num_params"),
            "file MB": v.get("file_mb"),
        }
        for k, v in qua.items()
        if isinstance(v, dict)
    ]
    tables = {
        "Greedy decoding speed (median of interleaved rounds)": rows,
        "File size": size_rows,
        "Goals": goals,
    }
    if quality:
        tables["Pipeline comparison (data/metrics/quantise.json)"] = quality
    write_results(
        "quantise",
        "Distil and quantise: student and its int8 variant",
        info,
        tables,
        extra={
            "student": source,
            "rounds": args.rounds,
            "sentences": args.sentences,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
        },
        notes=[
            f"student: {source}; fp32 activations for every variant",
            "ms per sentence = wall time / sentences; ms per batch = the latency of one "
            "batch; best = the fastest round; x fp32 = median of the paired per-round "
            "ratios",
            "BLEU goals read the pipeline's metrics; 'not measured' means no pipeline run "
            "(dvc repro quantise) in this checkout",
        ],
    )


if __name__ == "__main__":
    main()
