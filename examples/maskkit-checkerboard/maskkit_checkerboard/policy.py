"""``checkerboard``: mask the patches of a randomly shifted checkerboard.

A fixed (non-learnable) policy. Each image gets its own checkerboard of ``cell_size`` x
``cell_size``-patch squares, shifted at random; the "dark" squares are masked first. Because
the ratio rarely matches the board exactly, the rest is settled at random: at r = 0.75 every
dark square plus a random third of the light ones is masked, at r = 0.25 a random half of the
dark ones. The decision is built with :func:`maskkit.policy.decision_from_scores`, as every
policy's should be.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores


class CheckerboardMasking(MaskPolicy):
    """Checkerboard masking, topped up or trimmed with random patches to hit the ratio exactly.

    Options (``policy_options`` in the config, e.g. ``--set policy_options.cell_size=2``):
        cell_size: side of a checkerboard square, in patches (>= 1).
        jitter: scale of the random noise added to the pattern, in (0, 1]. Below 1 the pattern
            always wins and the noise only breaks ties; it picks which patches fill the rest.
    """

    name = "checkerboard"
    description = "Example plugin: a randomly shifted checkerboard, topped up with random patches."
    learnable = False

    def __init__(self, context: PolicyContext, cell_size: int = 1, jitter: float = 0.5) -> None:
        super().__init__(context)
        # Options arrive as YAML parsed them: `--set policy_options.jitter=5e-1` is the string
        # "5e-1" (YAML 1.1 wants 5.0e-1), so convert before checking.
        jitter = float(jitter)
        if not isinstance(cell_size, int) or cell_size < 1:
            raise ValueError(f"cell_size must be a positive integer, got {cell_size!r}")
        if not 0 < jitter <= 1:
            raise ValueError(f"jitter must be in (0, 1], got {jitter!r}")
        self.cell_size = cell_size
        self.jitter = jitter

    def pattern(self, batch_size: int, device: torch.device) -> Tensor:
        """One shifted checkerboard per image, flattened row-major like the patches.

        Returns:
            ``[B, L]`` float, 1 on the squares to mask first, 0 elsewhere.
        """
        grid, cell = self.context.grid_size, self.cell_size
        rows = torch.arange(grid, device=device).view(1, grid, 1)  # [1, g, 1]
        cols = torch.arange(grid, device=device).view(1, 1, grid)  # [1, 1, g]
        shift = torch.randint(0, 2 * cell, (2, batch_size, 1, 1), device=device)  # [2, B, 1, 1]
        board = ((rows + shift[0]) // cell + (cols + shift[1]) // cell) % 2  # [B, g, g]
        return board.flatten(1).float()  # [B, L]

    def forward(self, batch: MaskBatch) -> MaskDecision:
        tokens = batch.tokens  # [B, L, D]
        batch_size, num_patches = tokens.shape[:2]
        if num_patches != self.context.grid_size**2:
            raise ValueError(f"expected {self.context.grid_size**2} patches, got {num_patches}")
        noise = torch.rand(batch_size, num_patches, device=tokens.device) * self.jitter  # [B, L]
        scores = self.pattern(batch_size, tokens.device) + noise  # [B, L], higher = masked first
        return decision_from_scores(scores, batch.mask_ratio)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    """The hook maskkit calls: the policy classes this plugin provides."""
    return [CheckerboardMasking]
