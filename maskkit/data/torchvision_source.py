"""CIFAR-10 and CIFAR-100, read through ``torchvision.datasets`` (the python pickle layout).

``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<data_dir>/cifar-100-python/{train, test, meta}``; torchvision checks their md5 sums.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from maskkit.errors import DataError

from .locations import point_at_data_hint
from .preprocess import build_dataset, images_from_array
from .types import ImageSplit, LabelledDataset

__all__ = ["CIFAR_CLASSES", "load_cifar"]

#: Registry name -> torchvision dataset class.
CIFAR_CLASSES: dict[str, type[tvd.CIFAR10]] = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}

_READ_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError)


def _expected_files(cls: type[tvd.CIFAR10]) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def load_cifar(name: str, data_dir: Path, *, image_size: int, download: bool) -> LabelledDataset:
    """Load CIFAR-10 or CIFAR-100 with ``torchvision.datasets.CIFAR10`` / ``CIFAR100``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``.
        image_size: the square side length ``S`` the 32x32 images are resized to.
        download: let torchvision download and extract the archive when it is missing.

    Returns:
        The dataset with train (50000) and test (10000) splits, ``[N, 3, S, S]`` uint8, no val
        split, and class names from the dataset's ``classes``.
    """
    cls = CIFAR_CLASSES[name]
    folder = data_dir / cls.base_folder
    missing = [f for f in _expected_files(cls) if not (folder / f).is_file()]
    fetch = download and bool(missing)
    if not fetch and not folder.is_dir():
        raise DataError(
            f"{name} not found: expected the folder {folder}. "
            + point_at_data_hint(f"{cls.base_folder}/", downloadable=True)
        )
    if not fetch and missing:
        raise DataError(
            f"{name} is incomplete: {folder} lacks {', '.join(missing)}. Delete the folder and "
            "pass --download to fetch it again, or replace it with a complete copy."
        )
    if fetch:
        try:
            cls(root=data_dir, train=True, download=True)
        except Exception as err:  # network errors, md5 mismatch of the archive, disk full
            raise DataError(
                f"could not download {name} into {data_dir} ({type(err).__name__}: {err}). "
                f"Check the network connection, or extract {cls.url} yourself into {data_dir}."
            ) from err

    splits: dict[str, ImageSplit] = {}
    class_names: list[str] = []
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=data_dir, train=train, download=False)
        except _READ_ERRORS as err:
            raise DataError(
                f"{folder} is corrupt: its files fail torchvision's md5 check or cannot be "
                f"unpickled ({type(err).__name__}: {err}). Delete the folder and pass "
                "--download to fetch it again, or replace it with the official files."
            ) from None
        images = images_from_array(np.asarray(ds.data), f"{folder} ({split})")
        labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"{folder} ({split}) has {images.shape[0]} images but {labels.numel()} labels. "
                "Delete the folder and pass --download to fetch it again."
            )
        splits[split] = ImageSplit(images=images, labels=labels)
        class_names = list(ds.classes)

    return build_dataset(
        name,
        train=splits["train"],
        val=None,
        test=splits["test"],
        class_names=class_names,
        image_size=image_size,
        source=str(folder),
    )
