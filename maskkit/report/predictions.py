"""A run's saved test predictions: the labels and class scores its test metrics come from.

``predictions_test.npz`` in a run dir (written by ``maskkit train`` and ``maskkit evaluate``;
``maskkit evaluate --split val`` writes ``predictions_val.npz``) holds three arrays, so that any
outside tool (``medmnist.Evaluator``, scikit-learn) can recompute every metric:

- ``labels``: ``[N]`` int64, the true class of each test image, in the split's order;
- ``scores``: ``[N, C]`` float32, the fine-tuned model's softmax probabilities (rows sum to 1);
- ``class_names``: ``[C]`` str, the name of each score column.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskkit.rundir import atomic_write_bytes

__all__ = ["PREDICTIONS_FILE", "Predictions", "predictions_file", "read_predictions", "write_predictions"]


def predictions_file(split: str) -> str:
    """The file name of a split's predictions in a run dir: ``predictions_<split>.npz``."""
    return f"predictions_{split}.npz"


#: The test predictions' file name in a run dir.
PREDICTIONS_FILE = predictions_file("test")


@dataclass(frozen=True)
class Predictions:
    """A model's class scores on a split and the split's labels.

    Attributes:
        labels: ``[N]`` int64 true class indices.
        scores: ``[N, C]`` float32 class probabilities.
    """

    labels: np.ndarray
    scores: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        """``[N]`` int64: the class of highest score (the first one on a tie)."""
        if self.scores.shape[1] == 0:
            return np.zeros(len(self.labels), dtype=np.int64)
        return self.scores.argmax(axis=1).astype(np.int64)


def write_predictions(path: Path, predictions: Predictions, class_names: list[str]) -> Path:
    """Save ``predictions`` and ``class_names`` to ``path`` (an ``.npz``), atomically.

    Raises:
        ValueError: when the scores are not ``[N, C]`` for the N labels and C class names.
    """
    labels = np.asarray(predictions.labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(predictions.scores, dtype=np.float32)
    if scores.shape != (len(labels), len(class_names)):
        raise ValueError(
            f"scores must be [N, C] = [{len(labels)}, {len(class_names)}], got {list(scores.shape)}"
        )
    buffer = io.BytesIO()
    np.savez(buffer, labels=labels, scores=scores, class_names=np.asarray(class_names, dtype=str))
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def read_predictions(path: Path) -> tuple[Predictions, list[str]]:
    """The predictions and class names :func:`write_predictions` saved to ``path``."""
    with np.load(path, allow_pickle=False) as arrays:
        predictions = Predictions(arrays["labels"].astype(np.int64), arrays["scores"].astype(np.float32))
        return predictions, [str(name) for name in arrays["class_names"]]
