"""From per-pixel prior maps to the patch grid a policy sees.

Priors are stored per pixel, travel with their images through the device-side crop and flip
(:class:`maskkit.data.DeviceBatches` augments images and priors in one gather), and are pooled
here, last, to one value per patch in the MAE's row-major patch order
(:meth:`MaskedAutoencoderViT.patchify`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor


def pool_to_patches(pixel_map: Tensor, patch_size: int) -> Tensor:
    """The mean of each ``p × p`` patch, row-major.

    Args:
        pixel_map: ``[B, H, W]`` per-pixel values.
        patch_size: p, with ``H`` and ``W`` multiples of it.

    Returns:
        ``[B, L]`` with ``L = (H / p) · (W / p)``; patch ``i · (W / p) + j`` covers rows
        ``i·p … i·p + p − 1`` and columns ``j·p … j·p + p − 1``.
    """
    pooled = F.avg_pool2d(pixel_map.unsqueeze(1).float(), patch_size)  # [B, 1, H/p, W/p]
    return pooled.flatten(1)


def patch_priors(pixel_priors: Mapping[str, Tensor], patch_size: int) -> dict[str, Tensor]:
    """Every map of ``pixel_priors`` (name → ``[B, H, W]``) pooled to ``[B, L]``."""
    return {name: pool_to_patches(values, patch_size) for name, values in pixel_priors.items()}
