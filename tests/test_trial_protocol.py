"""The trial as a protocol: a run's policy against ``random`` from its own checkpoint
(``trial.forks``), in protocols.json, the summary and the bench report."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml
from helpers import write_medmnist_npz
from rich.console import Console

from maskkit.bench.aggregate import PAIRED_METRICS, collect
from maskkit.bench.cells import expand_grid
from maskkit.bench.journal import Journal, read_journal, timings
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.paired_report import one_sample
from maskkit.bench.report import write_report
from maskkit.bench.suite import load_suite
from maskkit.config import PRESETS, build_config, config_to_yaml
from maskkit.engine import run as runs
from maskkit.engine.protocols import PAIRED_PROTOCOLS
from maskkit.engine.protocols.paired_trial import trial_enabled
from maskkit.errors import ConfigError


def test_the_trial_is_off_by_default_and_needs_two_forks_and_a_stage_1():
    for preset in PRESETS:
        assert build_config(preset).trial.forks == 0 and not trial_enabled(build_config(preset))
    with pytest.raises(ConfigError, match=r"forks must be 0 \(off\) or at least 2"):
        build_config("smoke", overrides=[{"trial": {"forks": 1}}])
    assert trial_enabled(build_config("smoke", overrides=[{"trial": {"forks": 2}}]))
    assert not trial_enabled(
        build_config("smoke", overrides=[{"trial": {"forks": 2}, "pretrain": {"steps": 0}}])
    )
    assert [protocol.name for protocol in PAIRED_PROTOCOLS] == ["trial"]


def _config(data_dir, policy: str, steps: int) -> object:
    return build_config(
        "smoke",
        overrides=[
            {
                "policy": policy,
                "protocols": True,
                "data": {"dataset": "dermamnist", "data_dir": str(data_dir)},
                "pretrain": {"steps": steps},
                "trial": {"forks": 2, "steps": 2, "probe_images": 24},
            }
        ],
    )


@pytest.mark.slow
def test_a_run_tries_its_policy_against_random_from_its_pretrained_checkpoint(tmp_path):
    data_dir = write_medmnist_npz(tmp_path / "data" / "dermamnist.npz", sizes=(48, 16, 16)).parent
    runs.train(_config(data_dir, "mlo-light", 2), tmp_path / "run", Console(quiet=True))
    protocols = json.loads((tmp_path / "run" / "protocols.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    trial = protocols["trial"]
    settings = trial["settings"]
    assert (settings["pointer"], settings["checkpoint_stage"]) == ("pretrained", "pretrain")
    assert settings["A"]["policy"] == "mlo-light" and settings["A"]["mask_seed"] == 0
    assert settings["A"]["policy_state"].endswith("run:pretrained")  # its trained state, not a fresh one
    assert (settings["B"]["policy"], settings["B"]["mask_seed"]) == ("random", 1)
    assert (settings["forks"], settings["steps"], settings["probe"]["train_images"]) == (2, 2, 24)
    for key in ("balanced_accuracy", "val_cross_entropy"):
        found = trial["metrics"][key]
        assert len(found["per_fork"]) == 2
        assert summary["protocols"]["trial"][key] == found["mean"]
    # The linear probe and k-NN are still there; a run without stage 1 has no trial.
    assert {"linear_probe", "knn", "trial"} <= protocols.keys()
    runs.train(_config(data_dir, "random", 0), tmp_path / "none", Console(quiet=True))
    assert "trial" not in json.loads((tmp_path / "none" / "protocols.json").read_text())


SUITE = {
    "name": "trial",
    "preset": "smoke",
    "seeds": [0, 1, 2],
    "config": {"trial": {"forks": 4, "steps": 5}},
    "datasets": [{"dataset": "dermamnist"}],
    "policies": ["none", "random", "mlo"],
}
# Each cell's trial result (policy − random, mean over its forks): balanced accuracy, val CE.
TRIAL = {
    "random": [(0.01, -0.002), (-0.01, 0.001), (0.0, 0.004)],
    "mlo": [(-0.03, 0.02), (-0.05, 0.03), (-0.04, 0.025)],
}


def _fake_run(cell, trial: tuple[float, float] | None) -> None:
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.yaml").write_text(config_to_yaml(cell.config))
    test = {"accuracy": 0.7, "balanced_accuracy": 0.5, "auc": 0.8, "weighted_f1": 0.6, "macro_f1": 0.4}
    (cell.run_dir / "summary.json").write_text(json.dumps({"test": test, "wall_time_s": 1.0}))
    protocols: dict = {name: {"test": {"accuracy": 0.6}} for name in ("linear_probe", "knn")}
    if trial is not None:
        protocols["trial"] = {
            "metrics": {
                "balanced_accuracy": {"mean": trial[0], "ci95": [trial[0] - 0.1, trial[0] + 0.1]},
                "val_cross_entropy": {"mean": trial[1], "ci95": [trial[1] - 0.1, trial[1] + 0.1]},
            }
        }
    (cell.run_dir / "protocols.json").write_text(json.dumps(protocols))


def test_the_report_gives_each_policys_trial_over_seeds_with_random_as_the_noise_floor(tmp_path):
    suite_file = tmp_path / "trial.yaml"
    suite_file.write_text(yaml.safe_dump(SUITE))
    suite = load_suite(suite_file)
    layout = SuiteLayout(tmp_path / "out")
    cells = expand_grid(suite, layout, data_dir=tmp_path)
    assert all(cell.config.trial.forks == 4 for cell in cells)  # the suite's config sets it
    journal = Journal(layout.journal, invocation="first")
    for cell in cells:
        _fake_run(cell, TRIAL[cell.policy][cell.seed] if cell.policy in TRIAL else None)
        journal.record("cell", cell=cell.key, exit_code=0, seconds=1.0, resumed=False, log=str(cell.log_file))
    spent = timings(read_journal(layout.journal))
    write_report(suite, suite_file, cells, collect(cells, spent), spent, layout)

    rows = list(csv.DictReader(io.StringIO(layout.csv.read_text())))
    assert set(PAIRED_METRICS) <= set(rows[0])
    mlo = [row for row in rows if row["policy"] == "mlo"]
    assert [float(row["trial_balanced_accuracy"]) for row in mlo] == [-0.03, -0.05, -0.04]
    assert all(row["trial_val_cross_entropy"] == "" for row in rows if row["policy"] == "none")

    text = layout.markdown.read_text()
    assert "## The trial against `random`, from each policy's own checkpoint" in text
    section = text.split("## The trial against")[1].split("\n## ")[0]
    mlo_row = next(line for line in section.splitlines() if line.startswith("| `mlo` | 3 |"))
    expected = one_sample({0: -0.03, 1: -0.05, 2: -0.04})
    assert expected is not None and expected.excludes_zero
    low, high = (f"{100 * value:+.2f}".replace("-", "−") for value in (expected.low, expected.high))
    assert f"**−4.00 [{low}, {high}]**" in mlo_row  # points, over the seeds
    assert "+0.0250" in mlo_row  # cross-entropy in its own units
    random_row = next(line for line in section.splitlines() if line.startswith("| `random` | 3 |"))
    assert "**" not in random_row  # the noise floor covers 0
    assert "| `none` |" not in section  # no stage 1, no trial
