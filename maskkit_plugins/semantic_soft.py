"""``semantic-soft`` and ``semantic-soft-fixed``: soft semantic guidance of the mask.

The prior's per-patch importance ``h ∈ [0, 1]`` lowers each patch's mask logit by ``β·h``, and
logistic noise of scale ``τ`` (option ``noise``) makes the ranking stochastic, so important
patches are masked less often but not never:

    scores_bj = s_bj − β·h_bj + τ·g_bj,   g_bj ~ Logistic(0, 1),   mask the top r·L scores.

``semantic-soft`` (learnable, level 3 of MLO): ``s`` is the ``mlo-light`` scorer of the patch
tokens, bounded as every :class:`~maskkit.masking.LearnedMasking`'s logits are, and ``−β·h`` its
:meth:`~maskkit.masking.LearnedMasking.logit_bias`, added after the bound so that β keeps its
scale; σ of the sum is the mask probability (the weights), and in training the mask is sampled
from it (``pretrain.learned_mask``), which takes the place of the logistic noise; with
``selection: top-k`` the noise τ·g is added to the ranking as before. The hypergradient reaches
the scorer *and* β through the weights. β is learned (``learn_beta``, the default) or fixed.

``semantic-soft-fixed`` (single level): ``s = 0``, no weights. With β = 0 and τ = 1 it is MAE's
uniform random masking (σ of a logistic variable is uniform); β > 0 biases it away from the
prior's important patches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.masking import LearnedMasking, PerPatchScorer, logistic_noise, mask_probability
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores
from maskkit.priors.provider import IMPORTANCE


def _check(beta: float, noise: float) -> None:
    if not noise >= 0:
        raise ValueError(f"noise must be at least 0, got {noise!r}")
    if not isinstance(beta, int | float):
        raise ValueError(f"beta must be a number, got {beta!r}")


class SemanticSoftMasking(LearnedMasking):
    """Learned mask logits biased by the prior, ``σ(s − β·h)``; β learned at level 3 or fixed."""

    name = "semantic-soft"
    description = "Learned mask (mlo-light) biased by the prior: σ(s − β·h) + noise; β learned or fixed."
    learnable = True
    requires = frozenset({IMPORTANCE})

    def __init__(
        self,
        context: PolicyContext,
        beta: float = 2.0,
        learn_beta: bool = True,
        noise: float = 1.0,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__(context)
        _check(beta, noise)
        self.scorer = PerPatchScorer.for_context(context, hidden_dim)
        self.noise = float(noise)
        initial = torch.tensor(float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(tokens)

    def logit_bias(self, batch: MaskBatch) -> Tensor:
        return -self.beta * batch.priors[IMPORTANCE]  # [B, L], after the scorer's bound

    def forward(self, batch: MaskBatch) -> MaskDecision:
        settings = self.context.learned_mask
        if not self.training or settings.selection == "sample" or not self.noise or self.in_random_warmup():
            return super().forward(batch)
        # Deterministic selection (top-k): the logistic noise keeps important patches masked now and then.
        logits = self.logits(batch)
        scores = logits.detach() + self.noise * logistic_noise(logits)
        return decision_from_scores(scores, batch.mask_ratio, weights=mask_probability(logits))

    def statistics(self) -> dict[str, float]:
        return {**super().statistics(), "beta": float(self.beta.detach())}


class SemanticSoftFixedMasking(MaskPolicy):
    """Random masking biased away from the prior: scores ``τ·g − β·h``; nothing is learned."""

    name = "semantic-soft-fixed"
    description = "Random mask biased by the prior, τ·noise − β·h (semantic-soft without MLO)."
    learnable = False
    requires = frozenset({IMPORTANCE})

    def __init__(self, context: PolicyContext, beta: float = 2.0, noise: float = 1.0) -> None:
        super().__init__(context)
        _check(beta, noise)
        self.beta, self.noise = float(beta), float(noise)

    def forward(self, batch: MaskBatch) -> MaskDecision:
        importance = batch.priors[IMPORTANCE]  # [B, L]
        scores = -self.beta * importance.float()
        if self.noise:
            scores = scores + self.noise * logistic_noise(scores)
        return decision_from_scores(scores, batch.mask_ratio)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [SemanticSoftMasking, SemanticSoftFixedMasking]
