"""The command line's output: rich tables on stdout, progress bars on stderr (only on a
terminal: a pipe or a CI log gets no bar and no control characters)."""
import contextlib
import sys
import time

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


def out():
    """stdout: full width on a terminal, wide enough for the tables elsewhere."""
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty else 200, highlight=False, soft_wrap=not tty)


def err():
    return Console(file=sys.stderr, highlight=False, width=None if sys.stderr.isatty() else 200)


def table(rows, headers, title=None):
    """A rich Table: first column left-aligned (names), the others right-aligned (numbers)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, h in enumerate(headers):
        t.add_column(str(h), justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    return t


def print_table(rows, headers, title=None):
    out().print(table(rows, headers, title))


class Bar:
    """A progress display with an ETA and a rate, on stderr when it is a terminal; a no-op
    otherwise (quiet=True too). Use as a context manager; update(task, done, total)."""

    def __init__(self, quiet=False, unit="items"):
        self.enabled = sys.stderr.isatty() and not quiet
        self.unit = unit
        self.tasks = {}
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=err(), transient=True, disable=not self.enabled)
        self.t0 = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False

    def update(self, name, done, total, description=None):
        if not self.enabled:
            return
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(description or name, total=total, rate="")
            self.t0[name] = time.perf_counter()
        dt = max(time.perf_counter() - self.t0[name], 1e-9)
        self.progress.update(self.tasks[name], completed=done, total=total,
                             description=description or name, rate=f"{_si(done / dt)} {self.unit}/s")


def _si(x):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


@contextlib.contextmanager
def nothing():
    yield None
