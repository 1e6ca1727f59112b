"""Where a suite's cells run: ``local`` (processes on this machine, the default), ``slurm`` (one
submitit job per cell) or ``ray`` (one Ray actor per cell, on a running cluster).

Whatever the executor, a cell's attempt is the same :func:`~maskkit.bench.attempt.start_attempt`
(``maskkit train`` in a process of its own), and the output dir, the journal and the report are
the same. One module per executor; this registry names them and imports one only when a suite
runs on it, so that neither submitit nor ray is imported otherwise.

- :mod:`~maskkit.bench.executors.settings`: the suite file's ``slurm:`` / ``ray:`` sections and
  the command line's options;
- :mod:`~maskkit.bench.executors.local`: the local pool (:class:`~maskkit.bench.runner.CellPool`);
- :mod:`~maskkit.bench.executors.remote`: the loop that submits cells to a scheduler and records
  what becomes of them, for both of the others;
- :mod:`~maskkit.bench.executors.submitted`: the Slurm jobs in flight, kept in the output dir;
- :mod:`~maskkit.bench.executors.slurm` and :mod:`~maskkit.bench.executors.ray`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from maskkit.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from rich.console import Console

    from ..cells import Cell
    from ..journal import Journal
    from ..layout import SuiteLayout
    from ..runner import Outcome
    from ..suite import Suite
    from .settings import ExecutorOptions

#: Executor name → its module.
EXECUTORS: dict[str, str] = {
    "local": "maskkit.bench.executors.local",
    "slurm": "maskkit.bench.executors.slurm",
    "ray": "maskkit.bench.executors.ray",
}


class Executor(Protocol):
    """Runs a suite's pending cells and records each attempt in the journal."""

    name: str

    def describe(self) -> str:
        """How the cells run, for the plan line (``2 worker(s) × 1 thread(s)``)."""

    def start_fields(self) -> dict[str, Any]:
        """The fields of the journal's ``start`` record."""

    def run(self, cells: list[Cell], journal: Journal, announce: Callable[[Outcome], None]) -> list[Outcome]:
        """Run ``cells``, call ``announce`` as each attempt ends; propagate a stop
        (:class:`KeyboardInterrupt`) once the running cells are seen to."""


@dataclass(frozen=True)
class ExecutorContext:
    """What an executor is made from: the command line's options, the suite (its ``slurm:`` and
    ``ray:`` sections), the output dir, ``--workers`` and ``--threads`` (None: not given)."""

    options: ExecutorOptions
    suite: Suite
    layout: SuiteLayout
    workers: int | None
    threads: int | None
    console: Console


def executor_names() -> list[str]:
    return list(EXECUTORS)


def check_executor_name(name: str) -> None:
    """An unknown executor is a :class:`~maskkit.errors.UnknownNameError` (did you mean)."""
    if name not in EXECUTORS:
        raise UnknownNameError("executor", name, executor_names())


def create_executor(context: ExecutorContext) -> Executor:
    """The executor ``context.options.name``, its options checked (an option of another
    executor, a missing extra, a bad Slurm parameter, an unreachable Ray cluster: one
    :class:`~maskkit.errors.ConfigError`)."""
    options = context.options
    check_executor_name(options.name)
    foreign = options.given_for_others()
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not read by --executor {options.name}; leave it out")
    module = importlib.import_module(EXECUTORS[options.name])
    return module.create(context)


def missing_extra(executor: str, package: str) -> ConfigError:
    """The error of an executor whose optional dependency is not installed."""
    return ConfigError(
        f"--executor {executor} needs the {package} package: pip install 'maskkit[{executor}]' "
        f"(uv: uv pip install 'maskkit[{executor}]')"
    )
