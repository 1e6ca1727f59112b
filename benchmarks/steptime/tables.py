"""The report's tables as plain text cells, for the terminal and for Markdown alike."""

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
    format_si,
)
from .reference import GOALS, SOURCE, format_metric


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


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


def _lead(row: dict[str, Any], show_setting: bool) -> list[str]:
    """The first cells of a row: the setting (when several are compared) and the policy."""
    return [row.get("variant_label", ""), row["policy"]] if show_setting else [row["policy"]]


def _lead_headers(show_setting: bool) -> list[str]:
    return ["setting", "policy"] if show_setting else ["policy"]


def time_table(results: list[dict[str, Any]], show_setting: bool = False) -> TextTable:
    """Time, throughput and FLOPs per MLO iteration, one row per policy (and setting)."""
    headers = [
        *_lead_headers(show_setting),
        "s / MLO iteration",
        "s / pretrain step",
        "× random",
        "images/s",
        "FLOP / iteration",
        "achieved FLOP/s",
        "% of matmul rate",
        "MFU",
    ]
    rows = []
    for row in results:
        lead = _lead(row, show_setting)
        if not _ok(row):
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
                format_percent(row.get("fraction_of_matmul_peak")),
                format_percent(row.get("mfu")),
            ]
        )
    return TextTable("Step time per MLO iteration", headers, rows, left=set(_lead_headers(True)))


def interleaved_table(results: list[dict[str, Any]]) -> TextTable | None:
    """``--interleave``: each setting's first iteration (compilation included), its median and
    mean iteration, its ratio to the first setting of its policy and the agreement of its losses
    with that setting's (None without interleaved rows)."""
    rows_in = [row for row in results if row.get("interleaved") and _ok(row)]
    if not rows_in:
        return None
    headers = [
        "setting",
        "policy",
        "first iteration",
        "first − median",
        "median iteration",
        "mean iteration",
        "÷ first setting (median)",
        "÷ first setting (mean)",
        "CPU use",
        "largest loss difference",
    ]
    firsts: dict[str, dict[str, Any]] = {}
    rows = []
    for row in rows_in:
        first = firsts.setdefault(row["policy"], row)
        rows.append(
            [
                row.get("variant_label", ""),
                row["policy"],
                format_seconds(row.get("first_iteration_s")),
                format_seconds(row.get("compile_seconds")),
                format_seconds(row["median_iteration_s"]),
                format_seconds(row["mean_iteration_s"]),
                format_ratio(row["median_iteration_s"] / first["median_iteration_s"], 3),
                format_ratio(row["mean_iteration_s"] / first["mean_iteration_s"], 3),
                format_percent(row.get("cpu_utilisation")),
                _relative(row.get("loss_agreement")) if row is not first else "(reference)",
            ]
        )
    notes = [
        "Each policy's settings ran in one process, one iteration of each in turn (the order "
        "rotated every round), each on its own random stream. first iteration: the first warm-up "
        "iteration; first − median: its one-off cost (first calls, and with compile: true the "
        "compilation: compare with an eager setting's). largest loss difference: the largest relative "
        "difference of a level loss after the same iteration, against the policy's first setting "
        "(meaningful between settings that compute the same thing)."
    ]
    return TextTable(
        "Settings side by side (interleaved)", headers, rows, left={"setting", "policy"}, notes=notes
    )


def _relative(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1e}"


def learned_mask_table(row: dict[str, Any], show_setting: bool = False) -> TextTable | None:
    """One row's learned-mask work per call and amortised per MLO iteration (None without it)."""
    costs = row.get("learned_mask_costs")
    if not _ok(row) or not costs:
        return None
    median = row["median_iteration_s"]
    headers = ["part", "per call", "calls per iteration", "per iteration", "% of the median iteration"]
    rows = [
        [
            f"({name})" if part.get("included") else name,
            format_seconds(part["seconds"]),
            f"{part['per_iteration_calls']:.3g}",
            format_seconds(part["per_iteration_s"]),
            _share(part["per_iteration_s"], median),
        ]
        for name, part in costs["parts"].items()
    ]
    rows.append(
        ["total", "", "", format_seconds(costs["per_iteration_s"]), _share(costs["per_iteration_s"], median)]
    )
    schedule = costs["schedule"]
    setting = row.get("variant_label") if show_setting else None
    title = f"Learned-mask work of {row['policy']}" + (f" ({setting})" if setting else "")
    notes = [
        f"Per call: the median of {costs['repeats']} timings after the timed iterations. Amortised over "
        f"a run of {schedule['total_steps']} pretrain steps ({schedule['iterations']} MLO iterations, "
        f"{schedule['refits']} head refits, {schedule['health_records']} health records, "
        f"{schedule['snr_probes']} SNR probes); the median iteration ({format_seconds(median)}) "
        "contains the decisions and, in its mean, the refits. A part in brackets is included in "
        "the one above it, not added to the total."
    ]
    return TextTable(title, headers, rows, left={"part"}, notes=notes)


