"""``patch-scorer``: a learned mask, about the smallest one that works.

A learnable (level-3) policy. Each patch token gets a linear score, plus a learned bias for its
position on the grid; the sigmoid of the sum is the patch's mask probability. The probability
plays two parts: the most probable ``r·L`` patches are masked, and it is the patch's weight in
the reconstruction loss, which is the only way the MLO hypergradient reaches the policy's
parameters. A regulariser keeps the mean probability near the mask ratio, so the sigmoid does
not saturate (a saturated sigmoid passes almost no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores


class PatchScorerMasking(MaskPolicy):
    """A linear score per patch token plus a per-position bias, trained by the MLO loop.

    Options (``policy_options`` in the config, e.g. ``--set policy_options.balance=0.5``):
        balance: weight of the regulariser ``(mean mask probability - r)²`` in the level-3
            objective (>= 0; 0 turns it off).
        temperature: divides the logits before the sigmoid (> 0); above 1 keeps the
            probabilities away from 0 and 1 for longer.
    """

    name = "patch-scorer"
    description = "Example plugin: a learned linear score per patch plus a position bias, regularised."
    learnable = True

    def __init__(self, context: PolicyContext, balance: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__(context)
        # Options arrive as YAML parsed them: `--set policy_options.balance=1e-1` gives the
        # string "1e-1" (YAML 1.1 wants a dot: 1.0e-1), so convert before checking.
        balance, temperature = float(balance), float(temperature)
        if balance < 0:
            raise ValueError(f"balance must be >= 0, got {balance}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.balance = balance
        self.temperature = temperature
        self.score = nn.Linear(context.embed_dim, 1)  # shared by all patches: D + 1 parameters
        # One bias per patch position, in the patches' row-major order over the grid.
        self.position_bias = nn.Parameter(torch.zeros(context.num_patches))  # [L]

    def mask_probability(self, tokens: Tensor) -> Tensor:
        """``[B, L, D]`` patch tokens → ``[B, L]`` mask probabilities in (0, 1)."""
        logits = self.score(tokens).squeeze(-1) + self.position_bias  # [B, L]
        return torch.sigmoid(logits / self.temperature)

    def forward(self, batch: MaskBatch) -> MaskDecision:
        prob = self.mask_probability(batch.tokens)  # [B, L]
        # The probability is both the score (top r·L masked) and the differentiable loss weight.
        return decision_from_scores(prob, batch.mask_ratio, weights=prob)

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> Tensor:
        """``balance · (mean mask probability − r)²``: a scalar added to the level-3 objective."""
        assert decision.weights is not None  # forward always passes them
        return self.balance * (decision.weights.mean() - batch.mask_ratio) ** 2


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    """The hook maskkit calls: the policy classes this plugin provides."""
    return [PatchScorerMasking]
