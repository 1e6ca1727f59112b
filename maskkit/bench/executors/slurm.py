"""``--executor slurm``: each cell a Slurm job, submitted through submitit (``maskkit[slurm]``).

The job runs :func:`~maskkit.bench.executors.jobs.run_slurm_cell`, the cell's attempt as the local
pool runs it (``maskkit train``, or ``maskkit train --nproc N`` under torchrun inside the
allocation). Each job asks for one node, one task, ``gpus_per_cell`` GPUs and ``cpus_per_cell``
CPUs for ``time`` minutes, on ``partition`` and ``account``, plus any other submitit Slurm
parameter (``options``). The output dir must be on a filesystem the nodes share (it holds the
run dirs, the logs, and submitit's files under ``OUT/jobs/``).

Each job is recorded in ``OUT/jobs/submitted.json`` when submitted (:mod:`.submitted`) and
forgotten once its attempt is in the journal. A bench that is stopped leaves its jobs running;
the next one re-attaches to them. A job that ends without a result (its node died, it was
cancelled or killed at its time limit) is recorded with the state Slurm gives it as the reason.

``cluster: local`` in the suite's ``slurm:`` section runs the jobs with submitit's local
executor on this machine: the same path without Slurm (the tests use it).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from maskkit.errors import ConfigError, closest_name

from ..cells import Cell
from ..journal import Journal, read_journal
from ..layout import SuiteLayout
from . import ExecutorContext, missing_extra
from .jobs import run_slurm_cell
from .remote import Ended, Handle, RemotePoolExecutor, first_line, lost, record_end, resumes
from .settings import SlurmSettings
from .submitted import SubmittedJob, SubmittedJobs

#: Torch threads per process when neither --threads nor cpus_per_cell says.
DEFAULT_THREADS = 4
#: Parameters the bench sets itself, from its own options (not through ``options``).
OWN_PARAMETERS = {
    "partition": "--slurm-partition (or the suite's slurm.partition)",
    "account": "--slurm-account (or slurm.account)",
    "time": "--slurm-time (or slurm.time)",
    "gpus_per_node": "--gpus-per-cell (or slurm.gpus_per_cell)",
    "cpus_per_task": "--threads, or slurm.cpus_per_cell",
    "nodes": "nothing: a cell is one node",
    "ntasks_per_node": "--nproc: torchrun starts the processes in the one task",
    "job_name": "nothing: each job is named after its cell",
}
#: Slurm states of a job that ended without a result through a fault of its own (the others, as
#: CANCELLED, TIMEOUT, PREEMPTED or NODE_FAIL, stopped it from outside: it resumes on the next run).
FAILED_STATES = ("FAILED", "OUT_OF_MEMORY", "BOOT_FAIL")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise missing_extra("slurm", "submitit") from None
    return submitit


def parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``--slurm-option KEY=VALUE`` items (values read as YAML: ``64``, ``true``), each KEY a
    parameter of submitit's Slurm executor that the bench does not set itself."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"--slurm-option expects KEY=VALUE (e.g. constraint=a100), got '{item}'")
        parsed[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return parsed


def check_options(options: dict[str, Any], submitit: Any) -> None:
    """Refuse a key submitit's Slurm executor does not know (naming the nearest one), and those
    the bench sets from its own options."""
    valid = submitit.SlurmExecutor._valid_parameters()
    for key in options:
        if key in OWN_PARAMETERS:
            raise ConfigError(f"Slurm option '{key}' is set by {OWN_PARAMETERS[key]}, not --slurm-option")
        if key not in valid:
            nearest = closest_name(key, valid)
            if nearest in OWN_PARAMETERS:
                hint = f" Did you mean {OWN_PARAMETERS[nearest]}?"
            else:
                hint = f" Did you mean '{nearest}'?" if nearest else ""
            listing = ", ".join(sorted(valid - set(OWN_PARAMETERS)))
            raise ConfigError(f"unknown Slurm option '{key}'.{hint} Slurm options are submitit's: {listing}.")


class SlurmBackend:
    """Submits cells as submitit jobs, polls them, and keeps :class:`.SubmittedJobs` up to date.
    Without an ``executor`` it can only look at jobs already submitted."""

    name = "slurm"

    def __init__(
        self,
        layout: SuiteLayout,
        executor: Any = None,
        cluster: str = "slurm",
        console: Console | None = None,
    ) -> None:
        self.submitit = _submitit()
        self.registry = SubmittedJobs(layout)
        self.folder = layout.jobs / "%j"
        self.executor, self.cluster, self.console = executor, cluster, console
        self.noun = "Slurm job" if cluster == "slurm" else "submitit local job"

    def submit(self, cell: Cell, task: Any) -> Handle:
        self.executor.update_parameters(name=f"maskkit-{cell.slug}")
        resumed = resumes(cell)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):  # submitit prints sbatch's errors too
                job = self.executor.submit(run_slurm_cell, task)
        except (
            self.submitit.core.utils.FailedJobError,
            self.submitit.core.utils.FailedSubmissionError,
        ) as error:
            raise ConfigError(f"Slurm refused the job of cell {cell.key}: {first_line(error)}") from None
        entry = SubmittedJob(cell.key, str(job.job_id), str(self.folder), self.cluster, time.time(), resumed)
        self.registry.add(entry)
        return Handle(cell, entry.job, entry.submitted, resumed, job)

    def _job(self, entry: SubmittedJob) -> Any:
        job_class = self.submitit.LocalJob if entry.cluster == "local" else self.submitit.SlurmJob
        return job_class(folder=entry.folder, job_id=entry.job)

    def attached(self, cells: list[Cell]) -> list[Handle]:
        jobs = self.registry.load()
        return [
            Handle(cell, entry.job, entry.submitted, entry.resumed, self._job(entry))
            for cell in cells
            if (entry := jobs.get(cell.key)) is not None
        ]

    def _ended(self, handle: Handle) -> bool:
        job = handle.native
        if job.paths.result_pickle.exists():
            return True
        if isinstance(job, self.submitit.LocalJob) and job._process is None:
            return not _local_job_alive(handle.job_id)  # re-attached: not this process's child
        return job.done()

    def poll(self, handle: Handle) -> Ended | None:
        if not self._ended(handle):
            return None
        job = handle.native
        state = _state(job)
        if job.paths.result_pickle.exists() or state.startswith("COMPLETED"):
            try:
                return Ended(job.result())
            except self.submitit.core.utils.FailedJobError as error:
                reason = f"{self.noun} {handle.job_id} failed: {_last_line(error)}"
                return lost(handle, reason, interrupted=False)
            except self.submitit.core.utils.UncompletedJobError:
                pass
        reason = f"{self.noun} {handle.job_id} ended without a result ({state})"
        return lost(handle, reason, interrupted=state.split(" ")[0] not in FAILED_STATES)

    def release(self, handle: Handle) -> None:
        self.registry.remove(handle.cell.key)

    def stop(self, handles: list[Handle]) -> list[tuple[Handle, Ended]]:
        """The jobs run on, recorded in the registry: the next run re-attaches to them."""
        if handles and self.console is not None:
            ids = " ".join(handle.job_id for handle in handles)
            cancel = f"; scancel {ids} cancels them" if self.cluster == "slurm" else ""
            self.console.print(
                f"{len(handles)} {self.noun}(s) keep running ({escape(ids)}): the same command "
                f"re-attaches to them{cancel}",
                highlight=False,
            )
        return []


def _state(job: Any) -> str:
    """Slurm's state of the job (sacct), or the local executor's."""
    if getattr(job, "_process", True) is None:  # a local job re-attached: its process has ended
        return "ENDED"
    try:
        return str(job.state)
    except Exception:
        return "UNKNOWN"


def _last_line(error: BaseException) -> str:
    """The last line of a job's traceback (the exception itself)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and set(line.strip()) != {"-"}]
    tracebacks = [line for line in lines if not line.startswith(("You can check", "or at paths", "- /"))]
    return first_line(tracebacks[-1] if tracebacks else error)


