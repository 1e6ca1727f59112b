"""Issue 8's quoted figures of the reference implementation, beside this run's, and its goal.

The reference implementation (``Alexiland/MLO-MAE`` on betty) and maskkit were measured side by
side on the project's 2-core development CPU, one thread each, when issue 8 was filed. Those
figures are *quoted* here, never re-measured: the script fills in maskkit's figure of this run
beside each quoted one whose configuration this run has (model, batch, one thread, fp32 on the
CPU, the ``mlo`` policy at unroll 1/1/1), and checks issue 8's goal at the reference
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskkit.cost.formatting import MISSING, format_ratio, format_seconds, format_si

from .workloads import REFERENCE_MODEL, VIT_B2_MODEL

SOURCE = (
    "quoted from issue 8 (reference implementation and maskkit measured side by side on the project's "
    "2-core development CPU, one thread each, when the issue was filed); not re-measured by this script"
)


@dataclass(frozen=True)
class QuotedSetting:
    """The configuration a quoted figure was measured at (always one thread, fp32 on the CPU,
    unroll 1/1/1, the ``mlo`` policy against ``random``).

    Attributes:
        label: how the tables name it.
        model: the model options.
        batch_size: the batch of every level.
        command: the ``step_time.py`` options that run it.
    """

    label: str
    model: dict[str, int]
    batch_size: int
    command: str


REFERENCE_SETTING = QuotedSetting("reference configuration", REFERENCE_MODEL, 8, "--preset reference-cpu")
BATCH_32_SETTING = QuotedSetting("batch 32", REFERENCE_MODEL, 32, "--preset reference-cpu --batch-size 32")
VIT_B2_SETTING = QuotedSetting("ViT-B/2, batch 8", VIT_B2_MODEL, 8, "--preset reference-cpu-vit-b")


@dataclass(frozen=True)
class QuotedFigure:
    """One line of issue 8's table.

    Attributes:
        metric: ``mlo_iteration_s``, ``mae_step_s``, ``mlo_over_mae`` or ``flops_per_iteration``.
        label: the line's name.
        setting: where it was measured.
        reference: the reference implementation's figure.
        maskkit_at_filing: maskkit's figure when the issue was filed.
    """

    metric: str
    label: str
    setting: QuotedSetting
    reference: float
    maskkit_at_filing: float


QUOTED_FIGURES: tuple[QuotedFigure, ...] = (
    QuotedFigure("mlo_iteration_s", "MLO iteration", REFERENCE_SETTING, 5.11, 4.02),
    QuotedFigure("mae_step_s", "plain MAE step (baseline)", REFERENCE_SETTING, 0.454, 0.484),
    QuotedFigure("mlo_over_mae", "MLO ÷ MAE", REFERENCE_SETTING, 11.3, 8.3),
    QuotedFigure("flops_per_iteration", "FLOP per MLO iteration", REFERENCE_SETTING, 284e9, 199e9),
    QuotedFigure("mlo_iteration_s", "MLO iteration", BATCH_32_SETTING, 18.86, 12.88),
    QuotedFigure("mlo_iteration_s", "MLO iteration", VIT_B2_SETTING, 63.4, 44.7),
)


@dataclass(frozen=True)
class Goal:
    """One of issue 8's targets at the reference configuration: ``metric ≤ limit``."""

    metric: str
    label: str
    limit: float


GOALS: tuple[Goal, ...] = (
    Goal("flops_per_iteration", "FLOP per MLO iteration ≤ half the reference's (284 G)", 142e9),
    Goal("mlo_iteration_s", "MLO iteration ≤ half the reference's (5.11 s)", 5.11 / 2),
    Goal("mlo_over_mae", "MLO ÷ MAE ≤ 5×", 5.0),
    Goal("mae_step_s", "plain MAE step ≤ the reference's", 0.454),
)


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if metric == "flops_per_iteration":
        return format_si(value, "FLOP")
    if metric == "mlo_over_mae":
        return format_ratio(value, 1)
    return format_seconds(value)


