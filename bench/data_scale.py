"""Data stages at scale: clean, validate, vocab and tokenise on synthetic corpora of growing size.

Run with: python bench/data_scale.py [--sizes 0.2 1 5] [--work DIR]

For each size (GB of raw text) it writes an English and a French text file of about half
that size each, built from the embedded Wikipedia summaries: every line joins two of
their sentences drawn at random (seeded), so de-duplication does not collapse the corpus
(over 500 million possible lines per language against about 10 million at 5 GB). The
embedded Bible stays the parallel source, so the held-out splits, the leak check and the
validation gate work as in the default pipeline. The four stages then run one after the
other as ``dvc.yaml`` runs them (each stage's ``cmd``, in a workspace of their own, with
MLflow in a sqlite file there), and for each the benchmark records:

- wall time, and MB/s: MB of raw text (both files and the Bible) / the stage's seconds;
- peak memory of the stage's whole process tree (worker processes included), sampled
  4 times a second: ``anon`` (anonymous memory, what the stage needs; the figure the goals
  use) and ``rss`` (which also counts pages of memory-mapped files such as Arrow caches:
  page cache the kernel can drop).

Before each size it checks the disk: the corpus, the ``datasets`` cache and the stage
outputs need about :data:`DISK_FACTOR` times the corpus; a size that does not fit is
reported as skipped, as is every size after a stage that ran over ``--max-memory-gb``
(stopped there, so the machine never reaches the out-of-memory killer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml
from common import machine, write_results

from lmops.data.sources import EMBEDDED, embedded_path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("clean", "validate", "vocab", "tokenise")
DISK_FACTOR = 6  # disk needed / corpus size: raw text, datasets cache, splits, tokens
SAMPLE_S = 0.25
SEED = 0
GOALS = {"memory_ratio": 1.5, "memory_gb": 4.0, "clean_mb_s": 5.0}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------ corpus


def sentences(lang: str) -> list[str]:
    """The embedded Wikipedia summaries of ``lang``, split into sentences of 20-400 chars."""
    spec = EMBEDDED[f"wiki_{lang}"]
    out: list[str] = []
    for text in spec.load(embedded_path(f"wiki_{lang}"))["text"]:
        for s in SENTENCE_END.split(text or ""):
            s = " ".join(s.split())
            if 20 <= len(s) <= 400:
                out.append(s)
    return out


def write_corpus(path: Path, pool: list[str], target_bytes: int, seed: int) -> int:
    """Lines of two random sentences of ``pool`` until ``target_bytes``; bytes written."""
    encoded = [s.encode("utf-8") for s in pool]
    rng = np.random.default_rng(seed)
    written = 0
    with path.open("wb") as f:
        while written < target_bytes:
            pairs = rng.integers(0, len(encoded), size=(100_000, 2))
            chunk = b"".join(encoded[a] + b" " + encoded[b] + b"\n" for a, b in pairs.tolist())
            if written + len(chunk) > target_bytes:  # the last chunk: up to the line that
                chunk = chunk[: chunk.index(b"\n", target_bytes - written) + 1]  # crosses it
            f.write(chunk)
            written += len(chunk)
    return written


def params_for(work: Path, texts: dict[str, Path]) -> Path:
    """The project's params.yaml with the two synthetic files as the monolingual sources."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    keep = [s for s in params["clean"]["sources"] if s.get("role") == "parallel"]
    mono = [
        {"name": f"synthetic_{lang}", "type": "text", "role": "monolingual", "lang": lang,
         "path": str(path)}
        for lang, path in texts.items()
    ]  # fmt: skip
    params["clean"]["sources"] = mono + keep
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ------------------------------------------------------------------ running


def stage_command(name: str) -> list[str]:
    """``dvc.yaml``'s command for the stage, run by this interpreter from the repository."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"]
    argv = shlex.split(cmd)
    if argv[0] != "python" or not argv[1].startswith("stages/"):
        raise SystemExit(f"dvc.yaml: stage {name} does not run 'python stages/...': {cmd}")
    return [sys.executable, str(ROOT / argv[1]), *argv[2:]]


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(anonymous, resident) bytes of ``root`` and all its descendants."""
    anon = rss = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:  # ended between the listing and the read
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        kb = {k: int(v.split()[0]) for k, v in fields.items() if v.strip().endswith("kB")}
        anon += 1024 * (kb.get("RssAnon", 0) + kb.get("RssShmem", 0))
        rss += 1024 * kb.get("VmRSS", 0)
    return anon, rss


def run_stage(name: str, work: Path, env: dict[str, str], max_memory: int) -> dict[str, Any]:
    """Run one stage to the end (or until it passes ``max_memory``); time and peak memory."""
    log = (work / f"{name}.log").open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen(stage_command(name), cwd=work, env=env, stdout=log, stderr=log)
    root = psutil.Process(proc.pid)
    peak_anon = peak_rss = 0
    stopped = False
    while proc.poll() is None:
        try:
            anon, rss = _tree_memory(root)
        except psutil.NoSuchProcess:
            anon = rss = 0
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        if anon > max_memory:
            for p in [*root.children(recursive=True), root]:
                p.kill()
            stopped = True
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - start
    log.close()
    if proc.returncode != 0 and not stopped:
        tail = (work / f"{name}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}):\n{tail}")
    return {
        "seconds": seconds,
        "peak_anon_gb": peak_anon / 2**30,
        "peak_rss_gb": peak_rss / 2**30,
        "stopped": stopped,
    }


