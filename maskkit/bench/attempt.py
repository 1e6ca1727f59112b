"""One attempt of a cell, the same on every executor: ``maskkit train`` started (a new cell) or
resumed (one killed midway) in a process of its own, its output appended to the cell's log.

The local pool (:mod:`~maskkit.bench.runner`) starts attempts with :func:`start_attempt` and polls
them itself. The other executors (:mod:`maskkit.bench.executors`) run :func:`run_attempt` as the
whole of a cell's job (a submitit job, a Ray actor): it starts the attempt the same way, waits for
it, and stops it cleanly when asked (SIGINT: ``maskkit train`` stops with its checkpoints whole),
by the scheduler's signal or by the bench.

A :class:`CellTask` is plain data, and this module imports no torch and no plugin: a remote job
unpickles the task and imports this module before its cell's own process starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import IO

from maskkit.errors import ConfigError
from maskkit.rundir import RunDir, atomic_write_text

#: Thread-count variables of torch's, MKL's and OpenBLAS's pools, set for every cell.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Seconds between polls of a running attempt.
POLL_S = 0.5
#: Seconds a stopped attempt gets to exit after SIGINT before it is killed.
STOP_GRACE_S = 20.0
#: The exit status of a ``maskkit train`` that was interrupted (SIGINT) and kept its checkpoints.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
#: The first line of every attempt in the cell's log.
LOG_HEADER = "=== maskkit bench"
_PR_SET_PDEATHSIG = 1


class CellState(StrEnum):
    """``done``: summary.json (and protocols.json) written; ``partial``: a run dir with a config
    and no summary (killed or failed midway), resumed; ``new``: nothing yet."""

    DONE = "done"
    PARTIAL = "partial"
    NEW = "new"


def run_dir_state(run_dir: Path, protocols: bool) -> CellState:
    """The state of the cell whose run dir is ``run_dir`` (``protocols``: whether its config asks
    for the linear probe and k-NN, whose results a finished cell then holds)."""
    run = RunDir(run_dir)
    if run.summary_path.is_file() and (not protocols or run.protocols_path.is_file()):
        return CellState.DONE
    if run.config_path.is_file():
        return CellState.PARTIAL
    return CellState.NEW


def prepare_run_dir(key: str, run_dir: Path, config_file: Path, config_yaml: str) -> None:
    """Before a new cell starts: write its config file, and clear what a run killed before
    writing its config left in the run dir (``maskkit train --run-dir`` wants it empty)."""
    run = RunDir(run_dir)
    if run.path.is_dir() and any(run.path.iterdir()) and not run.discard_unstarted():
        raise ConfigError(f"cell {key}: {run.path} holds checkpoints but no config.yaml; move it away")
    atomic_write_text(config_file, config_yaml)


@dataclass(frozen=True)
class CellTask:
    """Everything one attempt of a cell needs, wherever it runs (plain data: it travels to a job).

    Attributes:
        key: the cell, as ``dataset/policy/seed-k``.
        new_command: the ``maskkit train`` command line of a new cell; ``resume_command`` that
            of one to resume. Which one runs is decided when the attempt starts, from the run dir.
        interpreter: the Python of the bench that made the task; where a command starts with it,
            a job on another machine runs its own (:meth:`here`).
        threads: torch threads per process (:data:`THREAD_VARIABLES`).
    """

    key: str
    run_dir: Path
    config_file: Path
    config_yaml: str
    log_file: Path
    protocols: bool
    new_command: tuple[str, ...]
    resume_command: tuple[str, ...]
    threads: int
    interpreter: str = sys.executable

    def state(self) -> CellState:
        return run_dir_state(self.run_dir, self.protocols)

    def command(self, state: CellState) -> list[str]:
        """The command line that starts (``new``) or resumes (``partial``) the cell."""
        return list(self.resume_command if state == CellState.PARTIAL else self.new_command)

    def here(self) -> CellTask:
        """This task with this process's Python in place of the bench's, where the commands
        start with the bench's (the nodes of a cluster may install it elsewhere)."""

        def local(command: tuple[str, ...]) -> tuple[str, ...]:
            if command and command[0] == self.interpreter:
                return (sys.executable, *command[1:])
            return command

        return replace(
            self,
            new_command=local(self.new_command),
            resume_command=local(self.resume_command),
            interpreter=sys.executable,
        )


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux); None
    elsewhere. libc is looked up here, in the parent, so the child only makes the call."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: follow it now
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def cell_environment(threads: int) -> dict[str, str]:
    """This process's environment with ``threads`` torch threads (:data:`THREAD_VARIABLES`)."""
    return {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}


@dataclass
class Started:
    """A running attempt: its process (a session of its own), its open log, when it started
    (``time.perf_counter``) and whether it resumes the cell."""

    process: subprocess.Popen
    log: IO[str]
    started: float
    resumed: bool


def start_attempt(task: CellTask, preexec: Callable[[], None] | None = None) -> Started:
    """Start ``maskkit train`` for ``task``: a new cell gets its config file first, one with a
    run dir resumes. Its output is appended to the cell's log, after a header line."""
    state = task.state()
    if state == CellState.NEW:
        prepare_run_dir(task.key, task.run_dir, task.config_file, task.config_yaml)
    command = task.command(state)
    task.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = task.log_file.open("a")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"\n{LOG_HEADER}, {stamp}: {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=cell_environment(task.threads),
        start_new_session=True,
        preexec_fn=preexec,
    )
    return Started(process, log, time.perf_counter(), state == CellState.PARTIAL)


class StopRequest:
    """Why a running attempt should stop, once someone asks (a signal handler, another thread);
    the first reason given stays."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended, as the job that ran it saw it.

    Attributes:
        exit_code: ``maskkit train``'s exit status (negative: killed by that signal); None
            where the attempt's job was lost before it could say (a node that died).
        seconds: the attempt's wall time (start-up, data, training, protocols).
        resumed: whether it resumed the cell from its run dir.
        reason: why it was stopped, when something stopped it (the scheduler, the bench).
        interrupted: stopped from outside, its checkpoints kept: the next run resumes it.
        host: the machine it ran on.
    """

    exit_code: int | None
    seconds: float
    resumed: bool
    reason: str | None = None
    interrupted: bool = False
    host: str = ""


def interrupt(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGINT to the process's group (``maskkit train`` stops with its checkpoints whole), then
    SIGKILL if it has not exited after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_attempt(task: CellTask, stop: StopRequest) -> AttemptResult | None:
    """The whole of a cell's job on a remote executor: start the attempt (with this machine's
    Python), wait for it, and stop it cleanly once ``stop`` is requested. None when nothing ran:
    the cell was already done, or the stop came first."""
    if stop.reason is not None or task.state() == CellState.DONE:
        return None
    running = start_attempt(task.here(), die_with_parent())
    try:
        while running.process.poll() is None:
            if stop.reason is not None:
                interrupt(running.process)
                break
            time.sleep(POLL_S)
        exit_code = running.process.wait()
        if stop.reason is not None:
            running.log.write(f"{LOG_HEADER}: stopped: {stop.reason}\n")
    finally:
        running.log.close()
    return AttemptResult(
        exit_code=exit_code,
        seconds=time.perf_counter() - running.started,
        resumed=running.resumed,
        reason=stop.reason,
        interrupted=stop.reason is not None or exit_code == INTERRUPTED_EXIT_CODE,
        host=socket.gethostname(),
    )
