"""The frozen-encoder protocols: linear probe and k-NN, chosen on val, scored once on test."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from helpers import quiet_context, synthetic_dataset, write_medmnist_npz
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler, normalize

from maskkit.checkpoint import load_checkpoint
from maskkit.config import build_config
from maskkit.data import load_dataset
from maskkit.engine import run as runs
from maskkit.engine.protocols import Features, encoder_features, knn_probe, linear_probe
from maskkit.models import MaskedAutoencoderViT
from maskkit.report import classification_metrics
from maskkit.report.predictions import read_predictions

CLASSES = [f"class {i}" for i in range(4)]


def _blobs(count: int, seed: int, spread: float = 0.3, dim: int = 16) -> Features:
    """Four well-separated Gaussian blobs in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4, dim) * 5.0
    labels = rng.integers(0, 4, count)
    values = centres[labels] + rng.normal(0, spread, (count, dim))
    return Features(values.astype(np.float32), labels.astype(np.int64))


def test_separable_features_are_classified_perfectly():
    train, val, test = _blobs(200, 0), _blobs(80, 1), _blobs(80, 2)
    for result in (linear_probe(train, val, test, CLASSES), knn_probe(train, val, test, CLASSES)):
        assert result["test"]["accuracy"] == pytest.approx(1.0)
        assert result["test"]["auc"] == pytest.approx(1.0)
        assert result["test"]["balanced_accuracy"] == pytest.approx(1.0)


def test_random_labels_give_chance():
    rng = np.random.default_rng(3)

    def noise(count: int) -> Features:
        return Features(rng.normal(size=(count, 16)).astype(np.float32), rng.integers(0, 4, count))

    train, val, test = noise(400), noise(200), noise(2000)
    for result in (linear_probe(train, val, test, CLASSES), knn_probe(train, val, test, CLASSES)):
        assert abs(result["test"]["accuracy"] - 0.25) < 0.05
        assert abs(result["test"]["auc"] - 0.5) < 0.05


def test_the_hyper_parameters_are_chosen_on_val_and_test_is_scored_once():
    # Overlapping blobs, so that C and k matter.
    train, val, test = _blobs(300, 4, spread=3.0), _blobs(150, 5, spread=3.0), _blobs(300, 6, spread=3.0)
    probe = linear_probe(train, val, test, CLASSES)
    assert probe["val_accuracy"][str(probe["C"])] == max(probe["val_accuracy"].values())
    # Independent fits on standardised features: the recorded scores are val's (not test's), and
    # the fit at the chosen C predicts test the same way.
    scaler = StandardScaler().fit(train.values)

    def fitted(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(train.values), train.labels)

    for c, recorded in probe["val_accuracy"].items():
        val_accuracy = float(np.mean(fitted(float(c)).predict(scaler.transform(val.values)) == val.labels))
        assert recorded == pytest.approx(val_accuracy, abs=2 / len(val.labels)), c
    accuracy = float(np.mean(fitted(probe["C"]).predict(scaler.transform(test.values)) == test.labels))
    assert probe["test"]["accuracy"] == pytest.approx(accuracy, abs=2 / len(test.labels))
    knn = knn_probe(train, val, test, CLASSES)
    assert set(knn["val_accuracy"]) == {"10", "20", "50"}
    assert knn["val_accuracy"][str(knn["k"])] == max(knn["val_accuracy"].values())
    unit = [normalize(scaler.transform(f.values)) for f in (train, val)]
    for k, recorded in knn["val_accuracy"].items():
        neighbours = KNeighborsClassifier(int(k), metric="cosine", weights="distance", algorithm="brute")
        predicted = neighbours.fit(unit[0], train.labels).predict(unit[1])
        assert recorded == pytest.approx(float(np.mean(predicted == val.labels))), k


def test_k_is_capped_by_the_training_set():
    train, val, test = _blobs(12, 7), _blobs(8, 8), _blobs(8, 9)
    assert set(knn_probe(train, val, test, CLASSES)["val_accuracy"]) == {"10", "12"}


def test_encoder_features_cover_the_split_in_order():
    dataset = synthetic_dataset(size=8, train=20)
    seen = []

    def encoder(images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] → [B, 2]
        seen.append(len(images))
        return torch.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], dim=1)

    features = encoder_features(
        encoder, dataset.train, 8, torch.device("cpu"), dataset.mean, dataset.std, contextlib.nullcontext
    )
    assert seen == [8, 8, 4] and features.values.shape == (20, 2)
    assert np.array_equal(features.labels, dataset.train.labels.numpy())


@pytest.mark.slow
def test_a_run_with_protocols_scores_its_pretrained_encoder(tmp_path):
    write_medmnist_npz(tmp_path / "data" / "dermamnist.npz", sizes=(48, 16, 16))
    config = build_config(
        "smoke",
        overrides=[
            {
                "policy": "random",
                "protocols": True,
                "data": {"dataset": "dermamnist", "data_dir": str(tmp_path / "data")},
                "pretrain": {"steps": 2},
            }
        ],
    )
    runs.train(config, tmp_path / "run", Console(quiet=True))
    protocols = json.loads((tmp_path / "run" / "protocols.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["protocols"]["knn"]["accuracy"] == protocols["knn"]["test"]["accuracy"]
    assert summary["protocols"]["linear_probe"]["auc"] == protocols["linear_probe"]["test"]["auc"] is not None
    # The saved test predictions give the summary's test metrics again.
    saved, names = read_predictions(tmp_path / "run" / "predictions_test.npz")
    assert names == summary["test"]["class_names"] and saved.scores.shape == (16, 7)
    np.testing.assert_allclose(saved.scores.sum(axis=1), 1.0, atol=1e-5)
    again = classification_metrics(saved.labels, saved.predicted, names, scores=saved.scores)
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert summary[f"test_{key}"] == summary["test"][key] == pytest.approx(again[key])
    assert protocols["splits"] == {"pretrain": 48, "val": 16, "test": 16}
    # Recomputed from the pretrained checkpoint, the linear probe agrees; the fine-tuned encoder
    # gives other features.
    dataset = load_dataset("dermamnist", tmp_path / "data", image_size=config.model.img_size)
    context = quiet_context(config, dataset, tmp_path / "scratch")
    features = {}
    for pointer in ("pretrained", "final"):
        mae = MaskedAutoencoderViT(config.model)
        load_checkpoint(tmp_path / "run" / "checkpoints", pointer).load_into({"mae": mae})
        mae.eval()
        features[pointer] = [
            encoder_features(
                mae.features,
                split,
                16,
                torch.device("cpu"),
                context.mean,
                context.std,
                contextlib.nullcontext,
            )
            for split in (context.splits.pretrain, context.splits.eval, context.splits.test)
        ]
    again = linear_probe(*features["pretrained"], context.dataset.class_names)
    assert again["test"]["accuracy"] == protocols["linear_probe"]["test"]["accuracy"]
    assert not np.allclose(features["pretrained"][2].values, features["final"][2].values)
