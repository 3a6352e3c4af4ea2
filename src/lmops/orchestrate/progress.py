"""A pipeline run's progress, read from its stages' output, without Prefect.

Each stage prints what DVC and its own code print; the training stages (and a few
others) draw a tqdm bar, ``desc:  12%|███ | 120/1000 [00:10<01:20, 11.9it/s]``,
redrawn in place with ``\\r``. :func:`parse_bar` reads such a line back;
:class:`PipelineProgress` follows a run's stages (stages done out of stages to run, the
running stage's bar) and hands a :class:`Progress` to a report callback at a bounded
rate; :class:`LatestSender` makes that callback's work (a request to the Prefect server)
run beside the stage, so a slow server never holds up the reading of its output. The
flows (``flows/pipeline.py``) turn a :class:`Progress` into a Prefect progress artifact.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from lmops.orchestrate.repro import stage_statuses

# how often a run's progress is reported at most while a stage redraws its bar (a stage's
# start and end are reported at once)
PROGRESS_REPORT_SECONDS = 5.0

_SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "Z": 1e21}
_NUMBER = r"\d+(?:\.\d+)?[kMGTPEZY]?"
_CLOCK = r"\d+:\d\d(?::\d\d)?"
# tqdm's default bar with a total: '{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}
# [{elapsed}<{remaining}, {rate_fmt}{postfix}]', cut at ncols when the screen is narrow
_WITH_TOTAL = re.compile(
    rf"^(?:(?P<desc>.*?): )?\s*\d+%\|.*\| ?(?P<n>{_NUMBER})/(?P<total>{_NUMBER}) "
    rf"\[(?P<elapsed>{_CLOCK})<(?P<remaining>{_CLOCK}|\?)(?:[,\]].*)?$"
)
# and without one: '{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]'
_NO_TOTAL = re.compile(
    rf"^(?:(?P<desc>.*?): )?(?P<n>{_NUMBER})[^\[\]|]* \[(?P<elapsed>{_CLOCK})(?:[,\]].*)?$"
)


class Bar(NamedTuple):
    """One redraw of a tqdm bar: ``n`` of ``total`` (None: tqdm was given none) after
    ``elapsed`` seconds, ``remaining`` seconds left by tqdm's estimate (None: not known yet)."""

    desc: str
    n: float
    total: float | None
    elapsed: float
    remaining: float | None

    @property
    def fraction(self) -> float | None:
        """How much of the bar is done, 0 to 1; None without a total."""
        if not self.total:
            return None
        return min(max(self.n / self.total, 0.0), 1.0)


def parse_bar(text: str) -> Bar | None:
    """The bar a line of output shows, or None when it is not a tqdm bar."""
    text = text.strip()
    m = _WITH_TOTAL.match(text)
    if m:
        remaining = m["remaining"]
        return Bar(
            m["desc"] or "",
            _number(m["n"]),
            _number(m["total"]),
            _seconds(m["elapsed"]),
            None if remaining == "?" else _seconds(remaining),
        )
    m = _NO_TOTAL.match(text)
    if m:
        return Bar(m["desc"] or "", _number(m["n"]), None, _seconds(m["elapsed"]), None)
    return None


def _number(text: str) -> float:
    """tqdm's ``n_fmt`` back to a number: ``120``, ``1.20k`` (``unit_scale``)."""
    suffix = text[-1] if text[-1] in _SCALE else ""
    return float(text[: len(text) - len(suffix)]) * _SCALE[suffix]


def _seconds(clock: str) -> float:
    """``MM:SS`` or ``H:MM:SS`` (tqdm's ``format_interval``) in seconds."""
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def clock(seconds: float) -> str:
    """``seconds`` as ``M:SS`` or ``H:MM:SS``."""
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def _count(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.3g}"


