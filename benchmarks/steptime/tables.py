"""The tables only this harness prints (settings side by side, the learned-mask work, issue 8's
figures and goal), as plain text cells; the step-time, cost and breakdown tables are
:mod:`maskkit.cost.tables`."""

from __future__ import annotations

from typing import Any

from maskkit.cost.formatting import MISSING, format_percent, format_ratio, format_seconds, format_share
from maskkit.cost.tables import TextTable, is_ok, row_title

from .reference import GOALS, SOURCE, format_metric


def interleaved_table(results: list[dict[str, Any]]) -> TextTable | None:
    """``--interleave``: each setting's first iteration (compilation included), its median and
    mean iteration, its ratio to the first setting of its policy and the agreement of its losses
    with that setting's (None without interleaved rows)."""
    rows_in = [row for row in results if row.get("interleaved") and is_ok(row)]
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
    if not is_ok(row) or not costs:
        return None
    median = row["median_iteration_s"]
    headers = ["part", "per call", "calls per iteration", "per iteration", "% of the median iteration"]
    rows = [
        [
            f"({name})" if part.get("included") else name,
            format_seconds(part["seconds"]),
            f"{part['per_iteration_calls']:.3g}",
            format_seconds(part["per_iteration_s"]),
            format_share(part["per_iteration_s"], median),
        ]
        for name, part in costs["parts"].items()
    ]
    rows.append(
        [
            "total",
            "",
            "",
            format_seconds(costs["per_iteration_s"]),
            format_share(costs["per_iteration_s"], median),
        ]
    )
    schedule = costs["schedule"]
    title = row_title(f"Learned-mask work of {row['policy']}", row, show_setting)
    notes = [
        f"Per call: the median of {costs['repeats']} timings after the timed iterations. Amortised over "
        f"a run of {schedule['total_steps']} pretrain steps ({schedule['iterations']} MLO iterations, "
        f"{schedule['refits']} head refits, {schedule['health_records']} health records, "
        f"{schedule['level2_records']} of them with the level-2 balanced accuracy, "
        f"{schedule['snr_probes']} SNR probes); the median iteration ({format_seconds(median)}) "
        "contains the decisions and, in its mean, the refits. A part in brackets is included in "
        "the one above it, not added to the total."
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
