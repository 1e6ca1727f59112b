"""Mini-batches from a split held on the training device, augmented there: no DataLoader workers.

All randomness comes from two CPU ``torch.Generator`` objects (one for the epoch permutations,
one for augmentation), so a run is reproducible from its seed and resumes bit-exactly from
:meth:`DeviceBatches.state_dict`, on CPU or GPU alike.

A batch is a :class:`Batch`: images, labels, and the per-pixel prior maps a policy asked for.
The priors are cropped and flipped in the very same gather as their images (they ride along as
extra channels), so they stay aligned pixel for pixel; they draw no random numbers of their own,
so a run's batches are the same with or without them.

In a run of several processes every process draws the same *global* batch (the same
permutation and the same augmentation draws, for all of its rows) and keeps its own contiguous
slice of it, so the processes' slices together are exactly the batch a single process would
draw, and the saved data-order state is the global one (a run may resume on a different number
of processes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.config import Augment
from maskkit.errors import DataError

from .types import ImageSplit

__all__ = ["Augment", "Batch", "DeviceBatches", "crop_flip", "cutout", "iterate_eval", "normalize"]

#: Zero padding of the random crop, as ``RandomCrop(32, padding=4)``.
CROP_PADDING = 4

StatLike = Sequence[float] | Tensor

NO_PRIORS: Mapping[str, Tensor] = MappingProxyType({})


class Batch(NamedTuple):
    """One mini-batch.

    Attributes:
        images: ``[B, 3, H, W]`` float32, normalised.
        labels: ``[B]`` int64.
        priors: per-pixel prior maps by name, each ``[B, H, W]`` float32 in [0, 1], aligned
            with ``images`` (cropped and flipped with them); empty unless asked for.
    """

    images: Tensor
    labels: Tensor
    priors: Mapping[str, Tensor] = NO_PRIORS


def _unpack_priors(maps: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """``[B, P, H, W]`` uint8 → name → ``[B, H, W]`` float32 in [0, 1]."""
    values = maps.to(torch.float32).div_(255.0)
    return {name: values[:, index] for index, name in enumerate(names)}


def _stack_priors(split: ImageSplit, names: Sequence[str]) -> Tensor:
    """The split's maps ``names`` as ``[N, P, H, W]`` uint8 (P = len(names))."""
    missing = [name for name in names if name not in split.priors]
    if missing:
        raise ValueError(f"the split holds no prior {missing} (it has {sorted(split.priors)})")
    n, _, h, w = split.images.shape
    if not names:
        return torch.empty(n, 0, h, w, dtype=torch.uint8)
    return torch.stack([split.priors[name] for name in names], dim=1)


def _stat_tensor(values: StatLike, device: torch.device) -> Tensor:
    """``[C]`` statistics as a ``[1, C, 1, 1]`` float32 tensor on ``device``."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)


def normalize(images_uint8: Tensor, mean: StatLike, std: StatLike) -> Tensor:
    """Scale uint8 images to ``[0, 1]`` and normalise them per channel.

    The same arithmetic as ``ToTensor()`` followed by ``Normalize(mean, std)``.

    Args:
        images_uint8: ``[B, C, H, W]`` uint8.
        mean: ``C`` per-channel means in ``[0, 1]``.
        std: ``C`` per-channel standard deviations in ``[0, 1]``.

    Returns:
        ``[B, C, H, W]`` float32 on the images' device: ``(x / 255 - mean) / std``.
    """
    device = images_uint8.device
    x = images_uint8.to(torch.float32).div_(255.0)
    return x.sub_(_stat_tensor(mean, device)).div_(_stat_tensor(std, device))


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Zero-pad, crop back to the original size at per-sample offsets, then flip some samples.

    Equal to ``RandomCrop((H, W), padding=padding)`` followed by ``RandomHorizontalFlip`` with
    the given draws, done for the whole batch with one gather.

    Args:
        images: ``[B, C, H, W]`` (any dtype).
        top: ``[B]`` int64 row offsets into the padded images, in ``0..2*padding``.
        left: ``[B]`` int64 column offsets, in ``0..2*padding``.
        flip: ``[B]`` bool, ``True`` to mirror the crop horizontally.
        padding: zero padding on each side.

    Returns:
        ``[B, C, H, W]``, same dtype and device as ``images``.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top, left, flip = top.to(device), left.to(device), flip.to(device)
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
    cols_base = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flip[:, None], (w - 1) - cols_base, cols_base) + left[:, None]  # [B, W]
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indices around a slice: the result is [B, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(images: Tensor, centre_y: Tensor, centre_x: Tensor, size: int) -> Tensor:
    """Zero one ``size × size`` square per image, centred at the given pixel and clipped at the
    border (DeVries & Taylor's Cutout, as the reference's fine-tuning applies it).

    Args:
        images: ``[B, C, H, W]`` normalised images (zero is the mean colour).
        centre_y, centre_x: ``[B]`` int64 centres, in ``0..H-1`` and ``0..W-1``.
        size: the square's side in pixels.

    Returns:
        ``[B, C, H, W]``, a new tensor.
    """
    _, _, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    centre_y, centre_x = centre_y.to(device)[:, None], centre_x.to(device)[:, None]
    inside_rows = (rows >= centre_y - size // 2) & (rows < centre_y + size // 2)  # [B, H]
    inside_cols = (cols >= centre_x - size // 2) & (cols < centre_x + size // 2)  # [B, W]
    hole = inside_rows[:, :, None] & inside_cols[:, None, :]  # [B, H, W]
    return images * (~hole)[:, None].to(images.dtype)


def _derived_seed(seed: int) -> int:
    """A second seed, unrelated to ``seed``, for the augmentation generator."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)


