"""A suite's report: the statistics over seeds, and the CSV, Markdown and PNG built from run dirs."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image

from maskkit.bench.aggregate import HEADLINE_METRICS, collect
from maskkit.bench.cells import expand_grid
from maskkit.bench.comparisons import compare_to_baseline, forest_bands, forest_panels, premise
from maskkit.bench.journal import Journal, read_journal, timings
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.power import mde_factor
from maskkit.bench.report import results_markdown, write_report
from maskkit.bench.suite import load_suite
from maskkit.config import config_to_yaml
from maskkit.report import plot_grouped_bars
from maskkit.report.forest import plot_forest
from maskkit.report.statistics import paired_difference, spread

# Student's t quantiles t(0.975, df), from a printed table (not from scipy).
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446}


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    policy = {0: 0.70, 1: 0.72, 2: 0.75, 3: 0.71, 9: 0.99}  # seed 9 has no baseline: left out
    baseline = {0: 0.68, 1: 0.71, 2: 0.72, 3: 0.69, 7: 0.10}
    found = paired_difference(policy, baseline)
    differences = [0.02, 0.01, 0.03, 0.02]
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = T_975[3] * sd / math.sqrt(4)
    assert found.n == 4
    assert found.mean == pytest.approx(0.02)
    assert (found.low, found.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert found.excludes_zero  # 0.02 ± 0.013
    # Not the unpaired comparison: the seeds' common shifts cancel, so the interval is much
    # tighter than the two spreads would give.
    unpaired = T_975[3] * math.sqrt(
        np.var([0.70, 0.72, 0.75, 0.71], ddof=1) / 4 + np.var([0.68, 0.71, 0.72, 0.69], ddof=1) / 4
    )
    assert found.high - found.low < unpaired


def test_paired_difference_with_two_seeds_uses_one_degree_of_freedom():
    found = paired_difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.4})
    half = T_975[1] * np.std([0.1, 0.2], ddof=1) / math.sqrt(2)
    assert (found.low, found.high) == (pytest.approx(0.15 - half), pytest.approx(0.15 + half))
    assert not found.excludes_zero


def test_one_shared_seed_has_no_interval_and_none_has_no_difference():
    found = paired_difference({0: 0.5, 1: 0.6}, {1: 0.4})
    assert (found.mean, found.low, found.high, found.n) == (pytest.approx(0.2), None, None, 1)
    assert not found.excludes_zero
    assert paired_difference({0: 0.5}, {1: 0.4}) is None


def test_spread_is_the_mean_and_the_sample_standard_deviation():
    found = spread([0.1, 0.2, 0.6])
    assert (found.mean, found.std, found.n) == (pytest.approx(0.3), pytest.approx(math.sqrt(0.07)), 3)
    assert spread([0.4]).std is None and spread([]) is None


SUITE = {
    "name": "fake",
    "preset": "smoke",
    "seeds": [0, 1, 2],
    "datasets": [{"dataset": "dermamnist", "per_class": True}],
    "policies": ["none", "random", "mlo"],
}
# Test accuracies of the fake cells: policy → per seed (mlo's seed 2 failed).
ACCURACY = {"none": [0.50, 0.52, 0.54], "random": [0.70, 0.71, 0.75], "mlo": [0.72, 0.74]}


def _fake_cell(cell, accuracy: float) -> None:
    """The files a finished cell's run leaves: config, summary and protocols."""
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.yaml").write_text(config_to_yaml(cell.config))
    per_class = [
        {"class": "mole", "index": 0, "precision": 1.0, "recall": accuracy, "f1": accuracy, "support": 30},
        {"class": "lesion", "index": 1, "precision": 1.0, "recall": accuracy / 2, "f1": 0.5, "support": 10},
    ]
    # Every metric is the accuracy shifted, so every paired difference is the accuracy's.
    test = {
        "accuracy": accuracy,
        "balanced_accuracy": accuracy - 0.15,
        "auc": accuracy + 0.2,
        "weighted_f1": accuracy - 0.1,
        "macro_f1": accuracy - 0.2,
        "per_class": per_class,
    }
    summary = {
        "test": test,
        "wall_time_s": 100.0,
        "environment": {"device": "cpu", "device_name": "Test CPU"},
    }
    (cell.run_dir / "summary.json").write_text(json.dumps(summary))
    protocols = {
        "linear_probe": {
            "test": {"accuracy": accuracy - 0.05, "balanced_accuracy": accuracy - 0.1, "auc": None}
        },
        "knn": {"test": {"accuracy": accuracy - 0.06, "balanced_accuracy": accuracy - 0.2, "auc": accuracy}},
    }
    (cell.run_dir / "protocols.json").write_text(json.dumps(protocols))


