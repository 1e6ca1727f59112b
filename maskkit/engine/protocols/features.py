"""The frozen encoder's features of a split, and what every protocol does with them: standardise
them on the pretrain features, and read a fitted classifier's class scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.preprocessing import StandardScaler
from torch import nn

from maskkit.data import ImageSplit, iterate_eval


@dataclass(frozen=True)
class Features:
    """Encoded images of one split: ``values`` ``[N, D]`` float32 and ``labels`` ``[N]`` int64."""

    values: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.labels.shape != (self.values.shape[0],):
            raise ValueError(
                f"features must be [N, D] with [N] labels, got {self.values.shape} and {self.labels.shape}"
            )


@torch.no_grad()
def encoder_features(
    encoder: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    autocast: Callable,
) -> Features:
    """``encoder`` (``[B, 3, H, W]`` normalised images → ``[B, D]``) over all of ``split``, in
    order, without augmentation."""
    chunks, labels = [], []
    for images, batch_labels, _ in iterate_eval(split, batch_size, device, mean, std):
        with autocast():
            values = encoder(images)
        chunks.append(values.float().cpu().numpy())
        labels.append(batch_labels.cpu().numpy().astype(np.int64))
    if not chunks:
        return Features(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Features(np.concatenate(chunks), np.concatenate(labels))


def standardised(train: Features, *others: Features) -> list[Features]:
    """Every split scaled by the mean and standard deviation of ``train``'s features."""
    scaler = StandardScaler().fit(train.values)
    return [Features(scaler.transform(f.values).astype(np.float32), f.labels) for f in (train, *others)]


def class_scores(model: ClassifierMixin, features: Features, num_classes: int) -> np.ndarray:
    """``[N, C]`` class probabilities of a fitted scikit-learn classifier on ``features``: its
    ``predict_proba`` columns (the classes it saw in training) put at their class indices, 0 for
    the classes it never saw."""
    scores = np.zeros((len(features.labels), num_classes), dtype=np.float64)
    if len(features.labels):
        scores[:, model.classes_.astype(np.int64)] = model.predict_proba(features.values)
    return scores


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """The share of ``predictions`` equal to ``labels`` (0 for none)."""
    return float(np.mean(labels == predictions)) if len(labels) else 0.0
