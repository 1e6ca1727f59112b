"""A suite's report: ``cells.csv``, ``results.md``, ``results.png`` and ``forest.png`` in its
output dir.

Rebuilt from the run dirs and the journal (:mod:`maskkit.bench.aggregate`) whenever ``maskkit
bench`` finishes, stops or is asked with ``--report-only``; every file is replaced whole.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from maskkit.engine.protocols import PROTOCOLS
from maskkit.report import plot_grouped_bars
from maskkit.report.forest import plot_forest
from maskkit.report.statistics import PairedDifference, Spread, spread
from maskkit.rundir import atomic_write_text

from .aggregate import (
    HEADLINE_METRICS,
    METRICS,
    PAIRED_METRICS,
    CellResult,
    by_seed,
    class_support,
    mean_per_class,
)
from .cells import Cell
from .comparisons import (
    PREMISE_BASELINE,
    PREMISE_POLICY,
    Comparison,
    compare_to_baseline,
    forest_bands,
    forest_panels,
    premise,
)
from .journal import Timings
from .layout import SuiteLayout
from .paired_report import paired_protocol_sections
from .suite import Suite

#: Short titles of the test metrics, for the headline tables and the plots.
_SHORT_METRIC_TITLES = {
    "balanced_accuracy": "bal. acc.",
    "auc": "AUC",
    "accuracy": "acc.",
    "weighted_f1": "weighted F1",
    "macro_f1": "macro F1",
}
#: Titles of the headline metrics in tables and the plot: fine-tune's, then each protocol's
#: (:data:`maskkit.engine.protocols.PROTOCOLS`).
SHORT_TITLES = {
    **{f"test_{key}": f"fine-tune {title}" for key, title in _SHORT_METRIC_TITLES.items()},
    **{
        f"{protocol.name}_{key}": f"{protocol.short_title} {_SHORT_METRIC_TITLES[key]}"
        for protocol in PROTOCOLS
        for key in protocol.headline
    },
}
CSV_COLUMNS = (
    "dataset",
    "policy",
    "seed",
    "status",
    *METRICS,
    *PAIRED_METRICS,
    "train_seconds",
    "cell_seconds",
    "exit_code",
    "reason",
    "run_dir",
    "log",
)


def write_report(
    suite: Suite,
    suite_file: Path,
    cells: list[Cell],
    results: list[CellResult],
    timings: Timings,
    layout: SuiteLayout,
) -> list[Path]:
    """Write the CSV, the Markdown, the bars and the forest plot; returns their paths."""
    atomic_write_text(layout.csv, cells_csv(results))
    atomic_write_text(layout.markdown, results_markdown(suite, suite_file, cells, results, timings, layout))
    plot_grouped_bars(
        {dataset: _plot_groups(results, dataset, suite.policy_labels) for dataset in suite.dataset_labels},
        layout.plot,
        "test %, mean ± std over seeds",
        f"maskkit bench {suite.name}",
    )
    comparisons = _comparisons(suite, results)
    titles = {metric: SHORT_TITLES[metric] for metric in HEADLINE_METRICS}
    plot_forest(
        forest_panels(comparisons, titles),
        layout.forest,
        "difference in points",
        f"maskkit bench {suite.name}: paired difference to `{suite.baseline_label}` over seeds, "
        "95 % interval (filled: excludes 0; grey: ± MDE)",
        bands=forest_bands(comparisons, titles),
    )
    return [layout.csv, layout.markdown, layout.plot, layout.forest]


def _comparisons(suite: Suite, results: list[CellResult]) -> list[Comparison]:
    """Each dataset's :class:`~maskkit.bench.comparisons.Comparison` to the baseline (none
    without a baseline)."""
    found = [compare_to_baseline(suite, results, label, HEADLINE_METRICS) for label in suite.dataset_labels]
    return [comparison for comparison in found if comparison is not None]


def cells_csv(results: list[CellResult]) -> str:
    """One row per cell: :data:`CSV_COLUMNS`; metrics as fractions in [0, 1], times in seconds."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        row = {
            "dataset": result.dataset,
            "policy": result.policy,
            "seed": result.seed,
            "status": result.status,
            "train_seconds": result.train_seconds,
            "cell_seconds": None if result.cell_seconds is None else round(result.cell_seconds, 2),
            "exit_code": result.exit_code,
            "reason": result.reason,
            "run_dir": result.run_dir,
            "log": result.log,
        }
        row.update({metric: result.metrics.get(metric) for metric in (*METRICS, *PAIRED_METRICS)})
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def _plot_groups(
    results: list[CellResult], dataset: str, policies: list[str]
) -> dict[str, dict[str, tuple[float, float | None]]]:
    groups = {}
    for policy in policies:
        values = {}
        for metric in HEADLINE_METRICS:
            found = spread(list(by_seed(results, dataset, policy, metric).values()))
            if found is not None:
                values[SHORT_TITLES[metric]] = (
                    100 * found.mean,
                    None if found.std is None else 100 * found.std,
                )
        if values:
            groups[policy] = values
    return groups


