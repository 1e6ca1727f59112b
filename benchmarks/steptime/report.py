"""The report: the header lines (command, hardware, date, model, what was measured) and the
tables, on the terminal (rich), in Markdown and in JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .formatting import format_si
from .tables import (
    TextTable,
    breakdown_table,
    cost_table,
    goal_table,
    interleaved_table,
    learned_mask_table,
    reference_table,
    time_table,
)
from .workload import NUM_CLASSES


def add_derived(
    results: list[dict[str, Any]], peak: dict[str, Any] | None, device_peak: dict[str, Any] | None = None
) -> None:
    """Fill in per row the ratio to the MAE baseline (``random``) per pretrain step, the same as
    per iteration when both iterations have as many pretrain steps, the fraction of the matmul
    rate and the model FLOP utilisation (of ``device_peak``, the dense peak)."""
    baseline = next(
        (row for row in results if row.get("policy") == "random" and row.get("status") == "ok"), None
    )
    for row in results:
        if row.get("status") != "ok":
            continue
        row["ratio_vs_random"] = (
            row["per_pretrain_step_s"] / baseline["per_pretrain_step_s"] if baseline is not None else None
        )
        achieved = row.get("achieved_flops_per_s")
        row["fraction_of_matmul_peak"] = achieved / peak["flops_per_s"] if achieved and peak else None
        row["mfu"] = achieved / device_peak["flops_per_s"] if achieved and device_peak else None


def _machine_line(meta: dict[str, Any]) -> str:
    info = meta["hardware"]
    if info["device"].startswith("cuda"):
        machine = f"{info['gpu']} (CUDA {info['cuda']}); host CPU {info['cpu']}, {info['cpu_cores']} cores"
    else:
        machine = f"CPU {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    peak = meta.get("matmul_peak")
    peak_text = (
        f"; dense matmul rate {format_si(peak['flops_per_s'], 'FLOP/s')} "
        f"({peak['size']}×{peak['size']} {peak['dtype']} matmuls, best of {peak['chunks']} timings; "
        "the reference for the % column)"
        if peak
        else ""
    )
    device_peak = meta.get("device_peak")
    mfu_text = (
        f"; MFU: of the dense peak {format_si(device_peak['flops_per_s'], 'FLOP/s')} "
        f"({device_peak['source']})"
        if device_peak
        else "; MFU: no dense peak known for this device (--peak-tflops names one)"
    )
    return (
        f"Hardware: {machine}; torch {info['torch']}, Python {info['python']}, {info['compute']}"
        f"{peak_text}{mfu_text}"
    )


def _tuning_line(meta: dict[str, Any]) -> str | None:
    tuning = meta.get("cpu_tuning")
    if tuning is None or not tuning["applies_to_device"]:
        return None
    if not tuning["enabled"]:
        return "CPU tuning: off (--no-cpu-tuning): glibc's malloc and subnormal-float defaults"
    applied = "; ".join(tuning["applied"]) or "nothing applicable on this platform"
    return f"CPU tuning (maskkit.runtime.tune_cpu_runtime, as `maskkit train` applies it): {applied}"


def _memory_line(meta: dict[str, Any]) -> str:
    if meta["hardware"]["device"].startswith("cuda"):
        return (
            "Peak memory: `torch.cuda.max_memory_allocated`, reset before each policy "
            "(model build and all iterations)"
        )
    fresh = meta["run"]["policy_subprocess"]
    where = "a fresh Python process per policy" if fresh else "the benchmarking process"
    if meta["run"].get("interleave"):
        where += " (interleaved: all of a policy's settings in it, so the figure is theirs together)"
    return (
        "Peak memory: **process** peak RSS (`VmHWM`, reset before each policy) of "
        f"{where}, including torch and the Python runtime; (+x) is the increase over the RSS "
        "just before the models were built"
    )


def describe_setup(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The lines above (or under) the tables: command, hardware, date, model and what was
    measured."""
    info, model, run = meta["hardware"], meta["model"], meta["run"]
    workload = meta.get("workload")
    lines = [
        f"Command: `{meta['command']}`",
        _machine_line(meta),
        f"Date: {meta['date']}",
    ]
    if info.get("environment"):
        lines.append(
            f"Environment: {' '.join(f'{key}={value}' for key, value in info['environment'].items())}"
        )
    tuning = _tuning_line(meta)
    if tuning:
        lines.append(tuning)
    preset = (
        f"workload `{workload['name']}` (preset `{meta['preset']}`)"
        if workload
        else f"preset `{meta['preset']}`"
    )
    settings = "; ".join(variant["label"] for variant in meta["variants"])
    lines += [
        f"Model ({preset}): encoder {model['embed_dim']}×{model['depth']} "
        f"({model['num_heads']} heads), patch {model['patch_size']} at {model['img_size']} px "
        f"({model['num_patches']} patches), decoder {model['decoder_embed_dim']}×{model['decoder_depth']} "
        f"({model['decoder_num_heads']} heads); mask ratio {meta['mask_ratio']}; batch "
        f"{run['batch_sizes']} and unroll {run['unroll']} (pretrain/finetune/mask); "
        f"hypergradient `{run['hypergradient']}` ({run['darts_mode']}); weighting `{run['weighting']}`",
        f"Settings compared: {settings}" if len(meta["variants"]) > 1 else "",
        "One MLO iteration = unroll(pretrain) × unroll(finetune) pretrain steps, plus for a learnable "
        "policy the finetune steps and one mask step with the mask level's hypergradient; a fixed "
        "policy runs the same pretrain steps alone, once, as the MAE baseline; × random compares "
        f"time per pretrain step. Times are medians (min–max) of {run['iterations']} "
        f"iteration{'s' if run['iterations'] != 1 else ''} after {run['warmup']} warm-up; "
        + (
            f"dataset `{run['dataset']}`" if run.get("dataset") else f"synthetic data ({NUM_CLASSES} classes)"
        ),
        _memory_line(meta),
    ]
    if not info["device"].startswith("cuda"):
        busy = [
            f"{row['policy']}{' [' + row['variant_label'] + ']' if len(meta['variants']) > 1 else ''} "
            f"{100 * row['cpu_utilisation']:.0f} %"
            for row in results
            if row.get("cpu_utilisation") is not None
        ]
        lines.append(
            "CPU use during the timed iterations (process CPU time / (wall time × threads); well "
            "below 100 % means another process competed for the cores): " + (", ".join(busy) or "–")
        )
    return [line for line in lines if line]


