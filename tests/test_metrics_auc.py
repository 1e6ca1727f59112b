"""AUC and balanced accuracy as MedMNIST defines them, and the saved test predictions.

The agreement tests score the same class probabilities with maskkit and with
``medmnist.Evaluator``, which reads the labels from a tiny fake ``<flag>.npz`` written here (no
download).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import synthetic_dataset, write_medmnist_npz
from medmnist import Evaluator
from sklearn.metrics import roc_auc_score

from maskkit.data import normalize
from maskkit.engine.evaluate import evaluate_predictions, predict
from maskkit.report import auc_score, classification_metrics
from maskkit.report.predictions import Predictions, read_predictions, write_predictions


def _scores(labels: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """``[N, C]`` softmax probabilities that rank each class's images higher, by a strength
    that differs from class to class (so the classes' AUCs differ)."""
    rng = np.random.default_rng(seed)
    strength = np.linspace(0.2, 2.5, classes)
    logits = rng.normal(size=(len(labels), classes)) + np.eye(classes)[labels] * strength
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


# DermaMNIST-like test labels: one class dominates, the smallest has 9 images.
DERMA_COUNTS = (20, 30, 60, 9, 70, 400, 11)
DERMA_LABELS = np.repeat(np.arange(7), DERMA_COUNTS)


def test_accuracy_and_auc_agree_with_medmnist_evaluator_multiclass(tmp_path):
    write_medmnist_npz(tmp_path / "dermamnist.npz", sizes=(8, 8, len(DERMA_LABELS)), test_labels=DERMA_LABELS)
    scores = _scores(DERMA_LABELS, 7)
    ours = classification_metrics(DERMA_LABELS, scores.argmax(1), [f"c{i}" for i in range(7)], scores=scores)
    theirs = Evaluator("dermamnist", "test", root=str(tmp_path)).evaluate(scores)
    assert ours["accuracy"] == pytest.approx(theirs.ACC, abs=1e-12)
    assert ours["auc"] == pytest.approx(theirs.AUC, abs=1e-12)
    # The scores make the wrong averages differ from the macro one by far more than the tolerance,
    # so an AUC averaged the wrong way fails the comparison above.
    for average in ("micro", "weighted"):
        wrong = roc_auc_score(DERMA_LABELS, scores, multi_class="ovr", average=average)
        assert abs(wrong - theirs.AUC) > 1e-2, average
    # Balanced accuracy: the mean of the classes' recalls.
    predicted = scores.argmax(1)
    labels = DERMA_LABELS
    recalls = [np.mean(predicted[labels == c] == c) for c in range(7)]
    assert ours["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert abs(ours["balanced_accuracy"] - ours["accuracy"]) > 1e-2


def test_accuracy_and_auc_agree_with_medmnist_evaluator_binary(tmp_path):
    labels = np.repeat([0, 1], (90, 30))
    write_medmnist_npz(
        tmp_path / "pneumoniamnist.npz", sizes=(8, 8, len(labels)), classes=2, test_labels=labels
    )
    scores = _scores(labels, 2, seed=1)
    ours = classification_metrics(labels, scores.argmax(1), ["normal", "pneumonia"], scores=scores)
    theirs = Evaluator("pneumoniamnist", "test", root=str(tmp_path)).evaluate(scores)
    assert ours["accuracy"] == pytest.approx(theirs.ACC, abs=1e-12)
    assert ours["auc"] == pytest.approx(theirs.AUC, abs=1e-12)
    assert 0.6 < ours["auc"] < 0.99


def test_auc_by_hand():
    # Class 1 against the rest by scores[:, 1]: positives 0.9, 0.4; negatives 0.3, 0.6, 0.1 ->
    # 5 of 6 pairs ranked right. The binary AUC is that of class 1.
    labels = np.array([1, 1, 0, 0, 0])
    p1 = np.array([0.9, 0.4, 0.3, 0.6, 0.1])
    assert auc_score(labels, np.stack([1 - p1, p1], axis=1)) == pytest.approx(5 / 6)
    # Three classes, each ranked perfectly but class 2 (its two images score 0.5 and 0.2, the
    # others 0.1, 0.3, 0.1, 0.1: 7 of 8 pairs right): macro = (1 + 1 + 0.875) / 3.
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.1, 0.3], [0.1, 0.8, 0.1], [0.0, 0.9, 0.1], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]]
    )
    assert auc_score(labels, scores) == pytest.approx((1 + 1 + 0.875) / 3)


def test_auc_is_none_where_undefined_and_json_writes_null():
    three = np.full((4, 3), 1 / 3)
    assert auc_score(np.array([0, 1, 0, 1]), three) is None  # class 2 never appears
    assert auc_score(np.array([0, 0]), np.ones((2, 1))) is None  # one class
    metrics = classification_metrics(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c"], three)
    assert metrics["auc"] is None and json.loads(json.dumps(metrics))["auc"] is None
    assert "auc" not in classification_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b"])


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [([0, 1], np.full((3, 2), 0.5), "rows"), ([0, 1], np.full(2, 0.5), r"\[N, C\]")],
)
def test_auc_rejects_scores_of_the_wrong_shape(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auc_score(np.array(labels), scores)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        classification_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b"], scores=np.full((2, 3), 1 / 3))


def test_predictions_round_trip_and_leave_no_temporary_file(tmp_path):
    labels = np.array([2, 0, 1])
    scores = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.6, 0.1]], dtype=np.float32)
    path = write_predictions(tmp_path / "predictions_test.npz", Predictions(labels, scores), ["a", "b", "c"])
    found, names = read_predictions(path)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(found.labels, labels)
    np.testing.assert_array_equal(found.scores, scores)
    np.testing.assert_array_equal(found.predicted, [2, 0, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["predictions_test.npz"]
    with pytest.raises(ValueError, match="scores must be"):
        write_predictions(tmp_path / "bad.npz", Predictions(labels, scores), ["a", "b"])
    assert not (tmp_path / "bad.npz").exists()


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_predict_gives_the_softmax_of_the_logits_in_the_split_order():
    dataset = synthetic_dataset(size=4, num_classes=3, train=40)  # 20 test images: batches 7, 7, 6
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    where = (torch.device("cpu"), dataset.mean, dataset.std, _no_autocast)
    found = predict(model, dataset.test, 7, *where, 3)
    with torch.no_grad():
        expected = torch.softmax(model(normalize(dataset.test.images, dataset.mean, dataset.std)), dim=1)
    np.testing.assert_array_equal(found.labels, dataset.test.labels.numpy())
    np.testing.assert_allclose(found.scores, expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(found.scores.sum(axis=1), 1.0, atol=1e-6)
    metrics, again = evaluate_predictions(model, dataset.test, dataset.class_names, 7, *where)
    np.testing.assert_array_equal(again.scores, found.scores)
    assert metrics["auc"] == pytest.approx(auc_score(found.labels, found.scores))
    assert metrics["accuracy"] == pytest.approx(np.mean(found.predicted == found.labels))
