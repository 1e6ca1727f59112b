"""The report's section on the paired protocols (the trial): each policy against ``random`` from
its own checkpoint.

A cell's trial value is already a difference, its policy − ``random`` on val, the mean over the
trial's forks (:mod:`maskkit.engine.protocols.paired_trial`). Over the seeds of a policy the
section gives the mean of those values and its 95 % Student-t interval (the seeds are the
repeats; the forks within a cell only make each value less noisy). The ``random`` row is
``random`` against ``random`` with another mask seed: the instrument's noise floor.
"""

from __future__ import annotations

from maskkit.engine.protocols import PAIRED_PROTOCOLS, PairedProtocol
from maskkit.report.statistics import PairedDifference, paired_difference

from .aggregate import CellResult, by_seed
from .suite import Suite


def one_sample(values: dict[int, float]) -> PairedDifference | None:
    """The mean of ``values`` (seed → a difference already) and its 95 % Student-t interval."""
    return paired_difference(values, dict.fromkeys(values, 0.0))


def _formatted(found: PairedDifference | None, scale: float, digits: int) -> str:
    """``+0.42 [−0.31, +1.15]`` (bold when the interval excludes 0), ``n/a`` without an interval."""
    if found is None:
        return "–"

    def number(value: float) -> str:
        return f"{scale * value:+.{digits}f}".replace("-", "−")

    if found.low is None or found.high is None:
        return f"{number(found.mean)} [n/a]"
    text = f"{number(found.mean)} [{number(found.low)}, {number(found.high)}]"
    return f"**{text}**" if found.excludes_zero else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _protocol_section(suite: Suite, results: list[CellResult], protocol: PairedProtocol) -> list[str]:
    columns = {f"{protocol.name}_{key}": key for key in protocol.metrics}
    if not any(column in result.metrics for result in results for column in columns):
        return []
    units = "; ".join(
        f"{title} in {'percentage points' if key in protocol.in_points else 'its own units'}"
        + (" (lower is better)" if key in protocol.lower_is_better else " (higher is better)")
        for key, title in protocol.metrics.items()
    )
    lines = [
        "",
        f"## The {protocol.title}, from each policy's own checkpoint",
        "",
        f"Each cell's {protocol.short_title} starts both arms from its own `pretrained` checkpoint: its "
        "policy in one, `random` (another mask seed) in the other, paired fork by fork "
        "(docs/bench.md). Mean over seeds of each cell's policy − `random`, with its 95 % Student-t "
        f"interval over the seeds; **bold** where it excludes 0. Units: {units}. The `random` row is the "
        "noise floor; cells without stage 1 (`none`) have no trial.",
    ]
    header = ["policy", "seeds", *(f"{title}, policy − random" for title in protocol.metrics.values())]
    for dataset in suite.dataset_labels:
        rows = []
        for policy in suite.policy_labels:
            found = {
                key: one_sample(by_seed(results, dataset, policy, column)) for column, key in columns.items()
            }
            if all(value is None for value in found.values()):
                continue
            seeds = max(value.n for value in found.values() if value is not None)
            rows.append(
                [f"`{policy}`", str(seeds)]
                + [
                    _formatted(
                        found[key],
                        100.0 if key in protocol.in_points else 1.0,
                        2 if key in protocol.in_points else 4,
                    )
                    for key in protocol.metrics
                ]
            )
        if rows:
            lines += ["", f"### {dataset}", "", *_table(header, rows)]
    return lines


def paired_protocol_sections(suite: Suite, results: list[CellResult]) -> list[str]:
    """The Markdown lines of every paired protocol that some cell recorded (none otherwise)."""
    return [line for protocol in PAIRED_PROTOCOLS for line in _protocol_section(suite, results, protocol)]
