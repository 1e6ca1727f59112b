"""Running a prior provider over a whole split, chunk by chunk, into the store's format."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from maskkit.priors.provider import PriorProvider, check_maps

#: Images handed to a provider at once (bounds memory; SAM works image by image anyway).
CHUNK = 256


def quantize(values: np.ndarray) -> Tensor:
    """``[N, H, W]`` floats in [0, 1] → uint8 ``round(255 · value)``."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 255.0)
    return torch.from_numpy(np.clip(scaled, 0, 255).astype(np.uint8))


def compute_priors(
    provider: PriorProvider, images: Tensor, advance: Callable[[int], None] | None = None
) -> dict[str, Tensor]:
    """Every map ``provider`` gives for ``images``.

    Args:
        provider: the provider.
        images: ``[N, 3, H, W]`` uint8, as an :class:`~maskkit.data.ImageSplit` holds them.
        advance: called with the number of images done after each chunk (a progress bar).

    Returns:
        name → ``[N, H, W]`` uint8 (``round(255 · value)``), one entry per name in ``provides``.
    """
    count, _, height, width = images.shape
    empty = torch.empty(0, height, width, dtype=torch.uint8)
    chunks: dict[str, list[Tensor]] = {name: [empty] for name in sorted(provider.provides)}
    for start in range(0, count, CHUNK):
        batch = images[start : start + CHUNK].permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [n, H, W, 3]
        maps = provider.compute(batch)
        check_maps(maps, provider, len(batch), height, width)
        for name in chunks:
            chunks[name].append(quantize(maps[name]))
        if advance is not None:
            advance(len(batch))
    return {name: torch.cat(parts) for name, parts in chunks.items()}
