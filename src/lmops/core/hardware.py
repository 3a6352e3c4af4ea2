"""What this machine can run fast, and the one place that turns ``auto`` into a choice.

bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA GPUs that report
it, x86 CPUs with AVX-512 BF16 or AMX, Arm CPUs with the BF16 extension. On an x86 CPU
with AVX2 alone, torch emulates bf16 matmuls at about 1/80 of the fp32 speed, so a stage
that picked bf16 by device type alone ran for hours instead of minutes there. Hence
``precision: auto`` asks the hardware (:func:`cpu_native_bf16`), and a forced ``bf16``
on such a CPU warns once with the expected slowdown.

:func:`facts` says what ran where (device, resolved precision, compile, CPU model and
capability, threads, GPUs); every torch stage records it in its metrics and MLflow run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lmops.config import ConfigError, TrainConfig, load_params
from lmops.errors import LmopsError, OutOfMemoryError

log = logging.getLogger(__name__)

# A forced bf16 on a CPU without bf16 instructions: the slowdown the warning names
# (a 2048x1024 by 1024x1024 matmul, 50 GFLOP/s fp32 against 0.6 bf16, AVX2 EPYC).
EMULATED_BF16_SLOWDOWN = 80


def cpu_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls in hardware (not emulated).

    oneDNN's own answer (``_is_mkldnn_bf16_supported``, which also honours
    ``ONEDNN_MAX_CPU_ISA``) and, on x86, the instructions themselves: AVX-512 BF16 or AMX.
    oneDNN says yes on any AVX-512 CPU, where bf16 is converted in software.
    """
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return True


def cpu_capability() -> str:
    """torch's vector ISA for its own kernels: ``AVX512``, ``AVX2``, ``DEFAULT``, ..."""
    return str(torch.backends.cpu.get_cpu_capability())


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name, or the architecture where the OS does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_device(name: str = "auto", local_rank: int = 0, key: str = "device") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LmopsError(f"{key}: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmopsError(f"{key}: 'mps' requested but MPS is not available")
    return torch.device(name)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


@functools.cache
def _warn_emulated(key: str, capability: str) -> None:
    log.warning(
        "%s: bf16 on a CPU without bf16 instructions (%s): torch emulates it, "
        "about %dx slower than fp32; set %s: auto (or fp32) to train at fp32 speed",
        key,
        capability,
        EMULATED_BF16_SLOWDOWN,
        key,
    )


def autocast_dtype(
    precision: str, device: torch.device, key: str = "precision"
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 where :func:`bf16_native` says so, else fp32. A forced ``bf16`` is
    honoured everywhere, with one warning on a CPU that would emulate it.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if bf16_native(device) else None
    if device.type == "cpu" and not cpu_native_bf16():
        _warn_emulated(key, cpu_capability())
    return torch.bfloat16


def compile_enabled(setting: bool | str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """``compile: auto`` compiles where it was measured to pay: on CUDA, and on a CPU that
    trains in bf16 (AVX-512 BF16: 10% faster steps after a compile of 20-40 s). On a CPU in
    fp32 it does not: 16% slower steps on an AVX2-only CPU, and on an AVX-512 CPU the
    compiled fp32 step crashed inside inductor's generated code (torch 2.13)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or (device.type == "cpu" and dtype is not None)


def resolve_nproc(nproc: int | str, device: str = "auto") -> int:
    """``nproc: auto`` is one process per visible CUDA device when training on cuda, else 1
    (on a CPU, several processes only share the same cores)."""
    if nproc != "auto":
        return int(nproc)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def precision_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat", "bf")


def gpus() -> tuple[int, str]:
    """Visible CUDA devices: their count and the first one's name ('' without any)."""
    if not torch.cuda.is_available():
        return 0, ""
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def facts(
    device: torch.device, dtype: torch.dtype | None, compiled: bool, world_size: int = 1
) -> dict[str, Any]:
    """What ran where: the block every torch stage writes as ``hardware`` in its metrics."""
    gpu_count, gpu_name = gpus()
    return {
        "device": device.type,
        "precision": precision_name(dtype),
        "compile": compiled,
        "processes": world_size,
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16": cpu_native_bf16(),
        "threads": torch.get_num_threads(),
        "cpu_count": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1,
        "gpu": gpu_name,
        "gpu_count": gpu_count,
    }


def relaunch_data_parallel(name: str, params_path: str, argv: list[str]) -> None:
    """Replace this process by ``torchrun`` over N copies of it when ``<name>.nproc`` asks
    for N > 1 (``auto``: one per GPU), so ``dvc repro`` uses every GPU of a worker."""
    if "WORLD_SIZE" in os.environ:  # already one of torchrun's processes
        return
    try:
        section = getattr(load_params(params_path), name, None)
    except ConfigError:
        return  # check_params reports it, with a FAILED run
    if not isinstance(section, TrainConfig):
        return
    n = resolve_nproc(section.nproc, section.device)
    if n <= 1:
        return
    log.info("%s.nproc=%s: %d data-parallel processes (torchrun)", name, section.nproc, n)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: DVC, Prefect and a kill see one process, torchrun forwards signals
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            sys.argv[0],
            *argv,
        ],
    )


# torch's CPU allocator raises a plain RuntimeError; CUDA's, torch.OutOfMemoryError
_CPU_OOM = "can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """True for a failed allocation: Python's MemoryError, or torch's on a CPU or a GPU."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and _CPU_OOM in str(err)


@contextlib.contextmanager
def memory_errors(device: torch.device, describe: Callable[[], tuple[str, str]]) -> Iterator[None]:
    """Turn a failed allocation inside the block into the one-line error of a stage that ran
    out of memory. ``describe()``, called only then, gives where it happened and what to
    lower: ``"pretrain: training step 5 with batch_size 32"``, ``"pretrain.batch_size"``."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        where, lower = describe()
        kind = "GPU" if device.type == "cuda" else "host"
        raise OutOfMemoryError(
            f"{where}: out of {kind} memory on {device} ({type(err).__name__}); lower {lower}"
        ) from None
