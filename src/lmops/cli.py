"""The ``lmops`` command: small helpers around the pipeline.

lmops params check [params.yaml]        validate a params file, name every bad key
lmops params set-args params.gpu.yaml   print `-S key=value` args for `dvc exp run`
lmops translate "Hello." ...            translate sentences (args, or stdin lines)
    --input in.txt --output out.txt     a file, line for line, in constant memory
    --model data/models/finetune --vocab data/vocab      a local model directory
    --model-uri models:/lmops-translator@champion        or a logged MLflow model
lmops estimate [--target STAGE]         how long `dvc repro` will take on this machine
    --profile params.fast.yaml          ... or `dvc exp run` with a profile
lmops compare [RUN_ID ...] [--last N]   pipeline runs side by side (params, metrics)
lmops tracking sync [SPOOL_FILE ...]    upload what stages kept in mlruns/spool/ while
                                        the tracking server was away
lmops runs reconcile                    end the RUNNING runs whose process is gone
    --other-hosts-after HOURS           ... and those of other hosts older than that
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import BinaryIO

import yaml

from lmops import config
from lmops.errors import LmopsError, Stopped, exit_like, stop_on_signals
from lmops.tracking.redact import redact


def _params_check(args: argparse.Namespace) -> None:
    config.load_params(args.file)
    print(f"{args.file}: ok")


def _params_set_args(args: argparse.Namespace) -> None:
    overrides = config.load_profile(args.profile, args.base)
    del overrides  # validated as a whole; only the profile's own keys become -S args
    with open(args.profile, encoding="utf-8") as fh:
        print(shlex.join(config.dvc_set_args(yaml.safe_load(fh) or {})))


def _translator(args: argparse.Namespace):  # -> serving.Translator
    from lmops.tracking import serving

    if (args.model is None) == (args.model_uri is None):
        raise LmopsError("give either --model DIR (with --vocab DIR) or --model-uri URI")
    if args.model_uri is not None:
        return serving.pyfunc_translator(serving.load_translator(args.model_uri))
    if args.vocab is None:
        raise LmopsError("--model needs --vocab (the vocab stage's directory, data/vocab)")
    decode = limits = None  # without a params file: evaluate's and serve's defaults
    if Path(args.params).is_file():  # decode as evaluate scored, within the same bounds
        params = config.load_params(args.params)
        decode, limits = params.evaluate.decode, params.serve
    return serving.Translator.from_dirs(
        args.model, args.vocab, target_lang=args.target_lang, decode=decode, limits=limits
    )


def _translate(args: argparse.Namespace) -> None:
    import io
    import os

    from lmops.io import atomic_output
    from lmops.tracking import serving

    if args.text and args.input:
        raise LmopsError("give sentences as arguments or --input FILE, not both")
    translator = _translator(args)
    overrides = {
        "beam_size": args.beam_size,
        "max_new_tokens": args.max_new_tokens,
        "deadline_s": args.deadline,
    }
    name, total = "<stdin>", None
    source: BinaryIO
    if args.text:
        name, source = "<args>", io.BytesIO("".join(f"{t}\n" for t in args.text).encode())
    elif args.input not in (None, "-"):
        name = args.input
        try:
            source, total = open(args.input, "rb"), os.path.getsize(args.input)  # noqa: SIM115
        except OSError as err:
            raise LmopsError(f"{args.input}: cannot be read ({err.strerror})") from None
    else:
        source = sys.stdin.buffer

    def report(problem: str) -> None:
        print(f"lmops: {problem}", file=sys.stderr)

    with source:
        if args.output in (None, "-"):
            bad = serving.translate_stream(
                translator, source, sys.stdout, name, report, total, **overrides
            )
        else:  # the output appears whole, or not at all
            with atomic_output(args.output) as tmp, open(tmp, "w", encoding="utf-8") as sink:
                bad = serving.translate_stream(
                    translator, source, sink, name, report, total, **overrides
                )
    if bad:
        raise LmopsError(f"{name}: {bad} line(s) not translated (left empty; see above)")


def _compare(args: argparse.Namespace) -> None:
    from lmops.tracking import compare

    print(
        compare.compare(
            args.runs,
            last=args.last,
            experiment=args.experiment,
            all_rows=args.all,
            volatile=args.timings,
        )
    )


def _estimate(args: argparse.Namespace) -> None:
    from lmops.orchestrate import dag, estimate

    params, changed = None, []
    if args.profile:  # as `dvc exp run $(lmops params set-args PROFILE)` would run
        params = config.parse_params(
            config.load_profile(args.profile, args.params), f"{args.params} + {args.profile}"
        )
        with open(args.profile, encoding="utf-8") as fh:
            changed = list(config.flatten(yaml.safe_load(fh) or {}))
    stages = args.stages.split(",") if args.stages else dag.stages_to_run(".", args.target, changed)
    print(estimate.render(estimate.estimate(stages, ".", args.params, params)))


def _tracking_sync(args: argparse.Namespace) -> None:
    from lmops.tracking import runs as tracking

    for line in tracking.sync(args.files):
        print(line)


def _runs_reconcile(args: argparse.Namespace) -> None:
    import os

    from lmops.tracking import runs as tracking

    if args.experiment:
        os.environ[tracking.EXPERIMENT_ENV] = args.experiment
    # one line per run ended, not MLflow's "View run ... at" line for each as well
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    lines = tracking.reconcile(other_hosts_after=args.other_hosts_after, dry_run=args.dry_run)
    for line in lines or [f"no vanished runs in experiment {tracking.experiment_name()!r}"]:
        print(line)


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

    tr = sub.add_parser(
        "translate",
        help="translate sentences or a file, line by line, with a local or logged model",
    )
    tr.add_argument("text", nargs="*", help="sentences (none: one per line of --input or stdin)")
    tr.add_argument("--input", "-i", help="a file of sentences, one per line (- for stdin)")
    tr.add_argument(
        "--output", "-o", help="where the translations go, line for line (default: stdout)"
    )
    tr.add_argument("--model", help="a model directory, e.g. data/models/finetune")
    tr.add_argument("--vocab", help="its vocabulary directory, e.g. data/vocab")
    tr.add_argument("--model-uri", help="an MLflow model, e.g. models:/lmops-translator@champion")
    tr.add_argument("--target-lang", help="target language (default: the model's own)")
    tr.add_argument(
        "--params",
        default=config.DEFAULT_PARAMS,
        help="with --model: decode with its evaluate.decode, within its serve bounds, "
        "when the file exists (a logged model carries its own)",
    )
    tr.add_argument("--beam-size", type=int, help="beam width (1 = greedy)")
    tr.add_argument("--max-new-tokens", type=int, help="longest translation, in tokens")
    tr.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="most seconds a batch may decode (at most serve.deadline_s, the default)",
    )
    tr.set_defaults(func=_translate)

    est = sub.add_parser("estimate", help="predict how long `dvc repro` will take here")
    est.add_argument("--params", default=config.DEFAULT_PARAMS, help="parameters file")
    est.add_argument("--profile", help="a profile merged over --params, e.g. params.fast.yaml")
    est.add_argument("--target", help="a stage: only it and what it needs, as dvc repro")
    est.add_argument(
        "--stages", help="comma-separated stages to estimate, whether or not they would run"
    )
    est.set_defaults(func=_estimate)

    cmp_ = sub.add_parser("compare", help="pipeline runs side by side, from MLflow")
    cmp_.add_argument("runs", nargs="*", help="parent run ids (default: the last --last runs)")
    cmp_.add_argument("--last", type=int, default=2, help="how many recent pipeline runs")
    cmp_.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or lmops)"
    )
    cmp_.add_argument(
        "--all",
        action="store_true",
        help="every row: every metric and param, not only the headline figures and the "
        "params that differ",
    )
    cmp_.add_argument(
        "--timings",
        action="store_true",
        help="timing metrics too (they differ on every run; the headline's training times "
        "are always there)",
    )
    cmp_.set_defaults(func=_compare)

    trk = sub.add_parser("tracking", help="MLflow tracking housekeeping")
    tsub = trk.add_subparsers(dest="action", required=True)
    sync = tsub.add_parser(
        "sync",
        help="upload the metrics, tags and artifacts stages kept "
        "in mlruns/spool/ while the tracking server was away",
    )
    sync.add_argument("files", nargs="*", help="spool files (default: every mlruns/spool/*.jsonl)")
    sync.set_defaults(func=_tracking_sync)

    runs = sub.add_parser("runs", help="MLflow runs of the pipeline")
    rsub = runs.add_subparsers(dest="action", required=True)
    rec = rsub.add_parser(
        "reconcile",
        help="end as FAILED the RUNNING runs whose process is gone (SIGKILL, out of memory)",
    )
    rec.add_argument(
        "--other-hosts-after",
        type=float,
        metavar="HOURS",
        help="also end runs of other hosts (or of unknown ones) started longer ago than this",
    )
    rec.add_argument("--dry-run", action="store_true", help="only say which runs would end")
    rec.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or lmops)"
    )
    rec.set_defaults(func=_runs_reconcile)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    stop_on_signals()
    try:
        args.func(args)
    except LmopsError as err:
        print(f"lmops: error: {redact(str(err))}", file=sys.stderr)
        sys.exit(1)
    except Stopped as err:
        print(f"lmops: {err}", file=sys.stderr)
        exit_like(err)
