"""Classification metrics for the fine-tuning / linear-probe test split, and their rich table.

:func:`classification_metrics` returns a plain, JSON-serialisable dict (Python ints, floats,
``None``, lists and strings only) so it can be written straight to ``metrics.json`` next to a run.

AUC is MedMNIST's (``medmnist.Evaluator``): for C > 2 classes the mean over the classes of the
one-vs-rest ROC AUC of each class's score (``roc_auc_score(..., multi_class="ovr",
average="macro")``), for two classes the ROC AUC of class 1's score. Balanced accuracy is
scikit-learn's: the mean recall over the classes present in the labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = ["auc_score", "classification_metrics", "metrics_table", "print_metrics"]

SUMMARY_KEYS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auc", "macro_f1", "weighted_f1")


def _as_labels(values: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    """Flatten ``values`` to a 1-D int64 array of class indices and check their range.

    Args:
        values: class indices, any shape ``[N]`` or ``[N, 1]`` (e.g. MedMNIST labels).
        name: argument name, for the error message.
        num_classes: C; every value must lie in ``[0, C)``.

    Returns:
        ``[N]`` int64 array.
    """
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.mod(arr, 1) == 0))
    )
    if arr.size and not integral:
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name} holds class index {int(arr.min() if arr.min() < 0 else arr.max())}, "
            f"outside [0, {num_classes}) for {num_classes} class names"
        )
    return arr


def auc_score(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as ``medmnist.Evaluator`` computes it for a multi-class or binary-class task.

    C > 2: the one-vs-rest AUC of each class (class ``i`` against the rest, ranked by
    ``scores[:, i]``), averaged over the C classes with equal weight (macro). C = 2: the AUC of
    class 1 ranked by ``scores[:, 1]`` (MedMNIST's binary case; the one-vs-rest macro average is
    the same number when the two scores sum to 1).

    Args:
        y_true: ``[N]`` (or ``[N, 1]``) true class indices in ``[0, C)``.
        scores: ``[N, C]`` class scores, the softmax probabilities (each row sums to 1).

    Returns:
        The AUC in [0, 1]; None where it is undefined: a class with no image in ``y_true``
        (where MedMNIST's Evaluator gives NaN), or C < 2.

    Raises:
        ValueError: on a ``scores`` that is not ``[N, C]`` for the N labels.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be an [N, C] array of class scores, got shape {scores.shape}")
    num_classes = scores.shape[1]
    labels = _as_labels(y_true, "y_true", max(num_classes, 1))
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"y_true has {labels.shape[0]} labels but scores has {scores.shape[0]} rows")
    present = np.bincount(labels, minlength=num_classes)
    if num_classes < 2 or np.any(present == 0):
        return None
    if num_classes == 2:
        return float(roc_auc_score(labels, scores[:, 1]))
    classes = list(range(num_classes))
    return float(roc_auc_score(labels, scores, multi_class="ovr", average="macro", labels=classes))


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str], scores: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC, F1 scores, per-class precision/recall/F1 and the
    confusion matrix.

    Every class in ``class_names`` is reported, also those absent from both ``y_true`` and
    ``y_pred`` (their scores are 0 and support 0; sklearn's ``zero_division=0``).

    Args:
        y_true: ``[N]`` (or ``[N, 1]``) true class indices in ``[0, C)``.
        y_pred: ``[N]`` (or ``[N, 1]``) predicted class indices in ``[0, C)``.
        class_names: C class names; index ``i`` names class ``i``.
        scores: ``[N, C]`` class scores (softmax probabilities) the predictions came from, for
            the AUC (:func:`auc_score`); without them there is no ``auc`` key.

    Returns:
        A JSON-serialisable dict with keys ``accuracy``, ``weighted_f1``, ``macro_f1``,
        ``balanced_accuracy`` (floats), ``auc`` (float, or None where undefined; only with
        ``scores``), ``num_samples`` (int), ``per_class`` (list of C dicts
        ``{"class", "index", "precision", "recall", "f1", "support"}``), ``confusion_matrix``
        (``[C, C]`` list of lists of ints, rows = true class, columns = predicted class) and
        ``class_names``.

    Raises:
        ValueError: on empty ``class_names``, mismatched lengths, or out-of-range indices.
    """
    names = [str(n) for n in class_names]
    num_classes = len(names)
    if num_classes == 0:
        raise ValueError("class_names must name at least one class")
    yt = _as_labels(y_true, "y_true", num_classes)
    yp = _as_labels(y_pred, "y_pred", num_classes)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {yt.shape[0]} and {yp.shape[0]}")
    labels = list(range(num_classes))
    n = int(yt.shape[0])

    cm = confusion_matrix(yt, yp, labels=labels) if n else np.zeros((num_classes,) * 2, int)
    if n:
        precision, recall, f1, support = precision_recall_fscore_support(
            yt, yp, labels=labels, zero_division=0
        )
        accuracy = float(accuracy_score(yt, yp))
        weighted_f1 = float(f1_score(yt, yp, labels=labels, average="weighted", zero_division=0))
        macro_f1 = float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0))
        # balanced accuracy = mean recall over the classes present in y_true.
        balanced = float(balanced_accuracy_score(yt, yp))
    else:
        precision = recall = f1 = np.zeros(num_classes)
        support = np.zeros(num_classes, dtype=np.int64)
        accuracy = weighted_f1 = macro_f1 = balanced = 0.0

    per_class = [
        {
            "class": names[i],
            "index": i,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in labels
    ]
    result: dict[str, Any] = {
        "accuracy": accuracy,
        "weighted_f1": weighted_f1,
        "macro_f1": macro_f1,
        "balanced_accuracy": balanced,
    }
    if scores is not None:
        if np.shape(scores) != (n, num_classes):
            raise ValueError(f"scores must be [N, C] = [{n}, {num_classes}], got {np.shape(scores)}")
        result["auc"] = auc_score(yt, scores)
    return {
        **result,
        "num_samples": n,
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in np.asarray(cm)],
        "class_names": names,
    }


def metrics_table(metrics: dict[str, Any], title: str = "Test metrics") -> Table:
    """A rich table: summary rows (accuracy, F1s, sample count), then one row per class.

    Args:
        metrics: a dict as returned by :func:`classification_metrics`. Missing keys are skipped.
        title: table title.

    Returns:
        A :class:`rich.table.Table` with columns metric/class, precision, recall, F1, support.
    """
    table = Table(title=title, show_lines=False)
    table.add_column("metric / class", style="bold")
    table.add_column("precision", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("F1", justify="right")
    table.add_column("support", justify="right")

    for key in SUMMARY_KEYS:
        if key in metrics:
            value = metrics[key]
            table.add_row(key, "", "", "n/a" if value is None else f"{float(value):.4f}", "")
    if "num_samples" in metrics:
        table.add_row("num_samples", "", "", "", str(int(metrics["num_samples"])))

    per_class = metrics.get("per_class") or []
    if per_class:
        table.add_section()
        for row in per_class:
            support = int(row.get("support", 0))
            table.add_row(
                f"{row.get('index', '')}: {row.get('class', '')}",
                f"{float(row.get('precision', 0.0)):.4f}",
                f"{float(row.get('recall', 0.0)):.4f}",
                f"{float(row.get('f1', 0.0)):.4f}",
                str(support),
                style="dim" if support == 0 else None,
            )
    return table


def print_metrics(
    metrics: dict[str, Any], console: Console | None = None, title: str = "Test metrics"
) -> None:
    """Print :func:`metrics_table` of ``metrics`` to ``console`` (a new stdout console if None)."""
    (console or Console()).print(metrics_table(metrics, title=title))
