"""Where a suite's cells and outputs live under its output dir.

Layout::

    OUT/
      suite.yaml                       the suite file as last run
      cells.csv  results.md  results.png  forest.png   the report (rebuilt from the run dirs at
                                       every finish)
      journal.jsonl                    one JSON line per invocation and per cell attempt
      runs/<dataset>/<policy>/seed-<k>/    each cell's run dir, as `maskkit train` makes it
      configs/<dataset>-<policy>-seed<k>.yaml  the config a new cell starts from
      logs/<dataset>-<policy>-seed<k>.log      the cell's output, appended by every attempt
      jobs/submitted.json              the Slurm jobs in flight (--executor slurm)
      jobs/<job id>/                   submitit's files of each job: its pickles, stdout, stderr
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SuiteLayout:
    """The paths of one output dir ``root``."""

    root: Path

    @property
    def suite_copy(self) -> Path:
        return self.root / "suite.yaml"

    @property
    def csv(self) -> Path:
        return self.root / "cells.csv"

    @property
    def markdown(self) -> Path:
        return self.root / "results.md"

    @property
    def plot(self) -> Path:
        return self.root / "results.png"

    @property
    def forest(self) -> Path:
        return self.root / "forest.png"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".bench.lock"

    @property
    def jobs(self) -> Path:
        """The folder of the jobs of ``--executor slurm`` (submitit's files, the registry)."""
        return self.root / "jobs"

    def run_dir(self, dataset: str, policy: str, seed: int) -> Path:
        return self.root / "runs" / dataset / policy / f"seed-{seed}"

    def config_file(self, slug: str) -> Path:
        return self.root / "configs" / f"{slug}.yaml"

    def log_file(self, slug: str) -> Path:
        return self.root / "logs" / f"{slug}.log"