def _local_job_alive(pid: str) -> bool:
    """Whether submitit's local job controller ``pid`` still runs (and is one: not a zombie, not
    a recycled pid)."""
    proc = Path("/proc") / pid
    try:
        status = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False
    return status != "Z" and "submitit" in command


class SlurmExecutor(RemotePoolExecutor):
    """Cells as submitit jobs (:class:`SlurmBackend`) through :class:`~.remote.RemotePool`."""

    name = "slurm"

    def __init__(
        self,
        backend: SlurmBackend,
        settings: SlurmSettings,
        threads: int,
        nproc: int | None,
        gpus: int,
        cpus: int,
        workers: int | None,
        console: Console,
    ) -> None:
        self.backend, self.settings, self.threads, self.nproc = backend, settings, threads, nproc
        self.gpus, self.cpus, self.workers, self.console = gpus, cpus, workers, console

    def describe(self) -> str:
        where = "Slurm" if self.settings.cluster == "slurm" else "submitit's local executor"
        partition = f" partition {self.settings.partition}," if self.settings.partition else ""
        processes = f", {self.nproc} process(es) each" if self.nproc else ""
        return (
            f"{where},{partition} {self.gpus} GPU(s) and {self.cpus} CPU(s) per cell for "
            f"{self.settings.time} min, {self.threads} thread(s){processes}"
        )

    def start_fields(self) -> dict[str, Any]:
        return {
            "executor": self.name,
            "cluster": self.settings.cluster,
            "partition": self.settings.partition,
            "gpus_per_cell": self.gpus,
            "cpus_per_cell": self.cpus,
            "time_min": self.settings.time,
            "threads": self.threads,
            "workers": self.workers,
        }