def report_tables(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[TextTable]:
    """Every table of the report, in order."""
    show_setting = len(meta["variants"]) > 1
    tables = [time_table(results, show_setting), cost_table(results, show_setting)]
    interleaved = interleaved_table(results)
    if interleaved is not None:
        tables.append(interleaved)
    peak = meta.get("device_peak") or _matmul_peak(meta)
    tables += [table for row in results if (table := breakdown_table(row, show_setting, peak)) is not None]
    tables += [table for row in results if (table := learned_mask_table(row, show_setting)) is not None]
    comparison = meta.get("reference_comparison")
    if comparison is not None:
        tables += [reference_table(comparison), goal_table(comparison)]
    return tables


def _matmul_peak(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The measured matmul rate as a peak for the breakdown's "% of peak" column."""
    rate = meta.get("matmul_peak")
    if not rate:
        return None
    return {"flops_per_s": rate["flops_per_s"], "source": f"the measured {rate['dtype']} matmul rate"}


def rich_table(table: TextTable) -> Table:
    rendered = Table(
        title=table.title, title_justify="left", caption="\n".join(table.notes), caption_justify="left"
    )
    for header in table.headers:
        rendered.add_column(header, justify="left" if header in table.left else "right")
    for row in table.rows:
        rendered.add_row(*row)
    return rendered


def print_report(console: Console, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The tables, then the header lines, on the terminal."""
    for table in report_tables(meta, results):
        console.print(rich_table(table))
    for line in describe_setup(meta, results):
        console.print(line, highlight=False, markup=False)


def markdown_table(table: TextTable) -> list[str]:
    align = ["---" if header in table.left else "--:" for header in table.headers]
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows)
    return lines


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The header lines as a list, then each table under a bold title, with its notes."""
    lines = [f"- {line}" for line in describe_setup(meta, results)]
    for table in report_tables(meta, results):
        lines += ["", f"**{table.title}**", "", *markdown_table(table)]
        if table.notes:
            lines += ["", *table.notes]
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({**meta, "results": results}, indent=2))
