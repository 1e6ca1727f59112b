"""Dataset names and the one entry point that loads any of them."""

from __future__ import annotations

import os
from pathlib import Path

from maskkit.errors import DataError, UnknownNameError

from .folder_source import load_image_folder
from .locations import default_data_dir
from .medmnist_source import load_medmnist, medmnist_flags, multilabel_medmnist_flags
from .preprocess import check_image_size
from .torchvision_source import CIFAR_CLASSES, load_cifar
from .types import LabelledDataset

__all__ = ["dataset_names", "default_data_dir", "load_dataset"]

IMAGEFOLDER = "imagefolder"


def dataset_names() -> list[str]:
    """Every name :func:`load_dataset` accepts, sorted.

    ``cifar10``, ``cifar100``, ``imagefolder`` and the single-label 2-D MedMNIST flags
    (``bloodmnist``, ``dermamnist``, ``pathmnist``, ...). The multi-label ChestMNIST and the 3-D
    flags are left out: they are not single-label image classification datasets.
    """
    return sorted([*CIFAR_CLASSES, IMAGEFOLDER, *medmnist_flags()])


def load_dataset(name: str, data_dir: Path, *, image_size: int, download: bool = False) -> LabelledDataset:
    """Load a dataset by name, with every split resized to ``image_size x image_size``.

    Args:
        name: one of :func:`dataset_names` (case-insensitive).
        data_dir: where the files are: the folder holding ``<flag>.npz`` for MedMNIST or
            ``cifar-10-batches-py`` / ``cifar-100-python`` for CIFAR; for ``imagefolder`` the
            folder or ``.zip`` file holding ``train/<class>/*`` and ``test/<class>/*``.
        image_size: the square side length ``S`` of the returned images.
        download: fetch MedMNIST or CIFAR files that are missing (never for ``imagefolder``).

    Returns:
        The dataset; its splits hold ``[N, 3, S, S]`` uint8 images and ``[N]`` int64 labels, and
        ``mean`` / ``std`` are the per-channel statistics of the resized train images in
        ``[0, 1]``.

    Raises:
        UnknownNameError: ``name`` is not a dataset maskkit knows.
        DataError: the files are missing, truncated, corrupt or of the wrong layout.
    """
    key = name.strip().lower()
    image_size = check_image_size(image_size)
    data_dir = Path(os.path.expanduser(os.fspath(data_dir)))
    if key in CIFAR_CLASSES:
        return load_cifar(key, data_dir, image_size=image_size, download=download)
    if key == IMAGEFOLDER:
        return load_image_folder(data_dir, image_size=image_size, download=download)
    if key in medmnist_flags():
        return load_medmnist(key, data_dir, image_size=image_size, download=download)
    if key in multilabel_medmnist_flags():
        raise DataError(
            f"dataset '{name}' is multi-label (several labels per image); maskkit trains "
            f"single-label classifiers. Pick another dataset: {', '.join(dataset_names())}."
        )
    raise UnknownNameError("dataset", name, dataset_names())
