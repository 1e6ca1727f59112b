"""Runs cells side by side, each ``maskkit train`` in a process of its own.

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
import ctypes
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

from maskkit.engine.progress import progress_display

from .cells import Cell, CellState
from .journal import Journal

#: Seconds between polls of the running cells.
POLL_S = 0.5
#: Seconds a stopped cell gets to exit after SIGINT before it is killed.
STOP_GRACE_S = 20.0
#: Thread-count variables of torch's, MKL's and OpenBLAS's pools, set for every cell.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PR_SET_PDEATHSIG = 1


class BenchStopped(KeyboardInterrupt):
    """The bench was asked to stop (SIGINT or SIGTERM); ``signal_number`` says which."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@dataclass(frozen=True)
class Outcome:
    """How one attempt of a cell ended: ``exit_code`` 0 is success; negative, killed by a signal."""

    cell: Cell
    exit_code: int
    seconds: float
    resumed: bool


@dataclass
class _Running:
    cell: Cell
    process: subprocess.Popen
    log: IO[str]
    started: float
    resumed: bool


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the bench dies (Linux); None
    elsewhere. libc is looked up here, in the parent, so the child only makes the call."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the bench died before the call: follow it now
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


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
    """Runs cells, ``workers`` at a time, ``threads`` torch threads each."""

    def __init__(self, workers: int, threads: int, journal: Journal, console: Console) -> None:
        self.workers = workers
        self.threads = threads
        self.journal = journal
        self.console = console
        self.environment = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
        self._preexec = _die_with_parent()

    def _start(self, cell: Cell) -> _Running:
        state = cell.state()
        if state == CellState.NEW:
            cell.prepare_new()
        command = cell.command(state)
        cell.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = cell.log_file.open("a")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== maskkit bench, {stamp}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment,
            start_new_session=True,
            preexec_fn=self._preexec,
        )
        resumed = state == CellState.PARTIAL
        verb = "resuming" if resumed else "starting"
        self.console.print(f"{verb} {cell.key} (log {_shown(cell.log_file)})", highlight=False)
        return _Running(cell, process, log, time.perf_counter(), resumed)

    def _finish(self, running: _Running, exit_code: int) -> Outcome:
        running.log.close()
        seconds = time.perf_counter() - running.started
        outcome = Outcome(running.cell, exit_code, seconds, running.resumed)
        self.journal.record(
            "cell",
            cell=running.cell.key,
            exit_code=exit_code,
            seconds=round(seconds, 2),
            resumed=running.resumed,
            log=str(running.cell.log_file),
        )
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
