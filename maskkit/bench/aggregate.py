"""A suite's results, read back from its cells' run dirs, and the statistics over seeds.

Every number comes from the files a cell's run wrote (``summary.json``, ``protocols.json``) and
the suite's journal (wall times), so a report can be rebuilt at any time, also while cells run.

Statistics, per policy and dataset, over the seeds present (:mod:`maskkit.report.statistics`):

- mean ± sample standard deviation (``ddof=1``; none with one seed);
- the **paired difference** to the baseline policy: ``d_s = x_policy(s) − x_baseline(s)`` over
  the seeds ``s`` both have finished, its mean, and the 95 % Student-t interval
  ``mean(d) ± t(0.975, n − 1) · sd(d) / √n``; with fewer than two pairs there is no interval.
  The pairing removes what a seed does to every policy alike (the initial weights, the head,
  the data order), so it is tighter than comparing the two means.

The metrics of the frozen-encoder protocols come from their registry
(:data:`maskkit.engine.protocols.PROTOCOLS`): a new protocol shows up here, with its titles.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskkit.engine.protocols import PAIRED_PROTOCOLS, PROTOCOLS
from maskkit.rundir import PROTOCOLS_FILE, SUMMARY_FILE, RunDir

from .cells import Cell, CellState
from .journal import Timings

#: The test metrics read from each protocol's results (``protocols.json`` → name → ``test``),
#: with their titles.
PROTOCOL_METRICS: dict[str, str] = {
    "balanced_accuracy": "balanced accuracy",
    "auc": "AUC",
    "accuracy": "accuracy",
}
#: The test metrics of stage 2's fine-tuned model (``summary.json`` → ``test``), with their titles.
FINETUNE_METRICS: dict[str, str] = {**PROTOCOL_METRICS, "weighted_f1": "weighted F1", "macro_f1": "macro F1"}
#: The metrics of a cell, in the report's order: CSV column → title. AUC is MedMNIST's (one-vs-rest,
#: macro over the classes; :func:`maskkit.report.auc_score`), balanced accuracy the mean recall.
METRICS: dict[str, str] = {
    **{f"test_{key}": f"fine-tune {title}" for key, title in FINETUNE_METRICS.items()},
    **{
        f"{protocol.name}_{key}": f"{protocol.title} {title}"
        for protocol in PROTOCOLS
        for key, title in PROTOCOL_METRICS.items()
    },
}
#: The metrics of the paired protocols (:data:`maskkit.engine.protocols.PAIRED_PROTOCOLS`, the
#: trial): CSV column → title. Each cell's value is already a difference, its policy − ``random``
#: (the mean over the protocol's forks), so the report shows them apart from :data:`METRICS`.
PAIRED_METRICS: dict[str, str] = {
    f"{protocol.name}_{key}": f"{protocol.title}: {title}, policy − random"
    for protocol in PAIRED_PROTOCOLS
    for key, title in protocol.metrics.items()
}
#: The metrics of the paired-difference tables, the minimum detectable effects, the premise and
#: the plots. Balanced accuracy and AUC lead: accuracy alone rewards predicting the majority class;
#: macro F1 weighs every class's precision as well as its recall.
HEADLINE_METRICS: tuple[str, ...] = (
    "test_balanced_accuracy",
    "test_auc",
    "test_accuracy",
    "test_macro_f1",
    *(f"{protocol.name}_{key}" for protocol in PROTOCOLS for key in protocol.headline),
)
#: The exit status of a ``maskkit train`` that was interrupted and saved its checkpoint (Ctrl-C, or
#: the SIGINT the bench sends its cells when it is stopped): the cell resumes on the next run.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


@dataclass
class CellResult:
    """What one cell produced.

    Attributes:
        status: ``done``; ``stopped`` (its last attempt was interrupted, as by Ctrl-C, the
            bench's SIGTERM or the scheduler, and left a run dir to resume); ``failed`` (its last
            attempt exited non-zero otherwise, or its job was lost), ``partial`` (started, not
            finished) or ``missing`` (never started).
        metrics: :data:`METRICS` → value in [0, 1], for a finished cell (those its run recorded).
        per_class: the test metrics per class (``summary.json`` → ``test.per_class``).
        train_seconds: stage 1 + stage 2 as the run measured them (over its resumes).
        cell_seconds: the wall time of the cell's recorded attempts (start-up, data, training,
            protocols), from the journal; None if the journal has none.
        exit_code: the last attempt's exit code, if any.
        reason: why the last attempt was stopped or lost, as its scheduler said (Slurm, Ray).
    """

    dataset: str
    policy: str
    seed: int
    status: str
    run_dir: Path
    log: Path
    metrics: dict[str, float] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float | None = None
    cell_seconds: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)


def collect(cells: list[Cell], timings: Timings) -> list[CellResult]:
    """One :class:`CellResult` per cell, in the grid's order."""
    results = []
    for cell in cells:
        last = timings.attempts[cell.key][-1] if timings.attempts.get(cell.key) else {}
        exit_code, reason = last.get("exit_code"), last.get("reason")
        interrupted = last.get("interrupted", False) or exit_code == INTERRUPTED_EXIT_CODE
        state = cell.state()
        if state == CellState.DONE:
            status = "done"
        elif interrupted and state == CellState.PARTIAL:
            status = "stopped"
        elif exit_code not in (None, 0) or reason:
            status = "failed"
        else:
            status = "partial" if state == CellState.PARTIAL else "missing"
        result = CellResult(
            cell.dataset,
            cell.policy,
            cell.seed,
            status,
            cell.run_dir,
            cell.log_file,
            cell_seconds=timings.cell_seconds.get(cell.key),
            exit_code=exit_code,
            reason=reason,
        )
        if status == "done":
            _read_results(result, RunDir(cell.run_dir))
        results.append(result)
    return results