def cost_table(results: list[dict[str, Any]], show_setting: bool = False) -> TextTable:
    """Peak memory, parameters and loss evaluations, one row per policy (and setting)."""
    headers = [
        *_lead_headers(show_setting),
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
        lead = _lead(row, show_setting)
        if not _ok(row):
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
    left = {*_lead_headers(True), "parameters: MAE + policy + head", "loss evaluations per iteration"}
    return TextTable("Cost per MLO iteration", headers, rows, left=left)


def _share(part: float | None, total: float | None) -> str:
    return format_percent(part / total) if part is not None and total else MISSING


def _rate(flops: float | None, seconds: float | None) -> float | None:
    return flops / seconds if flops and seconds and seconds > 0 else None


def breakdown_table(
    row: dict[str, Any], show_setting: bool = False, peak: dict[str, Any] | None = None
) -> TextTable | None:
    """One row's iteration by level and part (None when it was not broken down), with each
    part's FLOP rate as a share of ``peak`` (``{"flops_per_s", "source"}``: the device's dense
    peak, or the measured matmul rate)."""
    breakdown = row.get("breakdown")
    if not _ok(row) or not breakdown:
        return None
    total_s, total_flops = breakdown["total_seconds"], breakdown["total_flops"]
    headers = ["part", "time", "% of time", "FLOP", "% of FLOP", "FLOP/s", "% of peak", "calls"]

    def peak_share(flops: float | None, seconds: float | None) -> str:
        rate = _rate(flops, seconds)
        return format_percent(rate / peak["flops_per_s"]) if rate and peak else MISSING

    rows = [
        [
            part["name"],
            format_seconds(part["seconds"]),
            _share(part["seconds"], total_s),
            format_si(part["flops"], "FLOP") if part["flops"] is not None else MISSING,
            _share(part["flops"], total_flops),
            format_si(_rate(part["flops"], part["seconds"]), "FLOP/s"),
            peak_share(part["flops"], part["seconds"]),
            str(part["calls"]) if part["calls"] else "",
        ]
        for part in breakdown["parts"]
    ]
    rows.append(
        [
            "total (one profiled iteration)",
            format_seconds(total_s),
            "100.0 %" if total_s else MISSING,
            format_si(total_flops, "FLOP") if total_flops is not None else MISSING,
            "100.0 %" if total_flops else MISSING,
            format_si(_rate(total_flops, total_s), "FLOP/s"),
            peak_share(total_flops, total_s),
            "",
        ]
    )
    setting = row.get("variant_label") if show_setting else None
    title = f"Breakdown of one {row['policy']} iteration" + (f" ({setting})" if setting else "")
    notes = [
        f"Time: {breakdown['time_source']}; everything else is the rest of the profiled iteration's "
        f"wall time ({format_seconds(total_s)}, under the profiler; the timed median is "
        f"{format_seconds(row['median_iteration_s'])}). FLOP: FlopCounterMode by innermost labelled scope. "
        "FLOP/s: the part's FLOPs over its profiled time (the profiler's overhead included); "
        f"% of peak: of {peak['source'] if peak else 'no peak (none measured or known)'}. "
        "calls: scope entries per iteration."
    ]
    return TextTable(title, headers, rows, left={"part"}, notes=notes)


def reference_table(comparison: dict[str, Any]) -> TextTable:
    """Issue 8's quoted figures with this run's beside them."""
    headers = [
        "figure",
        "setting",
        "reference (quoted)",
        "maskkit at filing (quoted)",
        "this run",
        "this run ÷ reference",
    ]
    rows = []
    for figure in comparison["figures"]:
        if figure["not_comparable"]:
            measured = f"not run here ({figure['command']})"
        else:
            measured = format_metric(figure["metric"], figure["this_run"])
            if figure["this_run_variant"]:
                measured += f" [{figure['this_run_variant']}]"
        ratio = figure["this_run_over_reference"]
        rows.append(
            [
                figure["label"],
                figure["setting"],
                format_metric(figure["metric"], figure["reference"]),
                format_metric(figure["metric"], figure["maskkit_at_filing"]),
                measured,
                format_ratio(ratio) if ratio is not None else MISSING,
            ]
        )
    notes = [f"Reference and 'maskkit at filing' columns: {SOURCE}."]
    return TextTable(
        "Issue 8: the reference implementation's figures (quoted) beside this run",
        headers,
        rows,
        left={"figure", "setting", "this run"},
        notes=notes,
    )


def goal_table(comparison: dict[str, Any]) -> TextTable:
    """Issue 8's goal at the reference configuration, passed or failed by this run."""
    goal = comparison["goal"]
    headers = ["goal", "limit", "this run", "setting", "result"]
    rows = []
    if not goal["evaluated"]:
        rows = [
            [target.label, format_metric(target.metric, target.limit), MISSING, "", "not evaluated"]
            for target in GOALS
        ]
    for check in goal["checks"]:
        passed = check["passed"]
        rows.append(
            [
                check["label"],
                format_metric(check["metric"], check["limit"]),
                format_metric(check["metric"], check["this_run"]),
                check["variant"] or "random",
                "not measured" if passed is None else "PASS" if passed else "FAIL",
            ]
        )
    notes = []
    if not goal["evaluated"]:
        notes.append(
            "Not evaluated: this run is not issue 8's reference configuration (run it with "
            "--preset reference-cpu); it differs in " + "; ".join(goal["not_comparable"]) + "."
        )
    else:
        notes.append(
            "The time limits come from figures measured on the project's 2-core development CPU: "
            "they are met or missed only on that machine, idle. The FLOP limit holds anywhere."
        )
    return TextTable(
        "Issue 8's goal at the reference configuration",
        headers,
        rows,
        left={"goal", "setting", "result"},
        notes=notes,
    )
