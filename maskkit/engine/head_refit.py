"""Keep the level-2 head near its best response: refit its last layer by a converged probe.

The mask level learns from the validation loss of the head C on E's features. One AdamW step of
C per mask step with a plain cross-entropy leaves C far from its best response on a skewed set
like DermaMNIST (it answers the majority class), and T then learns what helps a majority-class
guess. Every ``pretrain.learned_mask.head_refit_every`` mask steps, the head's last linear layer
is replaced by a class-balanced multinomial logistic regression fitted to convergence on the
features of a fixed subset of the finetune split (the head's LayerNorm applied, as the head
sees them); the head's optimiser forgets that layer's moments. The head's own steps go on
between refits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from maskkit.data import ImageSplit
from maskkit.engine.protocols import encoder_features
from maskkit.models import ClassifierHead, MaskedAutoencoderViT

#: Logit bias given to a class absent from the refit subset (it is then never predicted).
ABSENT_CLASS_BIAS = -10.0
#: The probe's inverse regularisation (chosen on the mask split of a `cpu`-preset run, 2026-12-06:
#: C = 0.1 gave its best balanced cross-entropy and balanced accuracy of 0.01…1) and iteration cap.
REFIT_C = 0.1
REFIT_MAX_ITER = 500


def refit_subset(split: ImageSplit, size: int, seed: int) -> ImageSplit:
    """A fixed random subset of ``split`` of at most ``size`` images (the same at every refit)."""
    if len(split) <= size:
        return split
    generator = torch.Generator().manual_seed(seed)
    return split.subset(torch.randperm(len(split), generator=generator)[:size].sort().values)


@torch.no_grad()
def refit_head(
    head: ClassifierHead,
    mae: MaskedAutoencoderViT,
    split: ImageSplit,
    optimizer: torch.optim.Optimizer,
    mean: Sequence[float],
    std: Sequence[float],
    autocast: Callable,
    batch_size: int = 256,
) -> None:
    """Fit ``head.linear`` to E's features of ``split`` by class-balanced logistic regression.

    The features ``[N, D]`` are E's CLS features (modules in eval mode, no augmentation) passed
    through ``head.norm``; the fitted ``[classes, D]`` weights and ``[classes]`` biases replace the
    layer's, and ``optimizer``'s state for them is dropped (its moments belong to the old layer).
    """
    device = next(mae.parameters()).device
    modes = (mae.training, head.training)
    mae.eval()
    head.eval()
    try:
        features = encoder_features(
            lambda images: head.norm(mae.features(images)), split, batch_size, device, mean, std, autocast
        )
    finally:
        mae.train(modes[0])
        head.train(modes[1])
    num_classes = head.linear.out_features
    present = np.unique(features.labels)
    weight = np.zeros((num_classes, features.values.shape[1]))
    bias = np.full(num_classes, ABSENT_CLASS_BIAS)
    if len(present) == 1:
        bias[present[0]] = 0.0
    elif len(present) > 1:
        probe = LogisticRegression(C=REFIT_C, class_weight="balanced", max_iter=REFIT_MAX_ITER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(features.values, features.labels)
        coef, intercept = probe.coef_, probe.intercept_
        if len(present) == 2:  # scikit-learn gives one row for two classes: ± of it
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        weight[probe.classes_], bias[probe.classes_] = coef, intercept
    linear = head.linear
    linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype, device=device))
    linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype, device=device))
    for param in (linear.weight, linear.bias):
        optimizer.state.pop(param, None)
