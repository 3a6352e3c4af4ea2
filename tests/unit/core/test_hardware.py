"""What `auto` resolves to on each kind of hardware: precision, compile, processes, and the
facts every torch stage records. Each capability answer is forced both ways, so the
suite checks the rule on any machine; one test asks a process limited to AVX2 for real."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from lmops.config import TrainConfig
from lmops.core import hardware
from lmops.core.train import split_batch
from lmops.errors import LmopsError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Force the CPU's answer: ``cpu_bf16(True)`` is an AVX-512 BF16 / AMX CPU."""

    def force(native: bool) -> None:
        monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)

    hardware._warn_emulated.cache_clear()
    yield force
    hardware._warn_emulated.cache_clear()


@pytest.fixture
def cuda_bf16(monkeypatch):
    def force(native: bool) -> None:
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: native
        )

    return force


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_has_it(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert hardware.autocast_dtype("auto", CPU) is expected
    assert hardware.autocast_dtype("fp32", CPU) is None


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_cuda_asks_the_gpu(cuda_bf16, native, expected):
    cuda_bf16(native)
    assert hardware.autocast_dtype("auto", CUDA) is expected


def test_auto_elsewhere_is_fp32(cpu_bf16):
    cpu_bf16(True)
    assert hardware.autocast_dtype("auto", MPS) is None


def test_forced_bf16_on_an_emulating_cpu_warns_once_with_the_slowdown(cpu_bf16, caplog):
    cpu_bf16(False)
    with caplog.at_level(logging.WARNING, logger="lmops.core.hardware"):
        for _ in range(3):
            assert hardware.autocast_dtype("bf16", CPU, key="pretrain.precision") is (
                torch.bfloat16
            )
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("pretrain.precision: bf16 on a CPU without bf16 instructions")
    assert f"about {hardware.EMULATED_BF16_SLOWDOWN}x slower than fp32" in message


def test_forced_bf16_on_a_native_cpu_is_silent(cpu_bf16, caplog):
    cpu_bf16(True)
    with caplog.at_level(logging.WARNING, logger="lmops.core.hardware"):
        assert hardware.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert caplog.records == []


def test_a_process_limited_to_avx2_resolves_auto_to_fp32():
    """The real capability queries, in a process whose kernels are limited to AVX2 (what
    an AVX2-only CPU reports): no native bf16, so `auto` is fp32 and compile stays off."""
    code = (
        "import json, torch; from lmops.core import hardware as h; d = torch.device('cpu'); "
        "t = h.autocast_dtype('auto', d); print(json.dumps([h.cpu_capability(), "
        "h.cpu_native_bf16(), h.precision_name(t), h.compile_enabled('auto', d, t)]))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    capability, native, precision, compiled = json.loads(out.stdout)
    assert capability in ("AVX2", "DEFAULT")
    assert (native, precision, compiled) == (False, "fp32", False)


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        (CPU, torch.bfloat16, True),
        (CPU, None, False),
        (CUDA, None, True),
        (CUDA, torch.bfloat16, True),
        (MPS, None, False),
    ],
)
def test_compile_auto_is_on_where_it_pays(device, dtype, expected):
    assert hardware.compile_enabled("auto", device, dtype) is expected
    assert hardware.compile_enabled(True, device, dtype) is True
    assert hardware.compile_enabled(False, device, dtype) is False


def test_nproc_auto_is_one_per_gpu_and_one_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_nproc("auto", "auto") == 1
    assert hardware.resolve_nproc(3, "cpu") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert hardware.resolve_nproc("auto", "auto") == 8
    assert hardware.resolve_nproc("auto", "cuda") == 8
    assert hardware.resolve_nproc("auto", "cpu") == 1


def test_the_global_batch_is_shared_without_changing_it():
    cfg = TrainConfig(batch_size=16, grad_accum=4)
    for world in (1, 2, 4):  # whole micro-batches per process
        size, count = split_batch(cfg, world)
        assert (size, count * world) == (16, 4)
    size, count = split_batch(cfg, 8)  # then rows of each micro-batch
    assert (size, count) == (2, 4) and size * count * 8 == 64
    with pytest.raises(
        LmopsError,
        match=r"pretrain\.batch_size \(16\) x pretrain\.grad_accum "
        r"\(4\) rows cannot be shared evenly by 3 processes",
    ):
        split_batch(cfg, 3, "pretrain")


def test_facts_name_what_ran_where(cpu_bf16):
    cpu_bf16(False)
    facts = hardware.facts(CPU, None, compiled=False, world_size=2)
    assert facts["device"] == "cpu" and facts["precision"] == "fp32"
    assert facts["compile"] is False and facts["processes"] == 2
    assert facts["cpu_bf16"] is False
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["threads"] == torch.get_num_threads()
    assert facts["cpu"] == hardware.cpu_model() and facts["cpu"] != "unknown"
    assert (facts["gpu_count"], facts["gpu"]) == (hardware.gpus())
    assert hardware.facts(CPU, torch.bfloat16, True)["precision"] == "bf16"
