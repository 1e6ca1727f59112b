"""``maskkit bench SUITE.yaml``: validate a suite, run its missing cells, write its report."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskkit.errors import ConfigError

from .aggregate import collect
from .cells import Cell, CellState, expand_grid, select
from .executors import Executor, ExecutorContext, check_executor_name, create_executor
from .executors.settings import ExecutorOptions
from .executors.submitted import SubmittedJobs
from .journal import Journal, read_journal, timings
from .layout import SuiteLayout
from .priors import build_missing_priors
from .report import write_report
from .runner import BenchStopped, Outcome, stop_on_sigterm
from .suite import Suite, load_suite

#: Exit status when a cell failed (the others ran on).
EXIT_CELL_FAILED = 1


@dataclass(frozen=True)
class BenchOptions:
    """What ``maskkit bench`` was asked to do (its command-line options)."""

    suite_file: Path
    out: Path | None = None
    workers: int | None = None
    threads: int | None = None
    data_dir: Path | None = None
    only: tuple[str, ...] = ()
    dry_run: bool = False
    report_only: bool = False
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)


@contextlib.contextmanager
def exclusive(layout: SuiteLayout) -> Iterator[None]:
    """Hold the output dir's lock: two benches on one output dir would run the same cells."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with layout.lock.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another maskkit bench is running on {layout.root}; wait for it, or stop it first"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_bench(options: BenchOptions, console: Console) -> int:
    """Run the suite's missing cells (or list them, or only rebuild the report); returns the exit
    status: 0, :data:`EXIT_CELL_FAILED` when a cell failed, 128 + the signal when stopped."""
    check_executor_name(options.executor.name)
    suite = load_suite(options.suite_file)
    layout = SuiteLayout((options.out or suite.output_dir()).expanduser().resolve())
    cells = expand_grid(suite, layout, options.data_dir)
    chosen = select(cells, list(options.only))
    if options.report_only:
        _report(suite, options.suite_file, cells, layout, console)
        return 0
    if options.dry_run:  # reads only: no lock, and nothing written (not even the output dir)
        _print_cells(chosen, _states(chosen), layout, console)
        return 0
    context = ExecutorContext(options.executor, suite, layout, options.workers, options.threads, console)
    executor = create_executor(context)
    with exclusive(layout):
        journal = Journal(layout.journal)
        in_flight = _collect_submitted(layout, chosen, journal, console)
        states = _states(chosen)
        pending = _pending(chosen, states, in_flight, executor.name)
        _announce_plan(suite.name, layout, chosen, states, executor.describe(), console)
        try:
            if not pending:
                return 0
            shutil.copyfile(options.suite_file, layout.suite_copy)
            return _run_cells(pending, executor, journal, console)
        finally:
            _report(suite, options.suite_file, cells, layout, console)


def _states(cells: list[Cell]) -> dict[str, CellState]:
    """Each cell's state, once its saved config (if any) is known to be the suite's; reads only."""
    states = {cell.key: cell.state() for cell in cells}
    for cell in cells:
        cell.check_saved_config()
    return states


def _collect_submitted(
    layout: SuiteLayout, cells: list[Cell], journal: Journal, console: Console
) -> dict[str, str]:
    """Settle the Slurm jobs an earlier bench left running for ``cells``: record those that ended
    since; the ones still running, cell key → job id."""
    keys = {cell.key for cell in cells}
    if not keys & set(SubmittedJobs(layout).load()):
        return {}  # nothing in flight: submitit is not needed
    from .executors.slurm import collect_submitted

    return {job.cell: job.job for job in collect_submitted(layout, cells, journal, console)}


def _pending(
    cells: list[Cell], states: dict[str, CellState], in_flight: dict[str, str], executor: str
) -> list[Cell]:
    """The cells to run: those not done, and with ``--executor slurm`` those whose earlier job
    still runs (it re-attaches to them, and records them when they end). Another executor
    refuses cells not done whose job still runs: they would run twice."""
    busy = {key: job for key, job in in_flight.items() if states[key] != CellState.DONE}
    if busy and executor != "slurm":
        listing = ", ".join(f"{key} (job {job})" for key, job in busy.items())
        raise ConfigError(
            f"{listing} still run as jobs an earlier `maskkit bench --executor slurm` submitted: "
            "run with --executor slurm to wait for them (it re-attaches), or cancel them first (scancel)"
        )
    attach = in_flight if executor == "slurm" else {}
    return [cell for cell in cells if states[cell.key] != CellState.DONE or cell.key in attach]


