"""Tests for maskkit.report.metrics: values checked against a hand-computed example."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table
from sklearn.metrics import f1_score

from maskkit.report import classification_metrics, metrics_table, print_metrics

NAMES = ["cat", "dog", "bird", "frog"]  # "frog" (index 3) never appears anywhere
Y_TRUE = np.array([0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 1, 1, 0])


@pytest.fixture()
def metrics() -> dict:
    return classification_metrics(Y_TRUE, Y_PRED, NAMES)


def test_summary_values_by_hand(metrics: dict) -> None:
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["num_samples"] == 5
    # per-class F1: cat 0.5, dog 0.8, bird 0, frog 0 -> macro over 4 labels = 1.3 / 4
    assert metrics["macro_f1"] == pytest.approx(1.3 / 4)
    # weighted by support (2, 2, 1, 0): (2 * 0.5 + 2 * 0.8) / 5
    assert metrics["weighted_f1"] == pytest.approx(2.6 / 5)
    # mean recall over classes present in y_true: (0.5 + 1 + 0) / 3
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["class_names"] == NAMES


def test_per_class_by_hand(metrics: dict) -> None:
    rows = metrics["per_class"]
    assert [r["class"] for r in rows] == NAMES
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    expected = {
        # class: (precision, recall, f1, support)
        "cat": (1 / 2, 1 / 2, 1 / 2, 2),  # predicted 0 at indices 0, 4; one right
        "dog": (2 / 3, 1.0, 0.8, 2),  # predicted 1 at indices 1, 2, 3; two right
        "bird": (0.0, 0.0, 0.0, 1),  # never predicted
        "frog": (0.0, 0.0, 0.0, 0),  # absent: reported with zeros
    }
    for row in rows:
        precision, recall, f1, support = expected[row["class"]]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
        assert isinstance(row["support"], int)
        assert all(type(row[k]) is float for k in ("precision", "recall", "f1"))


def test_confusion_matrix_exact(metrics: dict) -> None:
    assert metrics["confusion_matrix"] == [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    assert all(type(v) is int for row in metrics["confusion_matrix"] for v in row)


def test_weighted_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 7, 300))
    m = classification_metrics(y_true, y_pred, [f"c{i}" for i in range(7)])
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert sum(r["support"] for r in m["per_class"]) == 300
    assert np.asarray(m["confusion_matrix"]).sum() == 300


def test_json_serialisable_and_roundtrips(metrics: dict) -> None:
    text = json.dumps(metrics)
    assert json.loads(text) == metrics
    assert all(type(metrics[k]) is float for k in ("accuracy", "weighted_f1", "macro_f1"))


def test_column_labels_and_float_indices_accepted() -> None:
    m = classification_metrics(Y_TRUE[:, None], Y_PRED.astype(np.float32), NAMES)
    assert m["accuracy"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "names", "match"),
    [
        ([0, 1], [0], ["a", "b"], "same length"),
        ([0, 5], [0, 1], ["a", "b"], "outside"),
        ([0, 1], [0, 1], [], "at least one class"),
        ([0.5, 1], [0, 1], ["a", "b"], "integer"),
    ],
)
def test_bad_inputs_raise(y_true: list, y_pred: list, names: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.array(y_true), np.array(y_pred), names)


def test_empty_input_gives_zeros() -> None:
    m = classification_metrics(np.array([], int), np.array([], int), ["a", "b"])
    assert m["num_samples"] == 0
    assert m["accuracy"] == 0.0
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]
    json.dumps(m)


def test_table_and_print(metrics: dict) -> None:
    table = metrics_table(metrics, title="My split")
    assert isinstance(table, Table)
    assert table.title == "My split"
    # 4 summary rows + num_samples + one row per class
    assert table.row_count == 5 + len(NAMES)
    console = Console(record=True, width=120)
    print_metrics(metrics, console=console, title="Test metrics")
    out = console.export_text()
    assert "Test metrics" in out
    assert "0.6000" in out  # accuracy
    assert "3: frog" in out
    assert "0.6667" in out  # dog precision
