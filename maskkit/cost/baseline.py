"""The baseline every policy's cost is compared with: ``random``, plain MAE pretraining of the
same model, measured first."""

from __future__ import annotations

from typing import Any

#: The policy every other one is compared with ("× random").
BASELINE_POLICY = "random"


def with_baseline(policies: list[str] | tuple[str, ...]) -> list[str]:
    """``policies`` in order, each once, after the baseline: ``["mlo", "random", "mlo"]`` →
    ``["random", "mlo"]``."""
    return list(dict.fromkeys([BASELINE_POLICY, *policies]))


def add_ratio_to_baseline(results: list[dict[str, Any]]) -> None:
    """Set each measured row's ``ratio_vs_random``: its time per pretrain step over the
    baseline's (the same as per MLO iteration when both iterations have as many pretrain steps);
    None without a measured baseline row."""
    baseline = next(
        (row for row in results if row.get("policy") == BASELINE_POLICY and row.get("status") == "ok"), None
    )
    for row in results:
        if row.get("status") != "ok":
            continue
        row["ratio_vs_random"] = (
            row["per_pretrain_step_s"] / baseline["per_pretrain_step_s"] if baseline is not None else None
        )