def _fake_grid(tmp_path):
    """The suite file of :data:`SUITE`, the suite, its output layout and its cells."""
    suite_file = tmp_path / "fake.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE))
    suite = load_suite(suite_file)
    layout = SuiteLayout(tmp_path / "out")
    return suite_file, suite, layout, expand_grid(suite, layout, data_dir=tmp_path)


@pytest.fixture
def fake_suite(tmp_path):
    suite_file, suite, layout, cells = _fake_grid(tmp_path)
    journal = Journal(layout.journal, invocation="first")
    journal.record("start", workers=2, threads=1, cells=9)
    for cell in cells:
        values = ACCURACY[cell.policy]
        if cell.seed < len(values):
            _fake_cell(cell, values[cell.seed])
            journal.record(
                "cell", cell=cell.key, exit_code=0, seconds=60.0, resumed=False, log=str(cell.log_file)
            )
    failed = cells[-1]
    assert failed.key == "dermamnist/mlo/seed-2"
    journal.record("cell", cell=failed.key, exit_code=1, seconds=5.0, resumed=False, log=str(failed.log_file))
    journal.record("finish", seconds=300.0, outcome="finished")
    spent = timings(read_journal(layout.journal))
    paths = write_report(suite, suite_file, cells, collect(cells, spent), spent, layout)
    return layout, paths


def test_the_csv_has_a_row_per_cell(fake_suite):
    layout, _ = fake_suite
    rows = list(csv.DictReader(io.StringIO(layout.csv.read_text())))
    assert [(row["policy"], row["seed"], row["status"]) for row in rows[-3:]] == [
        ("mlo", "0", "done"),
        ("mlo", "1", "done"),
        ("mlo", "2", "failed"),
    ]
    assert float(rows[3]["test_accuracy"]) == 0.70 and float(rows[3]["knn_accuracy"]) == pytest.approx(0.64)
    assert float(rows[3]["test_auc"]) == pytest.approx(0.90) and float(rows[3]["knn_auc"]) == 0.70
    assert float(rows[3]["test_balanced_accuracy"]) == pytest.approx(0.55)
    assert rows[3]["linear_probe_auc"] == ""  # undefined (None in protocols.json): left empty, not 0
    assert rows[3]["cell_seconds"] == "60.0" and rows[3]["train_seconds"] == "100.0"
    assert rows[-1]["test_accuracy"] == "" and rows[-1]["exit_code"] == "1"
    assert rows[-1]["log"].endswith("logs/dermamnist-mlo-seed2.log")


def test_the_markdown_tables(fake_suite):
    layout, _ = fake_suite
    text = layout.markdown.read_text()
    lines = text.splitlines()
    # Mean ± std (percent) of random's fine-tune accuracy: 72.00 ± 2.65.
    random_row = next(line for line in lines if line.startswith("| `random` | 3 |"))
    assert "72.00 ± 2.65" in random_row
    # mlo − random over the two seeds both finished: +1.0 and +3.0 points.
    half = 100 * T_975[1] * np.std([0.02, 0.03], ddof=1) / math.sqrt(2)
    mlo_row = next(line for line in lines if line.startswith("| `mlo` | 2 |") and "[" in line)
    assert f"+2.50 [{2.5 - half:+.2f}, {2.5 + half:+.2f}]".replace("-", "−") in mlo_row
    none_row = next(line for line in lines if line.startswith("| `none` | 3 |") and "[" in line)
    # Seven of the eight differences exclude 0 (none is 20 points lower); the linear probe's AUC,
    # undefined in every cell, has none. The fine-tuned model's four metrics lead, macro F1 fourth.
    lower = "**−20.00 [−22.48, −17.52]**"
    assert none_row.count("**") == 14 and none_row.endswith(f"| – | {lower} | {lower} |")
    header = "| policy | pairs | fine-tune bal. acc. | fine-tune AUC | fine-tune acc. | fine-tune macro F1 |"
    assert header in text
    assert "| policy | mole (30) | lesion (10) |" in text  # the per-class table
    assert "| `random` | 72.0 | 36.0 |" in text
    assert "1 failed" in text and "dermamnist/mlo/seed-2: **failed** (exit code 1" in text
    assert "Suite: 5 min 00 s of `maskkit bench` over 1 invocation(s)" in text
    assert "| dermamnist | `mlo` | 1:00 | 1:00 | 0:05 | 1:40 |" in text


