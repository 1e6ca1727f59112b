"""``maskkit cost``: what a policy costs per pretrain step against ``random``, and where an MLO
iteration's time and FLOPs go, level by level, on the config ``maskkit train`` would build.

The policies run one after another in this process, ``random`` (the baseline) first, each on
synthetic images by default (``--dataset`` reads a real one as ``maskkit train`` does). The
report is three tables and the lines that say what was measured; ``--json`` and ``--markdown``
write it to files. ``benchmarks/step_time.py`` is the project's own harness on the same parts.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from maskkit.config import DEFAULT_PRESET, RunConfig, build_config, parse_override
from maskkit.data import LabelledDataset, MLOSplits
from maskkit.engine.run import prepare
from maskkit.errors import ConfigError, warn_once
from maskkit.plugins import policy_info
from maskkit.progress import progress_display
from maskkit.runtime import select_device, tune_cpu_runtime

from .baseline import BASELINE_POLICY, add_ratio_to_baseline, with_baseline
from .formatting import format_seconds
from .machine import BUSY_WARNING, busy_fraction, hardware
from .measure import IterationDone, MeasurePlan, measure_policy
from .report import describe_config, describe_setup, markdown_report, print_report, write_json
from .tables import TextTable, breakdown_table, cost_table, time_table
from .workload import named_options, synthetic_dataset, synthetic_splits

#: The policy measured beside the baseline when none is named: the paper's three-level MLO.
DEFAULT_POLICIES = ("mlo",)


@dataclass(frozen=True)
class CostOptions:
    """The options of ``maskkit cost``.

    Attributes:
        policies: the policies to measure beside ``random`` (names, or comma-separated lists;
            empty: :data:`DEFAULT_POLICIES`).
        preset, config_file, assignments: the config, as ``maskkit train`` takes it.
        dataset, data_dir, download: a dataset to measure on, as ``maskkit train`` reads it
            (None: synthetic images of the model's size).
        prior: the prior provider of the policies that read priors (with ``dataset`` only; on
            synthetic images the ``center`` prior stands in).
        device, precision, threads: where and how the iterations compute.
        iterations, warmup, flops, breakdown: what is measured (:class:`MeasurePlan`).
        json_path, markdown_path: where the report is also written.
        command: the command line, for the report.
    """

    policies: tuple[str, ...] = ()
    preset: str = DEFAULT_PRESET
    config_file: Path | None = None
    assignments: tuple[str, ...] = ()
    dataset: str | None = None
    data_dir: Path | None = None
    download: bool | None = None
    prior: str | None = None
    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    iterations: int = 3
    warmup: int = 1
    flops: bool = True
    breakdown: bool = True
    json_path: Path | None = None
    markdown_path: Path | None = None
    command: str = "maskkit cost"

    def check(self) -> None:
        """Refuse options that cannot work together, before anything runs."""
        if self.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1 (got {self.iterations})")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be at least 0 (got {self.warmup})")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1 (got {self.threads})")
        for option, value in (
            ("--data-dir", self.data_dir),
            ("--download", self.download),
            ("--prior", self.prior),
        ):
            if value is not None and self.dataset is None:
                raise ConfigError(
                    f"{option} goes with --dataset; without it the policies run on synthetic images "
                    "(and a policy that reads priors gets the centre prior)"
                )

    @property
    def plan(self) -> MeasurePlan:
        return MeasurePlan(self.iterations, self.warmup, self.flops, self.breakdown)

    def policy_list(self) -> list[str]:
        """The policies in the order they run: the baseline, then the others as named."""
        named = [name.strip() for item in self.policies for name in item.split(",") if name.strip()]
        return with_baseline(named or DEFAULT_POLICIES)

    def config(self, policy: str) -> RunConfig:
        """``policy``'s run config: the preset, ``--config``, ``--set``, then the named options."""
        named = named_options(policy, self.device, self.precision)
        if self.dataset is not None:
            named["data"] = {"dataset": self.dataset}
            if self.data_dir is not None:
                named["data"]["data_dir"] = str(self.data_dir)
            if self.download is not None:
                named["data"]["download"] = self.download
        if self.prior is not None and policy_info(policy).requires:
            named["prior"] = self.prior
        overrides = [parse_override(item) for item in self.assignments]
        return build_config(self.preset, self.config_file, [*overrides, named])


def policy_data(
    options: CostOptions, config: RunConfig, console: Console
) -> tuple[LabelledDataset, MLOSplits]:
    """The images a policy runs on: ``--dataset`` read and split as ``maskkit train`` does
    (priors included), else synthetic ones."""
    if options.dataset is not None:
        _, dataset, splits = prepare(config, console)
        return dataset, splits
    dataset = synthetic_dataset(config, seed=config.seed)
    return dataset, synthetic_splits(config, dataset)


def describe_run(options: CostOptions, config: RunConfig, device: torch.device) -> dict[str, Any]:
    """The report's ``meta``: the command, when and on what, the baseline's config and the plan."""
    described = describe_config(config)
    applied = tune_cpu_runtime() if device.type == "cpu" else []
    return {
        "command": options.command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": options.preset,
        "hardware": hardware(device, config.precision),
        "cpu_tuning": {"enabled": True, "applies_to_device": device.type == "cpu", "applied": applied},
        "baseline": BASELINE_POLICY,
        **described,
        "run": {
            **described["run"],
            "iterations": options.iterations,
            "warmup": options.warmup,
            "dataset": options.dataset,
            "flops": options.flops,
            "breakdown": options.breakdown,
        },
    }


def report_tables(results: list[dict[str, Any]]) -> list[TextTable]:
    """The step-time and cost tables, then each measured policy's breakdown."""
    breakdowns = [breakdown_table(row) for row in results]
    return [time_table(results), cost_table(results), *(table for table in breakdowns if table is not None)]


def warn_if_busy(device: torch.device) -> None:
    """A ``warning:`` when other processes keep the CPU busy: the times would come out inflated."""
    busy = busy_fraction() if device.type == "cpu" else None
    if busy is not None and busy > BUSY_WARNING:
        warn_once(
            f"{100 * busy:.0f} % of the CPU is busy before the measurement starts: other processes "
            "compete for the cores, so the times will come out inflated"
        )


def _measure_all(
    options: CostOptions, configs: dict[str, RunConfig], device: torch.device, console: Console
) -> list[dict[str, Any]]:
    """Each policy's row, with a progress bar per policy over its iterations. The first policy's
    data are read before the bar starts (a missing dataset stops there), then the machine's load
    is checked."""
    plan = options.plan
    first_data = policy_data(options, next(iter(configs.values())), console)
    warn_if_busy(device)
    results = []
    with progress_display(console) as progress:
        for policy, config in configs.items():
            dataset, splits = first_data if not results else policy_data(options, config, console)
            task = progress.add_task(f"cost {policy}", total=plan.total_iterations, status="")

            def advance(event: IterationDone, task: Any = task) -> None:
                status = f"{event.phase} {event.index}/{event.count}: {format_seconds(event.seconds)}"
                progress.update(task, status=status)
                progress.advance(task)

            try:
                results.append(measure_policy(config, dataset, splits, device, plan, advance))
            except (torch.cuda.OutOfMemoryError, MemoryError) as error:
                message = f"out of memory: {error}".splitlines()[0]
                results.append({"policy": policy, "status": "failed", "error": message})
    return results


def run_cost(options: CostOptions, console: Console, table_console: Console | None = None) -> int:
    """Measure every policy and report; 1 when a policy failed (out of memory), else 0.

    Raises:
        MaskkitError: a user error (an unknown policy, a bad ``--set``, a missing dataset), before
            any policy is measured where it can be known then.
    """
    options.check()
    policies = options.policy_list()
    for policy in policies:
        policy_info(policy)  # an unknown name stops here, with the names that exist
    configs = {policy: options.config(policy) for policy in policies}
    baseline = configs[BASELINE_POLICY]
    device = select_device(baseline.device)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if device.type == "cpu":  # the profiler's library logs finding no GPU as an ERROR line: noise here
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    meta = describe_run(options, baseline, device)
    results = _measure_all(options, configs, device, console)
    add_ratio_to_baseline(results)
    tables = report_tables(results)
    lines = describe_setup(meta, results)
    print_report(table_console or console, tables, lines)
    if options.markdown_path is not None:
        options.markdown_path.write_text(markdown_report(lines, tables))
        console.print(f"markdown: {options.markdown_path}", highlight=False)
    if options.json_path is not None:
        write_json(options.json_path, meta, results)
        console.print(f"json: {options.json_path}", highlight=False)
    return 1 if any(row.get("status") == "failed" for row in results) else 0
