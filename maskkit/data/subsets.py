"""Fixed subsets of a split that keep its small classes."""

from __future__ import annotations

import torch

from .types import ImageSplit


def class_capped_subset(split: ImageSplit, size: int, seed: int) -> ImageSplit:
    """A fixed subset of at most ``size`` images of ``split``: every class keeps its images up to
    one common cap (the largest that fits ``size``; a class with fewer keeps all of its own),
    drawn at random by ``seed``, in the split's order. The whole split when it has ``size`` or
    fewer images."""
    if len(split) <= size:
        return split
    labels = split.labels.cpu()
    counts = sorted(int(n) for n in torch.bincount(labels) if n)
    cap, left, classes = 0, size, len(counts)
    for count in counts:  # water-filling: the small classes whole, the rest share what is left
        if count * classes <= left:
            cap, left, classes = count, left - count, classes - 1
        else:
            cap = left // classes
            break
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:cap]])
    return split.subset(torch.cat(keep).sort().values)
