"""System metrics of a stage run: CPU, memory, disk, network and GPU use, in MLflow.

MLflow's own monitor (:mod:`mlflow.system_metrics`) takes the samples and names them
(``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``,
``system/gpu_0_utilization_percentage``, ...); the UI shows them on the run's "System
metrics" tab. MLflow's monitor sends through its own logger, straight to the server, and
stops at the first request the server does not answer; :class:`BufferedMonitor` hands
every sample, with its step and timestamp, to the stage's
:class:`~lmops.tracking.buffer.RunBuffer` instead, so a server lost mid-run costs no sample.

The settings are MLflow's: ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` (stage runs log them
unless it is ``false``), ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds between
samples, :data:`DEFAULT_INTERVAL`), ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``
(samples averaged into one logged point, 1) and ``MLFLOW_SYSTEM_METRICS_NODE_ID``
(``system/<node id>/...``). GPU use needs ``nvidia-ml-py`` (the ``gpu`` extra) or, for
AMD, ``pyrsmi``; without them the GPU monitor is left out.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.environment_variables import (
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
    MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING,
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL,
)
from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from lmops.errors import LmopsError
from lmops.tracking.buffer import RunBuffer, now_ms

log = logging.getLogger(__name__)

PREFIX = "system/"
DEFAULT_INTERVAL = 10.0  # seconds; MLflow's own default, and enough for a stage of minutes
STOP_WAIT = 60.0  # seconds a stopping stage waits for a sample being sent
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
_told: set[str] = set()  # hints given once per process


def is_system_metric(key: str) -> bool:
    return key.startswith(PREFIX)


def _setting(var: Any, default: Any) -> Any:
    try:
        value = var.get()
    except ValueError as err:
        raise LmopsError(f"{var.name}={var.get_raw()!r}: {err}") from None
    return default if value is None else value


def enabled() -> bool:
    """Whether stage runs log system metrics: MLflow's setting when it is set, else yes."""
    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined:
        return True
    return bool(_setting(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, True))


class BufferedMonitor(SystemMetricsMonitor):
    """MLflow's system-metrics monitor, publishing through a :class:`RunBuffer`.

    Every ``sampling_interval`` seconds its thread takes a sample (CPU use is the average
    since the sample before); every ``samples_before_logging`` samples it logs their
    average, steps 0, 1, 2, ... :meth:`finish` logs what the last, partial interval
    holds, when it lasted at least half an interval.
    """

    def __init__(self, buffer: RunBuffer, sampling_interval: float = DEFAULT_INTERVAL):
        interval = float(_setting(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, sampling_interval))
        samples = int(_setting(MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING, 1))
        if interval <= 0 or samples < 1:
            raise LmopsError(
                f"{MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.name}={interval:g} and "
                f"{MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING.name}={samples}: "
                "expected seconds > 0 and a count >= 1"
            )
        super().__init__(
            buffer.run_id,
            sampling_interval=interval,
            samples_before_logging=samples,
            tracking_uri=buffer.uri,
        )
        self.buffer = buffer
        self.published = 0  # points handed to the buffer
        self._changed = threading.Condition()
        self._samples = 0  # taken since the last point
        self._done = False  # the thread has ended
        self._last_sample = time.monotonic()

    # ------------------------------------------------------------ MLflow's hooks

    def _initialize_gpu_monitor(self) -> BaseMetricsMonitor | None:
        # MLflow's GPU monitors need their library, which MLflow imports when installed;
        # only then is there a GPU to ask about (MLflow's own fallback logs a line per run)
        for module, monitor in (("pynvml", GPUMonitor), ("pyrsmi", ROCMMonitor)):
            if module not in sys.modules:
                continue
            try:
                return monitor()
            except Exception as err:  # the library, but no GPU or driver here
                log.debug("no GPU metrics through %s: %s", module, err)
        if NVIDIA_DRIVER.exists() and "pynvml" not in sys.modules and "gpu" not in _told:
            _told.add("gpu")
            log.info(
                "GPU use is not logged to MLflow: nvidia-ml-py is not installed "
                "(pip install -e '.[gpu]')"
            )
        return None

    def start(self) -> None:
        self._process = threading.Thread(
            target=self.monitor, daemon=True, name="lmops-system-metrics"
        )
        self._process.start()

    def monitor(self) -> None:
        """The thread: sample, log, and on :meth:`finish` log the last partial interval."""
        import psutil

        psutil.cpu_percent()  # per thread: the first sample's CPU use starts here
        self._last_sample = time.monotonic()
        try:
            while not self._shutdown_event.wait(self.sampling_interval):
                self._sample()
                if self._samples >= self.samples_before_logging:
                    self.publish_metrics(self.aggregate_metrics())
            if time.monotonic() - self._last_sample >= self.sampling_interval / 2:
                self._sample()
            if self._samples:
                self.publish_metrics(self.aggregate_metrics())
        except Exception as err:  # a rejected entry, a failing sensor: the stage goes on
            log.warning("system metrics are no longer logged: %s: %s", type(err).__name__, err)
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        self.buffer.log_metrics(
            {prefix + k: v for k, v in metrics.items()},
            step=self._logging_step,
            timestamp=now_ms(),
        )
        self._logging_step += 1
        self._samples = 0
        for monitor in self.monitors:
            monitor.clear_metrics()
        with self._changed:
            self.published += 1
            self._changed.notify_all()

    def finish(self) -> None:
        """Stop sampling, once the last partial interval is logged (to the buffer)."""
        thread, self._process = self._process, None
        if thread is None:
            return
        self._shutdown_event.set()
        thread.join(STOP_WAIT)
        if thread.is_alive():
            log.warning("system metrics: the last sample was not logged within %g s", STOP_WAIT)

    # ---------------------------------------------------------------- helpers

    def _sample(self) -> None:
        self.collect_metrics()
        self._samples += 1
        self._last_sample = time.monotonic()

    def wait_for(self, points: int, timeout: float) -> bool:
        """Wait until ``points`` points were logged (False: the time ran out, or the
        monitor stopped first)."""
        with self._changed:
            self._changed.wait_for(lambda: self.published >= points or self._done, timeout)
            return self.published >= points


_running: dict[str, BufferedMonitor] = {}


def start(buffer: RunBuffer) -> BufferedMonitor | None:
    """Log the system metrics of ``buffer``'s run until :func:`stop`; None when they are off."""
    if not enabled():
        return None
    monitor = BufferedMonitor(buffer)
    monitor.start()
    _running[buffer.run_id] = monitor
    return monitor


def stop(monitor: BufferedMonitor | None) -> None:
    """Stop a monitor :func:`start` gave (again: nothing); its last sample is logged first."""
    if monitor is None:
        return
    _running.pop(monitor.buffer.run_id, None)
    monitor.finish()


def monitor_of(run_id: str) -> BufferedMonitor | None:
    """The monitor logging ``run_id``'s system metrics, while it runs."""
    return _running.get(run_id)