def create(context: ExecutorContext) -> SlurmExecutor:
    """The Slurm executor of the command line's options over the suite's ``slurm:`` section;
    its parameters checked by submitit before anything is submitted."""
    submitit = _submitit()
    options = context.options
    base = context.suite.slurm or SlurmSettings()
    merged = base.model_copy(
        update={
            key: value
            for key, value in {
                "partition": options.slurm_partition,
                "account": options.slurm_account,
                "time": options.slurm_time,
                "gpus_per_cell": options.gpus_per_cell,
                "nproc": options.nproc,
                "options": {**base.options, **parse_options(options.slurm_options)},
            }.items()
            if value is not None
        }
    )
    check_options(merged.options, submitit)
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if merged.cluster == "slurm" and missing:
        raise ConfigError(
            f"--executor slurm needs Slurm's {' and '.join(missing)}, not on PATH: run the bench on a "
            "login node of the cluster (or set `slurm: {cluster: local}` in the suite to try it here)"
        )
    processes = merged.nproc or 1
    gpus = merged.gpus_per_cell if merged.gpus_per_cell is not None else processes
    if context.threads is not None:
        threads = context.threads
    elif merged.cpus_per_cell is not None:
        threads = max(1, merged.cpus_per_cell // processes)
    else:
        threads = DEFAULT_THREADS
    cpus = merged.cpus_per_cell or threads * processes
    parameters: dict[str, Any] = {
        "timeout_min": merged.time,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        "tasks_per_node": 1,
        "nodes": 1,
        **{f"slurm_{key}": value for key, value in merged.options.items()},
    }
    if merged.partition:
        parameters["slurm_partition"] = merged.partition
    if merged.account:
        parameters["slurm_account"] = merged.account
    folder = context.layout.jobs / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=merged.cluster)
        executor.update_parameters(**parameters)
    except (ValueError, TypeError, NameError, RuntimeError) as error:
        raise ConfigError(f"Slurm parameters: {first_line(error)}") from None
    backend = SlurmBackend(context.layout, executor, merged.cluster, context.console)
    return SlurmExecutor(backend, merged, threads, merged.nproc, gpus, cpus, context.workers, context.console)


def collect_submitted(
    layout: SuiteLayout, cells: list[Cell], journal: Journal, console: Console
) -> list[SubmittedJob]:
    """Record the attempts of the jobs an earlier bench submitted for ``cells`` and that ended
    since (unless the journal already has them), and forget those jobs; the ones still running,
    which only ``--executor slurm`` re-attaches to."""
    backend = SlurmBackend(layout)
    recorded = {record.get("job") for record in read_journal(layout.journal) if record.get("event") == "cell"}
    running = []
    entries = backend.registry.load()
    for handle in backend.attached(cells):
        ended = backend.poll(handle)
        if ended is None:
            running.append(entries[handle.cell.key])
        elif handle.job_id in recorded:
            backend.release(handle)
        else:
            outcome = record_end(journal, backend, handle, ended)
            if outcome is not None:
                console.print(
                    f"collected {backend.noun} {escape(handle.job_id)} of {handle.cell.key}, which ended "
                    f"while no bench watched (exit code {outcome.exit_code})",
                    highlight=False,
                )
    return running
