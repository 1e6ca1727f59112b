"""``random``: MAE's uniform random masking (He et al., 2022), the baseline."""

from __future__ import annotations

import torch

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, decision_from_scores


class RandomMasking(MaskPolicy):
    """Mask a uniformly random ``r`` fraction of patches per image; no loss weights."""

    name = "random"
    description = "MAE baseline: uniform random masking (He et al., 2022)."
    learnable = False

    def forward(self, batch: MaskBatch) -> MaskDecision:
        noise = torch.rand(batch.tokens.shape[:2], device=batch.tokens.device)  # [B, L]
        return decision_from_scores(noise, batch.mask_ratio)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [RandomMasking]
