"""``maskkit train --nproc N``: the same command, run by torchrun in N processes on this machine.

The launcher is torchrun itself (``torch.distributed.run``, called in this process with
``--standalone --nproc-per-node N -m maskkit ...``); this module builds its arguments and turns
a failed job into one ``error:`` line. Workers, under this launcher or under a torchrun the user
started, report a failure through torchrun's error file (:func:`report_worker_failure`), which
is how torchrun tells its launcher which process failed first and why.

torchrun stops every other process as soon as one fails, and a process waiting for a dead one
in a collective gives up after the collective timeout (:mod:`maskkit.distributed`), so no
process waits forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from maskkit.torchrun_env import RUN_DIR_NOTE

#: Set by the launcher for its workers: failures are reported by the launcher, in one line, so the
#: workers only write them to torchrun's error file.
LAUNCHER_REPORTS = "MASKKIT_LAUNCHER_REPORTS"
#: The exit code of a user error (maskkit.cli).
USER_ERROR_EXIT_CODE = 2
#: Words that mark a process's failure as a consequence of another's (see maskkit.distributed).
_CONSEQUENCE = "lost contact with the other processes"


class LaunchFailed(Exception):
    """The multi-process job failed; ``message`` is its one-line explanation."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def worker_arguments(argv: list[str]) -> list[str]:
    """The command line for the workers: ``argv`` without ``--nproc N`` (or ``--nproc=N``)."""
    arguments, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            arguments.append(argument)
    return arguments


def run_with_torchrun(nproc: int, argv: list[str]) -> None:
    """Run ``maskkit <argv>`` in ``nproc`` processes on this machine under torchrun, and wait.

    Raises:
        LaunchFailed: a process failed (or was killed); all were stopped. The message names the
            first failure and, when the run dir is known, the command that resumes it.
        KeyboardInterrupt: the launcher was interrupted (its workers are stopped by torchrun).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_torchrun_logs()
    arguments = torchrun.parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "maskkit", *argv]
    )
    with _run_dir_note() as note:
        try:
            torchrun.run(arguments)
        except ChildFailedError as error:
            raise LaunchFailed(*_failure_message(error, nproc, _read_note(note))) from None
        except SignalException:
            raise KeyboardInterrupt from None


def _quiet_torchrun_logs() -> None:
    """torchrun's own log lines (rendezvous, 'sending SIGTERM', its failure table) would bury the
    one line this launcher prints; the workers' output is unaffected."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _run_dir_note() -> Iterator[Path]:
    handle, name = tempfile.mkstemp(prefix="maskkit-run-dir-", suffix=".txt")
    os.close(handle)
    previous = {key: os.environ.get(key) for key in (RUN_DIR_NOTE, LAUNCHER_REPORTS)}
    os.environ[RUN_DIR_NOTE], os.environ[LAUNCHER_REPORTS] = name, "1"
    try:
        yield Path(name)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Path(name).unlink(missing_ok=True)


def _read_note(note: Path) -> str | None:
    try:
        return note.read_text().strip() or None
    except OSError:
        return None


def _message_of(failure) -> str:
    """The one-line explanation in a torchrun ``ProcessFailure``."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "").strip()
    if failure.exitcode < 0:
        return f"it was killed by signal {failure.signal_name()}"
    return message.splitlines()[0] if message else f"it exited with code {failure.exitcode}"


def _is_consequence(failure) -> bool:
    """Whether a failure follows from another's: a process that lost contact with a failed one,
    or one that torchrun stopped (SIGTERM) because another failed."""
    return failure.exitcode == -signal.SIGTERM or _CONSEQUENCE in _message_of(failure)


def _failure_message(error, nproc: int, run_dir: str | None) -> tuple[str, int]:
    """``(message, exit code)`` for a failed job: its root cause, the first failure that is not
    merely another process noticing it or being stopped because of it."""
    rank, failure = min(
        error.failures.items(),
        key=lambda item: (_is_consequence(item[1]), item[1].timestamp, item[0]),
    )
    detail = _message_of(failure)
    if failure.exitcode == USER_ERROR_EXIT_CODE:
        return detail, USER_ERROR_EXIT_CODE  # the same user error a single process would give
    message = f"process {rank} of {nproc} failed: {detail}. All {nproc} processes were stopped"
    if run_dir is not None:
        message += (
            f"; the last good checkpoint in {run_dir} is kept: continue with "
            f"maskkit train --resume {run_dir} --nproc {nproc}"
        )
    return message + ".", 1


def report_worker_failure(message: str, traceback_text: str | None = None) -> bool:
    """Record a worker's failure in torchrun's error file; return whether the worker should
    also print its ``error:`` line (not when the ``--nproc`` launcher prints it).

    The file's format is torchrun's own (``torch.distributed.elastic``'s ``ErrorHandler``):
    torchrun reads the message and the time of every failed process from it to find the first.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {
            "message": {
                "message": message,
                "extraInfo": {"py_callstack": traceback_text or message, "timestamp": str(int(time.time()))},
            }
        }
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps(record))
    return not os.environ.get(LAUNCHER_REPORTS)
