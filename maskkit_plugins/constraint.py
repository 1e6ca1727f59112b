"""``constraint`` and ``constraint-fixed``: structured guidance by a constraint on critical patches.

A patch is *critical* when the prior's pooled importance reaches ``critical_threshold``.

``constraint`` (learnable, level 3 of MLO): the ``mlo-light`` learned mask, unchanged, plus a
penalty on the level-3 objective (``MaskPolicy.regularizer``):

    R(T) = λ · Σ_bj p_bj c_bj / max(1, Σ_bj c_bj),   p = σ(s(tokens)) the mask probability,

the mean mask probability of the critical patches, weight λ (option ``penalty``). The mask level
then minimises L_val(C*(E*(T))) + R(T): the hypergradient and R's direct gradient both reach T.
With λ = 0 it is exactly ``mlo-light``.

``constraint-fixed`` (single level): without a level 3 there is nothing to trade λ against, so
the constraint is applied hard to random masking: the critical patches are masked only when the
other patches are too few to reach the ratio, each group in random order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskkit.hookspecs import hookimpl
from maskkit.masking import LearnedMasking, PerPatchScorer
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores
from maskkit.priors.provider import IMPORTANCE


def _check_threshold(critical_threshold: float) -> None:
    if not 0 < critical_threshold <= 1:
        raise ValueError(f"critical_threshold must be in (0, 1], got {critical_threshold!r}")


def critical_patches(batch: MaskBatch, threshold: float) -> Tensor:
    """``[B, L]`` 1 where the pooled importance reaches ``threshold``."""
    return (batch.priors[IMPORTANCE] >= threshold).float()


class ConstraintMasking(LearnedMasking):
    """The learned mlo-light mask plus a level-3 penalty λ on masking critical patches."""

    name = "constraint"
    description = "Learned mask (mlo-light) + level-3 penalty λ on masking the prior's critical patches."
    learnable = True
    requires = frozenset({IMPORTANCE})

    def __init__(
        self,
        context: PolicyContext,
        penalty: float = 1.0,
        critical_threshold: float = 0.5,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__(context)
        self.scorer = PerPatchScorer.for_context(context, hidden_dim)
        if not penalty >= 0:
            raise ValueError(f"penalty (λ) must be at least 0, got {penalty!r}")
        _check_threshold(critical_threshold)
        self.penalty, self.critical_threshold = float(penalty), float(critical_threshold)

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(tokens)

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
        """R(T) above, plus the run's diversity term when it is on (``LearnedMasking``)."""
        terms = [self.diversity_penalty(batch)]
        if self.penalty != 0 and decision.weights is not None:
            critical = critical_patches(batch, self.critical_threshold)
            terms.append(self.penalty * (decision.weights * critical).sum() / critical.sum().clamp_min(1))
        present = [term for term in terms if term is not None]
        return sum(present[1:], present[0]) if present else None


class ConstraintFixedMasking(MaskPolicy):
    """Random masking that masks critical patches only when it must; nothing is learned."""

    name = "constraint-fixed"
    description = "Random mask that spares the prior's critical patches where it can (constraint w/o MLO)."
    learnable = False
    requires = frozenset({IMPORTANCE})

    def __init__(self, context: PolicyContext, critical_threshold: float = 0.5) -> None:
        super().__init__(context)
        _check_threshold(critical_threshold)
        self.critical_threshold = float(critical_threshold)

    def forward(self, batch: MaskBatch) -> MaskDecision:
        critical = critical_patches(batch, self.critical_threshold)
        noise = torch.rand(critical.shape, device=critical.device)  # [B, L] in [0, 1)
        return decision_from_scores(noise - 2.0 * critical, batch.mask_ratio)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [ConstraintMasking, ConstraintFixedMasking]
