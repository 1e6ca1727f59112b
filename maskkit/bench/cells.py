"""The cells of a suite: each one policy × dataset × seed, trained as a normal run dir.

:func:`expand_grid` turns a validated suite into cells, each with its full, validated run config:
the suite's preset and shared config, the dataset's overrides, then what the grid sets (policy,
its options and prior, dataset, data folder, seed, and ``protocols: true``). The ``none`` policy
is the ViT from scratch: ``pretrain.steps: 0`` (stage 1 skipped, the policy takes no part; the
encoder is initialised exactly as every other cell of the seed), then the same stage 2.

A cell is trained by ``maskkit train`` in a process of its own (:meth:`Cell.command`): a new cell
with ``--config`` and ``--run-dir``, one whose run dir holds a config but no summary (killed midway)
with ``--resume``, which continues from its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import maskkit.bench
from maskkit.config import (
    ADJUSTABLE_ON_RESUME,
    RunConfig,
    build_config,
    config_differences,
    config_to_yaml,
    load_run_config,
)
from maskkit.data import dataset_names, default_data_dir
from maskkit.engine.priors import check_prior_choice
from maskkit.errors import ConfigError, MaskkitError, UnknownNameError
from maskkit.plugins import policy_info
from maskkit.rundir import RunDir

from .attempt import CellState, CellTask, prepare_run_dir, run_dir_state
from .layout import SuiteLayout
from .suite import NONE_POLICY, DatasetEntry, PolicyEntry, Suite

#: What may differ between a cell's saved config and the suite's without making it another
#: experiment: how it computes or reports, and where its data sits.
IGNORED_ON_COMPARISON = (*ADJUSTABLE_ON_RESUME, "data.data_dir")


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    dataset: str
    policy: str
    seed: int
    config: RunConfig
    layout: SuiteLayout

    @property
    def key(self) -> str:
        """``dataset/policy/seed-k``, as tables and messages name the cell."""
        return f"{self.dataset}/{self.policy}/seed-{self.seed}"

    @property
    def slug(self) -> str:
        return f"{self.dataset}-{self.policy}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir(self.dataset, self.policy, self.seed)

    @property
    def config_file(self) -> Path:
        return self.layout.config_file(self.slug)

    @property
    def log_file(self) -> Path:
        return self.layout.log_file(self.slug)

    def state(self) -> CellState:
        return run_dir_state(self.run_dir, self.config.protocols)

    def check_saved_config(self) -> None:
        """Refuse a run dir made from another config than the suite now gives the cell (the
        suite file changed): resuming or reporting it would mix two experiments."""
        run = RunDir(self.run_dir)
        if not run.config_path.is_file():
            return
        saved = load_run_config(run.config_path).model_dump(mode="json")
        differing = [
            item
            for item in sorted(config_differences(saved, self.config.model_dump(mode="json")))
            if item.split(" ")[0] not in IGNORED_ON_COMPARISON
        ]
        if differing:
            raise ConfigError(
                f"cell {self.key}: its run dir {run.path} was made with another config than the suite "
                f"now gives it ({'; '.join(differing)}); move the run dir away to run the cell again, "
                "or give the changed suite another --out"
            )

    def prepare_new(self) -> None:
        """Before a new cell starts: write its config file, and clear what a run killed before
        writing its config left in the run dir (``maskkit train --run-dir`` wants it empty)."""
        prepare_run_dir(self.key, self.run_dir, self.config_file, config_to_yaml(self.config))

    def command(
        self, state: CellState, cli: Sequence[str] | None = None, nproc: int | None = None
    ) -> list[str]:
        """The ``maskkit train`` command line that starts (``new``) or resumes (``partial``) it:
        ``cli`` (default :data:`maskkit.bench.CELL_CLI`) then ``train``; with ``nproc`` > 1,
        ``--nproc`` (torchrun in that many processes)."""
        cli = list(maskkit.bench.CELL_CLI if cli is None else cli)
        processes = ["--nproc", str(nproc)] if nproc is not None and nproc > 1 else []
        if state == CellState.PARTIAL:
            return [*cli, "train", "--resume", str(self.run_dir), *processes]
        return [
            *cli,
            "train",
            "--preset",
            self.config.preset,
            "--config",
            str(self.config_file),
            "--run-dir",
            str(self.run_dir),
            *processes,
        ]

    def task(self, threads: int, cli: Sequence[str] | None = None, nproc: int | None = None) -> CellTask:
        """What an attempt of this cell needs wherever it runs (:mod:`~maskkit.bench.attempt`)."""
        return CellTask(
            key=self.key,
            run_dir=self.run_dir,
            config_file=self.config_file,
            config_yaml=config_to_yaml(self.config),
            log_file=self.log_file,
            protocols=self.config.protocols,
            new_command=tuple(self.command(CellState.NEW, cli, nproc)),
            resume_command=tuple(self.command(CellState.PARTIAL, cli, nproc)),
            threads=threads,
        )


def _data_dir(suite: Suite, entry: DatasetEntry, data_dir: Path | None) -> Path:
    """``entry.data_dir`` under the suite's data folder (``--data-dir``, else the suite's, else the
    default one), as an absolute path so that a resumed cell finds it from anywhere."""
    root = data_dir or suite.data_dir or default_data_dir()
    path = root if entry.data_dir is None else root / entry.data_dir
    return path.expanduser().resolve()


def _prior(suite: Suite, dataset: DatasetEntry, policy: PolicyEntry) -> dict[str, Any]:
    """The prior a guided policy reads: the policy entry's, else the dataset's, else the suite's."""
    for source in (policy, dataset, suite):
        if source.prior is not None:
            return {"prior": source.prior, "prior_options": dict(source.prior_options)}
    return {}


