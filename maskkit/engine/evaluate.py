"""Classification evaluation of an encoder + head on one split.

With several processes each evaluates its share of the split's batches
(:func:`~maskkit.distributed.owned_rows`: whole batches, as one process forms them) and the
predictions are gathered in order, so every process gets the metrics a single process would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from maskkit.data import ImageSplit, iterate_eval
from maskkit.distributed import gather_rows, owned_rows
from maskkit.report import classification_metrics
from maskkit.report.predictions import Predictions


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
    num_classes: int,
) -> Predictions:
    """The labels ``[N]`` of ``split`` and the class scores ``[N, C]`` of ``model`` (images →
    ``[B, C]`` logits, C = ``num_classes``) on it: the softmax of the logits, taken in fp32.

    With several processes each predicts its share, and every process returns all of them."""
    was_training = model.training
    model.eval()
    truths, scores = [torch.zeros(0, dtype=torch.int64)], []
    for images, labels, _ in iterate_eval(share_of_split(split, batch_size), batch_size, device, mean, std):
        with autocast():
            logits = model(images)
        scores.append(torch.softmax(logits.float(), dim=1).cpu())
        truths.append(labels.cpu())
    model.train(was_training)
    local = torch.cat(scores) if scores else torch.zeros(0, num_classes)  # a process with no rows
    return Predictions(gather_rows(torch.cat(truths)).numpy(), gather_rows(local).numpy())


def evaluate_predictions(
    model: nn.Module,
    split: ImageSplit,
    class_names: list[str],
    batch_size: int,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    autocast: Callable,
) -> tuple[dict, Predictions]:
    """:func:`evaluate_classifier`'s metrics and the predictions they come from."""
    found = predict(model, split, batch_size, device, mean, std, autocast, len(class_names))
    return classification_metrics(found.labels, found.predicted, class_names, scores=found.scores), found


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
    """Accuracy, balanced accuracy, AUC, F1s, per-class precision/recall/F1/support and the
    confusion matrix (:func:`~maskkit.report.classification_metrics`)."""
    return evaluate_predictions(model, split, class_names, batch_size, device, mean, std, autocast)[0]