@dataclass(frozen=True)
class Progress:
    """Where a pipeline run stands: ``done`` of ``stages`` ended well; ``stage`` (number
    ``index`` + 1) runs and last drew ``bar``, or, once the run ended with ``status``, is
    where it stopped (None: nowhere, every stage ended)."""

    stages: tuple[str, ...]
    done: int
    stage: str | None = None
    index: int | None = None
    bar: Bar | None = None
    status: str | None = None

    @property
    def percent(self) -> float:
        """(stages done + the running stage's fraction) / stages to run, 0 to 100."""
        if not self.stages:
            return 100.0
        fraction = (self.bar.fraction or 0.0) if self.bar is not None else 0.0
        return round(min(100.0, 100.0 * (self.done + fraction) / len(self.stages)), 2)

    def describe(self) -> str:
        """One line: ``stage 5 of 5: pretrain, step 60 of 120, 0:31 left; 4 of 5 stages
        done``, and at the end ``COMPLETED; 5 of 5 stages done``."""
        total = len(self.stages)
        done = f"{self.done} of {total} stages done"
        where = "" if self.index is None else f"stage {self.index + 1} of {total}: {self.stage}"
        if where and self.bar is not None:
            bar = self.bar
            what = "" if bar.desc in ("", self.stage) else f" ({bar.desc})"
            of = f" of {_count(bar.total)}" if bar.total else ""
            left = "" if bar.remaining is None or self.status else f", {clock(bar.remaining)} left"
            where += f", step {_count(bar.n)}{of}{what}{left}"
        if self.status is not None:
            return f"{self.status} at {where}; {done}" if where else f"{self.status}; {done}"
        return f"{where}; {done}" if where else done


