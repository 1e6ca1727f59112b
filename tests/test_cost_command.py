"""``maskkit cost``: random and a learnable policy measured end to end on a tiny model, the report's
numbers (× random, the breakdown), real data read as ``maskkit train`` reads it, and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_clean_error_line, run_cli_in_process
from helpers import TINY_MODEL

from maskkit.cost.baseline import add_ratio_to_baseline
from maskkit.cost.breakdown import OTHER
from maskkit.cost.command import CostOptions

#: ``maskkit cost`` at the smoke preset with the tests' tiny ViT (8 px, 4 patches, width 8).
TINY = ["cost", "--preset", "smoke", *(f"--set=model.{key}={value}" for key, value in TINY_MODEL.items())]


@pytest.fixture
def torch_threads():
    """``--threads`` sets this process's torch threads: put them back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cost_times_random_and_mlo_and_reports_where_the_iteration_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, torch_threads: None
) -> None:
    json_path, markdown_path = tmp_path / "cost.json", tmp_path / "cost.md"
    options = ["--policy", "mlo", "--iterations", "2", "--warmup", "0", "--threads", "1"]
    result = run_cli_in_process(
        [*TINY, *options, "--json", str(json_path), "--markdown", str(markdown_path)], capsys, monkeypatch
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert report["baseline"] == "random"
    assert report["run"]["iterations"] == 2 and report["run"]["dataset"] is None
    assert report["hardware"]["torch_threads"] == 1
    assert report["model"]["embed_dim"] == TINY_MODEL["embed_dim"]
    assert report["command"].startswith("maskkit cost --preset smoke")

    random, mlo = report["results"]
    assert (random["policy"], mlo["policy"]) == ("random", "mlo")  # the baseline first
    for row in (random, mlo):
        assert row["status"] == "ok", row.get("error")
        assert len(row["iteration_seconds"]) == 2  # --iterations, not the default
        assert all(seconds > 0 for seconds in row["iteration_seconds"])
        assert row["median_iteration_s"] > 0 and row["per_pretrain_step_s"] > 0 and row["images_per_s"] > 0
        assert row["steps_per_iteration"] == 2  # the smoke preset's 2/1/1 unroll
        assert row["flops_per_iteration"] > 0 and row["achieved_flops_per_s"] > 0
        assert row["memory"]["peak_bytes"] > 0
        # The parts add up to the profiled iteration, in time and exactly in FLOPs.
        breakdown = row["breakdown"]
        parts = {part["part"]: part for part in breakdown["parts"]}
        assert sum(part["seconds"] for part in parts.values()) == pytest.approx(breakdown["total_seconds"])
        assert parts[OTHER]["seconds"] >= -0.05 * breakdown["total_seconds"]
        assert sum(part["flops"] for part in parts.values()) == breakdown["total_flops"]
        assert breakdown["total_flops"] == row["flops_per_iteration"]
    assert random["ratio_vs_random"] == 1.0
    assert mlo["ratio_vs_random"] == pytest.approx(mlo["per_pretrain_step_s"] / random["per_pretrain_step_s"])
    assert not random["learnable"] and mlo["learnable"]
    assert random["loss_evaluations"] == {"pretrain/step": 2}
    assert mlo["level_steps_per_iteration"] == {"pretrain": 2, "finetune": 1, "mask": 1}
    assert mlo["flops_per_iteration"] > random["flops_per_iteration"]  # the levels above MAE
    mlo_parts = {part["part"] for part in mlo["breakdown"]["parts"]}
    assert {"maskkit.finetune.forward", "maskkit.mask.backward", "maskkit.product.pretrain"} <= mlo_parts

    # The terminal: a progress line per policy over all its iterations (2 timed, the FLOP count,
    # the profiled one), the tables, the lines saying what was measured.
    assert "cost mlo 4/4" in result.stdout
    for title in ("Step time per MLO iteration", "Cost per MLO iteration", "Breakdown of one mlo iteration"):
        assert title in result.stdout
    assert "Times are medians (min–max) of 2 iterations after 0 warm-up; synthetic data" in result.stdout
    markdown = markdown_path.read_text()
    assert "| policy | s / MLO iteration |" in markdown and "| random |" in markdown
    assert "**Breakdown of one random iteration**" in markdown
    assert "| product at the pretrain level |" in markdown


def test_cost_reads_a_dataset_as_train_does(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    json_path = tmp_path / "cost.json"
    options = ["--policy", "random", "--iterations", "1", "--no-flops", "--no-breakdown"]
    data = ["--dataset", "dermamnist", "--data-dir", str(data_dir)]
    result = run_cli_in_process([*TINY, *options, *data, "--json", str(json_path)], capsys, monkeypatch)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert report["run"]["dataset"] == "dermamnist"
    [row] = report["results"]  # random named again runs once
    assert row["policy"] == "random" and len(row["iteration_seconds"]) == 1
    assert row["flops_per_iteration"] is None and "breakdown" not in row
    assert "dataset `dermamnist`" in result.stdout


def test_random_is_the_baseline_whatever_the_order() -> None:
    assert CostOptions().policy_list() == ["random", "mlo"]
    assert CostOptions(policies=("mlo-light,mlo", "random", "mlo")).policy_list() == [
        "random",
        "mlo-light",
        "mlo",
    ]
    rows = [
        {"policy": "mlo", "status": "ok", "per_pretrain_step_s": 3.0},
        {"policy": "hpm", "status": "failed"},
        {"policy": "random", "status": "ok", "per_pretrain_step_s": 1.5},
    ]
    add_ratio_to_baseline(rows)
    assert rows[0]["ratio_vs_random"] == 2.0 and rows[2]["ratio_vs_random"] == 1.0
    assert "ratio_vs_random" not in rows[1]


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--policy", "mlo-lite"], ["unknown policy 'mlo-lite'", "Did you mean 'mlo-light'?"]),
        (["--set", "model.depht=2"], ["model.depht: unknown key"]),
        (["--set", "model.depth=two"], ["model.depth", "valid integer"]),
        (["--iterations", "0"], ["--iterations must be at least 1"]),
        (["--data-dir", "somewhere"], ["--data-dir goes with --dataset"]),
        (["--dataset", "dermamnist", "--data-dir", "{tmp}/absent"], ["dermamnist not found", "absent"]),
    ],
)
def test_user_errors_end_in_one_line(
    arguments: list[str],
    fragments: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arguments = [item.replace("{tmp}", str(tmp_path)) for item in arguments]
    result = run_cli_in_process([*TINY, *arguments], capsys, monkeypatch)
    assert_one_clean_error_line(result, *fragments)
