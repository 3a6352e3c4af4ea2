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
import logging
import os
import sys
import traceback
from collections.abc import Callable

from lmops import tracking
from lmops.errors import LmopsError
from lmops.redact import redact


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="parameters file")
    return p


def _redacted_traceback(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    # a traceback may quote the tracking URI, user and password included, or a token
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def run(name: str, main: Callable[[argparse.Namespace], None],
        argp: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Parse arguments and run ``main``; a user error exits 1 with one readable message."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    sys.excepthook = _redacted_traceback
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    args = argp.parse_args(argv)
    try:
        with tracking.using_params_file(getattr(args, "params", None)):
            main(args)
    except LmopsError as err:
        print(f"lmops {name}: error: {redact(str(err))}", file=sys.stderr)
        sys.exit(1)
