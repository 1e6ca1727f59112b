"""MedMNIST 2-D datasets (DermaMNIST, PathMNIST, ...) at 28x28, read through ``medmnist``.

Each flag is stored as ``<data_dir>/<flag>.npz`` with ``train/val/test_images`` uint8
``[N, 28, 28]`` (grayscale) or ``[N, 28, 28, 3]`` (colour) and ``*_labels`` uint8 ``[N, 1]``.
"""

from __future__ import annotations

import functools
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskkit.errors import DataError

from .locations import point_at_data_hint
from .preprocess import build_dataset, images_from_array
from .types import ImageSplit, LabelledDataset

__all__ = ["load_medmnist", "medmnist_flags", "multilabel_medmnist_flags"]

# What reading a damaged npz can raise, from numpy, zipfile or zlib.
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, zlib.error)


@functools.cache
def _info() -> dict[str, dict[str, Any]]:
    """``medmnist.INFO``, imported on first use (``import medmnist`` takes about a second)."""
    import medmnist

    return medmnist.INFO


def _is_2d(flag: str) -> bool:
    return not flag.endswith("3d")


def _is_multilabel(flag: str) -> bool:
    return "multi-label" in _info()[flag]["task"]


def medmnist_flags() -> list[str]:
    """The single-label 2-D MedMNIST flags maskkit can load, e.g. ``["bloodmnist", ...]``."""
    return sorted(f for f in _info() if _is_2d(f) and not _is_multilabel(f))


def multilabel_medmnist_flags() -> list[str]:
    """2-D MedMNIST flags whose task is multi-label (ChestMNIST): not classification datasets."""
    return sorted(f for f in _info() if _is_2d(f) and _is_multilabel(f))


def _split_from_medmnist(ds: Any, path: Path, split: str) -> ImageSplit:
    """Convert a ``medmnist`` dataset object's arrays to an :class:`ImageSplit`.

    ``ds.imgs`` is ``[N, H, W]`` or ``[N, H, W, 3]`` uint8, ``ds.labels`` ``[N, 1]`` or ``[N]``.
    """
    fix = "delete it and pass --download to fetch it again, or replace it with a complete copy."
    imgs, labels = np.asarray(ds.imgs), np.asarray(ds.labels)
    try:
        images = images_from_array(imgs, f"{path} ({split}_images)")
    except DataError as err:
        raise DataError(f"{err} The file is damaged or not a MedMNIST file: {fix}") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise DataError(
            f"{path} ({split}_labels) has shape {tuple(labels.shape)} and dtype {labels.dtype}; "
            f"expected integer labels of shape [{images.shape[0]}, 1], one per image. "
            f"The file is damaged or not a MedMNIST file: {fix}"
        )
    return ImageSplit(images=images, labels=torch.from_numpy(labels.astype(np.int64)))


def load_medmnist(flag: str, data_dir: Path, *, image_size: int, download: bool) -> LabelledDataset:
    """Load a 2-D MedMNIST flag from ``<data_dir>/<flag>.npz`` through the ``medmnist`` package.

    Args:
        flag: a MedMNIST flag such as ``"dermamnist"``.
        data_dir: the folder holding ``<flag>.npz``.
        image_size: the square side length ``S`` the images are resized to.
        download: let ``medmnist`` download the file when it is missing.

    Returns:
        The dataset with train, val (MedMNIST's official validation split) and test, each
        ``[N, 3, S, S]`` uint8, and class names from ``medmnist.INFO[flag]["label"]``.
    """
    info = _info()[flag]
    path = data_dir / f"{flag}.npz"
    # Download only when the file is missing: medmnist would otherwise replace a local copy
    # whose md5 differs from the official one (such as a rebuilt DermaMNIST).
    fetch = download and not path.is_file()
    if fetch:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(
                f"cannot create the data folder {data_dir} to download {flag} into: {err}."
            ) from None
    elif not path.is_file():
        raise DataError(
            f"{flag} not found: expected the file {path}. " + point_at_data_hint(path.name, downloadable=True)
        )

    import medmnist

    cls = getattr(medmnist, info["python_class"])
    if fetch:
        try:
            cls(split="train", root=str(data_dir), download=True)
        except Exception as err:  # medmnist wraps every download failure in RuntimeError
            if not path.is_file():
                raise DataError(
                    f"could not download {flag} to {path} ({type(err).__name__}). Check the "
                    f"network connection, or download {info.get('url', 'the file')} yourself "
                    f"and put it at {path}."
                ) from err
    splits: dict[str, ImageSplit] = {}
    for split in ("train", "val", "test"):
        try:
            ds = cls(split=split, root=str(data_dir), download=False)
        except (*_READ_ERRORS, RuntimeError) as err:
            raise DataError(
                f"{path} is truncated or corrupt ({type(err).__name__}: {err}). Delete it and "
                "pass --download to fetch it again, or replace it with a complete copy."
            ) from None
        splits[split] = _split_from_medmnist(ds, path, split)

    class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    return build_dataset(
        flag,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=class_names,
        image_size=image_size,
        source=str(path),
    )
