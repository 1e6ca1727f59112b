"""``mlo`` and ``mlo-light``: masks learned by downstream feedback (MLO-MAE, Guo et al., 2024).

Both return a sigmoid mask probability per patch. The patches with the lowest probability are
kept, and the probabilities are the policy's loss weights: how they enter the pretrain loss, and
so how the hypergradient reaches the policy, is the run's ``pretrain.weighting``
(``maskkit/weighting.py``; equation 1 of the paper is ``reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores


def mask_probability(logits: Tensor) -> Tensor:
    """``[B, L]`` logits → ``[B, L]`` mask probabilities σ(logits), in fp32 or wider.

    Under bf16 autocast (on CUDA) the scorer's logits are bf16, and σ in bf16 rounds to exactly 1
    from a logit of about 6.2 on: σ's derivative, computed from its output as σ(1 − σ), is then
    exactly 0 and the hypergradient of every confident patch is cut. In fp32 that takes a logit
    of about 17. fp64 logits (the hypergradient tests) stay fp64.
    """
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).sigmoid()


class LearnedMasking(MaskPolicy):
    """Shared logic: a scorer gives logits ``[B, L]``; sigmoid gives the mask probability."""

    learnable = True

    def mask_logits(self, tokens: Tensor) -> Tensor:
        """``[B, L, D]`` patch tokens → ``[B, L]`` logits."""
        raise NotImplementedError

    def forward(self, batch: MaskBatch) -> MaskDecision:
        mask_prob = mask_probability(self.mask_logits(batch.tokens))  # [B, L]
        return decision_from_scores(mask_prob, batch.mask_ratio, weights=mask_prob)


class MLOMasking(LearnedMasking):
    """The reference masking network: an MLP over the *flattened* patch tokens.

    ``[B, L·D] → Linear(L·D, hidden) → ReLU → Linear(hidden, L)``. At ViT-B/2 (L=256, D=768)
    the first layer alone has ~100 M weights.
    """

    name = "mlo"
    description = "MLO-MAE reference masking network: MLP over flattened patch tokens (L·D → 512 → L)."

    def __init__(self, context: PolicyContext, hidden_dim: int = 512) -> None:
        super().__init__(context)
        self.scorer = nn.Sequential(
            nn.Linear(context.num_patches * context.embed_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, context.num_patches),
        )

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(tokens.flatten(1))


class MLOLightMasking(LearnedMasking):
    """A per-patch scorer shared across positions: ``[B, L, D] → LayerNorm → MLP(D → h → 1)``.

    The tokens carry position embeddings, so the scorer can still learn where to mask. It has
    about ``D·h`` parameters instead of the reference's ``L·D·512``.
    """

    name = "mlo-light"
    description = "Learned MLO mask with a small per-patch scorer (D → 64 → 1), far fewer parameters."

    def __init__(self, context: PolicyContext, hidden_dim: int = 64) -> None:
        super().__init__(context)
        self.scorer = nn.Sequential(
            nn.LayerNorm(context.embed_dim),
            nn.Linear(context.embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(tokens).squeeze(-1)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [MLOMasking, MLOLightMasking]
