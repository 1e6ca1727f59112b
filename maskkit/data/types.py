"""Plain containers for labelled image data: one split, and a whole dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ImageSplit", "LabelledDataset", "limit_dataset"]


@dataclass
class ImageSplit:
    """One split of a labelled image dataset, held in memory.

    Attributes:
        images: ``[N, C, H, W]`` uint8 pixels in ``0..255``; always ``C == 3``
            (grayscale sources are repeated to three channels by the loaders).
        labels: ``[N]`` int64 class indices in ``0..num_classes-1``.
        priors: per-pixel prior maps by name, each ``[N, H, W]`` uint8 (``round(255 · value)``),
            row for row with ``images`` (empty unless a policy needs them; see
            :mod:`maskkit.priors`). Subsets and slices keep them aligned.
    """

    images: Tensor
    labels: Tensor
    priors: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageSplit.images must be [N, 3, H, W], got shape {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"ImageSplit.images must be uint8, got {self.images.dtype}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(
                "ImageSplit.labels must be a 1-D int64 tensor, got "
                f"shape {tuple(self.labels.shape)} and dtype {self.labels.dtype}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageSplit has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        expected = (self.images.shape[0], *self.images.shape[2:])
        for name, values in self.priors.items():
            if tuple(values.shape) != expected or values.dtype != torch.uint8:
                raise ValueError(
                    f"ImageSplit prior '{name}' must be uint8 of shape {list(expected)}, "
                    f"got {values.dtype} {list(values.shape)}"
                )

    def __len__(self) -> int:
        """Number of images ``N``."""
        return int(self.images.shape[0])

    def subset(self, indices: Tensor) -> ImageSplit:
        """The images and labels at ``indices``.

        Args:
            indices: ``[K]`` int64 indices (or a ``[N]`` bool mask) into this split.

        Returns:
            A new split with ``images`` ``[K, 3, H, W]`` and ``labels`` ``[K]``, in the order of
            ``indices``. The tensors are copies, not views.
        """
        indices = torch.as_tensor(indices, device=self.images.device)
        priors = {name: values[indices] for name, values in self.priors.items()}
        return ImageSplit(images=self.images[indices], labels=self.labels[indices], priors=priors)

    def __getitem__(self, rows: slice) -> ImageSplit:
        """The rows ``rows`` (a slice) of images, labels and priors, as views (no copy)."""
        if not isinstance(rows, slice):
            raise TypeError("an ImageSplit is sliced with a slice; use subset() for indices")
        priors = {name: values[rows] for name, values in self.priors.items()}
        return ImageSplit(images=self.images[rows], labels=self.labels[rows], priors=priors)


@dataclass
class LabelledDataset:
    """A labelled image dataset as loaded from disk, resized to one square size.

    Attributes:
        name: the registry name it was loaded under, e.g. ``"dermamnist"``.
        train: the training split, ``[N_train, 3, S, S]``.
        val: the dataset's own validation split if it has one (MedMNIST does, CIFAR does not).
        test: the test split.
        class_names: one human-readable name per class index.
        mean: per-channel mean of the train images scaled to ``[0, 1]``.
        std: per-channel standard deviation of the train images scaled to ``[0, 1]``.
    """

    name: str
    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        """Side length ``S`` of the (square) images."""
        return int(self.train.images.shape[-1])


def limit_dataset(dataset: LabelledDataset, count: int) -> LabelledDataset:
    """Keep the first ``count`` images of each split (``data.subset``, for quick runs)."""

    def first(split: ImageSplit | None) -> ImageSplit | None:
        return None if split is None else split.subset(torch.arange(min(count, len(split))))

    return dataclasses.replace(
        dataset, train=first(dataset.train), val=first(dataset.val), test=first(dataset.test)
    )