def test_the_plot_is_a_png(fake_suite, tmp_path):
    layout, paths = fake_suite
    assert paths == [layout.csv, layout.markdown, layout.plot, layout.forest]
    for path in (layout.plot, layout.forest):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    empty = plot_grouped_bars({}, tmp_path / "empty.png", "%", "nothing")
    with Image.open(empty) as image:
        assert image.format == "PNG"


# The fake suite's per-seed differences to random: none −20, −19, −21 points and mlo +2, +3 (all
# metrics alike): squares 2 · 0.01² and 2 · 0.005² over 2 + 1 degrees of freedom.
POOLED_SD = math.sqrt((2 * 0.01**2 + 2 * 0.005**2) / 3)


def test_the_report_opens_with_the_premise(fake_suite):
    layout, _ = fake_suite
    text = layout.markdown.read_text()
    assert text.index("## Premise: does pretraining help?") < text.index("Suite file") < text.index("## Mean")
    # random − none: +20, +19, +21 points; sd 1 point over three seeds.
    half = 100 * T_975[2] * 0.01 / math.sqrt(3)
    interval = f"**+20.00 [{20 - half:+.2f}, {20 + half:+.2f}]**"
    premise_row = next(line for line in text.splitlines() if line.startswith("| dermamnist | 3 |"))
    assert premise_row.count(interval) == 7 and premise_row.count("| – |") == 1  # no linear-probe AUC
    assert (
        "Intervals that exclude 0: dermamnist, higher with pretraining: fine-tune bal. acc., fine-tune AUC, "
        "fine-tune acc., fine-tune macro F1, linear probe bal. acc., linear probe acc., k-NN acc.\n" in text
    )


def test_no_premise_without_none(tmp_path):
    suite_file = tmp_path / "nonone.yaml"
    suite_file.write_text(yaml.safe_dump({**SUITE, "policies": ["random", "mlo"]}))
    suite = load_suite(suite_file)
    assert premise(suite, [], "dermamnist", HEADLINE_METRICS) is None
    layout = SuiteLayout(tmp_path / "out")
    cells = expand_grid(suite, layout, data_dir=tmp_path)
    spent = timings(read_journal(layout.journal))
    text = results_markdown(suite, suite_file, cells, collect(cells, spent), spent, layout)
    assert "The suite has no `random` and `none` cells side by side" in text


def test_each_paired_table_ends_with_the_minimum_detectable_effect(fake_suite):
    layout, _ = fake_suite
    mde_row = next(line for line in layout.markdown.read_text().splitlines() if line.startswith("| *MDE* |"))
    expected = f"{100 * mde_factor(3) * POOLED_SD:.2f}"
    assert expected == "2.98"  # k(3) = 3.264 standard deviations of the differences
    assert mde_row == "| *MDE* | 3 | " + " | ".join([expected] * 5 + ["–"] + [expected] * 2) + " |"