def _percent(found: Spread | None) -> str:
    if found is None:
        return "–"
    if found.std is None:
        return f"{100 * found.mean:.2f}"
    return f"{100 * found.mean:.2f} ± {100 * found.std:.2f}"


def _difference(found: PairedDifference | None) -> str:
    """Percentage points: ``+0.42 [−0.31, +1.15]``, bold when the interval excludes 0."""
    if found is None:
        return "–"
    mean = f"{100 * found.mean:+.2f}".replace("-", "−")
    if found.low is None or found.high is None:
        return f"{mean} [n/a]"
    low, high = (f"{100 * value:+.2f}".replace("-", "−") for value in (found.low, found.high))
    text = f"{mean} [{low}, {high}]"
    return f"**{text}**" if found.excludes_zero else text


def _clock(seconds: float | None) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    if seconds is None:
        return "–"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if index < right_from else "--:" for index in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def results_markdown(
    suite: Suite,
    suite_file: Path,
    cells: list[Cell],
    results: list[CellResult],
    timings: Timings,
    layout: SuiteLayout,
) -> str:
    """The report as Markdown: the premise (``random`` against ``none``), the set-up, mean ± std,
    paired differences to the baseline with each metric's minimum detectable effect, per-class
    tables, wall times and the cells that did not finish."""
    done = [result for result in results if result.status == "done"]
    unfinished = ("stopped", "failed", "partial", "missing")
    counts = {status: sum(r.status == status for r in results) for status in unfinished}
    lines = [f"# Benchmark suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += _premise(suite, results)
    lines += _setup(suite, suite_file, cells, done, counts, len(results))
    lines += ["", "## Mean ± std over seeds", ""]
    lines += [
        "Test metrics in %: the fine-tuned model (stage 2, end to end), then the frozen pretrained "
        "encoder's linear probe and k-NN classifier (hyper-parameters chosen on val). `none` is "
        "the ViT trained from scratch by the same stage 2.",
    ]
    for dataset in suite.dataset_labels:
        rows = []
        for policy in suite.policy_labels:
            seeds = len(by_seed(results, dataset, policy, "test_accuracy"))
            rows.append(
                [f"`{policy}`", str(seeds)]
                + [_percent(spread(list(by_seed(results, dataset, policy, m).values()))) for m in METRICS]
            )
        lines += ["", f"### {dataset}", ""]
        lines += _table(["policy", "seeds", *METRICS.values()], rows, right_from=1)
    lines += _differences(suite, _comparisons(suite, results))
    lines += paired_protocol_sections(suite, results)
    for entry in suite.datasets:
        if entry.per_class:
            lines += _per_class(suite, results, entry.label)
    lines += _wall_times(suite, results, timings)
    lines += _unfinished(results)
    return "\n".join(lines) + "\n"


def _setup(
    suite: Suite, suite_file: Path, cells: list[Cell], done: list[CellResult], counts: dict, total: int
) -> list[str]:
    first = cells[0].config
    model = first.model
    environment = done[0].environment if done else {}
    ran_on = (
        f" Cells ran on {environment.get('device_name', '?')} ({environment.get('device', '?')}), "
        f"torch {environment.get('torch', '?')}, {environment.get('threads', '?')} thread(s) per cell."
        if environment
        else ""
    )
    pending = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    return [
        f"Suite file `{suite_file}`, preset `{suite.preset}` with the suite's `config`; "
        f"{len(suite.policy_labels)} policies × {len(suite.dataset_labels)} datasets × seeds "
        f"{', '.join(map(str, suite.seeds))}. Model: ViT {model.embed_dim}×{model.depth} at patch "
        f"{model.patch_size} on {model.img_size} px, decoder {model.decoder_embed_dim}×"
        f"{model.decoder_depth}; every cell's full config is `configs/<dataset>-<policy>-seed<k>.yaml` "
        "and its run dir's `config.yaml`.",
        "",
        f"{len(done)} of {total} cells finished" + (f" ({pending})" if pending else "") + "."
        f"{ran_on} Report written {time.strftime('%Y-%m-%d %H:%M')}.",
    ]


def _premise(suite: Suite, results: list[CellResult]) -> list[str]:
    """The suite's premise first: does pretraining (``random``) beat none at this budget?"""
    lines = ["## Premise: does pretraining help?", ""]
    if premise(suite, results, suite.dataset_labels[0], HEADLINE_METRICS) is None:
        return [
            *lines,
            f"The suite has no `{PREMISE_POLICY}` and `{PREMISE_BASELINE}` cells side by side, so it does "
            "not show whether pretraining helps at its budget; add both to test it.",
            "",
        ]
    lines += [
        f"`{PREMISE_POLICY}` (MAE pretraining with random masking) against `{PREMISE_BASELINE}` (the same "
        "ViT trained from scratch by stage 2 alone), paired by seed: the mean difference in percentage "
        "points and its 95 % Student-t interval, **bold** where the interval excludes 0. Where no "
        "interval excludes 0, the suite has not shown that pretraining helps at its budget, and the "
        "differences between masking policies below say little about masking.",
        "",
    ]
    rows, shown = [], []
    for dataset in suite.dataset_labels:
        found = premise(suite, results, dataset, HEADLINE_METRICS) or {}
        pairs = max((d.n for d in found.values() if d is not None), default=0)
        rows.append([dataset, str(pairs)] + [_difference(found.get(metric)) for metric in HEADLINE_METRICS])
        separated = {metric: d for metric, d in found.items() if d is not None and d.excludes_zero}
        for direction, sign in (("higher", 1), ("lower", -1)):
            metrics = [SHORT_TITLES[m] for m, d in separated.items() if sign * d.mean > 0]
            if metrics:
                shown.append(f"{dataset}, {direction} with pretraining: {', '.join(metrics)}")
    lines += _table(["dataset", "pairs", *(SHORT_TITLES[m] for m in HEADLINE_METRICS)], rows)
    # No full stop after the list: the metric titles end in one.
    verdict = "Intervals that exclude 0: " + "; ".join(shown) if shown else "No interval excludes 0."
    return [*lines, "", verdict, ""]


def _mde(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _differences(suite: Suite, comparisons: list[Comparison]) -> list[str]:
    baseline = suite.baseline_label
    if baseline is None or not comparisons:
        return []
    lines = [
        "",
        f"## Paired difference to `{baseline}`",
        "",
        f"Mean over seeds of (policy − `{baseline}`) on the same seed, in percentage points, with "
        "its 95 % Student-t interval; **bold** where the interval excludes 0, `n/a` with one seed. "
        "Under each table, *MDE* is the minimum detectable effect: the true difference that a paired "
        f"t-test at the suite's {len(suite.seeds)} seeds detects with 80 % power at two-sided 5 %, "
        f"given the pooled seed-to-seed standard deviation of every policy's differences to `{baseline}` "
        "(noncentral t; docs/bench.md). A smaller true difference can easily go unseen. `forest.png` "
        "draws these intervals.",
    ]
    titles = [SHORT_TITLES[m] for m in HEADLINE_METRICS]
    for comparison in comparisons:
        rows = []
        for policy, found in comparison.differences.items():
            pairs = max((d.n for d in found.values() if d is not None), default=0)
            rows.append([f"`{policy}`", str(pairs)] + [_difference(found[m]) for m in HEADLINE_METRICS])
        rows.append(["*MDE*", str(comparison.seeds)] + [_mde(comparison.mde[m]) for m in HEADLINE_METRICS])
        lines += ["", f"### {comparison.dataset}", ""]
        lines += _table(["policy", "pairs", *titles], rows)
    return lines


def _per_class(suite: Suite, results: list[CellResult], dataset: str) -> list[str]:
    support = class_support(results, dataset)
    if not support:
        return []
    names = list(support)
    rows = []
    for policy in suite.policy_labels:
        recall = mean_per_class(results, dataset, policy, "recall")
        rows.append(
            [f"`{policy}`"] + [f"{100 * recall[name]:.1f}" if name in recall else "–" for name in names]
        )
    return [
        "",
        f"## Per class: {dataset}",
        "",
        "Test recall per class in % (the fine-tuned model), mean over seeds; the header gives each "
        "class's test images.",
        "",
        *_table(["policy", *(f"{name} ({support[name]})" for name in names)], rows),
    ]


def _wall_times(suite: Suite, results: list[CellResult], timings: Timings) -> list[str]:
    seeds = suite.seeds
    rows = []
    for result_group in _grouped(results):
        first = result_group[0]
        by = {result.seed: result for result in result_group}
        cells = [_clock(by[seed].cell_seconds) if seed in by else "–" for seed in seeds]
        trained = [r.train_seconds for r in result_group if r.train_seconds is not None]
        rows.append(
            [
                first.dataset,
                f"`{first.policy}`",
                *cells,
                _clock(sum(trained) / len(trained) if trained else None),
            ]
        )
    recorded = sum(result.cell_seconds or 0.0 for result in results)
    return [
        "",
        "## Wall time",
        "",
        f"Suite: {_duration(timings.suite_seconds)} of `maskkit bench` over {timings.invocations} "
        f"invocation(s); the cells' own wall times add up to {_duration(recorded)}.",
        "",
        "Wall time per cell (m:ss): the cell's `maskkit train` processes (start-up, data, both stages, the "
        "protocols; every attempt the bench recorded), and the mean of stage 1 + stage 2 alone as the "
        "runs measured them.",
        "",
        *_table(["dataset", "policy", *(f"seed {seed}" for seed in seeds), "training (mean)"], rows, 2),
    ]


def _grouped(results: list[CellResult]) -> list[list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for result in results:
        groups.setdefault((result.dataset, result.policy), []).append(result)
    return list(groups.values())


def _unfinished(results: list[CellResult]) -> list[str]:
    unfinished = [result for result in results if result.status != "done"]
    if not unfinished:
        return []
    lines = ["", "## Cells not finished", ""]
    for result in unfinished:
        code = None if result.exit_code is None else f"exit code {result.exit_code}"
        why = f" ({result.reason})" if result.reason else ""
        detail = {
            "failed": ", ".join(item for item in (code, result.reason) if item) + ", ",
            "stopped": f"interrupted{why}; the same command resumes it from its checkpoint, ",
        }.get(result.status, "")
        lines.append(
            f"- {result.dataset}/{result.policy}/seed-{result.seed}: **{result.status}** ({detail}log "
            f"`{result.log}`)"
        )
    return lines
