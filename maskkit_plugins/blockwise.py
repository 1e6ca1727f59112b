"""``blockwise``: BEiT's block-wise masking (Bao et al., "BEiT: BERT Pre-Training of Image
Transformers", ICLR 2022; ``MaskingGenerator`` in ``microsoft/unilm/beit``).

Rectangles of patches are placed one after another until the image's quota of masked patches
is reached. Each block draws its area uniformly between the minimum block size and what is
left of the quota, and its aspect ratio log-uniformly from ``[min_aspect, max_aspect]``; its
side lengths are ``round(sqrt(area · aspect))`` by ``round(sqrt(area / aspect))``, both
strictly smaller than the grid, at a uniformly random position. A block is accepted when it
adds at least one new patch and no more than the quota left; each block gets 10 attempts, and
when none succeeds the placement stops. BEiT's generator may stop short of its quota there; the
contract wants exactly ``L − int(L·(1−r))`` masked patches per image, so the rest is topped up
with random patches (and, should the blocks ever exceed the quota, trimmed at random).

BEiT masks 75 of 196 patches (14×14 at 224 px, patch 16) with blocks of at least 16 patches.
maskkit's grids are smaller (4×4 at the ``smoke`` preset, 8×8 at ``cpu``, 16×16 at ``paper``),
so the default minimum block keeps BEiT's *share of the image*, 16/196: 1 patch at 4×4, 5 at
8×8, 16 at 14×14, 21 at 16×16 (:func:`default_min_block_patches`).

The placement runs for the whole batch at once: each round proposes 10 blocks per image
(``[B, 10]`` tensors, their new patches counted on an integral image of the mask) and keeps,
per image, the first that is acceptable, so a batch costs as many rounds as its longest image
has blocks, not a Python loop per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

BEIT_NUM_PATCHES = 196  # 14 × 14
BEIT_MIN_BLOCK_PATCHES = 16
BEIT_MIN_ASPECT = 0.3
ATTEMPTS_PER_BLOCK = 10


def default_min_block_patches(num_patches: int) -> int:
    """BEiT's minimum block (16 of 196 patches) scaled to the same share of ``num_patches``."""
    return max(1, round(BEIT_MIN_BLOCK_PATCHES * num_patches / BEIT_NUM_PATCHES))


@dataclass
class BlockSample:
    """The blocks placed for a batch.

    Attributes:
        mask: ``[B, g, g]`` bool, True on every patch of some block (their union).
        blocks: ``[B, R, 4]`` int64 ``(top, left, height, width)`` of the block placed in each
            of the R rounds; all zero where an image placed none in that round.
    """

    mask: Tensor
    blocks: Tensor


def sample_blocks(
    batch_size: int,
    grid_size: int,
    num_masked: int,
    min_block_patches: int,
    max_block_patches: int,
    aspect_range: tuple[float, float],
    device: torch.device | str = "cpu",
) -> BlockSample:
    """BEiT's block placement for ``batch_size`` images of ``grid_size``² patches at once.

    Args:
        batch_size: B.
        grid_size: g, patches per side.
        num_masked: the quota of masked patches per image.
        min_block_patches: the smallest block area drawn.
        max_block_patches: the largest block area drawn (capped by the quota left).
        aspect_range: ``(min_aspect, max_aspect)``, height / width, drawn log-uniformly.
        device: where to draw.

    Returns:
        The union of the blocks (never more than ``num_masked`` patches per image) and the
        blocks themselves.
    """
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    images = torch.arange(batch_size, device=device)
    mask = torch.zeros(batch_size, grid_size, grid_size, dtype=torch.bool, device=device)
    count = torch.zeros(batch_size, dtype=torch.int64, device=device)
    active = torch.full((batch_size,), num_masked > 0, dtype=torch.bool, device=device)
    rounds: list[Tensor] = []
    while bool(active.any()):
        limit = (num_masked - count).clamp(max=max_block_patches)  # [B], quota left for this block
        draws = torch.rand(batch_size, ATTEMPTS_PER_BLOCK, 4, device=device)  # [B, A, 4]
        area = min_block_patches + (limit[:, None] - min_block_patches) * draws[..., 0]  # [B, A]
        aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])
        height = torch.round(torch.sqrt(area * aspect)).long()
        width = torch.round(torch.sqrt(area / aspect)).long()
        fits = (height < grid_size) & (width < grid_size)
        top = (draws[..., 2] * (grid_size - height + 1).clamp(min=1)).long()  # uniform in [0, g − h]
        left = (draws[..., 3] * (grid_size - width + 1).clamp(min=1)).long()
        new = _free_patches(mask, top, left, height, width)  # [B, A], patches each proposal adds
        acceptable = fits & (new > 0) & (new <= limit[:, None]) & active[:, None]
        placed = acceptable.any(dim=1)  # [B]
        first = acceptable.long().argmax(dim=1)  # [B], the first acceptable attempt
        block = torch.stack([top, left, height, width], dim=-1)[images, first] * placed[:, None]  # [B, 4]
        mask |= rectangles(block, grid_size)
        count += new[images, first] * placed
        rounds.append(block)
        active = placed & (count < num_masked)
    blocks = torch.stack(rounds, dim=1) if rounds else torch.zeros(batch_size, 0, 4, dtype=torch.int64)
    return BlockSample(mask=mask, blocks=blocks.to(device))


