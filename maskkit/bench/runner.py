"""The local executor: runs cells side by side, each ``maskkit train`` in a process of its own
(:func:`~maskkit.bench.attempt.start_attempt`, which every executor's cells run).

Up to ``workers`` cells run at once, each with ``threads`` torch threads (``OMP_NUM_THREADS`` and
friends), its output appended to its log file. The pool is one loop on the main thread that
starts a cell when a slot frees and polls the running ones: no threads, so that every child can
be tied to the bench's life.

Stopping: each cell runs in a session of its own (a Ctrl-C at the terminal reaches the bench
only). On Ctrl-C or SIGTERM the bench sends SIGINT to every running cell (``maskkit train`` stops
at once, its checkpoints whole), waits up to :data:`STOP_GRACE_S`, kills what is left, records
the attempts and re-raises. On Linux each cell also gets SIGTERM when the bench dies in any other
way (``kill -9``; ``PR_SET_PDEATHSIG``), so no orphan trains on. A later ``maskkit bench`` resumes
the cells from their checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

import maskkit.bench
from maskkit.progress import progress_display

from .attempt import POLL_S, STOP_GRACE_S, die_with_parent, start_attempt
from .cells import Cell
from .journal import Journal


class BenchStopped(KeyboardInterrupt):
    """The bench was asked to stop (SIGINT or SIGTERM); ``signal_number`` says which."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@dataclass(frozen=True)
class Outcome:
    """How one attempt of a cell ended: ``exit_code`` 0 is success; negative, killed by a signal;
    None, its job was lost before it could say. The other executors add what their scheduler
    knows: the ``job`` that ran it, the ``reason`` it was stopped, whether it was
    ``interrupted`` (stopped from outside, its checkpoints kept) and the ``host``."""

    cell: Cell
    exit_code: int | None
    seconds: float
    resumed: bool
    reason: str | None = None
    interrupted: bool = False
    job: str | None = None
    host: str | None = None


def record_outcome(journal: Journal, outcome: Outcome, executor: str | None = None) -> None:
    """The journal's ``cell`` record of an attempt; the fields the local pool leaves empty are
    left out, so that its records stay as they were."""
    extra = {
        "executor": executor,
        "job": outcome.job,
        "host": outcome.host,
        "reason": outcome.reason,
        "interrupted": outcome.interrupted or None,
    }
    journal.record(
        "cell",
        cell=outcome.cell.key,
        exit_code=outcome.exit_code,
        seconds=round(outcome.seconds, 2),
        resumed=outcome.resumed,
        log=str(outcome.cell.log_file),
        **{key: value for key, value in extra.items() if value is not None},
    )


@dataclass
class _Running:
    cell: Cell
    process: subprocess.Popen
    log: IO[str]
    started: float
    resumed: bool


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`BenchStopped` (Ctrl-C already is a KeyboardInterrupt)."""

    def stop(signal_number: int, _frame: object) -> None:
        raise BenchStopped(signal_number)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CellPool:
    """Runs cells, ``workers`` at a time, ``threads`` torch threads each (and ``nproc``
    processes under torchrun, when given), each attempt as :func:`~maskkit.bench.attempt.start_attempt`
    starts it."""

    def __init__(
        self, workers: int, threads: int, journal: Journal, console: Console, nproc: int | None = None
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.nproc = nproc
        self.journal = journal
        self.console = console
        self._preexec = die_with_parent()

    def _start(self, cell: Cell) -> _Running:
        task = cell.task(self.threads, maskkit.bench.CELL_CLI, self.nproc)
        started = start_attempt(task, self._preexec)
        verb = "resuming" if started.resumed else "starting"
        self.console.print(f"{verb} {cell.key} (log {_shown(cell.log_file)})", highlight=False)
        return _Running(cell, started.process, started.log, started.started, started.resumed)

    def _finish(self, running: _Running, exit_code: int) -> Outcome:
        running.log.close()
        seconds = time.perf_counter() - running.started
        outcome = Outcome(running.cell, exit_code, seconds, running.resumed)
        record_outcome(self.journal, outcome)
        return outcome

    def run(self, cells: list[Cell], announce: Callable[[Outcome], None]) -> list[Outcome]:
        """Run ``cells``; ``announce`` is called as each ends. A failed cell does not stop the
        others. On a :class:`KeyboardInterrupt` (Ctrl-C, or SIGTERM under
        :func:`stop_on_sigterm`), or any error of the bench itself, the running cells are
        stopped and recorded, and it propagates."""
        pending, running, outcomes = deque(cells), [], []
        with progress_display(self.console) as progress:
            task = progress.add_task("cells", total=len(cells), status="")
            try:
                while pending or running:
                    while pending and len(running) < self.workers:
                        running.append(self._start(pending.popleft()))
                    time.sleep(POLL_S)
                    for item in list(running):
                        exit_code = item.process.poll()
                        if exit_code is None:
                            continue
                        running.remove(item)
                        outcomes.append(self._finish(item, exit_code))
                        announce(outcomes[-1])
                        progress.advance(task)
                    progress.update(task, status="running: " + ", ".join(r.cell.key for r in running))
            except BaseException:  # Ctrl-C, SIGTERM, or a cell that cannot start: stop the others
                self._stop(running)
                raise
        return outcomes

    def _stop(self, running: list[_Running]) -> None:
        """SIGINT to every running cell, then SIGKILL to what is left after the grace period."""
        if running:
            self.console.print(f"stopping {len(running)} running cell(s) ...")
        for item in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(item.process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for item in running:
            try:
                item.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(item.process.pid, signal.SIGKILL)
                item.process.wait()
            self._finish(item, item.process.returncode)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    with contextlib.suppress(ValueError):
        return escape(str(path.relative_to(Path.cwd())))
    return escape(str(path))
