"""The executors' settings: the suite file's ``slurm:`` and ``ray:`` sections, and the options of
``maskkit bench`` that override them.

Nothing here imports submitit or ray: a suite file is validated, and ``maskkit bench --help``
answers, without either installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from maskkit.config import StrictModel


class SlurmSettings(StrictModel):
    """How ``--executor slurm`` submits each cell (the suite file's ``slurm:`` section)."""

    partition: str | None = Field(None, description="the Slurm partition (default: the cluster's)")
    account: str | None = Field(None, description="the account the jobs are charged to")
    time: int = Field(240, gt=0, description="the time limit of each cell's job, in minutes")
    gpus_per_cell: int | None = Field(None, ge=0, description="GPUs per cell (default: nproc, else 1)")
    cpus_per_cell: int | None = Field(None, gt=0, description="CPUs per cell (default: threads × nproc)")
    nproc: int | None = Field(None, gt=0, description="processes per cell under torchrun (--nproc)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="other submitit Slurm parameters: constraint, qos, mem_gb, …"
    )
    cluster: Literal["slurm", "local"] = Field(
        "slurm", description="local: submitit's local executor, jobs on this machine (no Slurm)"
    )


class RaySettings(StrictModel):
    """How ``--executor ray`` runs each cell (the suite file's ``ray:`` section)."""

    address: str | None = Field(None, description="the cluster (ray.init's address; default: Ray's own)")
    gpus_per_cell: int | None = Field(
        None, ge=0, description="GPUs per cell (default: nproc, else 1, where the cluster has GPUs)"
    )
    nproc: int | None = Field(None, gt=0, description="processes per cell under torchrun (--nproc)")


@dataclass(frozen=True)
class ExecutorOptions:
    """What the command line says about where the cells run; None is "not given" (the suite
    file's value, else the default, applies)."""

    name: str = "local"
    nproc: int | None = None
    gpus_per_cell: int | None = None
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_time: int | None = None
    slurm_options: tuple[str, ...] = ()
    ray_address: str | None = None

    def given_for_others(self) -> list[str]:
        """The options given that the chosen executor does not read, as their flags."""
        owners = {
            "--gpus-per-cell": (self.gpus_per_cell is not None, ("slurm", "ray")),
            "--slurm-partition": (self.slurm_partition is not None, ("slurm",)),
            "--slurm-account": (self.slurm_account is not None, ("slurm",)),
            "--slurm-time": (self.slurm_time is not None, ("slurm",)),
            "--slurm-option": (bool(self.slurm_options), ("slurm",)),
            "--ray-address": (self.ray_address is not None, ("ray",)),
        }
        return [flag for flag, (given, readers) in owners.items() if given and self.name not in readers]
