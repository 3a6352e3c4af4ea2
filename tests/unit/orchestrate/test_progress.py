"""A pipeline run's progress: tqdm's bars read back, stages followed, reports rate-limited.

Every bar here is drawn by tqdm itself (a live bar into a buffer or a subprocess's pipe,
or ``tqdm.format_meter``, the function each redraw goes through), never a hand-written
literal, so that a tqdm upgrade that changes its format fails here first.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time

import pytest
from tqdm import tqdm

from lmops.orchestrate import repro
from lmops.orchestrate.progress import (
    Bar,
    LatestSender,
    PipelineProgress,
    Progress,
    clock,
    parse_bar,
)
from tests.support import workspace


def _redraws(steps: int = 50, **options) -> list[str]:
    """What a live tqdm bar writes, redraw by redraw (``\\r`` and the final newline)."""
    buffer = io.StringIO()
    bar = tqdm(file=buffer, mininterval=0, miniters=1, **options)
    with bar:
        for i in range(steps):
            if i == 30:
                bar.set_postfix(loss=f"{2.5 - i / 100:.4f}", lr="3.00e-04", refresh=False)
            bar.update(1)
    return [s.strip() for s in re.split(r"[\r\n]", buffer.getvalue()) if s.strip()]


def test_a_live_bar_reads_back_redraw_by_redraw():
    """The training loop's own options (core/train.py): desc, unit, a total, a resume's
    ``initial``, a postfix."""
    lines = _redraws(80, total=120, initial=40, desc="pretrain", unit="step", dynamic_ncols=True)
    bars = [parse_bar(line) for line in lines]
    assert None not in bars, lines
    # the first draw, one per step, and the last again as the bar closes
    assert [b.n for b in bars] == [*range(40, 121), 120]
    assert {b.desc for b in bars} == {"pretrain"} and {b.total for b in bars} == {120}
    assert bars[0].remaining is None  # tqdm's '?' before it has a rate
    assert bars[-1].fraction == 1.0 and bars[-1].remaining == 0
    assert "loss=" in lines[-1]  # the postfix did not hide the rest


def test_a_bar_without_total_or_description():
    untotalled = [parse_bar(line) for line in _redraws(desc="vocab: read text", unit=" sent")]
    assert untotalled[-1] == Bar("vocab: read text", 50, None, 0, None)
    assert untotalled[-1].fraction is None
    plain = [parse_bar(line) for line in _redraws(total=50, ascii=True, leave=True)]
    assert plain[-1] == Bar("", 50, 50, 0, 0)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (  # an hour-long pretrain: H:MM:SS, a slow rate (s/step), a postfix
            dict(
                n=120,
                total=1000,
                elapsed=3725,
                prefix="pretrain",
                unit="step",
                postfix="loss=2.3000, lr=1.00e-03",
            ),
            Bar("pretrain", 120, 1000, 3725, 27316),
        ),
        (  # unit_scale: '1.20k/100k'
            dict(n=1200, total=100_000, elapsed=10, prefix="write mono_train.bin", unit_scale=True),
            Bar("write mono_train.bin", 1200, 100_000, 10, 823),
        ),
        (  # a narrow screen: tqdm cuts the line at ncols, in the rate
            dict(n=5, total=100, elapsed=1, prefix="distil", ncols=40),
            Bar("distil", 5, 100, 1, 19),
        ),
        (  # a description with a colon in it
            dict(n=3, total=4, elapsed=2, prefix="evaluate: test", unit="split"),
            Bar("evaluate: test", 3, 4, 2, 0),  # 0.67 s left: tqdm shows 00:00
        ),
    ],
)
def test_format_meter_lines_read_back(options, expected):
    line = tqdm.format_meter(**options)
    bar = parse_bar(line)
    assert bar is not None, line
    assert bar._replace(remaining=round(bar.remaining)) == expected, line


@pytest.mark.parametrize(
    "line",
    [
        "Running stage 'pretrain':",
        "> python stages/pretrain.py --params params.yaml",
        "pretrain: step 30, train_loss 2.31, valid_loss 2.40",
        "Updating lock file 'dvc.lock'",
        "100%",
        "",
    ],
)
def test_other_output_is_no_bar(line):
    assert parse_bar(line) is None


# ------------------------------------------------------------------ progress


STAGES = ("clean", "validate", "vocab", "tokenise", "pretrain")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_percent_and_the_description():
    bar = parse_bar(tqdm.format_meter(n=60, total=120, elapsed=31, prefix="pretrain"))
    running = Progress(STAGES, 4, "pretrain", 4, bar)
    assert running.percent == 90.0
    assert (
        running.describe()
        == "stage 5 of 5: pretrain, step 60 of 120, 0:31 left; 4 of 5 stages done"
    )
    other = running.__class__(STAGES, 3, "tokenise", 3, bar._replace(desc="write a.bin"))
    assert other.describe().startswith("stage 4 of 5: tokenise, step 60 of 120 (write a.bin),")
    assert Progress(STAGES, 5, status="FINISHED").describe() == "FINISHED; 5 of 5 stages done"
    assert Progress(STAGES, 5, status="FINISHED").percent == 100.0
    assert Progress(STAGES, 0).describe() == "0 of 5 stages done"
    assert clock(27316) == "7:35:16" and clock(59.6) == "1:00"


def test_reports_are_rate_limited_while_a_stage_redraws_its_bar():
    """A redraw every 20 ms for 30 s: a report when the stage starts and ends, and in
    between one at most every `every` seconds, the latest bar each time."""
    now, reports, logged = Clock(), [], []
    tracker = PipelineProgress(STAGES, reports.append, logged.append, every=5.0, clock=now)
    for stage in STAGES[:4]:
        tracker.start(stage)
        tracker.end(stage, "skipped")
    reports.clear()
    tracker.start("pretrain")
    live = tqdm(total=1500, desc="pretrain", unit="step", file=io.StringIO(), mininterval=0)
    for _ in range(1500):
        now.now += 0.02
        live.update(1)
        tracker.output(live.format_meter(**live.format_dict))
    now.now += 1
    tracker.end("pretrain", "ran")
    final = tracker.close("FINISHED")

    bar_reports = reports[1:-2]
    assert reports[0] == Progress(STAGES, 4, "pretrain", 4, None)  # the start, at once
    assert 5 <= len(bar_reports) <= 6  # 30 s / 5 s, not 1500
    steps = [r.bar.n for r in bar_reports]
    assert steps == sorted(steps) and steps[0] >= 1  # the bar as it was at each report
    assert reports[-1] == final and final.percent == 100.0 and final.stage is None
    assert logged[-2:] == ["stage 5 of 5 pretrain: started", "stage 5 of 5 pretrain: ran in 31.0 s"]
    assert reports[-2].done == 5 and reports[-2].percent == 100.0  # the end, at once


def test_a_bar_held_back_goes_out_with_the_next_output_after_the_interval():
    now, reports = Clock(), []
    tracker = PipelineProgress(["pretrain"], reports.append, every=5.0, clock=now)
    tracker.start("pretrain")  # reported at once, so a bar right after it waits
    now.now += 5
    tracker.output(tqdm.format_meter(n=1, total=10, elapsed=1, prefix="pretrain"))
    now.now += 1
    tracker.output(tqdm.format_meter(n=2, total=10, elapsed=2, prefix="pretrain"))
    assert [r.bar.n if r.bar else None for r in reports] == [None, 1]  # 2 waits
    now.now += 5
    tracker.output("pretrain: step 2, valid_loss 3.1")  # any line: the interval is over
    assert reports[-1].bar.n == 2 and reports[-1].percent == 20.0


def test_the_stages_bar_wins_over_the_others_it_draws():
    """A training stage's evaluation draws a decoding bar now and then: the stage's own
    bar stays the one its progress is read from."""
    reports: list[Progress] = []
    tracker = PipelineProgress(["finetune"], reports.append, every=0)
    tracker.start("finetune")
    tracker.output(tqdm.format_meter(n=10, total=30, elapsed=5, prefix="finetune", unit="step"))
    tracker.output(tqdm.format_meter(n=1, total=16, elapsed=1, prefix="finetune: bleu"))
    assert reports[-1].bar.desc == "finetune" and reports[-1].bar.n == 10
    tokenise = PipelineProgress(["tokenise"], reports.append, every=0)
    tokenise.start("tokenise")
    tokenise.output(tqdm.format_meter(n=4, total=8, elapsed=1, prefix="write a.bin"))
    assert reports[-1].bar.desc == "write a.bin"  # none of its own: the latest


def test_one_dvc_exp_run_is_followed_stage_by_stage_from_its_output():
    now, reports, logged = Clock(), [], []
    tracker = PipelineProgress(STAGES[:3], reports.append, logged.append, every=0, clock=now)
    tracker.output("Stage 'clean' didn't change, skipping")
    tracker.output("Running stage 'validate':")
    tracker.output("> python stages/validate.py")
    now.now += 2
    tracker.output(tqdm.format_meter(n=1, total=4, elapsed=2, prefix="validate", unit="split"))
    assert (
        reports[-1].describe()
        == "stage 2 of 3: validate, step 1 of 4, 0:06 left; 1 of 3 stages done"
    )
    now.now += 1
    tracker.output("Running stage 'vocab':")
    now.now += 4
    tracker.finish([("clean", "skipped"), ("validate", "ran"), ("vocab", "ran")])
    assert tracker.close("FINISHED").percent == 100.0
    assert logged == [
        "stage 1 of 3 clean: skipped",
        "stage 2 of 3 validate: started",
        "stage 2 of 3 validate: ran in 3.0 s",
        "stage 3 of 3 vocab: started",
        "stage 3 of 3 vocab: ran in 4.0 s",
    ]


def test_a_failed_stage_is_where_the_run_stopped():
    now, reports, logged = Clock(), [], []
    tracker = PipelineProgress(STAGES, reports.append, logged.append, clock=now)
    tracker.start("clean")
    tracker.end("clean", "ran")
    tracker.start("validate")
    tracker.start("validate")  # once
    now.now += 1.5
    tracker.finish([("clean", "ran"), ("validate", "failed"), ("vocab", "not reached")])
    final = tracker.close("FAILED")
    assert final.describe() == "FAILED at stage 2 of 5: validate; 1 of 5 stages done"
    assert final.percent == 20.0
    assert logged[-1] == "stage 2 of 5 validate: failed after 1.5 s"
    assert len(logged) == 4  # each stage's start and end once


# ---------------------------------------------------------- the stage's output


def test_a_stage_bar_reaches_the_tracker_through_the_runner(tmp_path):
    """A real subprocess drawing the training loop's bar through `_run`: the tracker
    sees the redraws (the flow's log does not), with `watching` as the flow sets it."""
    script = (
        "import sys, time\n"
        "from tqdm import tqdm\n"
        "print(\"Running stage 'pretrain':\", flush=True)\n"
        "for _ in tqdm(range(40), desc='pretrain', unit='step', mininterval=0,\n"
        "              dynamic_ncols=True, file=sys.stderr): time.sleep(0.002)\n"
    )
    reports: list[Progress] = []
    tracker = PipelineProgress(["vocab", "pretrain"], reports.append, every=0)
    tracker.end("vocab", "skipped")
    logged: list[str] = []
    with repro.watching(tracker.output):
        repro._run(
            [sys.executable, "-c", script],
            tmp_path,
            workspace.clean_env(),
            "pretrain",
            logged.append,
        )
    steps = [r.bar.n for r in reports if r.bar is not None]
    assert len(steps) >= 20 and steps[-1] == 40, steps  # every redraw, as every=0 asks
    assert reports[-1].percent == 100.0 and reports[-1].stage == "pretrain"
    assert len(logged) <= 3  # the log stays throttled: the line and at most two bars


def test_a_bar_drawn_once_is_seen_before_the_next_redraw_ends_it():
    """tqdm writes ``\\r`` before each redraw, so the bar on screen is an unfinished line
    until the next one; a stage that draws once and then trains for a while (or is held)
    must still show where it is."""
    out = io.StringIO()
    bar = tqdm(total=120, desc="pretrain", unit="step", file=out)  # the first draw only
    seen: list[str] = []
    lines = repro.OutputLines(lambda line: None, watch=seen.append)
    lines.feed(out.getvalue())
    assert [parse_bar(t) for t in seen] == [Bar("pretrain", 0, 120, 0, None)]
    bar.update(30)
    bar.refresh()
    lines.feed(out.getvalue()[len(seen[0]) + 1 :])  # the next redraw: the first one once
    assert [(b.n, b.total) for b in map(parse_bar, seen) if b] == [(0, 120), (30, 120)]
    bar.close()


def test_a_watch_that_breaks_stops_watching_not_the_stage():
    logged: list[str] = []
    seen: list[str] = []

    def watch(text: str) -> None:
        seen.append(text)
        raise ValueError("bug in a progress display")

    out = repro.OutputLines(logged.append, watch=watch)
    out.feed("one\ntwo\n")
    out.close()
    assert seen == ["one"]
    assert "ValueError: bug in a progress display" in logged[0] and logged[1:] == ["one", "two"]
    assert out.lines == ["one", "two"]


# ---------------------------------------------------------------- the sender


def test_the_sender_never_holds_up_the_caller_and_sends_the_latest():
    release, sent, errors = threading.Event(), [], []

    def send(value: int) -> None:
        if value == 0:
            release.wait(10)  # a server that hangs on the first request
        sent.append(value)

    sender = LatestSender(send, errors.append)
    started = time.monotonic()
    for value in range(6):
        sender(value)
        time.sleep(0.01 if value == 0 else 0)
    assert time.monotonic() - started < 1  # the caller went on while 0 hung
    release.set()
    sender.close()
    sender(7)  # after close: dropped
    assert sent[-1] == 5 and 1 not in sent and sent == sorted(sent)  # superseded values skipped
    sender_errors = LatestSender(lambda v: 1 / 0, errors.append)
    for value in range(3):
        sender_errors(value)
        time.sleep(0.05)
    sender_errors.close()
    assert [type(e) for e in errors] == [ZeroDivisionError] and sender_errors.errors == 3
