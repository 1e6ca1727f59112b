"""The loop of the executors that hand cells to a scheduler (``slurm``, ``ray``).

It submits the pending cells (at most ``--workers`` in flight; default all, the scheduler queues
them), polls them, and records each attempt in the journal as the local pool does
(:func:`~maskkit.bench.runner.record_outcome`), with what the scheduler adds: the job, the host,
and the reason a job ended without its cell finishing. On a stop (Ctrl-C, SIGTERM) or an error of
the bench itself, it hands the running jobs to the backend: Slurm's keep running and are
re-attached by the next run; Ray's are stopped cleanly and resume on the next run.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape

import maskkit.bench
from maskkit.progress import progress_display

from ..attempt import POLL_S, AttemptResult, CellState, CellTask
from ..cells import Cell
from ..journal import Journal
from ..runner import Outcome, record_outcome


@dataclass
class Handle:
    """A cell handed to a scheduler: its job's id there, when it was submitted (seconds since the
    epoch), whether the cell had a run dir to resume then, and the backend's own object."""

    cell: Cell
    job_id: str
    submitted: float
    resumed: bool
    native: Any = None


@dataclass(frozen=True)
class Ended:
    """A job that ended: how its attempt went, None when it ran nothing (its cell was already
    done, or the stop came before it started)."""

    result: AttemptResult | None


class Backend(Protocol):
    """What a scheduler does for :class:`RemotePool`."""

    #: The executor's name (the journal's ``executor``), and what a job is called there.
    name: str
    noun: str

    def submit(self, cell: Cell, task: CellTask) -> Handle:
        """Hand the cell's attempt to the scheduler."""

    def attached(self, cells: list[Cell]) -> list[Handle]:
        """The jobs of ``cells`` that an earlier bench submitted and that still run."""

    def poll(self, handle: Handle) -> Ended | None:
        """None while the job runs; its end, once it has ended (a lost job's with its reason)."""

    def release(self, handle: Handle) -> None:
        """Forget a job whose attempt is in the journal."""

    def stop(self, handles: list[Handle]) -> list[tuple[Handle, Ended]]:
        """The bench stops: deal with the running jobs; the ends of those that ended."""


def lost(handle: Handle, reason: str, interrupted: bool = True) -> Ended:
    """The end of a job that said nothing of its attempt (killed with its node, cancelled before
    it could answer): no exit code, the time since its submission, and ``reason``."""
    return Ended(
        AttemptResult(
            exit_code=None,
            seconds=max(0.0, time.time() - handle.submitted),
            resumed=handle.resumed,
            reason=reason,
            interrupted=interrupted,
        )
    )


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_end(journal: Journal, backend: Backend, handle: Handle, ended: Ended) -> Outcome | None:
    """Record a job's attempt in the journal and forget the job; None when it ran nothing."""
    result = ended.result
    if result is None:
        backend.release(handle)
        return None
    outcome = Outcome(
        cell=handle.cell,
        exit_code=result.exit_code,
        seconds=result.seconds,
        resumed=result.resumed,
        reason=result.reason,
        interrupted=result.interrupted,
        job=handle.job_id,
        host=result.host or None,
    )
    record_outcome(journal, outcome, backend.name)
    backend.release(handle)
    return outcome


class RemotePool:
    """Runs cells through ``backend``, at most ``workers`` in flight (None: all)."""

    def __init__(
        self,
        backend: Backend,
        make_task: Callable[[Cell], CellTask],
        workers: int | None,
        journal: Journal,
        console: Console,
    ) -> None:
        self.backend, self.make_task, self.workers = backend, make_task, workers
        self.journal, self.console = journal, console

    def _submit(self, cell: Cell) -> Handle:
        handle = self.backend.submit(cell, self.make_task(cell))
        verb = "to resume" if handle.resumed else "to start"
        self.console.print(
            f"submitted {cell.key} {verb} as {self.backend.noun} {escape(handle.job_id)} "
            f"(log {_shown(cell.log_file)})",
            highlight=False,
        )
        return handle

    def run(self, cells: list[Cell], announce: Callable[[Outcome], None]) -> list[Outcome]:
        """Run ``cells``; ``announce`` is called as each attempt ends. A failed or lost cell does
        not stop the others. On any exception (a stop, an error of the bench) the running jobs
        go to :meth:`Backend.stop` and it propagates."""
        running = self.backend.attached(cells)
        for handle in running:
            self.console.print(
                f"re-attached to {self.backend.noun} {escape(handle.job_id)}: {handle.cell.key}",
                highlight=False,
            )
        attached = {handle.cell.key for handle in running}
        pending = deque(cell for cell in cells if cell.key not in attached)
        outcomes: list[Outcome] = []
        with progress_display(self.console) as progress:
            task = progress.add_task("cells", total=len(cells), status="")
            try:
                while pending or running:
                    while pending and (self.workers is None or len(running) < self.workers):
                        running.append(self._submit(pending.popleft()))
                    time.sleep(POLL_S)
                    for handle in list(running):
                        ended = self.backend.poll(handle)
                        if ended is None:
                            continue
                        running.remove(handle)
                        outcome = record_end(self.journal, self.backend, handle, ended)
                        if outcome is not None:
                            outcomes.append(outcome)
                            announce(outcome)
                        progress.advance(task)
                    progress.update(task, status="running: " + ", ".join(h.cell.key for h in running))
            except BaseException:
                for handle, ended in self.backend.stop(running):
                    record_end(self.journal, self.backend, handle, ended)
                raise
        return outcomes


class RemotePoolExecutor:
    """What the Slurm and Ray executors share: their cells run as ``maskkit`` cell commands
    (:meth:`Cell.task`) through a :class:`RemotePool` over their ``backend``. A subclass sets
    ``backend``, ``threads``, ``nproc``, ``workers`` and ``console``."""

    backend: Backend
    threads: int
    nproc: int | None
    workers: int
    console: Console

    def run(self, cells: list[Cell], journal: Journal, announce: Callable[[Outcome], None]) -> list[Outcome]:
        def make_task(cell: Cell) -> Any:
            return cell.task(self.threads, maskkit.bench.CELL_CLI, self.nproc)

        return RemotePool(self.backend, make_task, self.workers, journal, self.console).run(cells, announce)


def resumes(cell: Cell) -> bool:
    """Whether the cell's next attempt resumes it (its run dir holds a config)."""
    return cell.state() == CellState.PARTIAL


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is under it."""
    with contextlib.suppress(ValueError):
        return escape(str(path.relative_to(Path.cwd())))
    return escape(str(path))
