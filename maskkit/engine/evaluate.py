"""Classification evaluation of an encoder + head on one split.

With several processes each evaluates its share of the split's batches
(:func:`~maskkit.distributed.owned_rows`: whole batches, as one process forms them) and the
predictions are gathered in order, so every process gets the metrics a single process would.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from maskkit.data import ImageSplit, iterate_eval
from maskkit.distributed import gather_rows, owned_rows
from maskkit.report import classification_metrics


def share_of_split(split: ImageSplit, batch_size: int) -> ImageSplit:
    """This process's share of ``split`` for evaluation in batches of ``batch_size``: a contiguous
    run of whole batches (all of ``split`` with one process)."""
    rows = owned_rows(len(split), batch_size)
    if len(rows) == len(split):
        return split
    return split.subset(torch.arange(rows.start, rows.stop))


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
    """Labels and predicted classes ``([N], [N])`` of ``model`` (images → logits) on ``split``.

    With several processes each predicts its share, and every process returns all of them."""
    was_training = model.training
    model.eval()
    truths, predictions = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for images, labels, _ in iterate_eval(share_of_split(split, batch_size), batch_size, device, mean, std):
        with autocast():
            logits = model(images)
        predictions.append(logits.argmax(dim=1).cpu())
        truths.append(labels.cpu())
    model.train(was_training)
    return gather_rows(torch.cat(truths)).numpy(), gather_rows(torch.cat(predictions)).numpy()


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
