"""What every ``stages/*.py`` script shares: argument parsing and a clean exit.

A stage script stays a few lines long::

    def main(args):
        params = load_params(args.params)
        with tracking.stage_run("vocab", flatten(params.vocab)):
            ...library call...

    if __name__ == "__main__":
        stage.run("vocab", main, stage.parser("Build the vocabulary").add_argument(...))
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

from lmops.config import ConfigError, load_params
from lmops.errors import (
    DiskFullError,
    LmopsError,
    OutOfMemoryError,
    Stopped,
    exit_like,
    stop_on_signals,
)
from lmops.io import disk_full_reason
from lmops.tracking import runs as tracking
from lmops.tracking.redact import redact


def parser(description: str, paths: type | None = None) -> argparse.ArgumentParser:
    """``--params``, and a required ``--<field>`` for each field of ``paths`` (a stage's
    :mod:`lmops.pipeline` ``Paths``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file")
    for f in dataclasses.fields(paths) if paths is not None else ():
        p.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, required=True, help=f.metadata["help"]
        )
    return p


def _redacted_traceback(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    # a traceback may quote the tracking URI, user and password included, or a token
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def run(
    name: str,
    main: Callable[[argparse.Namespace], None],
    argp: argparse.ArgumentParser,
    argv: list[str] | None = None,
    before: Callable[[str, str, list[str]], None] | None = None,
) -> None:
    """Parse arguments and run ``main``; a user error exits 1 with one readable message.

    A params file that fails the schema is recorded as a FAILED run of the stage too
    (``main`` reads it before it opens its run); a full disk is a user error like any other.
    SIGTERM and SIGHUP stop the stage as Ctrl-C does (its runs end as KILLED), then the
    process dies of that signal, so DVC records nothing and releases its lock.
    ``before(name, params_path, argv)`` runs first and may replace the process (training
    stages: :func:`lmops.orchestrate.estimate.training_stage_start`).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = _redacted_traceback
    stop_on_signals()
    # lmops says what it does; libraries only warn (the ONNX exporter alone would add some
    # 90 lines of INFO to quantise's output)
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(message)s")
    logging.getLogger("lmops").setLevel(logging.INFO)
    args = argp.parse_args(argv)
    params = getattr(args, "params", None)
    if before is not None and params is not None:
        before(name, params, sys.argv[1:] if argv is None else argv)
    try:
        with tracking.using_params_file(params):
            if params is not None:
                check_params(name, params)
            main(args)
    except LmopsError as err:
        fail(name, err)
    except Stopped as err:  # SIGTERM: the runs are ended as KILLED; die of the signal
        print(f"lmops {name}: {err}", file=sys.stderr)
        exit_like(err)
    except OSError as err:
        reason = disk_full_reason(err)
        if reason is None:
            raise
        fail(name, DiskFullError(err.filename or "an output", reason))
    except MemoryError as err:  # outside the loops that name the step and batch size
        fail(name, OutOfMemoryError(f"out of memory ({err or 'MemoryError'})"))


def fail(name: str, err: LmopsError) -> NoReturn:
    print(f"lmops {name}: error: {redact(str(err))}", file=sys.stderr)
    sys.exit(1)


def check_params(name: str, path: str) -> None:
    """Validate the params file; if it fails, record a FAILED ``name`` run with the error."""
    try:
        load_params(path)
    except ConfigError:
        with warnings.catch_warnings():  # the run would warn that it cannot log them either
            warnings.filterwarnings("ignore", "pipeline params not logged")
            with tracking.stage_run(name):
                raise