def _read_results(result: CellResult, run: RunDir) -> None:
    summary = run.read_json(SUMMARY_FILE)
    test = summary["test"]
    found = {f"test_{key}": test.get(key) for key in FINETUNE_METRICS}
    if run.protocols_path.is_file():
        protocols = run.read_json(PROTOCOLS_FILE)
        for protocol in PROTOCOLS:
            if protocol.name in protocols:  # a protocol added after the run: not recorded
                test_metrics = protocols[protocol.name]["test"]
                found.update({f"{protocol.name}_{key}": test_metrics.get(key) for key in PROTOCOL_METRICS})
        for paired in PAIRED_PROTOCOLS:
            differences = protocols.get(paired.name, {}).get("metrics", {})
            found.update(
                {
                    f"{paired.name}_{key}": differences[key]["mean"]
                    for key in paired.metrics
                    if key in differences
                }
            )
    # A metric a run did not record (an AUC undefined on its test split, or a run from before
    # maskkit reported it) is left out, not taken as 0.
    result.metrics = {metric: float(value) for metric, value in found.items() if value is not None}
    result.per_class = test.get("per_class", [])
    result.train_seconds = summary.get("wall_time_s")
    result.environment = summary.get("environment", {})


def by_seed(results: list[CellResult], dataset: str, policy: str, metric: str) -> dict[int, float]:
    """seed → ``metric`` of the finished cells of ``dataset`` × ``policy``."""
    return {
        result.seed: result.metrics[metric]
        for result in results
        if result.dataset == dataset and result.policy == policy and metric in result.metrics
    }


def mean_per_class(results: list[CellResult], dataset: str, policy: str, key: str) -> dict[str, float]:
    """class name → mean of its per-class ``key`` (``recall``, ``f1`` …) over the finished seeds."""
    rows: dict[str, list[float]] = {}
    for result in results:
        if result.dataset == dataset and result.policy == policy:
            for row in result.per_class:
                rows.setdefault(row["class"], []).append(float(row[key]))
    return {name: float(np.mean(values)) for name, values in rows.items()}


def class_support(results: list[CellResult], dataset: str) -> dict[str, int]:
    """class name → test images of the class (from any finished cell of ``dataset``)."""
    for result in results:
        if result.dataset == dataset and result.per_class:
            return {row["class"]: int(row["support"]) for row in result.per_class}
    return {}