def one_size(gb: float, work: Path, max_memory: int, pools: dict[str, list[str]]) -> list[dict]:
    work.mkdir(parents=True)
    texts = {lang: work / f"raw_{lang}.txt" for lang in pools}
    print(f"\n[{gb} GB] writing the corpus into {work}", flush=True)
    raw = sum(
        write_corpus(path, pools[lang], int(gb * 1e9 / len(pools)), SEED + i)
        for i, (lang, path) in enumerate(texts.items())
    )
    params_for(work, texts)
    # the Bible's bytes count too: the clean stage reads them
    raw += sum(len(t.encode("utf-8")) for t in _bible_texts())
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-cache"),
    }
    rows = []
    for name in STAGES:
        result = run_stage(name, work, env, max_memory)
        row = {
            "size GB": gb,
            "stage": name,
            "raw MB": raw / 1e6,
            "seconds": result["seconds"],
            "MB/s": raw / 1e6 / result["seconds"],
            "peak anon GB": result["peak_anon_gb"],
            "peak rss GB": result["peak_rss_gb"],
            "note": f"stopped: over {max_memory / 2**30:.1f} GB" if result["stopped"] else "",
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        if result["stopped"]:
            break
    return rows


def _bible_texts() -> list[str]:
    ds = EMBEDDED["bible_en_fr"].load(embedded_path("bible_en_fr"))
    return list(ds["en"]) + list(ds["fr"])


# ------------------------------------------------------------------ goals


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def goals(rows: list[dict[str, Any]], sizes: list[float]) -> list[dict[str, Any]]:
    done = {(r["size GB"], r["stage"]): r for r in rows if not r["note"]}
    small, big = min(sizes), max(sizes)
    out = []
    for name in STAGES:
        a, b = done.get((small, name)), done.get((big, name))
        ratio = b["peak anon GB"] / a["peak anon GB"] if a and b else None
        out.append(
            {
                "check": f"{name}: peak memory at {big} GB / at {small} GB",
                "measured": ratio if ratio is not None else "not measured",
                "goal": f"<= {GOALS['memory_ratio']}",
                "met": "n/a" if ratio is None else _yes(ratio <= GOALS["memory_ratio"]),
            }
        )
        peak = max((r["peak anon GB"] for r in rows if r["stage"] == name), default=None)
        over = any(r["stage"] == name and r["note"] for r in rows)
        out.append(
            {
                "check": f"{name}: peak memory, any size",
                "measured": "over the limit" if over else peak,
                "goal": f"< {GOALS['memory_gb']} GB",
                "met": "n/a" if peak is None else _yes(not over and peak < GOALS["memory_gb"]),
            }
        )
    per_mb = {
        gb: sum(done[(gb, n)]["seconds"] for n in STAGES) / done[(gb, STAGES[0])]["raw MB"]
        for gb in sizes
        if all((gb, n) in done for n in STAGES)
    }
    if small in per_mb and big in per_mb and big != small:
        ratio = per_mb[big] / per_mb[small]
        out.append(
            {
                "check": f"clean..tokenise seconds per MB at {big} GB / at {small} GB",
                "measured": ratio,
                "goal": "<= 1",
                "met": _yes(ratio <= 1),
            }
        )
    clean = [done[(gb, "clean")]["MB/s"] for gb in sizes if (gb, "clean") in done]
    out.append(
        {
            "check": "clean MB/s, slowest size (goal set for a 2-core AVX2 CPU)",
            "measured": min(clean) if clean else "not measured",
            "goal": f">= {GOALS['clean_mb_s']}",
            "met": _yes(min(clean) >= GOALS["clean_mb_s"]) if clean else "n/a",
        }
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[0.2, 1, 5, 30], help="GB of raw text")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where corpora and outputs go (default: a temporary dir)",
    )
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="stop a stage past this (default: 75%% of RAM)",
    )
    p.add_argument("--keep", action="store_true", help="keep each size's workspace")
    args = p.parse_args()
    total = psutil.virtual_memory().total
    max_memory = int(args.max_memory_gb * 2**30) if args.max_memory_gb else int(0.75 * total)
    info = machine(torch.device("cpu"))
    pools = {lang: sentences(lang) for lang in ("en", "fr")}
    base = Path(tempfile.mkdtemp(prefix="lmops-data-scale-", dir=args.work))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    over = False
    try:
        for gb in sorted(args.sizes):
            free = shutil.disk_usage(base).free
            need = DISK_FACTOR * gb * 1e9
            if over or need > free:
                why = (
                    "an earlier size ran out of memory"
                    if over
                    else (f"disk: needs about {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free")
                )
                skipped.append({"size GB": gb, "skipped": why})
                print(f"[{gb} GB] skipped: {why}", flush=True)
                continue
            work = base / f"{gb:g}GB"
            size_rows = one_size(gb, work, max_memory, pools)
            rows += size_rows
            over = any(r["note"] for r in size_rows)
            if not args.keep:
                shutil.rmtree(work)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    measured = sorted({r["size GB"] for r in rows})
    tables = {"Stages": rows, "Goals": goals(rows, measured)}
    if skipped:
        tables["Skipped"] = skipped
    write_results(
        "data_scale",
        "Data stages at scale: clean, validate, vocab, tokenise",
        info,
        tables,
        extra={"max_memory_gb": max_memory / 2**30, "disk_factor": DISK_FACTOR, "seed": SEED},
        notes=[
            "synthetic English and French text (two random sentences of the embedded "
            "Wikipedia summaries a line, seeded) plus the embedded Bible as the parallel "
            "source; params.yaml otherwise",
            "MB/s = MB of raw text / the stage's wall time, for every stage",
            "peak anon = anonymous memory of the stage's process tree (workers included), "
            f"sampled every {SAMPLE_S} s; peak rss also counts memory-mapped file pages",
        ],
    )


if __name__ == "__main__":
    main()