def _cell_overrides(
    suite: Suite, dataset: DatasetEntry, policy: PolicyEntry, seed: int, data_dir: Path
) -> tuple[dict, frozenset[str]]:
    """What the grid sets in a cell's config, and the prior maps its policy reads."""
    data: dict[str, Any] = {"dataset": dataset.dataset, "data_dir": str(data_dir)}
    if dataset.subset is not None:
        data["subset"] = dataset.subset
    overrides: dict[str, Any] = {"seed": seed, "protocols": True, "data": data}
    if policy.policy == NONE_POLICY:
        if policy.policy_options or policy.prior is not None:
            raise ConfigError(f"policy '{NONE_POLICY}' (no pretraining) takes no policy_options or prior")
        # Any fixed policy would do: with no pretrain step it never masks anything.
        overrides.update(policy="random", pretrain={"steps": 0})
        return overrides, frozenset()
    requires = policy_info(policy.policy).requires
    overrides.update(policy=policy.policy, policy_options=dict(policy.policy_options))
    if requires:
        overrides.update(_prior(suite, dataset, policy))
        data["build_priors"] = True
    elif policy.prior is not None:
        overrides["prior"] = policy.prior  # refused below, with check_prior_choice's message
    return overrides, requires


def expand_grid(suite: Suite, layout: SuiteLayout, data_dir: Path | None = None) -> list[Cell]:
    """Every cell of ``suite`` (datasets, then policies, then seeds, in the file's order), each
    config built and validated. An unknown dataset or policy ends in an
    :class:`UnknownNameError`, any other problem in one :class:`ConfigError` naming the cell."""
    known = dataset_names()
    for entry in suite.datasets:
        if entry.dataset.strip().lower() not in known:
            raise UnknownNameError("dataset", entry.dataset, known)
    for entry in suite.policies:
        if entry.policy != NONE_POLICY:
            policy_info(entry.policy)
    cells = []
    for dataset in suite.datasets:
        root = _data_dir(suite, dataset, data_dir)
        for policy in suite.policies:
            for seed in suite.seeds:
                key = f"{dataset.label}/{policy.label}/seed-{seed}"
                try:
                    overrides, requires = _cell_overrides(suite, dataset, policy, seed, root)
                    config = build_config(
                        suite.preset, overrides=[suite.config, dataset.config, policy.config, overrides]
                    )
                    check_prior_choice(config, requires)
                except MaskkitError as error:
                    raise ConfigError(f"cell {key}: {error}") from None
                cells.append(Cell(dataset.label, policy.label, seed, config, layout))
    return cells


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells matching the ``KEY=V1,V2`` filters (``dataset``, ``policy``, ``seed``): a cell
    must match every key named, and any of the values given for a key (``policy=a`` and
    ``policy=b`` in two filters are ``policy=a,b``)."""
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, _, values = item.partition("=")
        key = key.strip()
        named = {value.strip() for value in values.split(",") if value.strip()}
        if key not in ("dataset", "policy", "seed") or not named:
            raise ConfigError(
                f"--only expects dataset=..., policy=... or seed=... (comma-separated), got '{item}'"
            )
        known = {str(getattr(cell, key)) for cell in cells}
        unknown = sorted(named - known)
        if unknown:
            raise ConfigError(
                f"--only {key}: {', '.join(unknown)} not in the suite (it has {', '.join(sorted(known))})"
            )
        wanted.setdefault(key, set()).update(named)
    return [cell for cell in cells if all(str(getattr(cell, key)) in wanted[key] for key in wanted)]
