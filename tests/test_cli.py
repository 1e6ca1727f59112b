"""The command line as a user meets it: a whole smoke run, then each user mistake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_user_error, maskkit
from helpers import SHARED_DATA, write_medmnist_npz
from PIL import Image
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    result = maskkit(
        "train", "--policy", "mlo", "--dataset", "dermamnist", "--data-dir", data_dir,
        "--preset", "smoke", "--run-dir", run_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    return run_dir


@pytest.mark.slow
def test_smoke_run_writes_a_complete_run_dir(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0.0 <= summary["test_weighted_f1"] <= 1.0
    per_class = summary["test"]["per_class"]
    assert len(per_class) == 7 and sum(row["support"] for row in per_class) == summary["test"]["num_samples"]
    assert summary["pretrain"]["level_steps"] == {"pretrain": 8, "finetune": 4, "mask": 4}
    config = (smoke_run / "config.yaml").read_text()
    assert "policy: mlo" in config and "preset: smoke" in config
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert {record["stage"] for record in records} == {"pretrain", "finetune"}
    assert any("loss/mask" in record for record in records)
    # What a user needs to see whether the learned mask is healthy (logged and plotted).
    logged = set().union(*records)
    assert {
        "mask/prob_masked",
        "mask/prob_kept",
        "mask/prob_std",
        "mask/position_variety",
        "pretrain/masked_error",
        "hypergradient/total_norm",
        "hypergradient/pretrain_norm",
        "hypergradient/finetune-pretrain_norm",
        "val/majority_rate",
    } <= logged
    final_masks = summary["pretrain"]["mask_statistics"]
    assert 0 < final_masks["mask/prob_masked"] < 1 and final_masks["mask/position_variety"] >= 0
    pretrained = json.loads((smoke_run / "checkpoints" / "pretrained.json").read_text())["dir"]
    weights = load_file(smoke_run / "checkpoints" / pretrained / "policy.safetensors")
    assert weights and all(tensor.numel() > 0 for tensor in weights.values())
    for png in ("confusion_matrix.png", "training_curves.png"):
        assert Image.open(smoke_run / "plots" / png).size[0] > 100


@pytest.mark.slow
def test_evaluate_prints_and_saves_the_metrics(smoke_run):
    result = maskkit("evaluate", smoke_run)
    assert result.returncode == 0, result.stderr
    saved = json.loads((smoke_run / "evaluation_test.json").read_text())
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert saved["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "accuracy" in result.stdout and "weighted_f1" in result.stdout
    # AUC and balanced accuracy, in the table and the JSON, and the scores they come from.
    assert "auc" in result.stdout and "balanced_accuracy" in result.stdout
    assert saved["auc"] == pytest.approx(summary["test_auc"], abs=1e-6) and 0 <= saved["auc"] <= 1
    assert saved["balanced_accuracy"] == pytest.approx(summary["test_balanced_accuracy"])
    with np.load(smoke_run / "predictions_test.npz") as predictions:
        assert predictions["scores"].shape == (32, 7) and predictions["labels"].shape == (32,)
    # One confusion matrix of the test split: the run's own, redrawn; no identical copy beside it.
    assert (smoke_run / "plots" / "confusion_matrix.png").is_file()
    assert not (smoke_run / "plots" / "confusion_matrix_test.png").exists()


@pytest.mark.slow
def test_visualize_draws_the_learned_mask_grid(smoke_run, tmp_path):
    output = tmp_path / "grid.png"
    result = maskkit("visualize", smoke_run, "--num-images", "3", "--output", output)
    assert result.returncode == 0, result.stderr
    image = Image.open(output)
    assert image.size[0] > image.size[1] / 3  # four columns (with the heatmap) of three rows


@pytest.mark.slow
def test_visualize_says_when_it_draws_a_checkpoint_from_the_middle_of_pretraining(smoke_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(smoke_run, unfinished)
    (unfinished / "checkpoints" / "pretrained.json").unlink()  # as if stopped during pretraining
    best_step = json.loads((unfinished / "checkpoints" / "best.json").read_text())["step"]
    result = maskkit("visualize", unfinished, "--num-images", "2", "--output", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    output = " ".join(result.stdout.split())
    drawn = f"checkpoint 'best' (mid-pretraining, step {best_step} of 8)"
    assert f"warning: unfinished has not finished pretraining: drawing its {drawn}" in output
    assert f"policy mlo, {drawn})" in output  # the saved line; the figure's title says the same
    result = maskkit("visualize", smoke_run, "--num-images", "2", "--output", tmp_path / "done.png")
    output = " ".join(result.stdout.split())
    assert "warning" not in output and "checkpoint 'pretrained' (end of pretraining, step 8)" in output


def test_describe_checkpoint_names_the_stage_and_step():
    from maskkit.engine.inspect_run import describe_checkpoint

    pretrain = {"stage": "pretrain", "step": 120}
    assert describe_checkpoint("pretrained", {**pretrain, "step": 200}, 200) == (
        "checkpoint 'pretrained' (end of pretraining, step 200)",
        True,
    )
    assert describe_checkpoint("best", pretrain, 200) == (
        "checkpoint 'best' (mid-pretraining, step 120 of 200)",
        False,
    )
    assert describe_checkpoint("last", {"stage": "finetune", "step": 7}, 200)[0] == (
        "checkpoint 'last' (finetune step 7)"
    )


def test_unknown_policy(data_dir, tmp_path):
    result = maskkit("train", "--policy", "nosuch", "--data-dir", data_dir, "--run-dir", tmp_path / "run")
    assert_user_error(result, "nosuch", "random", "mlo")
    assert not (tmp_path / "run").exists()


def test_mask_ratio_out_of_range(data_dir):
    assert_user_error(maskkit("train", "--mask-ratio", "1.5", "--data-dir", data_dir), "mask_ratio", "1.5")


def test_mask_ratio_that_keeps_no_token(data_dir):
    result = maskkit("train", "--preset", "smoke", "--mask-ratio", "0.99", "--data-dir", data_dir)
    assert_user_error(result, "keeps no token")


def test_missing_data_dir(tmp_path):
    result = maskkit(
        "train", "--preset", "smoke", "--data-dir", "/nonexistent", "--run-dir", tmp_path / "run"
    )
    assert_user_error(result, "/nonexistent/dermamnist.npz", "--data-dir")
    assert not (tmp_path / "run").exists()


def test_truncated_npz(tmp_path):
    complete = write_medmnist_npz(tmp_path / "full" / "dermamnist.npz").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "dermamnist.npz").write_bytes(complete[: len(complete) // 2])
    result = maskkit("train", "--preset", "smoke", "--data-dir", tmp_path / "cut")
    assert_user_error(result, "dermamnist.npz")


def test_unknown_config_key(data_dir):
    result = maskkit("train", "--preset", "smoke", "--data-dir", data_dir, "--set", "pretrain.lr=1")
    assert_user_error(result, "pretrain.lr", "unknown key")


def test_image_size_not_divisible_by_patch(data_dir):
    result = maskkit("train", "--preset", "smoke", "--data-dir", data_dir, "--set", "model.patch_size=5")
    assert_user_error(result, "not divisible")


def test_unknown_preset(data_dir):
    assert_user_error(maskkit("train", "--preset", "huge", "--data-dir", data_dir), "huge", "smoke", "paper")


def test_config_show_prints_the_paper_preset():
    result = maskkit("config", "show", "--preset", "paper")
    assert result.returncode == 0, result.stderr
    assert "embed_dim: 768" in result.stdout and "patch_size: 2" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "dermamnist.npz").exists(), reason="shared DermaMNIST not present")
def test_smoke_run_on_the_real_dermamnist(tmp_path):
    result = maskkit(
        "train", "--policy", "random", "--dataset", "dermamnist", "--data-dir", SHARED_DATA,
        "--preset", "smoke", "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["class_names"][0].startswith("actinic keratoses")
    assert summary["test"]["num_samples"] == 256  # the smoke preset's subset of the 2005 test images


def test_an_unknown_option_is_a_usage_error():
    result = maskkit("train", "--bogus")
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_rejects_an_unknown_split(tmp_path):
    assert_user_error(maskkit("evaluate", tmp_path, "--split", "train"), "unknown split 'train'")
