"""The harness's report: its header lines (the workload, the settings compared, the matmul rate
and the MFU's peak on top of :mod:`maskkit.cost.report`'s) and its tables, on the terminal
(rich) and in Markdown."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from maskkit.cost import report
from maskkit.cost.baseline import add_ratio_to_baseline
from maskkit.cost.formatting import format_si
from maskkit.cost.tables import TextTable, breakdown_table, cost_table, time_table

from .tables import goal_table, interleaved_table, learned_mask_table, reference_table


def add_derived(
    results: list[dict[str, Any]], peak: dict[str, Any] | None, device_peak: dict[str, Any] | None = None
) -> None:
    """Fill in per row the ratio to the MAE baseline (``random``) per pretrain step, the fraction
    of the matmul rate and the model FLOP utilisation (of ``device_peak``, the dense peak)."""
    add_ratio_to_baseline(results)
    for row in results:
        if row.get("status") != "ok":
            continue
        achieved = row.get("achieved_flops_per_s")
        row["fraction_of_matmul_peak"] = achieved / peak["flops_per_s"] if achieved and peak else None
        row["mfu"] = achieved / device_peak["flops_per_s"] if achieved and device_peak else None


def _machine_line(meta: dict[str, Any]) -> str:
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
    return report.hardware_line(meta["hardware"]) + peak_text + mfu_text


def _memory_where(meta: dict[str, Any]) -> str:
    """The process(es) a CPU peak is of."""
    run = meta["run"]
    where = "a fresh Python process per policy" if run["policy_subprocess"] else "the benchmarking process"
    if run.get("interleave"):
        where += " (interleaved: all of a policy's settings in it, so the figure is theirs together)"
    return where


def describe_setup(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The lines above (or under) the tables: command, hardware, date, model and what was
    measured."""
    info = meta["hardware"]
    workload = meta.get("workload")
    source = (
        f"workload `{workload['name']}` (preset `{meta['preset']}`)"
        if workload
        else f"preset `{meta['preset']}`"
    )
    several = len(meta["variants"]) > 1
    lines = [
        f"Command: `{meta['command']}`",
        _machine_line(meta),
        f"Date: {meta['date']}",
        report.environment_line(info),
        report.tuning_line(meta.get("cpu_tuning")),
        report.model_line(source, meta),
        "Settings compared: " + "; ".join(variant["label"] for variant in meta["variants"])
        if several
        else "",
        report.iteration_line(meta["run"]),
        report.memory_line(info, _memory_where(meta)),
    ]
    if not info["device"].startswith("cuda"):
        lines.append(
            report.cpu_use_line(
                results,
                lambda row: row["policy"] + (f" [{row['variant_label']}]" if several else ""),
            )
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


def print_report(console: Console, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The tables, then the header lines, on the terminal."""
    report.print_report(console, report_tables(meta, results), describe_setup(meta, results))


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The header lines as a list, then each table under a bold title, with its notes."""
    return report.markdown_report(describe_setup(meta, results), report_tables(meta, results))
