"""The data splits of three-level MLO-MAE: pretraining, fine-tuning and mask validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from maskkit.errors import DataError

from .types import ImageSplit, LabelledDataset

__all__ = ["MLOSplits", "MaskSource", "make_splits"]

MaskSource = Literal["train_tail", "val"]


@dataclass
class MLOSplits:
    """The splits one MLO-MAE run uses; every image tensor is ``[N, 3, S, S]`` uint8.

    Attributes:
        pretrain: level 1, masked-autoencoder pretraining: all training images (the train
            split, less the held-out val images when the dataset has no val split).
        finetune: level 2, classifier fine-tuning.
        mask_val: level 3, the data the masking network is validated on; held out from
            ``finetune``.
        eval: selection and periodic evaluation: the dataset's val split, or one held out
            from train when it has none. Never used for training, never the test split.
        test: the test split, used once at the end.
        eval_source: where ``eval`` comes from, in words.
    """

    pretrain: ImageSplit
    finetune: ImageSplit
    mask_val: ImageSplit
    eval: ImageSplit
    test: ImageSplit
    eval_source: str


def make_splits(
    dataset: LabelledDataset,
    train_portion: float = 0.8,
    mask_source: MaskSource = "train_tail",
    val_portion: float = 0.1,
) -> MLOSplits:
    """Cut a dataset into the MLO-MAE splits.

    Selection first: ``eval`` is the dataset's val split; a dataset without one (CIFAR) gives
    up the last ``round(val_portion * N)`` train images to a held-out val split, so that nothing
    is ever selected on test. The remaining train images are ``pretrain``.

    With ``mask_source="train_tail"`` (the paper's split, the default): ``finetune`` is the first
    ``floor(train_portion * N)`` of them in dataset order and ``mask_val`` the rest. With
    ``"val"``: ``finetune`` is all of them and ``mask_val`` the dataset's val split, which is
    then also the selection split (so selection is no longer on held-out data).

    Args:
        dataset: the loaded dataset.
        train_portion: the fraction of train used for fine-tuning, in ``(0, 1)``.
        mask_source: where the mask-validation data comes from.
        val_portion: the fraction of train held out for selection when there is no val split.

    Returns:
        The splits; ``finetune`` and ``mask_val`` share no image, and ``eval`` shares none
        with either unless ``mask_source="val"``.

    Raises:
        DataError: a bad ``train_portion``, ``val_portion`` or ``mask_source``, ``"val"`` on a
            dataset without a val split, or a split that comes out empty.
    """
    if mask_source not in get_args(MaskSource):
        raise DataError(f"mask_source must be one of {', '.join(get_args(MaskSource))}; got {mask_source!r}.")
    for name, portion in (("train_portion", train_portion), ("val_portion", val_portion)):
        if not (isinstance(portion, int | float) and 0.0 < portion < 1.0):
            raise DataError(f"{name} must be a number strictly between 0 and 1; got {portion!r}.")
    has_val = dataset.val is not None and len(dataset.val) > 0
    train = dataset.train
    if has_val:
        assert dataset.val is not None
        eval_split, eval_source = dataset.val, f"the val split of {dataset.name}"
    else:
        n_val = round(len(train) * val_portion)
        n_kept = len(train) - n_val
        # Slices are views of the train tensors (images, labels, priors): no copy.
        eval_split = train[n_kept:]
        train = train[:n_kept]
        eval_source = f"the last {n_val} train images, held out (val_portion={val_portion})"

    if mask_source == "val":
        if not has_val:
            raise DataError(
                f"mask_source 'val' needs a validation split, but dataset '{dataset.name}' has "
                "none. Use mask_source 'train_tail'."
            )
        finetune, mask_val = train, eval_split
    else:
        # The small epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
        n_finetune = math.floor(len(train) * train_portion + 1e-9)
        finetune = train[:n_finetune]
        mask_val = train[n_finetune:]

    splits = MLOSplits(
        pretrain=train,
        finetune=finetune,
        mask_val=mask_val,
        eval=eval_split,
        test=dataset.test,
        eval_source=eval_source,
    )
    for split_name in ("pretrain", "finetune", "mask_val", "test", "eval"):
        if len(getattr(splits, split_name)) == 0:
            raise DataError(
                f"the {split_name} split of dataset '{dataset.name}' is empty "
                f"(train has {len(dataset.train)} images, train_portion={train_portion}, "
                f"val_portion={val_portion}, mask_source={mask_source!r}). Use a larger dataset "
                "or other portions."
            )
    return splits
