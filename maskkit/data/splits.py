"""The data splits of three-level MLO-MAE: pretraining, fine-tuning and mask validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from maskkit.errors import DataError

from .types import ImageSplit, LabelledDataset

__all__ = ["MLOSplits", "MaskSource", "make_splits"]

MaskSource = Literal["auto", "train_tail", "val"]


@dataclass
class MLOSplits:
    """The splits one MLO-MAE run uses; every image tensor is ``[N, 3, S, S]`` uint8.

    Attributes:
        pretrain: level 1, masked-autoencoder pretraining: all of the train split.
        finetune: level 2, classifier fine-tuning.
        mask_val: level 3, the data the masking network is validated on; held out from
            ``finetune``.
        eval: periodic evaluation during training: the dataset's val split if it has one,
            else its test split.
        test: the test split.
        eval_name: ``"val"`` or ``"test"``, naming what ``eval`` is.
    """

    pretrain: ImageSplit
    finetune: ImageSplit
    mask_val: ImageSplit
    eval: ImageSplit
    test: ImageSplit
    eval_name: str


def make_splits(
    dataset: LabelledDataset,
    train_portion: float = 0.8,
    mask_source: MaskSource = "auto",
) -> MLOSplits:
    """Cut a dataset into the MLO-MAE splits.

    With ``mask_source="train_tail"`` (the paper's split): ``finetune`` is the first
    ``floor(train_portion * N)`` train images in dataset order and ``mask_val`` the remaining
    ones. With ``"val"``: ``finetune`` is all of train and ``mask_val`` the dataset's own val
    split (``train_portion`` is then unused). ``"auto"`` means ``"val"`` when the dataset has a
    val split, else ``"train_tail"``. ``pretrain`` is always all of train.

    Args:
        dataset: the loaded dataset.
        train_portion: the fraction of train used for fine-tuning, in ``(0, 1)``.
        mask_source: where the mask-validation data comes from.

    Returns:
        The splits; ``finetune`` and ``mask_val`` share no image.

    Raises:
        DataError: a bad ``train_portion`` or ``mask_source``, ``"val"`` on a dataset without a
            val split, or a split that comes out empty.
    """
    if mask_source not in get_args(MaskSource):
        raise DataError(f"mask_source must be one of {', '.join(get_args(MaskSource))}; got {mask_source!r}.")
    has_val = dataset.val is not None and len(dataset.val) > 0
    source = ("val" if has_val else "train_tail") if mask_source == "auto" else mask_source
    train = dataset.train

    if source == "val":
        if not has_val:
            raise DataError(
                f"mask_source 'val' needs a validation split, but dataset '{dataset.name}' has "
                "none. Use mask_source 'train_tail' (or 'auto')."
            )
        assert dataset.val is not None
        finetune, mask_val = train, dataset.val
    else:
        if not (isinstance(train_portion, int | float) and 0.0 < train_portion < 1.0):
            raise DataError(
                f"train_portion must be a number strictly between 0 and 1; got {train_portion!r}."
            )
        n = len(train)
        # The small epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
        n_finetune = math.floor(n * train_portion + 1e-9)
        # Slices are views of the train tensors: no copy.
        finetune = ImageSplit(train.images[:n_finetune], train.labels[:n_finetune])
        mask_val = ImageSplit(train.images[n_finetune:], train.labels[n_finetune:])

    if dataset.val is not None and len(dataset.val) > 0:
        eval_split, eval_name = dataset.val, "val"
    else:
        eval_split, eval_name = dataset.test, "test"

    splits = MLOSplits(
        pretrain=train,
        finetune=finetune,
        mask_val=mask_val,
        eval=eval_split,
        test=dataset.test,
        eval_name=eval_name,
    )
    for split_name in ("pretrain", "finetune", "mask_val", "test", "eval"):
        if len(getattr(splits, split_name)) == 0:
            raise DataError(
                f"the {split_name} split of dataset '{dataset.name}' is empty "
                f"(train has {len(train)} images, train_portion={train_portion}, "
                f"mask_source={source!r}). Use a larger dataset or another train_portion."
            )
    return splits
