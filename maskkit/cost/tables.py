"""The step-time, cost and breakdown tables as plain text cells, for the terminal and Markdown
alike (:mod:`.report` renders them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .formatting import (
    MISSING,
    format_bytes,
    format_count,
    format_percent,
    format_ratio,
    format_seconds,
    format_share,
    format_si,
)


@dataclass
class TextTable:
    """A titled table of text cells, with lines to print under it.

    Attributes:
        title: its title.
        headers: the column names.
        rows: one list of cells per row.
        left: the columns aligned left (the rest are numbers, aligned right).
        notes: lines under the table.
    """

    title: str
    headers: list[str]
    rows: list[list[str]]
    left: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def is_ok(row: dict[str, Any]) -> bool:
    """Whether the row's policy was measured (not skipped or failed)."""
    return row.get("status") == "ok"


def lead_cells(row: dict[str, Any], show_setting: bool) -> list[str]:
    """The first cells of a row: the setting (when several are compared) and the policy."""
    return [row.get("variant_label", ""), row["policy"]] if show_setting else [row["policy"]]


def lead_headers(show_setting: bool) -> list[str]:
    return ["setting", "policy"] if show_setting else ["policy"]


def row_title(title: str, row: dict[str, Any], show_setting: bool) -> str:
    """A per-row table's ``title``, with the row's setting when several are compared."""
    setting = row.get("variant_label") if show_setting else None
    return title + (f" ({setting})" if setting else "")


#: Columns of the step-time table shown only when some row has a value (the rate against a
#: measured or known peak, which ``benchmarks/step_time.py`` adds).
PEAK_COLUMNS: dict[str, str] = {"% of matmul rate": "fraction_of_matmul_peak", "MFU": "mfu"}


def time_table(results: list[dict[str, Any]], show_setting: bool = False) -> TextTable:
    """Time, throughput and FLOPs per MLO iteration, one row per policy (and setting)."""
    peaks = {
        header: key
        for header, key in PEAK_COLUMNS.items()
        if any(row.get(key) is not None for row in results if is_ok(row))
    }
    headers = [
        *lead_headers(show_setting),
        "s / MLO iteration",
        "s / pretrain step",
        "× random",
        "images/s",
        "FLOP / iteration",
        "achieved FLOP/s",
        *peaks,
    ]
    rows = []
    for row in results:
        lead = lead_cells(row, show_setting)
        if not is_ok(row):
            rows.append([*lead, f"{row['status']} (see below)"] + [""] * (len(headers) - len(lead) - 1))
            continue
        spread = ""
        if len(row["iteration_seconds"]) > 1:
            spread = f" ({format_seconds(row['min_iteration_s'])}–{format_seconds(row['max_iteration_s'])})"
        rows.append(
            [
                *lead,
                format_seconds(row["median_iteration_s"]) + spread,
                format_seconds(row["per_pretrain_step_s"]),
                format_ratio(row.get("ratio_vs_random")),
                f"{row['images_per_s']:.1f}",
                format_si(row["flops_per_iteration"], "FLOP"),
                format_si(row["achieved_flops_per_s"], "FLOP/s"),
                *(format_percent(row.get(key)) for key in peaks.values()),
            ]
        )
    return TextTable("Step time per MLO iteration", headers, rows, left=set(lead_headers(True)))


def cost_table(results: list[dict[str, Any]], show_setting: bool = False) -> TextTable:
    """Peak memory, parameters and loss evaluations, one row per policy (and setting)."""
    headers = [
        *lead_headers(show_setting),
        "peak memory",
        "parameters: MAE + policy + head",
        "loss evaluations per iteration",
    ]
    rows = []
    for row in results:
        params = row.get("parameters")
        parameter_text = ""
        if params is not None:
            parameter_text = f"{format_count(params['mae'])} + {format_count(params['policy'])}"
            if row["learnable"]:
                parameter_text += f" + {format_count(params['head'])}"
            elif params.get("policy_pretrain"):
                parameter_text += " (pretrain level)"
            else:
                parameter_text += " (not trained)"
        lead = lead_cells(row, show_setting)
        if not is_ok(row):
            rows.append([*lead, row["status"], parameter_text, row.get("error", "")])
            continue
        memory = row["memory"]
        rows.append(
            [
                *lead,
                f"{format_bytes(memory['peak_bytes'])} (+{format_bytes(memory['increase_bytes'])})",
                parameter_text,
                row["loss_evaluations_text"] or MISSING,
            ]
        )
    left = {*lead_headers(True), "parameters: MAE + policy + head", "loss evaluations per iteration"}
    return TextTable("Cost per MLO iteration", headers, rows, left=left)


def _rate(flops: float | None, seconds: float | None) -> float | None:
    return flops / seconds if flops and seconds and seconds > 0 else None


def breakdown_table(
    row: dict[str, Any], show_setting: bool = False, peak: dict[str, Any] | None = None
) -> TextTable | None:
    """One row's iteration by level and part (None when it was not broken down). With ``peak``
    (``{"flops_per_s", "source"}``: a device's dense peak, or a measured matmul rate), each
    part's FLOP rate also as a share of it."""
    breakdown = row.get("breakdown")
    if not is_ok(row) or not breakdown:
        return None
    total_s, total_flops = breakdown["total_seconds"], breakdown["total_flops"]
    headers = [
        "part",
        "time",
        "% of time",
        "FLOP",
        "% of FLOP",
        "FLOP/s",
        *(["% of peak"] if peak else []),
        "calls",
    ]

    def cells(
        name: str, seconds: float | None, flops: float | None, time_share: str, flop_share: str
    ) -> list[str]:
        rate = _rate(flops, seconds)
        return [
            name,
            format_seconds(seconds),
            time_share,
            format_si(flops, "FLOP") if flops is not None else MISSING,
            flop_share,
            format_si(rate, "FLOP/s"),
            *([format_percent(rate / peak["flops_per_s"]) if rate else MISSING] if peak else []),
        ]

    rows = [
        [
            *cells(
                part["name"],
                part["seconds"],
                part["flops"],
                format_share(part["seconds"], total_s),
                format_share(part["flops"], total_flops),
            ),
            str(part["calls"]) if part["calls"] else "",
        ]
        for part in breakdown["parts"]
    ]
    whole = cells(
        "total (one profiled iteration)",
        total_s,
        total_flops,
        "100.0 %" if total_s else MISSING,
        "100.0 %" if total_flops else MISSING,
    )
    rows.append([*whole, ""])
    title = row_title(f"Breakdown of one {row['policy']} iteration", row, show_setting)
    notes = [
        f"Time: {breakdown['time_source']}; everything else is the rest of the profiled iteration's "
        f"wall time ({format_seconds(total_s)}, under the profiler; the timed median is "
        f"{format_seconds(row['median_iteration_s'])}). FLOP: FlopCounterMode by innermost labelled scope. "
        "FLOP/s: the part's FLOPs over its profiled time (the profiler's overhead included)"
        + (f"; % of peak: of {peak['source']}" if peak else "")
        + ". calls: scope entries per iteration."
    ]
    return TextTable(title, headers, rows, left={"part"}, notes=notes)
