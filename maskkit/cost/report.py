"""The report of a measurement: the lines that say what was measured, on what and how (command,
hardware, date, model, iterations), and the tables rendered on the terminal (rich), in Markdown
and as JSON.

``meta`` is the measurement's description as the JSON holds it: ``command``, ``date``,
``hardware`` (:func:`maskkit.cost.machine.hardware`), ``cpu_tuning``, ``model``, ``mask_ratio``
and ``run`` (:func:`describe_config`, with ``iterations``, ``warmup`` and ``dataset``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from maskkit.config import RunConfig

from .tables import TextTable
from .workload import NUM_CLASSES, level_settings, steps_per_iteration


def describe_config(config: RunConfig) -> dict[str, Any]:
    """The model, mask ratio and MLO settings of ``config``, as the report's ``meta`` holds them."""
    return {
        "model": {**config.model.model_dump(), "num_patches": config.model.num_patches},
        "mask_ratio": config.mask_ratio,
        "run": {
            "steps_per_iteration": steps_per_iteration(config),
            **level_settings(config),
            "hypergradient": config.pretrain.hypergradient.estimator,
            "darts_mode": config.pretrain.hypergradient.darts_mode,
            "weighting": config.pretrain.weighting,
        },
    }


def hardware_line(info: dict[str, Any]) -> str:
    """``Hardware: CPU ..., 2 cores, 1 torch threads; torch ..., Python ..., fp32``."""
    if info["device"].startswith("cuda"):
        machine = f"{info['gpu']} (CUDA {info['cuda']}); host CPU {info['cpu']}, {info['cpu_cores']} cores"
    else:
        machine = f"CPU {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    return f"Hardware: {machine}; torch {info['torch']}, Python {info['python']}, {info['compute']}"


def environment_line(info: dict[str, Any]) -> str:
    """The speed-relevant environment variables that were set (empty when none)."""
    environment = info.get("environment") or {}
    return (
        f"Environment: {' '.join(f'{key}={value}' for key, value in environment.items())}"
        if environment
        else ""
    )


def tuning_line(tuning: dict[str, Any] | None) -> str:
    """What maskkit's CPU tuning did (empty off the CPU)."""
    if tuning is None or not tuning["applies_to_device"]:
        return ""
    if not tuning["enabled"]:
        return "CPU tuning: off (--no-cpu-tuning): glibc's malloc and subnormal-float defaults"
    applied = "; ".join(tuning["applied"]) or "nothing applicable on this platform"
    return f"CPU tuning (maskkit.runtime.tune_cpu_runtime, as `maskkit train` applies it): {applied}"


def model_line(source: str, meta: dict[str, Any]) -> str:
    """The model and the MLO settings; ``source`` names where the config came from."""
    model, run = meta["model"], meta["run"]
    return (
        f"Model ({source}): encoder {model['embed_dim']}×{model['depth']} "
        f"({model['num_heads']} heads), patch {model['patch_size']} at {model['img_size']} px "
        f"({model['num_patches']} patches), decoder {model['decoder_embed_dim']}×{model['decoder_depth']} "
        f"({model['decoder_num_heads']} heads); mask ratio {meta['mask_ratio']}; batch "
        f"{run['batch_sizes']} and unroll {run['unroll']} (pretrain/finetune/mask); "
        f"hypergradient `{run['hypergradient']}` ({run['darts_mode']}); weighting `{run['weighting']}`"
    )


def iteration_line(run: dict[str, Any]) -> str:
    """What an MLO iteration is, how the times were taken, and on what data."""
    iterations = run["iterations"]
    data = f"dataset `{run['dataset']}`" if run.get("dataset") else f"synthetic data ({NUM_CLASSES} classes)"
    return (
        "One MLO iteration = unroll(pretrain) × unroll(finetune) pretrain steps, plus for a learnable "
        "policy the finetune steps and one mask step with the mask level's hypergradient; a fixed "
        "policy runs the same pretrain steps alone, as the MAE baseline; × random compares "
        f"time per pretrain step. Times are medians (min–max) of {iterations} "
        f"iteration{'s' if iterations != 1 else ''} after {run['warmup']} warm-up; {data}"
    )


def memory_line(info: dict[str, Any], where: str) -> str:
    """How peak memory was read; ``where``: the process(es) it is the peak of, on the CPU."""
    if info["device"].startswith("cuda"):
        return (
            "Peak memory: `torch.cuda.max_memory_allocated`, reset before each policy "
            "(model build and all iterations)"
        )
    return (
        "Peak memory: **process** peak RSS (`VmHWM`, reset before each policy) of "
        f"{where}, including torch and the Python runtime; (+x) is the increase over the RSS "
        "just before the models were built"
    )


def cpu_use_line(
    results: list[dict[str, Any]], label: Callable[[dict[str, Any]], str] = lambda row: row["policy"]
) -> str:
    """How much CPU each row's timed iterations got: low means another process competed."""
    busy = [
        f"{label(row)} {100 * row['cpu_utilisation']:.0f} %"
        for row in results
        if row.get("cpu_utilisation") is not None
    ]
    return (
        "CPU use during the timed iterations (process CPU time / (wall time × threads); well "
        "below 100 % means another process competed for the cores): " + (", ".join(busy) or "–")
    )


def describe_setup(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The lines under the tables of a ``maskkit cost`` run."""
    info = meta["hardware"]
    lines = [
        f"Command: `{meta['command']}`",
        hardware_line(info),
        f"Date: {meta['date']}",
        environment_line(info),
        tuning_line(meta.get("cpu_tuning")),
        model_line(f"preset `{meta['preset']}`", meta),
        iteration_line(meta["run"]),
        memory_line(info, "this process (the policies one after another)"),
    ]
    if not info["device"].startswith("cuda"):
        lines.append(cpu_use_line(results))
    return [line for line in lines if line]


def rich_table(table: TextTable) -> Table:
    rendered = Table(
        title=table.title, title_justify="left", caption="\n".join(table.notes), caption_justify="left"
    )
    for header in table.headers:
        rendered.add_column(header, justify="left" if header in table.left else "right")
    for row in table.rows:
        rendered.add_row(*row)
    return rendered


def print_report(console: Console, tables: list[TextTable], lines: list[str]) -> None:
    """The tables, then the lines, on the terminal."""
    for table in tables:
        console.print(rich_table(table))
    for line in lines:
        console.print(line, highlight=False, markup=False)


def markdown_table(table: TextTable) -> list[str]:
    align = ["---" if header in table.left else "--:" for header in table.headers]
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows)
    return lines


def markdown_report(lines: list[str], tables: list[TextTable]) -> str:
    """The lines as a list, then each table under a bold title, with its notes."""
    text = [f"- {line}" for line in lines]
    for table in tables:
        text += ["", f"**{table.title}**", "", *markdown_table(table)]
        if table.notes:
            text += ["", *table.notes]
    return "\n".join(text) + "\n"


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """``meta`` with the rows under ``results``."""
    path.write_text(json.dumps({**meta, "results": results}, indent=2))
