"""What a suite's report compares: each policy to the baseline, seed by seed, with the smallest
difference the suite could have detected, and the suite's premise (``random`` against ``none``).

Everything here is computed from the cells' results (:mod:`maskkit.bench.aggregate`); the report
(:mod:`maskkit.bench.report`) formats it, and the forest plot draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskkit.report.statistics import PairedDifference, paired_difference

from .aggregate import CellResult, by_seed
from .power import minimum_detectable_effect, pooled_sd
from .suite import NONE_POLICY, Suite

#: The pretrained policy of the premise: pretraining with random masking …
PREMISE_POLICY = "random"
#: … against none at all (the ViT trained from scratch by stage 2).
PREMISE_BASELINE = NONE_POLICY


@dataclass(frozen=True)
class Comparison:
    """One dataset's paired differences to the baseline, for each metric.

    Attributes:
        dataset: the dataset label.
        baseline: the baseline policy label.
        seeds: the suite's number of seeds, at which the MDE is stated.
        differences: policy (every one but the baseline, in the suite's order) → metric → its
            :class:`~maskkit.report.statistics.PairedDifference` (None when no seed is shared).
        mde: metric → the minimum detectable effect (80 % power, two-sided 5 %, paired t at
            ``seeds`` seeds; :mod:`maskkit.bench.power`) from the pooled standard deviation of
            every policy's per-seed differences to the baseline; None without two shared seeds.
    """

    dataset: str
    baseline: str
    seeds: int
    differences: dict[str, dict[str, PairedDifference | None]]
    mde: dict[str, float | None]


def seed_differences(values: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """``values[s] − baseline[s]`` over the seeds ``s`` both have, in seed order."""
    return [values[seed] - baseline[seed] for seed in sorted(values.keys() & baseline.keys())]


def compare_to_baseline(
    suite: Suite, results: list[CellResult], dataset: str, metrics: tuple[str, ...]
) -> Comparison | None:
    """The :class:`Comparison` of ``dataset`` for ``metrics``; None when the suite has no baseline."""
    baseline = suite.baseline_label
    if baseline is None:
        return None
    policies = [policy for policy in suite.policy_labels if policy != baseline]
    differences: dict[str, dict[str, PairedDifference | None]] = {policy: {} for policy in policies}
    mde: dict[str, float | None] = {}
    for metric in metrics:
        reference = by_seed(results, dataset, baseline, metric)
        groups = []
        for policy in policies:
            values = by_seed(results, dataset, policy, metric)
            differences[policy][metric] = paired_difference(values, reference)
            groups.append(seed_differences(values, reference))
        mde[metric] = minimum_detectable_effect(pooled_sd(groups), len(suite.seeds))
    return Comparison(dataset, baseline, len(suite.seeds), differences, mde)


def premise(
    suite: Suite, results: list[CellResult], dataset: str, metrics: tuple[str, ...]
) -> dict[str, PairedDifference | None] | None:
    """metric → the paired difference ``random − none`` on ``dataset``: does pretraining help at
    the suite's budget? None when the suite lacks either policy."""
    if not {PREMISE_POLICY, PREMISE_BASELINE} <= set(suite.policy_labels):
        return None
    return {
        metric: paired_difference(
            by_seed(results, dataset, PREMISE_POLICY, metric),
            by_seed(results, dataset, PREMISE_BASELINE, metric),
        )
        for metric in metrics
    }


#: One point of a forest plot: mean, interval low and high (None without an interval), in points.
ForestPoint = tuple[float, float | None, float | None]


def forest_panels(
    comparisons: list[Comparison], titles: dict[str, str]
) -> dict[str, dict[str, dict[str, ForestPoint]]]:
    """What the forest plot draws, in percentage points: dataset → metric title → policy →
    ``(mean, low, high)`` of its paired difference to the baseline (the numbers of the report's
    paired-difference tables, times 100). Policies without a shared seed are left out.

    Args:
        comparisons: one per dataset (:func:`compare_to_baseline`).
        titles: metric → its title in the plot; the panels follow its order.
    """
    panels: dict[str, dict[str, dict[str, ForestPoint]]] = {}
    for comparison in comparisons:
        panels[comparison.dataset] = {}
        for metric, title in titles.items():
            points = {}
            for policy, found in comparison.differences.items():
                difference = found.get(metric)
                if difference is not None:
                    points[policy] = (
                        100 * difference.mean,
                        None if difference.low is None else 100 * difference.low,
                        None if difference.high is None else 100 * difference.high,
                    )
            panels[comparison.dataset][title] = points
    return panels


def forest_bands(comparisons: list[Comparison], titles: dict[str, str]) -> dict[str, dict[str, float | None]]:
    """dataset → metric title → its MDE in percentage points (the forest plot's grey band)."""
    return {
        comparison.dataset: {
            title: None if comparison.mde.get(metric) is None else 100 * comparison.mde[metric]
            for metric, title in titles.items()
        }
        for comparison in comparisons
    }
