"""A suite's results, read back from its cells' run dirs, and the statistics over seeds.

Every number comes from the files a cell's run wrote (``summary.json``, ``protocols.json``) and
the suite's journal (wall times), so a report can be rebuilt at any time, also while cells run.

Statistics, per policy and dataset, over the seeds present:

- mean ± sample standard deviation (``ddof=1``; none with one seed);
- the **paired difference** to the baseline policy: ``d_s = x_policy(s) − x_baseline(s)`` over
  the seeds ``s`` both have finished, its mean, and the 95 % Student-t interval
  ``mean(d) ± t(0.975, n − 1) · sd(d) / √n``; with fewer than two pairs there is no interval.
  The pairing removes what a seed does to every policy alike (the initial weights, the head,
  the data order), so it is tighter than comparing the two means.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from maskkit.engine.run import PROTOCOLS_FILE
from maskkit.rundir import RunDir

from .cells import Cell, CellState
from .journal import Timings

#: The metrics of a cell, in the report's order: CSV column → title. AUC is MedMNIST's (one-vs-rest,
#: macro over the classes; :func:`maskkit.report.auc_score`), balanced accuracy the mean recall.
METRICS: dict[str, str] = {
    "test_balanced_accuracy": "fine-tune balanced accuracy",
    "test_auc": "fine-tune AUC",
    "test_accuracy": "fine-tune accuracy",
    "test_weighted_f1": "fine-tune weighted F1",
    "test_macro_f1": "fine-tune macro F1",
    "linear_probe_balanced_accuracy": "linear-probe balanced accuracy",
    "linear_probe_auc": "linear-probe AUC",
    "linear_probe_accuracy": "linear-probe accuracy",
    "knn_balanced_accuracy": "k-NN balanced accuracy",
    "knn_auc": "k-NN AUC",
    "knn_accuracy": "k-NN accuracy",
}
#: The metrics of the paired-difference tables, the minimum detectable effects, the premise and
#: the plots. Balanced accuracy and AUC lead: accuracy alone rewards predicting the majority class.
HEADLINE_METRICS = (
    "test_balanced_accuracy",
    "test_auc",
    "test_accuracy",
    "linear_probe_balanced_accuracy",
    "linear_probe_auc",
    "linear_probe_accuracy",
    "knn_accuracy",
)
#: The test metrics read from each protocol's results (``protocols.json`` → name → ``test``).
PROTOCOL_METRICS = ("balanced_accuracy", "auc", "accuracy")
#: The exit status of a ``maskkit train`` that was interrupted and saved its checkpoint (Ctrl-C, or
#: the SIGINT the bench sends its cells when it is stopped): the cell resumes on the next run.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


@dataclass
class CellResult:
    """What one cell produced.

    Attributes:
        status: ``done``; ``stopped`` (its last attempt was interrupted, as by Ctrl-C or the
            bench's SIGTERM, and left a run dir to resume); ``failed`` (its last attempt exited
            non-zero otherwise), ``partial`` (started, not finished) or ``missing`` (never
            started).
        metrics: :data:`METRICS` → value in [0, 1], for a finished cell (those its run recorded).
        per_class: the test metrics per class (``summary.json`` → ``test.per_class``).
        train_seconds: stage 1 + stage 2 as the run measured them (over its resumes).
        cell_seconds: the wall time of the cell's recorded attempts (start-up, data, training,
            protocols), from the journal; None if the journal has none.
        exit_code: the last attempt's exit code, if any.
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
    environment: dict[str, Any] = field(default_factory=dict)


def collect(cells: list[Cell], timings: Timings) -> list[CellResult]:
    """One :class:`CellResult` per cell, in the grid's order."""
    results = []
    for cell in cells:
        attempts = timings.attempts.get(cell.key, [])
        exit_code = attempts[-1]["exit_code"] if attempts else None
        state = cell.state()
        if state == CellState.DONE:
            status = "done"
        elif exit_code == INTERRUPTED_EXIT_CODE and state == CellState.PARTIAL:
            status = "stopped"
        elif exit_code not in (None, 0):
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
        )
        if status == "done":
            _read_results(result, RunDir(cell.run_dir))
        results.append(result)
    return results


def _read_results(result: CellResult, run: RunDir) -> None:
    summary = run.read_json("summary.json")
    test = summary["test"]
    found = {
        f"test_{key}": test.get(key)
        for key in ("balanced_accuracy", "auc", "accuracy", "weighted_f1", "macro_f1")
    }
    if (run.path / PROTOCOLS_FILE).is_file():
        protocols = run.read_json(PROTOCOLS_FILE)
        for name in ("linear_probe", "knn"):
            found.update({f"{name}_{key}": protocols[name]["test"].get(key) for key in PROTOCOL_METRICS})
    # A metric a run did not record (an AUC undefined on its test split, or a run from before
    # maskkit reported it) is left out, not taken as 0.
    result.metrics = {metric: float(value) for metric, value in found.items() if value is not None}
    result.per_class = test.get("per_class", [])
    result.train_seconds = summary.get("wall_time_s")
    result.environment = summary.get("environment", {})


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of ``n`` values (``std`` None when ``n < 2``)."""

    mean: float
    std: float | None
    n: int


def spread(values: list[float]) -> Spread | None:
    """The :class:`Spread` of ``values``; None for no values."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return Spread(float(array.mean()), std, len(array))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences ``policy − baseline`` over ``n`` seeds, and its
    ``confidence`` Student-t interval ``(low, high)`` (None when ``n < 2``)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """The paired difference of two policies' values by seed (seed → value), over the seeds
    both have; None when they share none."""
    seeds = sorted(values.keys() & baseline.keys())
    if not seeds:
        return None
    differences = np.asarray([values[seed] - baseline[seed] for seed in seeds], dtype=np.float64)
    mean, n = float(differences.mean()), len(differences)
    if n < 2:
        return PairedDifference(mean, None, None, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * float(differences.std(ddof=1)) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


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
