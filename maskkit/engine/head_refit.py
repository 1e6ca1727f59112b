"""Keep the level-2 head near its best response: refit its last layer by a converged probe.

The mask level learns from the validation loss of the head C on E's features. One AdamW step of
C per mask step with a plain cross-entropy leaves C far from its best response on a skewed set
like DermaMNIST (it answers the majority class), and T then learns what helps a majority-class
guess. Every ``pretrain.learned_mask.head_refit_every`` mask steps, the head's last linear layer
is replaced by a class-balanced multinomial logistic regression fitted to convergence on E's
features of a fixed subset of the finetune split (``head_refit_images`` images, eval mode, no
augmentation; the head's LayerNorm applied, as the head sees them); the head's optimiser forgets
that layer's moments. The head's own steps go on between refits.

The subset keeps the small classes (:func:`maskkit.data.class_capped_subset`: every class up to
one common cap): a class-balanced probe is only as good as its smallest classes' samples, and a
random subset of DermaMNIST's finetune split holds about 12 images of its smallest class per
1024, the capped one all 66 of them in 512.

E's features of the subset are most of a refit's cost, so :class:`RefitFeatures` keeps them and
recomputes a rotating share ``head_refit_refresh`` of them at each refit (all of them at the
first): with a share of 1/4, each feature is at most 4 refits old.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from maskkit.data import ImageSplit
from maskkit.engine.protocols import encoder_features
from maskkit.models import ClassifierHead, MaskedAutoencoderViT

#: Logit bias given to a class absent from the refit's features (it is then never predicted).
ABSENT_CLASS_BIAS = -10.0
#: The probe's inverse regularisation and iteration cap. C was chosen by the balanced
#: cross-entropy on the class-capped 512 mask-split images of the level-2 diagnostic, with the
#: features of the end of stage 1 of a `cpu`-preset `mlo` run (seed 2), C from 0.03 to 3
#: (2026-12-06): C = 1 on the class-capped 512 refit images (C = 0.1 had been best on 2048 random
#: ones, whose small classes hold a few images each). docs/mlo.md has the table.
REFIT_C = 1.0
REFIT_MAX_ITER = 500


class RefitFeatures:
    """E's CLS features ``[N, D]`` of a fixed subset of ``N`` images, kept between refits, and a
    rotating window of ``ceil(refresh · N)`` of them recomputed at each :meth:`update` (every row
    at the first)."""

    def __init__(self, split: ImageSplit, refresh: float) -> None:
        if not 0 < refresh <= 1:
            raise ValueError(f"the refreshed share must be in (0, 1], got {refresh}")
        self.split = split
        self.window = max(1, math.ceil(refresh * len(split)))
        self.values: Tensor | None = None  # [N, D] float32, on the CPU
        self.next_row = 0
        self.fingerprint = _fingerprint(split)

    @torch.no_grad()
    def update(
        self,
        mae: MaskedAutoencoderViT,
        mean: Sequence[float],
        std: Sequence[float],
        autocast: Callable,
        batch_size: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Recompute the next window's features under ``mae`` (eval mode, no augmentation) and
        return all ``features [N, D]`` with their ``labels [N]``."""
        count = len(self.split)
        if self.values is None:
            rows = torch.arange(count)
        else:
            rows = (self.next_row + torch.arange(min(self.window, count))) % count
        device = next(mae.parameters()).device
        training = mae.training
        mae.eval()
        try:
            fresh = encoder_features(
                mae.features, self.split.subset(rows), batch_size, device, mean, std, autocast
            )
        finally:
            mae.train(training)
        values = torch.from_numpy(fresh.values)
        if self.values is None:
            self.values = values
        else:
            self.values[rows] = values
            self.next_row = int((self.next_row + len(rows)) % count)
        return self.values, self.split.labels

    def state_dict(self) -> dict:
        values = None if self.values is None else self.values.clone()
        return {"values": values, "next_row": self.next_row, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Take saved features back, unless they are of other images (a run saved before the
        subset kept the small classes): then every row is computed afresh at the next refit."""
        if state.get("fingerprint") != self.fingerprint:
            self.values, self.next_row = None, 0
            return
        self.values, self.next_row = state["values"], state["next_row"]


def _fingerprint(split: ImageSplit) -> str:
    """A digest of ``split``'s images and labels, which names the rows saved features belong to."""
    digest = hashlib.sha1(split.images.cpu().contiguous().numpy().tobytes())
    digest.update(split.labels.cpu().numpy().tobytes())
    return digest.hexdigest()


def balanced_probe_weights(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple:
    """A class-balanced multinomial logistic regression of ``labels [N]`` on ``features [N, D]``,
    as ``(weight [classes, D], bias [classes])``; a class absent from ``labels`` gets weight 0 and
    bias :data:`ABSENT_CLASS_BIAS`."""
    present = np.unique(labels)
    weight = np.zeros((num_classes, features.shape[1]))
    bias = np.full(num_classes, ABSENT_CLASS_BIAS)
    if len(present) == 1:
        bias[present[0]] = 0.0
    elif len(present) > 1:
        probe = LogisticRegression(C=REFIT_C, class_weight="balanced", max_iter=REFIT_MAX_ITER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(features, labels)
        coef, intercept = probe.coef_, probe.intercept_
        if len(present) == 2:  # scikit-learn gives one row for two classes: ± of it
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        weight[probe.classes_], bias[probe.classes_] = coef, intercept
    return weight, bias


@torch.no_grad()
def refit_head(
    head: ClassifierHead, features: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer
) -> None:
    """Fit ``head.linear`` to E's ``features [N, D]`` passed through ``head.norm`` as it stands,
    with ``labels [N]``, by :func:`balanced_probe_weights`; the fitted ``[classes, D]`` weights and
    ``[classes]`` biases replace the layer's, and ``optimizer``'s state for them is dropped (its
    moments belong to the old layer)."""
    linear = head.linear
    training = head.training
    head.eval()
    try:
        normed = head.norm(features.to(linear.weight.device, linear.weight.dtype)).float().cpu().numpy()
    finally:
        head.train(training)
    weight, bias = balanced_probe_weights(normed, labels.cpu().numpy(), linear.out_features)
    linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype, device=linear.weight.device))
    linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype, device=linear.bias.device))
    for param in (linear.weight, linear.bias):
        optimizer.state.pop(param, None)
