"""Progress of a long command: a bar on a terminal, and periodic lines when stderr goes to a log file.

`prepare`, `evaluate` and `export-recs` report through one `Progress`: done of total, the rate and an
estimate of the time left. A job that prints nothing for minutes cannot be told from a hang; one that writes
a progress bar into a log file fills it with control characters. So on a terminal it draws a rich bar, and
otherwise it writes one plain line every `every_s` seconds (and one at the end, for a job that took longer).
`MOVIEREC_PROGRESS_SECONDS` sets that period for every command (0: a line at every step and at the end).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from movierec.errors import ConfigError


def duration(seconds: float) -> str:
    """12 s, 3.4 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def progress_period() -> float:
    """Seconds between plain progress lines: `MOVIEREC_PROGRESS_SECONDS`, else 10."""
    text = os.environ.get("MOVIEREC_PROGRESS_SECONDS", "").strip()
    try:
        seconds = float(text) if text else 10.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"MOVIEREC_PROGRESS_SECONDS must be a number of seconds >= 0, got {text!r}")
    return seconds


class Progress:
    """`with Progress("export-recs", total, "users") as progress: ... progress.advance(n)`."""

    def __init__(self, what: str, total: int, unit: str, stream: TextIO | None = None, every_s: float | None = None):
        if every_s is None:
            every_s = progress_period()
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = None

    def __enter__(self) -> Progress:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn(f"{self.what}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn())  # fmt: skip
            self.bar = Bar(*columns, console=Console(file=self.stream), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=self.total, rate="")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)
        if exc_info[0] is None and time.perf_counter() - self.started >= self.every_s:  # quick jobs stay quiet
            self.stream.write(self.line(final=True) + "\n")
            self.stream.flush()

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def line(self, final: bool = False) -> str:
        """`what: done/total unit (p %), rate unit/s, about t left` (or `in t` at the end)."""
        rate, elapsed = self.rate(), time.perf_counter() - self.started
        share = f" ({100 * self.done / self.total:.1f} %)" if self.total else ""
        if final:
            return f"{self.what}: {self.done:,} {self.unit} in {duration(elapsed)} ({rate:,.0f} {self.unit}/s)"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        estimate = f"about {duration(left)} left" if left != float("inf") else "estimating"
        return f"{self.what}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate:,.0f} {self.unit}/s, {estimate}"

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self.rate():,.0f}/s")
        elif time.perf_counter() - self.last_line >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_line = time.perf_counter()