def rectangles(blocks: Tensor, grid_size: int) -> Tensor:
    """``[..., 4]`` int64 ``(top, left, height, width)`` → ``[..., g, g]`` bool, True inside."""
    rows = torch.arange(grid_size, device=blocks.device).view(grid_size, 1)
    cols = torch.arange(grid_size, device=blocks.device).view(1, grid_size)
    top, left, height, width = (blocks[..., i, None, None] for i in range(4))
    return (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)


def _free_patches(mask: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Unmasked patches inside each proposed rectangle, from an integral image of ``mask``.

    Args:
        mask: ``[B, g, g]`` bool, the patches masked so far.
        top, left, height, width: ``[B, A]`` int64 rectangles (clipped to the grid here).

    Returns:
        ``[B, A]`` int64 counts.
    """
    grid_size = mask.shape[1]
    free = (~mask).long().cumsum(dim=1).cumsum(dim=2)
    integral = F.pad(free, (1, 0, 1, 0)).flatten(1)  # [B, (g+1)²], sums of free[:r, :c]
    bottom = (top + height).clamp(max=grid_size)
    right = (left + width).clamp(max=grid_size)

    def corner(row: Tensor, col: Tensor) -> Tensor:
        return integral.gather(1, row * (grid_size + 1) + col)

    return corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(top, left)


class BlockwiseMasking(MaskPolicy):
    """BEiT's block-wise masking, topped up (or trimmed) with random patches to the exact count.

    Options (``policy_options``, e.g. ``--set policy_options.min_block_patches=4``):
        min_block_patches: smallest block area in patches (>= 1); default BEiT's 16 of 196
            scaled to the grid (:func:`default_min_block_patches`).
        max_block_patches: largest block area (>= min_block_patches); default the whole quota.
        min_aspect: smallest height/width ratio, > 0 (BEiT: 0.3).
        max_aspect: largest ratio, >= min_aspect; default ``1 / min_aspect``.
    """

    name = "blockwise"
    description = "BEiT block-wise masking: random rectangles of patches, topped up to the exact ratio."
    learnable = False

    def __init__(
        self,
        context: PolicyContext,
        min_block_patches: int | None = None,
        max_block_patches: int | None = None,
        min_aspect: float = BEIT_MIN_ASPECT,
        max_aspect: float | None = None,
    ) -> None:
        super().__init__(context)
        if min_block_patches is None:
            min_block_patches = default_min_block_patches(context.num_patches)
        if isinstance(min_block_patches, bool) or not isinstance(min_block_patches, int):
            raise ValueError(f"min_block_patches must be an integer, got {min_block_patches!r}")
        if not 1 <= min_block_patches <= context.num_patches:
            raise ValueError(
                f"min_block_patches must be in [1, {context.num_patches}] (the patches per image), "
                f"got {min_block_patches}"
            )
        if max_block_patches is not None and (
            isinstance(max_block_patches, bool)
            or not isinstance(max_block_patches, int)
            or max_block_patches < min_block_patches
        ):
            raise ValueError(
                f"max_block_patches must be an integer >= min_block_patches ({min_block_patches}), "
                f"got {max_block_patches!r}"
            )
        if not isinstance(min_aspect, int | float) or not min_aspect > 0:
            raise ValueError(f"min_aspect must be a number > 0, got {min_aspect!r}")
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if not isinstance(max_aspect, int | float) or max_aspect < min_aspect:
            raise ValueError(f"max_aspect must be a number >= min_aspect ({min_aspect}), got {max_aspect!r}")
        self.min_block_patches = min_block_patches
        self.max_block_patches = max_block_patches
        self.aspect_range = (float(min_aspect), float(max_aspect))

    def blocks(self, batch_size: int, num_masked: int, device: torch.device) -> BlockSample:
        """The blocks for ``batch_size`` images whose quota is ``num_masked`` patches each."""
        largest = num_masked if self.max_block_patches is None else self.max_block_patches
        return sample_blocks(
            batch_size,
            self.context.grid_size,
            num_masked,
            self.min_block_patches,
            largest,
            self.aspect_range,
            device,
        )

    def forward(self, batch: MaskBatch) -> MaskDecision:
        batch_size, num_patches = batch.tokens.shape[:2]
        if num_patches != self.context.grid_size**2:
            raise ValueError(f"expected {self.context.grid_size**2} patches, got {num_patches}")
        device = batch.tokens.device
        in_block = self.blocks(batch_size, num_patches - batch.num_keep, device).mask.flatten(1)  # [B, L]
        # Block patches first; random ones fill the rest of the quota (or trim an excess).
        scores = in_block.float() + 0.5 * torch.rand(batch_size, num_patches, device=device)  # [B, L]
        return decision_from_scores(scores, batch.mask_ratio)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [BlockwiseMasking]