class PipelineProgress:
    """Follows a run of ``stages`` (in order) and reports its :class:`Progress`.

    The flow calls :meth:`start` and :meth:`end` around each stage it runs, or leaves that
    to the output: :meth:`output` (the hook of :class:`lmops.orchestrate.repro.OutputLines`)
    sees every line and redraw a stage prints, reads its tqdm bars and DVC's lines
    (``Running stage 'x'``, ``Stage 'x' didn't change, skipping``), so one ``dvc exp run``
    over many stages is followed stage by stage too. ``report`` gets the progress at once
    when a stage starts or ends, and while a stage draws its bar at most every ``every``
    seconds; ``log`` gets a line when a stage starts and one when it ends, with its status
    and duration.
    """

    def __init__(
        self,
        stages: Iterable[str],
        report: Callable[[Progress], None],
        log: Callable[[str], None] | None = None,
        every: float = PROGRESS_REPORT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stages = tuple(stages)
        self.report, self.log, self.every, self.clock = report, log, every, clock
        self.ended: dict[str, str] = {}  # stage: its status
        self.stage: str | None = None  # the stage started last
        self.bar: Bar | None = None  # the bar it drew last
        self._bars: dict[str, Bar] = {}
        self._started = 0.0
        self._last_report = -float("inf")
        self._pending = False  # a bar not reported yet
        self._lock = threading.Lock()  # the flow's thread and a stage's output may both call

    def progress(self, status: str | None = None) -> Progress:
        """Where the run stands (with ``status``: where it ended)."""
        done = sum(st != "failed" for st in self.ended.values())
        stage = self.stage
        if stage is not None and self.ended.get(stage, "failed") != "failed":
            stage = None  # it ended well: nothing runs
        index = self.stages.index(stage) if stage in self.stages else None
        if index is None:
            return Progress(self.stages, done, status=status)
        # a failed stage keeps its last bar: where it stopped
        return Progress(self.stages, done, stage, index, self.bar, status)

    def start(self, stage: str) -> None:
        """``stage`` starts; once (a second call for the running stage does nothing)."""
        with self._lock:
            self._start(stage)

    def end(self, stage: str, status: str) -> None:
        """``stage`` ended with ``status`` (ran, skipped, restored, failed); once."""
        with self._lock:
            self._end(stage, status)

    def output(self, text: str) -> None:
        """A line or a redraw of the running stage's output."""
        bar = parse_bar(text)
        with self._lock:
            if bar is not None and self.stage is not None and self.stage not in self.ended:
                self._bars[bar.desc] = bar
                # the stage's own bar (desc = the stage, as the training loop draws it)
                # over the others it may draw on the way, such as an evaluation's
                self.bar = self._bars.get(self.stage, bar)
                self._pending = True
            elif bar is None:
                for stage, status in stage_statuses(text, self.stages).items():
                    if status == "ran":
                        self._start(stage)
                    elif status != "not reached":  # skipped / restored: over at once
                        self._end(stage, status)
            if self._pending and self.clock() - self._last_report >= self.every:
                self._report()

    def finish(self, results: Iterable[tuple[str, str]]) -> None:
        """The stages' final statuses, (stage, status) as the run has them: ends those the
        output left open; a stage not reached stays as it is."""
        with self._lock:
            for stage, status in results:
                if status != "not reached":
                    self._end(stage, status)

    def close(self, status: str) -> Progress:
        """The run ended with ``status``: reports where (100 once every stage ended well)."""
        with self._lock:
            final = self.progress(status)
            self._last_report, self._pending = self.clock(), False
            self.report(final)
            return final

    # the methods below run under self._lock
    def _start(self, stage: str) -> None:
        if stage == self.stage or stage in self.ended:
            return
        self._moved_on(stage)
        self.stage, self.bar, self._bars = stage, None, {}
        self._started = self.clock()
        if self.log:
            self.log(f"{self._where(stage)}: started")
        self._report()

    def _end(self, stage: str, status: str) -> None:
        if stage in self.ended:
            return
        self._moved_on(stage)
        self.ended[stage] = status
        if self.log:
            if stage == self.stage:
                verb = "after" if status == "failed" else "in"
                self.log(
                    f"{self._where(stage)}: {status} {verb} {self.clock() - self._started:.1f} s"
                )
            else:  # never started here: skipped, restored or up to date
                self.log(f"{self._where(stage)}: {status}")
        self._report()

    def _moved_on(self, stage: str) -> None:
        """DVC went on to ``stage``: the stage that ran before it is over."""
        if self.stage not in (None, stage) and self.stage not in self.ended:
            self._end(self.stage, "ran")

    def _where(self, stage: str) -> str:
        k = self.stages.index(stage) + 1 if stage in self.stages else "?"
        return f"stage {k} of {len(self.stages)} {stage}"

    def _report(self) -> None:
        self._last_report, self._pending = self.clock(), False
        self.report(self.progress())


T = TypeVar("T")
_NOTHING = object()


class LatestSender(Generic[T]):
    """Calls ``send(value)`` on a thread of its own, with the latest value given: a value
    given while a call is still on its way replaces the one waiting, so a slow or
    unreachable server costs updates, never a stall of the caller. ``on_error`` gets the
    first exception a call raises (``errors`` counts them all). The thread starts with the
    first value and runs in a copy of the creator's context (Prefect keeps its run and
    settings there). :meth:`close` sends what waits and stops the thread."""

    def __init__(
        self,
        send: Callable[[T], object],
        on_error: Callable[[BaseException], None] = lambda err: None,
        name: str = "lmops-progress",
    ):
        self.send, self.on_error = send, on_error
        self.errors = 0
        self._value: object = _NOTHING
        self._closed = False
        self._ready = threading.Condition()
        self._context = contextvars.copy_context()
        self._name = name
        self._thread: threading.Thread | None = None

    def __call__(self, value: T) -> None:
        with self._ready:
            if self._closed:  # too late: the last value was sent
                return
            self._value = value
            self._ready.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._context.run, args=(self._loop,), name=self._name, daemon=True
                )
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Send the value still waiting and stop: waits ``timeout`` seconds at most."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while self._value is _NOTHING and not self._closed:
                    self._ready.wait()
                if self._value is _NOTHING:
                    return
                value, self._value = self._value, _NOTHING
            try:
                self.send(value)  # type: ignore[arg-type]
            except Exception as err:  # a report is not worth failing a stage for
                self.errors += 1
                if self.errors == 1:
                    with contextlib.suppress(Exception):
                        self.on_error(err)