def setting_differences(setting: QuotedSetting, meta: dict[str, Any]) -> list[str]:
    """How this run's configuration differs from ``setting`` (empty: it has it)."""
    differences = []
    model = meta["model"]
    changed = [
        f"{key} {model[key]} (quoted: {value})" for key, value in setting.model.items() if model[key] != value
    ]
    differences.extend(changed)
    batch = meta["run"]["batch_sizes"]
    if batch != "/".join([str(setting.batch_size)] * 3):
        differences.append(f"batch {batch} (quoted: {setting.batch_size} at every level)")
    info = meta["hardware"]
    if info["torch_threads"] != 1:
        differences.append(f"{info['torch_threads']} torch threads (quoted: 1)")
    if not info["device"].startswith("cpu"):
        differences.append(f"device {info['device']} (quoted: the CPU)")
    if info["compute"] != "fp32":
        differences.append(f"{info['compute']} (quoted: fp32)")
    return differences


def _is_unroll_111(row: dict[str, Any]) -> bool:
    return all(steps == 1 for steps in row["unroll_steps"].values())


def measured_rows(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """This run's MAE baseline (``random``) and its ``mlo`` rows at unroll 1/1/1 (one per
    variant, e.g. exact and finite-difference)."""
    ok = [row for row in results if row.get("status") == "ok"]
    baseline = next((row for row in ok if row["policy"] == "random"), None)
    mlo = [row for row in ok if row["policy"] == "mlo" and _is_unroll_111(row)]
    return baseline, mlo


def metric_value(metric: str, baseline: dict[str, Any] | None, mlo: dict[str, Any] | None) -> float | None:
    """This run's figure for ``metric``."""
    if metric == "mae_step_s":
        return baseline["per_pretrain_step_s"] if baseline else None
    if mlo is None:
        return None
    if metric == "mlo_iteration_s":
        return mlo["median_iteration_s"]
    if metric == "mlo_over_mae":
        return mlo.get("ratio_vs_random")
    if metric == "flops_per_iteration":
        return mlo.get("flops_per_iteration")
    raise ValueError(f"unknown metric {metric}")


def compare(results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The quoted figures with this run's beside them, and the goal at the reference
    configuration (``evaluated`` False, with the reasons, when this run does not have it)."""
    baseline, mlo_rows = measured_rows(results)
    rows = []
    for figure in QUOTED_FIGURES:
        differences = setting_differences(figure.setting, meta)
        candidates: list[dict[str, Any] | None] = [None]
        if not differences and figure.metric != "mae_step_s":
            candidates = list(mlo_rows) or [None]
        for mlo in candidates:
            value = None if differences else metric_value(figure.metric, baseline, mlo)
            rows.append(
                {
                    "metric": figure.metric,
                    "label": figure.label,
                    "setting": figure.setting.label,
                    "command": figure.setting.command,
                    "reference": figure.reference,
                    "maskkit_at_filing": figure.maskkit_at_filing,
                    "this_run": value,
                    "this_run_variant": mlo["variant_label"] if mlo is not None else None,
                    "this_run_over_reference": value / figure.reference if value is not None else None,
                    "not_comparable": differences,
                }
            )
    differences = setting_differences(REFERENCE_SETTING, meta)
    goal: dict[str, Any] = {"evaluated": not differences, "not_comparable": differences, "checks": []}
    if not differences:
        per_mlo_row = [target for target in GOALS if target.metric != "mae_step_s"]
        for mlo in mlo_rows or [None]:
            goal["checks"].extend(_check(target, baseline, mlo) for target in per_mlo_row)
        goal["checks"].extend(_check(target, baseline, None) for target in GOALS if target not in per_mlo_row)
    return {"source": SOURCE, "figures": rows, "goal": goal}


def _check(target: Goal, baseline: dict[str, Any] | None, mlo: dict[str, Any] | None) -> dict[str, Any]:
    value = metric_value(target.metric, baseline, mlo)
    return {
        "metric": target.metric,
        "label": target.label,
        "limit": target.limit,
        "this_run": value,
        "variant": mlo["variant_label"] if mlo is not None else None,
        "passed": None if value is None else value <= target.limit,
    }
