"""Progress of a long stage (a training stage, a priors build): a live bar on a terminal, plain
lines every so often in a log file.

rich's bar redraws itself in place, which a log file (``maskkit train ... > run.log``, a batch
job, CI) cannot show: it gets one truncated bar line at the end. :func:`progress_display` picks
the bar on a terminal and :class:`PlainProgress` elsewhere. Both offer what the stages use:
``add_task`` (with a ``status`` field), ``advance``, ``update(status=..., completed=...)``,
``console`` and the ``with`` block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

# A plain line at most this often (seconds), and at the first and the last step of a stage.
PLAIN_LINE_SECONDS = 30.0
# The live bar's width: a quarter of the terminal, within these bounds.
BAR_WIDTH_RANGE = (5, 40)


class StatusColumn(ProgressColumn):
    """The free-text status (the latest losses, img/s): the one column that gives way, cut with
    "…" where the terminal is too narrow for all of it."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(overflow="ellipsis"))

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")), no_wrap=True, overflow="ellipsis")


def bar_width(console_width: int) -> int:
    """The live bar's width on a terminal ``console_width`` columns wide."""
    low, high = BAR_WIDTH_RANGE
    return max(low, min(high, console_width // 4))


def progress_display(console: Console) -> Progress | PlainProgress:
    """A rich bar with a free-text status field on a terminal, :class:`PlainProgress` otherwise.

    On the terminal the stage's name, step count, elapsed time and ETA keep their whole width
    (down to about 60 columns), the bar takes a quarter of the width, and the status gets the
    rest, cut short with "…" when it does not fit.
    """
    if not console.is_terminal:
        return PlainProgress(console)

    def whole() -> Column:
        return Column(no_wrap=True)

    return Progress(
        TextColumn("[bold]{task.description}", table_column=whole()),
        BarColumn(bar_width=bar_width(console.width), table_column=whole()),
        MofNCompleteColumn(table_column=whole()),
        TimeElapsedColumn(table_column=whole()),
        TextColumn("eta", table_column=whole()),
        TimeRemainingColumn(table_column=whole()),
        StatusColumn(),
        console=console,
        transient=False,
    )


@dataclass
class _Task:
    description: str
    total: int
    completed: int
    status: str
    started: float
    started_at: int  # steps already done when the task was added (a resumed stage)
    last_line: float | None = None  # when its latest line was printed
    finished: float | None = None  # when its last step was done


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class PlainProgress:
    """Progress as plain, whole lines: one at the first step, then at most one every
    ``interval`` seconds, and one for the last step when the ``with`` block ends::

        MLO pretrain 120/400 (30%) elapsed 0:02:00 eta 0:04:40  pretrain 0.4123  ...  130 img/s
    """

    def __init__(
        self,
        console: Console,
        interval: float = PLAIN_LINE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.interval = interval
        self.clock = clock
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The last step's line waits for the status set after it (the stage's final losses).
        for task in self.tasks:
            if task.completed >= task.total and task.last_line != task.finished:
                self._print(task, task.finished)

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        now = self.clock()
        self.tasks.append(_Task(description, total, completed, fields.get("status", ""), now, completed))
        return len(self.tasks) - 1

    def update(
        self, task_id: int, *, status: str | None = None, completed: int | None = None, **_: Any
    ) -> None:
        task = self.tasks[task_id]
        if status is not None:
            task.status = status
        if completed is not None:
            task.completed = completed
            if task.completed >= task.total and task.finished is None:
                task.finished = self.clock()  # printed when the block ends

    def advance(self, task_id: int, advance: int = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        now = self.clock()
        if task.completed >= task.total:
            task.finished = now  # printed when the block ends
        elif task.last_line is None or now - task.last_line >= self.interval:
            self._print(task, now)

    def _print(self, task: _Task, now: float) -> None:
        task.last_line = now
        self.console.print(self.line(task, now), soft_wrap=True, highlight=False)

    def line(self, task: _Task, now: float) -> str:
        """One progress line of ``task`` (its latest status is the one of the previous step)."""
        elapsed = now - task.started
        done = task.completed - task.started_at
        left = task.total - task.completed
        eta = _duration(elapsed / done * left) if done > 0 else "?"
        percent = 100 * task.completed / max(task.total, 1)
        text = (
            f"{task.description} {task.completed}/{task.total} ({percent:.0f}%) "
            f"elapsed {_duration(elapsed)} eta {eta}"
        )
        return escape(text + (f"  {task.status}" if task.status else ""))
