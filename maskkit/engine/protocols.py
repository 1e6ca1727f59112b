"""Evaluation protocols of the frozen pretrained encoder: a linear probe and a k-NN classifier.

They are the standard protocols of self-supervised papers, scored beside stage 2's end-to-end
fine-tuning (``protocols: true`` in a run's config; every cell of ``maskkit bench``). The encoder of
the run's ``pretrained`` checkpoint is frozen, and every image of the pretrain (all training
images), val and test splits is encoded once, without masking or augmentation, into the CLS
feature the classifier reads (:meth:`~maskkit.models.MaskedAutoencoderViT.features`). Two
classifiers are fitted on the pretrain features:

- **linear probe**: scikit-learn's multinomial ``LogisticRegression`` on standardised features
  (mean and scale of the pretrain features); its inverse regularisation ``C`` is chosen on val
  from :data:`LINEAR_PROBE_C`.
- **k-NN**: the ``k`` nearest pretrain features by cosine distance, on standardised and
  L2-normalised features, votes weighted by 1 / distance; ``k`` is chosen on val from
  :data:`KNN_K`.

Nothing is chosen on test: it is scored once, with the setting chosen on val. With ``pretrain.steps:
0`` the "pretrained" encoder is the freshly initialised one, so the protocols measure a random
encoder: the floor of a comparison.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler, normalize
from torch import nn

from maskkit.checkpoint import load_checkpoint
from maskkit.data import ImageSplit, iterate_eval
from maskkit.engine.context import RunContext
from maskkit.models import MaskedAutoencoderViT
from maskkit.report import classification_metrics

#: Inverse regularisation strengths of the linear probe, chosen on val (ascending: a tie goes to
#: the stronger regularisation).
LINEAR_PROBE_C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Neighbour counts of the k-NN classifier, chosen on val (ascending: a tie goes to the smaller k).
KNN_K: tuple[int, ...] = (10, 20, 50)
#: Iterations of the probe's solver (lbfgs) per value of C; each fit starts from the previous one.
LINEAR_PROBE_MAX_ITER = 1000


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


def _standardised(train: Features, *others: Features) -> list[Features]:
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


def _accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(labels == predictions)) if len(labels) else 0.0


def linear_probe(
    train: Features,
    val: Features,
    test: Features,
    class_names: list[str],
    c_grid: Sequence[float] = LINEAR_PROBE_C,
) -> dict:
    """A linear classifier on frozen features, ``C`` chosen on ``val``, scored on ``test``.

    Returns:
        ``{"C": chosen C, "val_accuracy": {C: val accuracy}, "converged": bool, "test": the
        test metrics of :func:`~maskkit.report.classification_metrics`}``; the model scored on
        test is the one fitted on ``train`` with the chosen C.
    """
    train, val, test = _standardised(train, val, test)
    grid = sorted(c_grid)
    # Each fit starts from the previous one's solution (warm start over ascending C).
    model = LogisticRegression(max_iter=LINEAR_PROBE_MAX_ITER, warm_start=True)
    scores, fitted, converged = {}, {}, {}
    for c in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=c).fit(train.values, train.labels)
        scores[c] = _accuracy(val.labels, model.predict(val.values))
        fitted[c] = (model.coef_.copy(), model.intercept_.copy())
        converged[c] = bool(np.all(model.n_iter_ < LINEAR_PROBE_MAX_ITER))
    chosen = max(grid, key=lambda c: scores[c])  # the first best: the strongest regularisation
    model.coef_, model.intercept_ = fitted[chosen]
    predictions = model.predict(test.values)
    probabilities = class_scores(model, test, len(class_names))
    return {
        "C": chosen,
        "val_accuracy": {str(c): scores[c] for c in grid},
        "converged": converged[chosen],
        "test": classification_metrics(test.labels, predictions, class_names, scores=probabilities),
    }


def knn_probe(
    train: Features,
    val: Features,
    test: Features,
    class_names: list[str],
    k_grid: Sequence[int] = KNN_K,
) -> dict:
    """A distance-weighted k-NN classifier by cosine distance on frozen features, ``k`` chosen on
    ``val`` (values above the number of train features are left out), scored on ``test``.

    Returns:
        ``{"k": chosen k, "val_accuracy": {k: val accuracy}, "test": test metrics}``.
    """
    train, val, test = _standardised(train, val, test)
    train, val, test = (Features(normalize(f.values), f.labels) for f in (train, val, test))
    grid = sorted({min(k, len(train.labels)) for k in k_grid})
    scores, models = {}, {}
    for k in grid:
        models[k] = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", weights="distance", algorithm="brute"
        )
        models[k].fit(train.values, train.labels)
        scores[k] = _accuracy(val.labels, models[k].predict(val.values))
    chosen = max(grid, key=lambda k: scores[k])
    probabilities = class_scores(models[chosen], test, len(class_names))
    return {
        "k": chosen,
        "val_accuracy": {str(k): scores[k] for k in grid},
        "test": classification_metrics(
            test.labels, models[chosen].predict(test.values), class_names, scores=probabilities
        ),
    }


def frozen_encoder_protocols(context: RunContext) -> dict:
    """Linear probe and k-NN of the run's ``pretrained`` encoder (a fresh MAE with those weights).

    Returns:
        ``{"linear_probe": ..., "knn": ..., "feature_dim": D, "splits": {name: N}, "seconds":
        wall time}``, JSON-serialisable (``protocols.json``).
    """
    started = time.perf_counter()
    config, splits, device = context.config, context.splits, context.device
    mae = MaskedAutoencoderViT(config.model).to(device)
    load_checkpoint(context.run.checkpoints, "pretrained", map_location=str(device)).load_into({"mae": mae})
    mae.eval()
    named = {"pretrain": splits.pretrain, "val": splits.eval, "test": splits.test}
    features = {
        name: encoder_features(
            mae.features,
            split,
            config.data.eval_batch_size,
            device,
            context.mean,
            context.std,
            context.autocast,
        )
        for name, split in named.items()
    }
    class_names = context.dataset.class_names
    arguments = (features["pretrain"], features["val"], features["test"], class_names)
    return {
        "linear_probe": linear_probe(*arguments),
        "knn": knn_probe(*arguments),
        "feature_dim": int(features["test"].values.shape[1]),
        "splits": {name: len(split) for name, split in named.items()},
        "val_source": splits.eval_source,
        "seconds": round(time.perf_counter() - started, 2),
    }
