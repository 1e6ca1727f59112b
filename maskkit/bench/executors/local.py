"""``--executor local``, the default: the cells run as processes on this machine, ``--workers`` at
a time with ``--threads`` torch threads each (:class:`~maskkit.bench.runner.CellPool`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ..cells import Cell
from ..journal import Journal
from ..runner import CellPool, Outcome
from . import ExecutorContext


def available_cpus() -> int:
    """CPUs this process may run on."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class LocalExecutor:
    """Cells as processes of this machine, ``workers`` at a time."""

    name = "local"

    def __init__(self, workers: int, threads: int, nproc: int | None, console: Console) -> None:
        self.workers, self.threads, self.nproc, self.console = workers, threads, nproc, console

    def describe(self) -> str:
        processes = f" × {self.nproc} process(es)" if self.nproc else ""
        return f"{self.workers} worker(s) × {self.threads} thread(s){processes}"

    def start_fields(self) -> dict[str, Any]:
        return {"workers": self.workers, "threads": self.threads}

    def run(self, cells: list[Cell], journal: Journal, announce: Callable[[Outcome], None]) -> list[Outcome]:
        return CellPool(self.workers, self.threads, journal, self.console, self.nproc).run(cells, announce)


def create(context: ExecutorContext) -> LocalExecutor:
    """``--workers`` (default 1) cells at a time, ``--threads`` each (default: the CPUs divided by
    the workers)."""
    workers = context.workers or 1
    threads = context.threads or max(1, available_cpus() // workers)
    return LocalExecutor(workers, threads, context.options.nproc, context.console)
