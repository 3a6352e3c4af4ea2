"""System metrics of a stage run: MLflow's monitor, sampling for real, through the run's buffer.

The outage half (samples kept in the spool while the server is away, sent with their
timestamps) is in tests/e2e/test_tracking_outage.py, against a real `mlflow server`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
import requests
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.tracking import MlflowClient

from lmops.errors import LmopsError, Stopped
from lmops.tracking import runs as tracking
from lmops.tracking import system
from lmops.tracking.buffer import RunBuffer

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"
POINTS = 3  # points each test waits for
THREAD = "lmops-system-metrics"


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_NODE_ID", raising=False)


def work_until(monitor: system.BufferedMonitor, points: int, timeout: float = 60) -> list:
    """Use CPU and memory until the monitor has logged ``points`` points."""
    held, deadline = [], time.monotonic() + timeout
    while monitor.published < points:
        assert time.monotonic() < deadline, f"{monitor.published} points in {timeout} s"
        held.append(bytearray(1 << 20))  # a MiB more each round, held to the end
        sum(i * i for i in range(20_000))
    return held


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def test_a_stage_run_logs_cpu_memory_and_disk_use_while_it_runs(mlflow_store, fast, capfd):
    client = MlflowClient()
    with tracking.stage_run("busy") as run:
        monitor = system.monitor_of(run.info.run_id)
        assert monitor is not None and monitor.sampling_interval == 0.1
        work_until(monitor, POINTS)
    assert system.monitor_of(run.info.run_id) is None
    assert THREAD not in {t.name for t in threading.enumerate()}  # stopped, not left behind

    got = client.get_run(run.info.run_id)
    keys = {k for k in got.data.metrics if k.startswith("system/")}
    assert {
        CPU,
        MEMORY,
        "system/system_memory_usage_percentage",
        "system/disk_usage_percentage",
        "system/disk_usage_megabytes",
        "system/disk_available_megabytes",
        "system/network_receive_megabytes",
        "system/network_transmit_megabytes",
    } <= keys
    gpu = any(isinstance(m, GPUMonitor) for m in monitor.monitors)
    assert any(k.startswith("system/gpu_0_") for k in keys) == gpu  # a GPU worker: its use too

    cpu, memory = history(client, run.info.run_id, CPU), history(client, run.info.run_id, MEMORY)
    assert len(cpu) >= POINTS
    # one point per step, none lost, all within the run, in order
    assert [m.step for m in cpu] == list(range(len(cpu))) == [m.step for m in memory]
    stamps = [m.timestamp for m in cpu]
    assert stamps == sorted(stamps)
    assert got.info.start_time <= stamps[0] and stamps[-1] <= got.info.end_time
    total_mb = psutil.virtual_memory().total / 1e6
    assert all(0 < m.value < total_mb for m in memory), [m.value for m in memory]
    assert all(0 <= m.value <= 100 * psutil.cpu_count() for m in cpu), [m.value for m in cpu]
    assert any(m.value > 0 for m in cpu)  # the work shows

    # the curves stay on the stage run; the pipeline run gets the stage's own metrics only
    parent = client.get_run(got.data.tags["mlflow.parentRunId"])
    assert "busy/wall_seconds" in parent.data.metrics
    assert not [k for k in parent.data.metrics if k.startswith("system/")]
    # nothing said about it, a GPU missing included (this machine may have none)
    err = capfd.readouterr().err
    assert "GPU" not in err and "system metrics" not in err.lower(), err


def test_a_stopped_stage_logs_its_last_partial_interval_before_its_run_ends(
    mlflow_store, fast, monkeypatch
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.4")
    client = MlflowClient()
    with pytest.raises(Stopped), tracking.stage_run("stopped") as run:
        monitor = system.monitor_of(run.info.run_id)
        work_until(monitor, 1)
        time.sleep(0.25)  # over half an interval: a point of its own when the stage stops
        stopped_ms = int(time.time() * 1000)
        raise Stopped(signal.SIGTERM)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "KILLED"
    assert THREAD not in {t.name for t in threading.enumerate()}
    cpu = history(client, run.info.run_id, CPU)
    assert len(cpu) == monitor.published >= 2
    assert stopped_ms <= cpu[-1].timestamp <= got.info.end_time


def test_mlflows_setting_turns_them_off(mlflow_store, fast, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with tracking.stage_run("quiet") as run:
        assert system.monitor_of(run.info.run_id) is None
        time.sleep(0.3)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert not [k for k in metrics if k.startswith("system/")]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0"),
        ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "soon"),
        ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "maybe"),
    ],
)
def test_a_bad_setting_is_named(fast, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    buffer = SimpleNamespace(run_id="r", uri="sqlite:///never-opened.db")  # refused before
    with pytest.raises(LmopsError, match=name):
        system.start(buffer)  # type: ignore[arg-type]


def test_a_gpu_machine_without_the_gpu_extra_is_told_once(
    mlflow_store, fast, monkeypatch, tmp_path, caplog
):
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)  # as without the gpu extra
    driver = tmp_path / "version"
    driver.write_text("NVRM version: 1\n")
    monkeypatch.setattr(system, "NVIDIA_DRIVER", driver)
    monkeypatch.setattr(system, "_told", set())
    buffer = SimpleNamespace(run_id="r", uri=mlflow_store)
    with caplog.at_level("INFO", logger="lmops.tracking.system"):
        for _ in range(2):
            system.BufferedMonitor(buffer)  # type: ignore[arg-type]
    told = [r.getMessage() for r in caplog.records if "GPU" in r.getMessage()]
    assert told == [
        "GPU use is not logged to MLflow: nvidia-ml-py is not installed (pip install -e '.[gpu]')"
    ]


class FlakyClient:
    """A tracking client whose server drops every third request."""

    def __init__(self):
        self.rows: list[tuple[str, int]] = []
        self.calls = 0
        self.lock = threading.Lock()

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        with self.lock:
            self.calls += 1
            if self.calls % 3 == 0:
                raise requests.exceptions.ConnectionError("Connection refused")
            self.rows += [(m.key, m.step) for m in metrics]


def test_the_buffer_takes_calls_from_two_threads_in_one_order(tmp_path):
    client = FlakyClient()
    uri = f"sqlite:///{tmp_path}/never-opened.db"  # the fake client stands in for it
    buffer = RunBuffer("run", client, tmp_path / "spool", uri, retry_seconds=0.0)
    steps = 150

    def log(key):
        for step in range(steps):
            buffer.log_metrics({key: float(step)}, step=step)

    threads = [threading.Thread(target=log, args=(key,)) for key in ("train", "system/cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert buffer.close(wait=5)
    for key in ("train", "system/cpu"):  # every step arrived, in the order it was logged
        got = [step for k, step in client.rows if k == key]
        assert sorted(set(got)) == list(range(steps)), key
        assert got == sorted(got), key
