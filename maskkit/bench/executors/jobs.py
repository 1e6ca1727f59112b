"""What runs on the scheduler's side: the submitit job function and the Ray actor of a cell.

Both are :func:`~maskkit.bench.attempt.run_attempt`, the local pool's attempt waited on, with the
scheduler's way of asking it to stop: a signal for a Slurm job (SIGUSR2 shortly before its time
limit or on preemption, SIGTERM when it is cancelled), a method call for a Ray actor. The
attempt then stops cleanly (``maskkit train`` keeps its checkpoints) and the reason goes back to
the bench with the result.

This module imports neither submitit nor ray, nor torch: a job imports it before its cell's own
process starts.
"""

from __future__ import annotations

import os
import signal

from ..attempt import AttemptResult, CellTask, StopRequest, run_attempt


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "?"


def _preemption_signal() -> signal.Signals:
    """The signal submitit has Slurm send before the time limit (``SUBMITIT_PREEMPT_SIGNAL``)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def run_slurm_cell(task: CellTask) -> AttemptResult | None:
    """A cell's submitit job: its attempt, stopped cleanly on the scheduler's signals (submitit's
    own handlers, which would requeue the job or end it at once, are set aside meanwhile)."""
    stop = StopRequest()
    job = _job_id()
    usr = _preemption_signal()
    reasons = {
        usr: f"job {job} got {usr.name}: its time limit is near, or it was preempted",
        signal.SIGTERM: f"job {job} got SIGTERM: cancelled, preempted or over its time limit",
        signal.SIGINT: f"job {job} was interrupted (SIGINT)",
    }
    previous = {}
    for number, reason in reasons.items():
        previous[number] = signal.signal(number, lambda *_, reason=reason: stop.request(reason))
    try:
        return run_attempt(task, stop)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class CellActor:
    """A cell's Ray actor (threaded: :meth:`stop` runs while :meth:`run` waits)."""

    def __init__(self) -> None:
        self._stop = StopRequest()

    def run(self, task: CellTask) -> AttemptResult | None:
        return run_attempt(task, self._stop)

    def stop(self, reason: str) -> None:
        self._stop.request(reason)

    def pid(self) -> int:
        """The actor's process (the tests kill it, as a node that dies would)."""
        return os.getpid()
