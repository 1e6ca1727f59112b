"""Datasets for maskkit: loading, the MLO-MAE splits, and device-resident mini-batches.

>>> ds = load_dataset("dermamnist", default_data_dir(), image_size=32)
>>> splits = make_splits(ds)
>>> batches = DeviceBatches(splits.pretrain, 256, torch.device("cuda"), ds.mean, ds.std)
>>> images, labels, priors = batches.next()  # [256, 3, 32, 32] float32, [256] int64, {}
"""

from __future__ import annotations

from .batches import Augment, Batch, DeviceBatches, crop_flip, cutout, iterate_eval, normalize
from .locations import DATA_DIR_ENV, default_data_dir
from .registry import dataset_names, load_dataset
from .splits import MaskSource, MLOSplits, make_splits
from .subsets import class_capped_subset
from .types import ImageSplit, LabelledDataset, limit_dataset

__all__ = [
    "DATA_DIR_ENV",
    "Augment",
    "Batch",
    "DeviceBatches",
    "ImageSplit",
    "LabelledDataset",
    "MLOSplits",
    "MaskSource",
    "class_capped_subset",
    "crop_flip",
    "cutout",
    "dataset_names",
    "default_data_dir",
    "iterate_eval",
    "limit_dataset",
    "load_dataset",
    "make_splits",
    "normalize",
]