def test_the_forest_plot_draws_the_reports_intervals(tmp_path):
    suite_file, suite, layout, cells = _fake_grid(tmp_path)
    for cell in cells:
        values = ACCURACY[cell.policy]
        if cell.seed < len(values):
            _fake_cell(cell, values[cell.seed])
    results = collect(cells, timings([]))
    comparison = compare_to_baseline(suite, results, "dermamnist", HEADLINE_METRICS)
    titles = {"test_auc": "AUC", "test_accuracy": "acc.", "linear_probe_auc": "probe AUC"}
    panels = forest_panels([comparison], titles)
    assert list(panels["dermamnist"]) == ["AUC", "acc.", "probe AUC"]
    # mlo − random: +2 and +3 points, the interval of the paired-difference table.
    half = 100 * T_975[1] * np.std([0.02, 0.03], ddof=1) / math.sqrt(2)
    for title in ("AUC", "acc."):
        mean, low, high = panels["dermamnist"][title]["mlo"]
        assert (mean, low, high) == (pytest.approx(2.5), pytest.approx(2.5 - half), pytest.approx(2.5 + half))
        assert panels["dermamnist"][title]["none"][0] == pytest.approx(-20.0)
        assert list(panels["dermamnist"][title]) == ["none", "mlo"]  # the suite's order, no baseline
    assert panels["dermamnist"]["probe AUC"] == {}  # undefined in every cell
    # The very numbers of the report's table.
    text = results_markdown(suite, suite_file, cells, results, timings([]), layout)
    mean, low, high = panels["dermamnist"]["acc."]["mlo"]
    mlo_row = next(line for line in text.splitlines() if line.startswith("| `mlo` | 2 |") and "[" in line)
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]".replace("-", "−") in mlo_row
    bands = forest_bands([comparison], titles)
    assert bands["dermamnist"]["acc."] == pytest.approx(100 * mde_factor(3) * POOLED_SD)
    assert bands["dermamnist"]["probe AUC"] is None
    path = plot_forest(panels, tmp_path / "forest.png", "points", "test", bands=bands)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    with Image.open(plot_forest({}, tmp_path / "empty.png", "points", "nothing")) as image:
        assert image.format == "PNG"


def test_a_killed_invocation_counts_until_its_last_record(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl", invocation="killed")
    records = [
        {"time": 100.0, "invocation": "killed", "event": "start"},
        {
            "time": 160.0,
            "invocation": "killed",
            "event": "cell",
            "cell": "a",
            "seconds": 50.0,
            "exit_code": 0,
        },
        {"time": 200.0, "invocation": "again", "event": "start"},
        {"time": 230.0, "invocation": "again", "event": "cell", "cell": "a", "seconds": 25.0, "exit_code": 0},
        {"time": 240.0, "invocation": "again", "event": "finish", "seconds": 40.0},
    ]
    journal.path.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"cut')
    spent = timings(read_journal(journal.path))
    assert spent.suite_seconds == 60.0 + 40.0 and spent.invocations == 2
    assert spent.cell_seconds == {"a": 75.0}


def test_an_interrupted_cell_with_a_run_dir_is_stopped_not_failed(tmp_path):
    suite_file, suite, layout, cells = _fake_grid(tmp_path)
    interrupted, killed_early, crashed = cells[:3]
    journal = Journal(layout.journal, invocation="first")
    # Ctrl-C after the run dir was made (maskkit train exits 130 and keeps its checkpoint) ...
    interrupted.run_dir.mkdir(parents=True)
    (interrupted.run_dir / "config.yaml").write_text(config_to_yaml(interrupted.config))
    journal.record("cell", cell=interrupted.key, exit_code=130, seconds=5.0, resumed=False, log="")
    # ... before it (nothing to resume), and a crash after it.
    journal.record("cell", cell=killed_early.key, exit_code=130, seconds=1.0, resumed=False, log="")
    crashed.run_dir.mkdir(parents=True)
    (crashed.run_dir / "config.yaml").write_text(config_to_yaml(crashed.config))
    journal.record("cell", cell=crashed.key, exit_code=1, seconds=5.0, resumed=False, log="")
    spent = timings(read_journal(layout.journal))
    results = collect(cells, spent)
    assert [result.status for result in results[:3]] == ["stopped", "failed", "failed"]
    write_report(suite, suite_file, cells, results, spent, layout)
    text = layout.markdown.read_text()
    assert "1 stopped, 2 failed" in text
    assert f"{interrupted.key}: **stopped** (interrupted; the same command resumes" in text
