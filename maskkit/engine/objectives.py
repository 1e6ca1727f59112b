"""The three objectives of MLO-MAE, written without any knowledge of betty.

- Level 1, pretrain (E, D): MAE reconstruction with the policy's mask; the policy's weights enter
  the loss as the run's :class:`~maskkit.weighting.LossWeighting` says (equation 1 of the paper
  is the ``reference`` weighting).
- Level 2, finetune (C): cross-entropy of the head on the CLS feature of the unmasked encoder.
- Level 3, mask (T): cross-entropy of C(E(T)) on held-out data. It does not depend on T
  directly; its gradient reaches T only through the hypergradient.

The policy is called only through :mod:`maskkit.engine.policy_calls`, so an exception raised in
plugin code ends in one line naming the plugin.

Each lower level also offers its loss as a function of its own parameters for the ``darts``
hypergradient product: a part computed once (``*_pair``) and the loss at given parameters
(``*_loss_at``), which the product differentiates in forward mode or evaluates at ±εv.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from maskkit.data import Batch
from maskkit.distributed import mean_of, world_size
from maskkit.engine.compiled import EAGER_PASSES, StepPasses
from maskkit.engine.policy_calls import (
    checked_decision,
    checked_pretrain_loss,
    checked_regularizer,
    plugin_code,
)
from maskkit.errors import TrainingDivergedError
from maskkit.masking import frozen_statistics
from maskkit.models.classifier import ClassifierHead
from maskkit.models.mae import MaskedAutoencoderViT
from maskkit.policy import MASK_LEVEL, MaskBatch, MaskDecision, MaskPolicy
from maskkit.priors.alignment import patch_priors
from maskkit.runtime import full_precision
from maskkit.weighting import LossWeighting

PixelPriors = Mapping[str, Tensor]  # name → [B, H, W] per-pixel maps, aligned with the images


@dataclass
class Reconstruction:
    """One masked reconstruction.

    Attributes:
        loss: the weighted pretrain loss (a scalar).
        decision: the policy's decision.
        pred: ``[B, L, p·p·C]`` pixel predictions.
        error: ``[B, L]`` per-patch norm-pix error, unweighted.
        batch: the batch the policy saw, priors pooled to the patch grid (``[B, L]``).
    """

    loss: Tensor
    decision: MaskDecision
    pred: Tensor
    error: Tensor
    batch: MaskBatch

    def detached(self) -> Reconstruction:
        """A copy without graphs, to keep for diagnostics."""
        batch = MaskBatch(
            self.batch.images, self.batch.tokens.detach(), self.batch.mask_ratio, self.batch.priors
        )
        return Reconstruction(
            self.loss.detach(), self.decision.detached(), self.pred.detach(), self.error.detach(), batch
        )


def mask_batch(
    mae: MaskedAutoencoderViT, images: Tensor, tokens: Tensor, mask_ratio: float, priors: PixelPriors | None
) -> MaskBatch:
    """What a policy sees: the images, their ``[B, L, D]`` tokens and the priors pooled from
    per-pixel ``[B, H, W]`` to the patch grid ``[B, L]`` (the one place they are pooled)."""
    pooled = patch_priors(priors, mae.config.patch_size) if priors else {}
    return MaskBatch(images=images, tokens=tokens, mask_ratio=mask_ratio, priors=pooled)


def decide(
    mae: MaskedAutoencoderViT,
    policy: MaskPolicy,
    images: Tensor,
    mask_ratio: float,
    weighting: LossWeighting,
    priors: PixelPriors | None = None,
) -> tuple[Tensor, MaskBatch, MaskDecision]:
    """Embed ``images`` and let ``policy`` decide, with the ``priors`` aligned to ``images``.

    Returns ``(tokens, batch, decision)``: the ``[B, L, D]`` tokens with their graph into E, the
    batch the policy saw (tokens as the weighting lets it see them), and its checked decision.
    """
    tokens = mae.embed(images)  # [B, L, D]
    if not bool(torch.isfinite(tokens.detach().float().square().sum(dim=-1)).all()):
        # Checked before the policy sees them: non-finite tokens, or tokens whose squared norm
        # overflows fp32 (a normalisation inside the policy would turn them into NaN), would
        # otherwise surface as a "malformed decision" of a policy that did nothing wrong.
        raise TrainingDivergedError("the patch embeddings became non-finite (or overflow fp32)")
    batch = mask_batch(mae, images, weighting.policy_tokens(tokens), mask_ratio, priors)
    return tokens, batch, checked_decision(policy, batch)


def masked_reconstruction(
    mae: MaskedAutoencoderViT,
    policy: MaskPolicy,
    images: Tensor,
    mask_ratio: float,
    weighting: LossWeighting,
    priors: PixelPriors | None = None,
    passes: StepPasses = EAGER_PASSES,
) -> Reconstruction:
    """Mask with ``policy`` (which reads ``priors``, per pixel and aligned with ``images``),
    reconstruct, and weight the per-patch error by ``weighting``. ``passes`` may run the
    encoder, decoder and error compiled (:mod:`maskkit.engine.compiled`)."""
    tokens, seen, decision = decide(mae, policy, images, mask_ratio, weighting, priors)
    # pred [B, L, p·p·C], error [B, L]
    pred, error = passes.reconstruct(mae, tokens, decision.ids_keep, decision.ids_restore, images)
    weights = None if decision.weights is None else full_precision(decision.weights)
    loss = weighting.loss(error, decision.mask, weights, decision.log_prob)
    return Reconstruction(loss=loss, decision=decision, pred=pred, error=error, batch=seen)


def _cuda_devices(tensor: Tensor) -> list:
    return [tensor.device] if tensor.device.type == "cuda" else []


def _cuda_rng_state(tensor: Tensor) -> Tensor | None:
    return torch.cuda.get_rng_state(tensor.device) if tensor.device.type == "cuda" else None


@dataclass
class _StepFeatures:
    """Features of a finetune step, and the pretrain step count (E's version) they were taken at."""

    batch: Batch
    pretrain_steps: int
    features: Tensor  # [B, D], graph into E


@dataclass
class _PretrainPair:
    images: Tensor
    decision: MaskDecision
    weights: Tensor | None  # [B, L] with graph into T, or None when they follow E (reference)
    priors: PixelPriors  # name → [B, H, W], the images' priors
    log_prob: Tensor | None = None  # [B] with graph into T: the sampled masks' log-probability


@dataclass
class MLOObjectives:
    """The level losses over shared modules, with a count of each kind of evaluation.

    ``counts`` tallies forward evaluations by ``"<level>/<purpose>"`` so the cost per MLO
    iteration can be reported (``purpose`` is ``step`` or ``hypergradient``).
    ``class_weights`` (``[classes]`` or None) make the level-2 and level-3 cross-entropies
    class-balanced. ``last_pretrain`` holds the latest pretrain step's reconstruction (detached),
    ``last_policy_pretrain`` the policy's latest pretrain-level loss (folded into the pretrain
    loss) and ``last_regularizer`` its latest level-3 penalty (folded into the mask loss).
    ``passes`` run the levels' own steps' reconstruction and features, compiled under the run's
    ``compile`` option (:mod:`maskkit.engine.compiled`); the hypergradient's evaluations of the
    pretrain loss always run eager.
    """

    mae: MaskedAutoencoderViT
    policy: MaskPolicy
    head: ClassifierHead | None
    mask_ratio: float
    autocast: Callable
    weighting: LossWeighting
    class_weights: Tensor | None = None
    counts: Counter = field(default_factory=Counter)
    last_pretrain: Reconstruction | None = None
    last_policy_pretrain: Tensor | None = None
    last_regularizer: Tensor | None = None
    _step_features: _StepFeatures | None = field(default=None, repr=False)
    _pair_draw: tuple | None = field(default=None, repr=False)  # (key, CPU and CUDA RNG states)
    passes: StepPasses = EAGER_PASSES

    def _precision(self, purpose: str) -> contextlib.AbstractContextManager:
        """bf16 autocast for the levels' own steps; fp32 for the finite-difference evaluations of
        the hypergradient, whose ±εv weight perturbations bf16 would round away."""
        return contextlib.nullcontext() if purpose == "hypergradient" else self.autocast()

    # --- level 1 ---------------------------------------------------------------------------
    def pretrain_loss(self, batch: Batch, purpose: str = "step") -> Tensor:
        """Level 1: the weighted reconstruction loss, plus, in the level's own step, the policy's
        :meth:`~maskkit.policy.MaskPolicy.pretrain_loss` (the only place it is added)."""
        self.counts[f"pretrain/{purpose}"] += 1
        draw = self._hypergradient_draw(batch) if purpose == "hypergradient" else contextlib.nullcontext()
        with self._precision(purpose), draw:
            result = masked_reconstruction(
                self.mae,
                self.policy,
                batch.images,
                self.mask_ratio,
                self.weighting,
                batch.priors,
                self.passes if purpose == "step" else EAGER_PASSES,  # cg differentiates it twice
            )
            loss = result.loss
            if purpose == "step" and MASK_LEVEL in self.policy.training_levels():
                self.weighting.check_decision(result.decision.weights, result.decision.log_prob)
            if purpose == "step" and type(self.policy).pretrain_loss is not MaskPolicy.pretrain_loss:
                term = checked_pretrain_loss(
                    self.policy, result.decision, result.batch, result.error.detach().float()
                )
                if term is not None:
                    term = full_precision(term).reshape(())
                    self.last_policy_pretrain = term.detach()
                    loss = loss + term
        if purpose == "step":
            self.last_pretrain = result.detached()
            self._remember_draw(batch)
        return loss

    @contextlib.contextmanager
    def _hypergradient_draw(self, batch: Batch) -> Iterator[None]:
        """Random draws of the hypergradient's pretrain-level evaluations (a sampled mask): the
        same for every product of one pretrain step (one per path when the hypergradient is
        split, the SNR probe's, each ``cg`` evaluation), and kept off the training's stream."""
        images = batch.images
        if self._pair_draw is None or self._pair_draw[0] != self._draw_key(batch):
            self._remember_draw(batch)
        devices = _cuda_devices(images)
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._pair_draw[1])
            if devices:
                torch.cuda.set_rng_state(self._pair_draw[2], devices[0])
            yield

    def _draw_key(self, batch: Batch) -> tuple[int, int]:
        return id(batch), self.counts["pretrain/step"]

    def _remember_draw(self, batch: Batch) -> None:
        """The random state the hypergradient's draws on ``batch`` start from: the training
        stream's right after the pretrain step (so it does not depend on what the products of
        the hypergradient drew before, e.g. the head's dropout)."""
        self._pair_draw = (self._draw_key(batch), torch.get_rng_state(), _cuda_rng_state(batch.images))

    def pretrain_pair(self, batch: Batch) -> _PretrainPair:
        """What both sides of a ±εv pair on E share: one mask decision (a decision flipping
        between the sides would be a jump, not a derivative) and, unless the weights follow E,
        the weights with their graph into T."""
        images = batch.images
        with torch.no_grad():
            tokens = self.mae.embed(images)
        seen = mask_batch(self.mae, images, tokens, self.mask_ratio, batch.priors)
        with self._hypergradient_draw(batch):
            decision = checked_decision(self.policy, seen)
        weights = None if self.weighting.policy_reads_encoder else decision.weights
        return _PretrainPair(images, decision, weights, batch.priors, decision.log_prob)

    def pretrain_loss_at(self, pair: _PretrainPair, params: dict[str, Tensor]) -> Tensor:
        """The pretrain loss at MAE weights ``params`` (detached) under the pair's decision: the
        only graph it builds is the weights' (into T), all the product needs."""
        self.counts["pretrain/hypergradient"] += 1
        decision = pair.decision
        inputs = (pair.images, decision.ids_keep, decision.ids_restore)
        tokens, pred = functional_call(self.mae, params, inputs)
        error = self.mae.reconstruction_error(pair.images, pred)
        weights, log_prob = pair.weights, pair.log_prob
        if self.weighting.policy_reads_encoder:
            seen = mask_batch(self.mae, pair.images, tokens, self.mask_ratio, pair.priors)
            with plugin_code(self.policy, "forward"), frozen_statistics():
                weights = self.policy(seen).weights
        return self.weighting.loss(error, decision.mask, weights, log_prob)

    # --- levels 2 and 3 ----------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """CLS features of the unmasked encoder ``[B, D]`` (graph kept into E; every use
        differentiates it once)."""
        with self.autocast():
            return self.passes.features(self.mae, images)

    def head_loss(self, features: Tensor, labels: Tensor, head_params: dict | None = None) -> Tensor:
        """Cross-entropy of the head on ``features [B, D]``; ``head_params`` evaluates the
        head at other parameter values (for finite differences) without touching its weights."""
        assert self.head is not None
        with self._precision("step" if head_params is None else "hypergradient"):
            if head_params is None:
                logits = self.head(features)
            else:
                logits = functional_call(self.head, head_params, (features,))
            return self._cross_entropy(full_precision(logits), labels)

    def _cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of ``logits [B, classes]``, a mean over the batch. Class-weighted, it is
        Σ w_y·ℓ / Σ w_y; with several processes the denominator is the global batch's (its mean
        per process), so the processes' losses still average to the global batch's loss."""
        weights = None if self.class_weights is None else self.class_weights.to(logits.dtype)
        if weights is None or world_size() == 1:
            return F.cross_entropy(logits, labels, weight=weights)
        weight_per_process = mean_of(float(weights[labels].sum()))
        weighted_sum = F.cross_entropy(logits, labels, weight=weights, reduction="sum")
        return weighted_sum / weight_per_process

    def finetune_loss(self, batch: Batch) -> Tensor:
        """Level 2's own step. Its features keep their graph into E: the mask level's
        hypergradient, which follows before E changes, differentiates through the same
        features (:meth:`finetune_pair`) instead of running the encoder again."""
        self.counts["finetune/step"] += 1
        images, labels = batch.images, batch.labels
        features = self.features(images)
        self._step_features = _StepFeatures(batch, self.counts["pretrain/step"], features)
        return self.head_loss(features, labels)

    def finetune_pair(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Level 2's features ``[B, D]`` with the graph into E, for the hypergradient product
        (which perturbs C only): the step's own when E has not moved since, else computed."""
        kept, self._step_features = self._step_features, None
        if kept is not None and kept.batch is batch and kept.pretrain_steps == self.counts["pretrain/step"]:
            return kept.features, batch.labels
        self.counts["finetune/hypergradient"] += 1
        return self.features(batch.images), batch.labels

    def finetune_loss_at(self, pair: tuple[Tensor, Tensor], params: dict[str, Tensor]) -> Tensor:
        features, labels = pair
        return self.head_loss(features, labels, params)

    def finetune_hypergradient_loss(self, batch: Batch) -> Tensor:
        """Level 2's loss with its graph into E (for ``cg``)."""
        features, labels = self.finetune_pair(batch)
        return self.head_loss(features, labels)

    def mask_loss(self, batch: Batch) -> Tensor:
        """Level 3: validation cross-entropy of C(E(T)), plus the policy's regulariser if any
        (logged on its own as ``loss/mask_regularizer``; ``loss/mask`` is the sum)."""
        self.counts["mask/step"] += 1
        images, labels = batch.images, batch.labels
        loss = self.head_loss(self.features(images), labels)
        if self.policy.has_regularizer():
            # A validation batch is no training batch: policies' running statistics stay put.
            with self.autocast(), frozen_statistics():
                # The penalty is a term in T alone: its gradient must not leak into E's seed.
                with torch.no_grad():
                    tokens = self.mae.embed(images)
                seen = mask_batch(self.mae, images, tokens, self.mask_ratio, batch.priors)
                # A sampled mask would consume the training's random stream: the penalty reads
                # the weights only, so the draw is kept off it.
                with torch.random.fork_rng(devices=_cuda_devices(images)):
                    decision = checked_decision(self.policy, seen)
                penalty = checked_regularizer(self.policy, decision, seen)
            if penalty is not None:
                penalty = full_precision(penalty).reshape(())
                self.last_regularizer = penalty.detach()
                loss = loss + penalty
        return loss
