"""The one exception family stage scripts turn into a clean, non-zero exit, and the
signals that stop a process (:class:`Stopped`)."""

import os
import signal
import sys
import threading
from typing import NoReturn


class LmopsError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""


class DataError(LmopsError):
    """Raw or intermediate data is missing, empty, binary, mis-encoded or misaligned."""


class QualityError(LmopsError):
    """A Great Expectations check failed; the message summarises which and where."""


class DiskFullError(LmopsError):
    """An output could not be written: no space left, file size or quota limit reached."""

    def __init__(self, path: object, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"disk full writing {path}: {reason}; free some space (or raise the "
            "quota or file size limit) and rerun"
        )

    def __reduce__(self) -> tuple:  # survives pickling (worker processes)
        return type(self), (self.path, self.reason)


class OutOfMemoryError(LmopsError):
    """A stage ran out of host or accelerator memory; the message says what to lower."""


class RequestError(LmopsError):
    """A translation request is over a bound or malformed; the message names the field
    and the limit. Nothing was decoded."""


class DeadlineExceeded(LmopsError):
    """Decoding went past its deadline and stopped."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal: SIGTERM (a ``kill``, a Prefect
    cancellation, Kubernetes, systemd, ``timeout``) or SIGHUP is handled as Ctrl-C is:
    a KeyboardInterrupt, so every ``finally`` runs and the MLflow runs end as KILLED."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    def __reduce__(self) -> tuple:
        return type(self), (self.signum,)


def stop_reason(err: BaseException) -> str:
    """What an interruption says in a run's ``lmops.error`` tag."""
    if isinstance(err, Stopped):
        return str(err)
    return "stopped by SIGINT (Ctrl-C)"


def stop_on_signals() -> None:
    """From now on SIGTERM and SIGHUP raise :class:`Stopped` in the main thread, as SIGINT
    raises KeyboardInterrupt. Call it in a program's main thread, before the work."""

    def handler(signum: int, frame: object) -> None:
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and gets the signals)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def exit_like(err: Stopped) -> NoReturn:
    """End the process as the signal would have (status 128 + n to a shell, -n to
    ``subprocess``), once cleanup is done: DVC then records nothing for the stage."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(err.signum, signal.SIG_DFL)
    os.kill(os.getpid(), err.signum)
    sys.exit(128 + err.signum)  # not reached where the default action ends the process
