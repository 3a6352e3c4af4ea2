"""The ``lmops`` command: small helpers around the pipeline.

    lmops params check [params.yaml]        validate a params file, name every bad key
    lmops params set-args params.gpu.yaml   print `-S key=value` args for `dvc exp run`
"""

from __future__ import annotations

import argparse
import shlex
import sys

import yaml

from lmops import config
from lmops.errors import LmopsError


def _params_check(args: argparse.Namespace) -> None:
    config.load_params(args.file)
    print(f"{args.file}: ok")


def _params_set_args(args: argparse.Namespace) -> None:
    overrides = config.load_profile(args.profile, args.base)
    del overrides  # validated as a whole; only the profile's own keys become -S args
    with open(args.profile, encoding="utf-8") as fh:
        print(shlex.join(config.dvc_set_args(yaml.safe_load(fh) or {})))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmops", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    params = sub.add_parser("params", help="check params files and profiles")
    psub = params.add_subparsers(dest="action", required=True)
    check = psub.add_parser("check", help="validate a params file")
    check.add_argument("file", nargs="?", default=config.DEFAULT_PARAMS)
    check.set_defaults(func=_params_check)
    set_args = psub.add_parser("set-args", help="a profile as `dvc exp run -S` arguments")
    set_args.add_argument("profile")
    set_args.add_argument("--base", default=config.DEFAULT_PARAMS)
    set_args.set_defaults(func=_params_set_args)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmopsError as err:
        print(f"lmops: error: {err}", file=sys.stderr)
        sys.exit(1)