def _run_cells(cells: list[Cell], executor: Executor, journal: Journal, console: Console) -> int:
    """Build the cells' priors, run them, and record the invocation in the journal."""
    journal.record("start", **executor.start_fields(), cells=len(cells))
    started = time.perf_counter()
    outcome = "finished"
    try:
        with stop_on_sigterm():
            build_missing_priors(cells, console)
            outcomes = executor.run(cells, journal, lambda result: _announce_cell(result, console))
    except KeyboardInterrupt as interruption:
        outcome = "stopped"
        console.print(
            "stopped: run the same command again to resume the unfinished cells from their checkpoints"
        )
        return 128 + (interruption.signal_number if isinstance(interruption, BenchStopped) else signal.SIGINT)
    except BaseException:
        outcome = "error"
        raise
    finally:
        journal.record("finish", seconds=round(time.perf_counter() - started, 2), outcome=outcome)
    failed = [result for result in outcomes if result.exit_code != 0 and not result.interrupted]
    stopped = [result for result in outcomes if result.exit_code != 0 and result.interrupted]
    if failed:
        console.print(f"[red]{len(failed)} cell(s) failed[/]: " + ", ".join(r.cell.key for r in failed))
    if stopped:
        console.print(
            f"[yellow]{len(stopped)} cell(s) stopped[/] (the same command resumes them): "
            + ", ".join(r.cell.key for r in stopped)
        )
    return EXIT_CELL_FAILED if failed or stopped else 0


def _report(suite: Suite, suite_file: Path, cells: list[Cell], layout: SuiteLayout, console: Console) -> None:
    """Rebuild the report of every cell of the suite from the run dirs and the journal."""
    spent = timings(read_journal(layout.journal))
    paths = write_report(suite, suite_file, cells, collect(cells, spent), spent, layout)
    console.print("report: " + ", ".join(f"[cyan]{escape(str(path))}[/]" for path in paths))


def _announce_plan(
    name: str,
    layout: SuiteLayout,
    cells: list[Cell],
    states: dict[str, CellState],
    how: str,
    console: Console,
) -> None:
    count = {state: sum(states[cell.key] == state for cell in cells) for state in CellState}
    console.print(
        f"[bold]maskkit bench[/] {escape(name)} → [cyan]{escape(str(layout.root))}[/]: {len(cells)} cells, "
        f"{count[CellState.DONE]} done, {count[CellState.PARTIAL]} to resume, {count[CellState.NEW]} new; "
        f"{escape(how)}",
        highlight=False,
    )


def _announce_cell(outcome: Outcome, console: Console) -> None:
    cell, minutes = outcome.cell, outcome.seconds / 60
    why = escape(outcome.reason or f"exit code {outcome.exit_code}")
    if outcome.exit_code == 0:
        console.print(f"[green]done[/] {cell.key} in {minutes:.1f} min", highlight=False)
    elif outcome.interrupted:
        console.print(
            f"[yellow]stopped[/] {cell.key} ({why}) after {minutes:.1f} min; the same command resumes it; "
            f"log {escape(str(cell.log_file))}",
            highlight=False,
        )
    else:
        console.print(
            f"[red]failed[/] {cell.key} ({why}) after {minutes:.1f} min; log {escape(str(cell.log_file))}",
            highlight=False,
        )


def _print_cells(
    cells: list[Cell], states: dict[str, CellState], layout: SuiteLayout, console: Console
) -> None:
    table = Table(title=f"{len(cells)} cells, in {layout.root}/runs/<dataset>/<policy>/seed-<k>")
    for column, values in (("dataset", [c.dataset for c in cells]), ("policy", [c.policy for c in cells])):
        table.add_column(column, no_wrap=True, min_width=max(map(len, values), default=4))  # whole names
    table.add_column("seed")
    table.add_column("state")
    for cell in cells:
        table.add_row(cell.dataset, cell.policy, str(cell.seed), states[cell.key].value)
    console.print(table)
