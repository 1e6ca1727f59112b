"""The Slurm (submitit) jobs in flight, kept in the output dir: ``OUT/jobs/submitted.json``.

A job is written here as soon as it is submitted and removed once its attempt is in the journal,
so that a bench that was stopped, or killed, leaves a record of the jobs that still run its
cells. The next ``maskkit bench`` on that output dir re-attaches to them instead of submitting the
cells again (``--executor slurm``), or collects those that ended meanwhile (any executor).
Reading it needs neither submitit nor Slurm.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from maskkit.errors import DamagedFileError
from maskkit.rundir import atomic_write_text

from ..layout import SuiteLayout


@dataclass(frozen=True)
class SubmittedJob:
    """One job: its id, submitit's folder for it, the cluster (``slurm``, or ``local`` for
    submitit's local executor), when it was submitted (seconds since the epoch), and whether
    the cell had a run dir to resume then."""

    cell: str
    job: str
    folder: str
    cluster: str
    submitted: float
    resumed: bool


class SubmittedJobs:
    """The registry of ``layout``'s output dir."""

    def __init__(self, layout: SuiteLayout) -> None:
        self.path: Path = layout.jobs / "submitted.json"

    def load(self) -> dict[str, SubmittedJob]:
        """Cell key → its job in flight (none when the file does not exist)."""
        if not self.path.is_file():
            return {}
        try:
            entries = json.loads(self.path.read_text())
            return {key: SubmittedJob(**entry) for key, entry in entries.items()}
        except (json.JSONDecodeError, TypeError, AttributeError) as error:
            raise DamagedFileError(
                self.path,
                f"not the registry of submitted jobs: {error}",
                "check the jobs it names with squeue, then delete it",
            ) from None

    def _save(self, jobs: dict[str, SubmittedJob]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({key: asdict(job) for key, job in jobs.items()}, indent=1))

    def add(self, job: SubmittedJob) -> None:
        self._save({**self.load(), job.cell: job})

    def remove(self, cell: str) -> None:
        jobs = self.load()
        if jobs.pop(cell, None) is not None:
            self._save(jobs)
