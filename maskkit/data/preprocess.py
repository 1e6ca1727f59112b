"""Shared preprocessing for every loader: array checks, resizing, channel statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.errors import DataError

from .types import ImageSplit, LabelledDataset

__all__ = [
    "build_dataset",
    "channel_stats",
    "check_image_size",
    "images_from_array",
    "resize_square",
]

# Images resized per chunk, to bound the float32 working memory (~2048 x 3 x S x S x 4 bytes).
_RESIZE_CHUNK = 2048


def check_image_size(image_size: int) -> int:
    """Validate the requested square side length; returns it as an ``int``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    return image_size


def images_from_array(array: np.ndarray, where: str) -> Tensor:
    """Convert channel-last uint8 pixels to a channel-first, three-channel tensor.

    Args:
        array: ``[N, H, W]`` (grayscale), ``[N, H, W, 1]`` or ``[N, H, W, 3]`` uint8.
        where: how to name the source in an error message (a file path and array key).

    Returns:
        ``[N, 3, H, W]`` uint8, contiguous; grayscale is repeated to three channels.
    """
    if array.dtype != np.uint8:
        raise DataError(f"{where} holds images of dtype {array.dtype}; expected uint8.")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or min(array.shape[1:3], default=0) < 1:
        raise DataError(
            f"{where} holds images of shape {tuple(array.shape)}; expected [N, H, W] or [N, H, W, 3]."
        )
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def resize_square(images: Tensor, size: int) -> Tensor:
    """Resize images to ``size x size`` with antialiased bicubic interpolation.

    Interpolation runs on float32, then the result is rounded and clamped back to uint8. Images
    that already have the requested size are returned unchanged (the same tensor).

    Args:
        images: ``[N, C, H, W]`` uint8.
        size: the target side length ``S``.

    Returns:
        ``[N, C, S, S]`` uint8.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty((n, c, size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(
    images: Tensor,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) standard deviation of uint8 images scaled to ``[0, 1]``.

    Args:
        images: ``[N, 3, H, W]`` uint8, ``N >= 1``.

    Returns:
        ``(mean, std)``, each a tuple of three floats.
    """
    n, c = images.shape[:2]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float64).div_(255.0)
        total += chunk.sum(dim=(0, 2, 3)).cpu()
        total_sq += chunk.square().sum(dim=(0, 2, 3)).cpu()
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_(min=0.0)
    std = var.sqrt().clamp_(min=1e-6)
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def build_dataset(
    name: str,
    *,
    train: ImageSplit,
    val: ImageSplit | None,
    test: ImageSplit,
    class_names: list[str],
    image_size: int,
    source: str,
) -> LabelledDataset:
    """Resize every split to ``image_size`` and compute the train statistics.

    Args:
        name: the registry name of the dataset.
        train, val, test: splits at their native size, ``[N, 3, H, W]`` uint8.
        class_names: one name per class index.
        image_size: the target side length ``S``.
        source: the file or folder it came from, for error messages.

    Returns:
        A :class:`LabelledDataset` whose splits are ``[N, 3, S, S]`` uint8.
    """
    if val is not None and len(val) == 0:
        val = None  # an empty validation split is the same as none
    for split_name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise DataError(f"the {split_name} split of {source} holds no images.")
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        if split is None or len(split) == 0:
            continue
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= len(class_names):
            raise DataError(
                f"the {split_name} split of {source} has labels in {low}..{high}, but the dataset "
                f"has {len(class_names)} classes (labels 0..{len(class_names) - 1}); "
                "the file is damaged or from another dataset: replace it."
            )

    def resized(split: ImageSplit) -> ImageSplit:
        return ImageSplit(resize_square(split.images, image_size), split.labels)

    train, test = resized(train), resized(test)
    val = resized(val) if val is not None else None
    mean, std = channel_stats(train.images)
    return LabelledDataset(
        name=name,
        train=train,
        val=val,
        test=test,
        class_names=list(class_names),
        mean=mean,
        std=std,
    )