class DeviceBatches:
    """Endless shuffled mini-batches of one split held on ``device``.

    The split's uint8 images are moved to ``device`` once. Each epoch visits the images in a
    fresh permutation; a batch that would run past the end of an epoch is completed from the
    next epoch's permutation, so every batch holds exactly ``batch_size`` images (with
    ``batch_size > N`` the data is cycled through several times per batch). Augmentation runs on
    the device on uint8, then the images are normalised on float.

    With ``world_size > 1`` the batches are the slices of process ``rank``: each call draws the
    next global batch of ``batch_size`` images, as one process would, and returns its rows
    ``[rank·b, (rank+1)·b)`` with ``b = batch_size / world_size``.

    Attributes:
        epoch: number of completed passes over the split (the current permutation's index).
        position: index into the current permutation of the next image to serve.
        batch_size: images per global batch.
        augment: ``"none"``, ``"crop_flip"`` or ``"randaugment"`` (RandAugment, then crop_flip).
        cutout: side of the square :func:`cutout` zeroes in every normalised image (0 = none).
        device: where images and batches live.
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        device: torch.device | str,
        mean: StatLike,
        std: StatLike,
        augment: Augment = "crop_flip",
        seed: int = 0,
        cutout: int = 0,
        priors: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Hold ``split`` on ``device``.

        Args:
            split: ``[N, 3, H, W]`` uint8 images and ``[N]`` int64 labels, ``N >= 1``.
            batch_size: images per batch, ``>= 1``.
            device: where to keep the images and build batches.
            mean: per-channel means in ``[0, 1]`` for normalisation.
            std: per-channel standard deviations in ``[0, 1]``.
            augment: the augmentation applied to every training batch.
            seed: seeds the permutations and the augmentation.
            cutout: side in pixels of the square zeroed in each image after normalisation.
            priors: names of the split's prior maps to serve with every batch, augmented with
                their images (``crop_flip`` or ``none``; RandAugment has no way to move them).
            rank: this process's index among those sharing each batch, ``0 <= rank < world_size``.
            world_size: the number of processes sharing each batch; ``batch_size`` must be a
                multiple of it.
        """
        if len(split) == 0:
            raise DataError("cannot draw batches from an empty split.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment not in get_args(Augment):
            raise ValueError(f"augment must be one of {get_args(Augment)}, got {augment!r}")
        if priors and augment == "randaugment":
            raise ValueError("RandAugment would move images without their priors; use crop_flip or none")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(
                f"a batch of {batch_size} cannot be split evenly across {world_size} processes (rank {rank})"
            )
        self.device = torch.device(device)
        self.images = split.images.to(self.device)  # [N, 3, H, W] uint8
        self.labels = split.labels.to(self.device)  # [N] int64
        self.prior_names = tuple(priors)
        self.prior_maps = _stack_priors(split, self.prior_names).to(self.device)  # [N, P, H, W] uint8
        self.num_items = len(split)
        self.batch_size = batch_size
        self.augment: Augment = augment
        self.cutout = cutout
        self.seed = seed
        local = batch_size // world_size
        self._rows = slice(rank * local, (rank + 1) * local)  # this process's rows of a global batch
        self._mean = _stat_tensor(mean, self.device)
        self._std = _stat_tensor(std, self.device)
        self._perm_generator = torch.Generator().manual_seed(seed)
        self._aug_generator = torch.Generator().manual_seed(_derived_seed(seed))
        self.epoch = 0
        self.position = 0
        self._perm = torch.randperm(self.num_items, generator=self._perm_generator)
        self._randaugment: Any = None
        if augment == "randaugment":
            from torchvision.transforms import v2

            self._randaugment = v2.RandAugment()

    @property
    def steps_per_epoch(self) -> int:
        """Batches per pass over the split: ``ceil(N / batch_size)``."""
        return math.ceil(self.num_items / self.batch_size)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def _next_indices(self) -> Tensor:
        """The next ``batch_size`` indices into the split, ``[B]`` int64 on CPU."""
        parts: list[Tensor] = []
        need = self.batch_size
        while need > 0:
            take = min(need, self.num_items - self.position)
            parts.append(self._perm[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
                self._perm = torch.randperm(self.num_items, generator=self._perm_generator)
        return torch.cat(parts)

    def _gather(self, indices: Tensor) -> Tensor:
        """Images ``[n, 3, H, W]`` uint8 at ``indices`` (``[n]``), with the served prior maps as
        extra channels, ``[n, 3 + P, H, W]``, so that crop and flip move them together."""
        indices = indices.to(self.device)
        images = self.images.index_select(0, indices)
        if not self.prior_names:
            return images
        return torch.cat([images, self.prior_maps.index_select(0, indices)], dim=1)

    def _augmented(self, indices: Tensor) -> Tensor:
        """This process's rows of the global batch ``indices`` (``[B]``), augmented with the
        global batch's draws; ``[b, 3 + P, H, W]`` uint8 on the device (channels past the third
        are the prior maps, cropped and flipped with their images; RandAugment is refused with
        priors)."""
        rows = self._rows
        b = indices.shape[0]
        if self._randaugment is not None:
            # RandAugment draws from the global RNG: fork it, seeded from our generator. It draws
            # image by image from one stream, so the images before this slice are augmented too,
            # to leave the stream where a single process would have it.
            rand_seed = int(torch.randint(0, 1 << 62, (), generator=self._aug_generator))
            upto = self._gather(indices[: rows.stop])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rand_seed)
                images = torch.stack([self._randaugment(img) for img in upto])[rows]
        else:
            images = self._gather(indices[rows])
        if self.augment == "none":
            return images
        span = 2 * CROP_PADDING + 1
        top = torch.randint(0, span, (b,), generator=self._aug_generator)
        left = torch.randint(0, span, (b,), generator=self._aug_generator)
        flip = torch.rand(b, generator=self._aug_generator) < 0.5
        return crop_flip(images, top[rows], left[rows], flip[rows], CROP_PADDING)

    def next(self) -> Batch:
        """The next training batch (this process's slice of it).

        Returns:
            ``Batch(images, labels, priors)``: ``[b, 3, H, W]`` float32 normalised, ``[b]`` int64
            and name → ``[b, H, W]`` float32 in [0, 1], all on ``device``, with
            ``b == batch_size / world_size``.
        """
        indices = self._next_indices()  # [B], the global batch
        rows = self._rows
        labels = self.labels.index_select(0, indices[rows].to(self.device))
        stacked = self._augmented(indices)
        images = normalize(stacked[:, :3], self._mean, self._std)
        priors = _unpack_priors(stacked[:, 3:], self.prior_names) if self.prior_names else {}
        if self.cutout:
            b, _, h, w = indices.shape[0], *images.shape[1:]
            centre_y = torch.randint(0, h, (b,), generator=self._aug_generator)
            centre_x = torch.randint(0, w, (b,), generator=self._aug_generator)
            images = cutout(images, centre_y[rows], centre_x[rows], self.cutout)
        return Batch(images, labels, priors)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the future batches exactly (CPU tensors and ints)."""
        return {
            "num_items": self.num_items,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self._perm.clone(),
            "permutation_generator": self._perm_generator.get_state(),
            "augment_generator": self._aug_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of a ``DeviceBatches`` over the same split."""
        if int(state["num_items"]) != self.num_items:
            raise ValueError(
                f"batch state was saved for a split of {state['num_items']} images, "
                f"this split has {self.num_items}"
            )
        perm = torch.as_tensor(state["permutation"], dtype=torch.int64).cpu()
        position = int(state["position"])
        if perm.shape != (self.num_items,) or not 0 <= position < self.num_items:
            raise ValueError("batch state is malformed: bad permutation or position")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._perm = perm.clone()
        self._perm_generator.set_state(state["permutation_generator"].cpu())
        self._aug_generator.set_state(state["augment_generator"].cpu())


def iterate_eval(
    split: ImageSplit,
    batch_size: int,
    device: torch.device | str,
    mean: StatLike,
    std: StatLike,
    priors: Sequence[str] = (),
) -> Iterator[Batch]:
    """All of ``split`` in order, in batches, without augmentation.

    Args:
        split: ``[N, 3, H, W]`` uint8 images and ``[N]`` int64 labels.
        batch_size: images per batch; the last batch holds the ``N % batch_size`` rest.
        device: where the batches are put.
        mean: per-channel means in ``[0, 1]``.
        std: per-channel standard deviations in ``[0, 1]``.
        priors: names of the split's prior maps to serve with the images.

    Yields:
        ``Batch(images, labels, priors)``: ``[B, 3, H, W]`` float32 normalised, ``[B]`` int64
        and name → ``[B, H, W]`` float32 in [0, 1] on ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    mean_t, std_t = _stat_tensor(mean, device), _stat_tensor(std, device)
    names = tuple(priors)
    maps = _stack_priors(split, names)
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
        batch_priors = _unpack_priors(maps[start : start + batch_size].to(device), names) if names else {}
        yield Batch(normalize(images, mean_t, std_t), labels, batch_priors)
