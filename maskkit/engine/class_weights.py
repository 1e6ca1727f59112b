"""Class-balanced stage 2: cross-entropy weighted by inverse class frequency.

On a dataset where one class dominates (two thirds of DermaMNIST is melanocytic nevi) a short
fine-tuning with plain cross-entropy ends at the majority class. ``finetune.class_balanced: true``
weights each image's loss by its class's weight ``w_c = N / (K · n_c)`` (``n_c`` training images of
class ``c`` out of ``N``, ``K`` classes present), scikit-learn's ``"balanced"`` weights: every class
contributes the same total weight, and the weights average 1 over the training images, so the
loss keeps the scale of plain cross-entropy. A class absent from the training split gets weight 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_balanced_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency class weights, normalised to mean 1 over the images.

    Args:
        labels: ``[N]`` int64 class indices of the training images, in ``0..num_classes-1``.
        num_classes: ``C``, the number of classes of the dataset.

    Returns:
        ``[C]`` float32 weights ``N / (K · n_c)`` for each class ``c`` with ``n_c > 0`` images
        (``K`` such classes), 0 for a class without images. ``Σ_c n_c · w_c = N``.
    """
    counts = torch.bincount(labels.to(torch.int64).cpu(), minlength=num_classes)[:num_classes]
    counts = counts.to(torch.float64)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.to(torch.float32)


def weighted_cross_entropy(
    logits: Tensor, labels: Tensor, class_weights: Tensor | None, label_smoothing: float = 0.0
) -> Tensor:
    """Mean over the batch of each image's cross-entropy times its class's weight.

    Args:
        logits: ``[B, C]`` class logits (fp32).
        labels: ``[B]`` int64 class indices.
        class_weights: ``[C]`` weights (:func:`class_balanced_weights`), or None for plain
            cross-entropy.
        label_smoothing: as :func:`torch.nn.functional.cross_entropy`'s; the smoothed loss of an
            image is weighted by its true class's weight.

    Returns:
        A scalar: ``mean_i(w[y_i] · CE_i)`` (a sum over the batch divided by ``B``, not by the
        weights' sum, so each batch is an unbiased estimate of the class-balanced loss).
    """
    if class_weights is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    per_image = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    return (per_image * class_weights.to(per_image.device, per_image.dtype)[labels]).mean()
