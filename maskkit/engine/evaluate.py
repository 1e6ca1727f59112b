"""Classification evaluation of an encoder + head on one split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from maskkit.data import ImageSplit, iterate_eval
from maskkit.report import classification_metrics


@torch.no_grad()
def predict(
    model: nn.Module,
    split: ImageSplit,
    batch_size: int,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    autocast: Callable,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted classes ``([N], [N])`` of ``model`` (images → logits) on ``split``."""
    was_training = model.training
    model.eval()
    truths, predictions = [], []
    for images, labels, _ in iterate_eval(split, batch_size, device, mean, std):
        with autocast():
            logits = model(images)
        predictions.append(logits.argmax(dim=1).cpu())
        truths.append(labels.cpu())
    model.train(was_training)
    return torch.cat(truths).numpy(), torch.cat(predictions).numpy()


def evaluate_classifier(
    model: nn.Module,
    split: ImageSplit,
    class_names: list[str],
    batch_size: int,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    autocast: Callable,
) -> dict:
    """Accuracy, weighted F1, per-class precision/recall/F1/support and the confusion matrix."""
    truths, predictions = predict(model, split, batch_size, device, mean, std, autocast)
    return classification_metrics(truths, predictions, class_names)
