"""Shared helpers of the benchmark scripts: machine description, interleaved timing, output.

Every comparison runs its cases side by side in one process, interleaved (A, B, A, B ...)
so that a noisy neighbour or thermal drift hits every case alike; each figure is the
median over the rounds. Results go to ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from lmops.core import hardware

# The benchmarks build throwaway workspaces with the test suite's helper (tests/support).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------- machine


def pick_device(name: str = "auto") -> torch.device:
    """cuda when there is one (or when asked), else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup_threads() -> int:
    """One torch thread per physical core: SMT siblings only contend for the FMA units."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on; the load average tells whether it was shared."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_capability": hardware.cpu_capability(),
        "cpu_bf16": hardware.cpu_native_bf16(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def matmul_peak(
    dtype: torch.dtype, device: torch.device, repeats: int = 5, n: int | None = None
) -> list[float]:
    """GFLOP/s of ``torch.matmul`` on large square matrices, one figure per repeat."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2
    for _ in range(2):
        torch.matmul(a, b, out=out)
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync(device)
        rates.append(2 * n**3 * inner / (time.perf_counter() - start) / 1e9)
    return rates


# ------------------------------------------------------------------- timing


def interleaved(
    cases: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] | None = print
) -> dict[str, list[float]]:
    """Run every case once per round, in turn (A, B, A, B ...); each returns one figure.

    The order is rotated each round so no case always follows the same neighbour.
    """
    names = list(cases)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            value = cases[name]()
            out[name].append(value)
            if log is not None:
                log(f"  round {r + 1}/{rounds} {name}: {value:,.1f}")
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i]: each ratio pairs two runs taken moments apart, so
    it holds up far better than a ratio of medians when other work shares the machine."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as a rough noise figure."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else 0.0


# ------------------------------------------------------------------- output


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    info: dict[str, Any],
    tables: dict[str, list[dict[str, Any]]],
    extra: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """``bench/results/<name>.json`` (everything) and ``<name>.md`` (the tables); prints the md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": info, "tables": tables, **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    parts = [f"# {title}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    for heading, rows in tables.items():
        parts += [f"## {heading}", "", markdown_table(rows), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(parts)
    (RESULTS / f"{name}.md").write_text(text)
    print("\n" + text)
    return RESULTS / f"{name}.md"
