"""The three objectives of MLO-MAE, written without any knowledge of betty.

- Level 1, pretrain (E, D): MAE reconstruction with the policy's mask; per-patch loss weighted
  by the policy's differentiable weights when it gives them (equation 1 of the paper).
- Level 2, finetune (C): cross-entropy of the head on the CLS feature of the unmasked encoder.
- Level 3, mask (T): cross-entropy of C(E(T)) on held-out data. It does not depend on T
  directly; its gradient reaches T only through the hypergradient.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from maskkit.errors import TrainingDivergedError
from maskkit.models.classifier import ClassifierHead
from maskkit.models.mae import MaskedAutoencoderViT
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, validate_decision
from maskkit.runtime import full_precision

Batch = tuple[Tensor, Tensor]  # images [B, C, H, W], labels [B]


def masked_reconstruction(
    mae: MaskedAutoencoderViT, policy: MaskPolicy, images: Tensor, mask_ratio: float
) -> tuple[Tensor, MaskDecision, Tensor]:
    """Mask with ``policy``, reconstruct, and return ``(loss, decision, pred)``.

    ``loss = Σ_j err_j · w_j · m_j / Σ_j m_j`` over masked patches ``m_j = 1``, where ``err_j``
    is the per-patch norm-pix MSE and ``w_j`` the policy's weight (1 when it gives none).
    ``pred`` is ``[B, L, p·p·C]``.
    """
    tokens = mae.embed(images)  # [B, L, D]
    if not bool(torch.isfinite(tokens).all()):
        # Checked before the policy sees them: non-finite tokens would otherwise surface as a
        # "malformed decision" of a policy that did nothing wrong.
        raise TrainingDivergedError("the patch embeddings became non-finite")
    batch = MaskBatch(images=images, tokens=tokens, mask_ratio=mask_ratio)
    decision = policy(batch)
    validate_decision(decision, batch, policy.name)
    latent = mae.encode(tokens, decision.ids_keep)  # [B, 1 + K, D]
    pred = mae.decode(latent, decision.ids_restore)  # [B, L, p·p·C]
    error = mae.reconstruction_error(images, pred)  # [B, L]
    if decision.weights is not None:
        error = error * full_precision(decision.weights)
    loss = (error * decision.mask).sum() / decision.mask.sum()
    return loss, decision, pred


@dataclass
class MLOObjectives:
    """The level losses over shared modules, with a count of each kind of evaluation.

    ``counts`` tallies forward evaluations by ``"<level>/<purpose>"`` so the cost per MLO
    iteration can be reported (``purpose`` is ``step`` or ``hypergradient``).
    """

    mae: MaskedAutoencoderViT
    policy: MaskPolicy
    head: ClassifierHead | None
    mask_ratio: float
    autocast: Callable
    counts: Counter = field(default_factory=Counter)

    def _precision(self, purpose: str) -> contextlib.AbstractContextManager:
        """bf16 autocast for the levels' own steps; fp32 for the finite-difference evaluations of
        the hypergradient, whose ±εv weight perturbations bf16 would round away."""
        return contextlib.nullcontext() if purpose == "hypergradient" else self.autocast()

    def pretrain_loss(self, batch: Batch, purpose: str = "step") -> Tensor:
        self.counts[f"pretrain/{purpose}"] += 1
        with self._precision(purpose):
            loss, _, _ = masked_reconstruction(self.mae, self.policy, batch[0], self.mask_ratio)
        return loss

    def features(self, images: Tensor) -> Tensor:
        """CLS features of the unmasked encoder ``[B, D]`` (graph kept into E)."""
        with self.autocast():
            return self.mae.features(images)

    def head_loss(self, features: Tensor, labels: Tensor, head_params: dict | None = None) -> Tensor:
        """Cross-entropy of the head on ``features [B, D]``; ``head_params`` evaluates the
        head at other parameter values (for finite differences) without touching its weights."""
        assert self.head is not None
        with self._precision("step" if head_params is None else "hypergradient"):
            if head_params is None:
                logits = self.head(features)
            else:
                logits = functional_call(self.head, head_params, (features,))
            return F.cross_entropy(full_precision(logits), labels)

    def finetune_loss(self, batch: Batch) -> Tensor:
        """Level 2's own step needs gradients for C only, so E runs without a graph."""
        self.counts["finetune/step"] += 1
        images, labels = batch
        with torch.no_grad():
            features = self.features(images)
        return self.head_loss(features, labels)

    def finetune_trunk(self, batch: Batch) -> Tensor:
        """Level 2's features with the graph into E, for the hypergradient."""
        self.counts["finetune/hypergradient"] += 1
        return self.features(batch[0])

    def mask_loss(self, batch: Batch) -> Tensor:
        """Level 3: validation cross-entropy of C(E(T)), plus the policy's regulariser if any."""
        self.counts["mask/step"] += 1
        images, labels = batch
        loss = self.head_loss(self.features(images), labels)
        if type(self.policy).regularizer is not MaskPolicy.regularizer:
            with self.autocast():
                tokens = self.mae.embed(images)
                mask_batch = MaskBatch(images=images, tokens=tokens, mask_ratio=self.mask_ratio)
                decision = self.policy(mask_batch)
                validate_decision(decision, mask_batch, self.policy.name)
                penalty = self.policy.regularizer(decision, mask_batch)
            if penalty is not None:
                loss = loss + full_precision(penalty)
        return loss
