"""The masking-policy contract that every plugin implements.

A policy sees a :class:`MaskBatch` (images and their patch tokens) and returns a
:class:`MaskDecision`: which patches the encoder keeps, how to restore the order, the binary
mask and, optionally, a differentiable per-patch weight for the reconstruction loss. The last
is how a learnable policy receives gradient in the MLO loop (equation 1 of the MLO-MAE paper);
how the weights enter the pretrain loss, and what gradient reaches what, is decided in one place:
:mod:`maskkit.weighting`.

Every policy turns its per-patch scores into a decision with :func:`decision_from_scores`, and
every decision is checked by :func:`validate_decision` before the model sees it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from maskkit.errors import PluginError


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may need to know about the model when it is built.

    Attributes:
        num_patches: L, patches per image.
        embed_dim: D, width of the patch tokens the policy sees.
        grid_size: patches per side (L = grid_size ** 2).
        patch_size: pixels per patch side.
        in_chans: image channels.
    """

    num_patches: int
    embed_dim: int
    grid_size: int
    patch_size: int
    in_chans: int = 3


@dataclass
class MaskBatch:
    """The input of a policy.

    Attributes:
        images: ``[B, C, H, W]`` normalised images.
        tokens: ``[B, L, D]`` patch embeddings with position embeddings added, patches in
            row-major order over the grid. Detached from the MAE unless the run's weighting is
            ``reference`` (then the pretrain loss also reaches the MAE through the policy).
        mask_ratio: fraction r of patches to mask; ``num_keep = int(L * (1 - r))``.
        priors: per-patch prior maps by name, each ``[B, L]`` in [0, 1], pooled from the
            per-pixel maps of the run's prior provider after augmentation (the names in the
            policy's ``requires``; empty for a policy that requires none).
    """

    images: Tensor
    tokens: Tensor
    mask_ratio: float
    priors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_keep(self) -> int:
        return num_kept(self.num_patches, self.mask_ratio)


@dataclass
class MaskDecision:
    """The output of a policy.

    Attributes:
        ids_keep: ``[B, K]`` int64 indices of the patches the encoder sees.
        ids_restore: ``[B, L]`` int64 permutation that puts ``[kept ++ masked]`` back in order.
        mask: ``[B, L]`` float, 1 = masked (reconstructed), 0 = kept.
        weights: ``[B, L]`` differentiable per-patch reconstruction-loss weights, or None. They
            enter the pretrain loss as the run's ``pretrain.weighting`` says
            (:mod:`maskkit.weighting`); for a learnable policy they are the only way the
            hypergradient reaches its parameters.
        scores: ``[B, L]`` the scores behind the decision, for plots (detached), or None.
        maps: named per-patch maps ``[B, L]`` the policy computed on the way (e.g. ``hpm``'s
            predicted loss). ``maskkit visualize`` draws each beside the mask, and they reach
            the policy's :meth:`MaskPolicy.pretrain_loss` with their graphs.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor
    weights: Tensor | None = None
    scores: Tensor | None = None
    maps: dict[str, Tensor] = field(default_factory=dict)

    def detached(self) -> MaskDecision:
        """A copy whose weights and maps carry no graph (to keep for diagnostics)."""
        return MaskDecision(
            ids_keep=self.ids_keep,
            ids_restore=self.ids_restore,
            mask=self.mask,
            weights=None if self.weights is None else self.weights.detach(),
            scores=self.scores,
            maps={name: value.detach() for name, value in self.maps.items()},
        )


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder keeps at ``mask_ratio``: ``int(L * (1 - r))``, as in MAE."""
    return int(num_patches * (1.0 - mask_ratio))


def decision_from_scores(
    scores: Tensor,
    mask_ratio: float,
    weights: Tensor | None = None,
    maps: dict[str, Tensor] | None = None,
) -> MaskDecision:
    """Keep the ``int(L * (1 - r))`` lowest-scoring patches of each image; mask the rest.

    This is MAE's ``random_masking`` with the noise replaced by ``scores``, and the reference
    MLO-MAE rule (the patches with the lowest mask probability are kept).

    Args:
        scores: ``[B, L]`` per-patch scores; higher means "more likely masked".
        mask_ratio: fraction of patches to mask, in [0, 1).
        weights: optional ``[B, L]`` differentiable per-patch loss weights to pass through.
        maps: optional named ``[B, L]`` maps to pass through (:attr:`MaskDecision.maps`).

    Returns:
        A decision with ``ids_keep [B, K]``, ``ids_restore [B, L]`` and ``mask [B, L]``.
    """
    batch_size, num_patches = scores.shape
    num_keep = num_kept(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(scores.detach(), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, device=scores.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return MaskDecision(
        ids_keep=ids_keep,
        ids_restore=ids_restore,
        mask=mask,
        weights=weights,
        scores=scores.detach(),
        maps=dict(maps or {}),
    )


class MalformedDecisionError(PluginError):
    """A policy returned a decision that breaks the contract."""


def validate_decision(decision: MaskDecision, batch: MaskBatch, policy_name: str) -> None:
    """Check a decision against the contract; raise :class:`MalformedDecisionError` if broken.

    Checks types, dtypes, shapes, the index range, that ``ids_restore`` is a permutation
    consistent with ``ids_keep``, that ``mask`` is binary with exactly ``L - K`` ones per row,
    and that ``weights`` (if any) are finite.
    """

    def fail(problem: str) -> None:
        raise MalformedDecisionError(
            f"mask policy '{policy_name}' returned a malformed decision: {problem}. "
            "Build decisions with maskkit.policy.decision_from_scores, or fix the plugin."
        )

    if not isinstance(decision, MaskDecision):
        fail(f"expected a MaskDecision, got {type(decision).__name__}")
    batch_size, num_patches = batch.tokens.shape[:2]
    num_keep = batch.num_keep
    expected = {
        "ids_keep": (batch_size, num_keep),
        "ids_restore": (batch_size, num_patches),
        "mask": (batch_size, num_patches),
    }
    for name, shape in expected.items():
        value = getattr(decision, name)
        if not isinstance(value, Tensor):
            fail(f"{name} is {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            fail(f"{name} has shape {list(value.shape)}, expected {list(shape)}")
    for name in ("ids_keep", "ids_restore"):
        if getattr(decision, name).dtype != torch.int64:
            fail(f"{name} has dtype {getattr(decision, name).dtype}, expected torch.int64")
    if not decision.mask.is_floating_point():
        fail(f"mask has dtype {decision.mask.dtype}, expected a float dtype")
    ids_keep, ids_restore, mask = decision.ids_keep, decision.ids_restore, decision.mask
    if ids_restore.min() < 0 or ids_restore.max() >= num_patches:
        fail(f"ids_restore holds values outside [0, {num_patches})")
    if num_keep and (ids_keep.min() < 0 or ids_keep.max() >= num_patches):
        fail(f"ids_keep holds values outside [0, {num_patches})")
    arange = torch.arange(num_patches, device=ids_restore.device).expand(batch_size, -1)
    if not torch.equal(torch.sort(ids_restore, dim=1).values, arange):
        fail("ids_restore is not a permutation of 0..L-1 in every row")
    if not bool(((mask == 0) | (mask == 1)).all()):
        fail("mask holds values other than 0 and 1")
    masked_per_row = mask.sum(dim=1)
    if not bool((masked_per_row == num_patches - num_keep).all()):
        fail(
            f"mask must mask exactly {num_patches - num_keep} of {num_patches} patches per image "
            f"(ratio {batch.mask_ratio}), got {masked_per_row.tolist()[:4]}…"
        )
    if num_keep and not bool((torch.gather(mask, 1, ids_keep) == 0).all()):
        fail("ids_keep names patches that mask marks as masked")
    # ids_restore must put the kept ids first: position ids_restore[j] < K  <=>  j is kept.
    if not torch.equal((ids_restore < num_keep).float(), 1.0 - mask):
        fail("ids_restore does not place the kept patches first")
    if decision.weights is not None:
        weights = decision.weights
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (batch_size, num_patches):
            fail(f"weights must be a [B, L] = [{batch_size}, {num_patches}] tensor or None")
        if not bool(torch.isfinite(weights.detach()).all()):
            fail("weights hold non-finite values")
    if not isinstance(decision.maps, dict):
        fail(f"maps is {type(decision.maps).__name__}, not a dict of [B, L] tensors")
    for name, value in decision.maps.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (batch_size, num_patches):
            fail(f"map '{name}' must be a [B, L] = [{batch_size}, {num_patches}] tensor")
        if not bool(torch.isfinite(value.detach()).all()):
            fail(f"map '{name}' holds non-finite values")


class MaskPolicy(nn.Module, abc.ABC):
    """Base class of every masking policy.

    Subclasses set ``name`` and ``description``, and implement :meth:`forward`. ``requires``
    names the priors the policy reads from ``MaskBatch.priors`` (``"importance"``,
    ``"foreground"``; the run's ``--prior`` provider supplies them). Constructors take the
    :class:`PolicyContext` and keyword options from the run config (``policy_options``).

    Which level trains a policy's parameters (each parameter is trained by exactly one):

    - those :meth:`pretrain_parameters` names join the **pretrain level's** optimiser, beside
      the MAE (same AdamW, learning rate, schedule and weight-decay rule), and follow the
      gradient of the pretrain loss, which includes the policy's own :meth:`pretrain_loss`;
    - the others are **level 3's** (the mask level of the MLO loop, moved by the
      hypergradient) when ``learnable = True``, and not trained at all otherwise.

    A policy with ``learnable = False`` runs the pretrain level alone.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    learnable: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, context: PolicyContext) -> None:
        super().__init__()
        self.context = context

    @abc.abstractmethod
    def forward(self, batch: MaskBatch) -> MaskDecision:
        """Decide which patches of ``batch`` to mask."""

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
        """An optional scalar added to the level-3 (mask) objective. None by default."""
        return None

    def pretrain_loss(self, decision: MaskDecision, batch: MaskBatch, error: Tensor) -> Tensor | None:
        """An optional scalar added to the pretrain (level-1) loss of every pretrain step.

        It is how a policy trains its :meth:`pretrain_parameters` jointly with the MAE, e.g.
        ``hpm``'s loss predictor. maskkit logs it as ``loss/policy_pretrain``.

        Args:
            decision: this step's decision, as :meth:`forward` returned it (graphs kept, so
                ``decision.maps`` can carry the predictions to train).
            batch: the batch the policy saw.
            error: ``[B, L]`` float32 per-patch norm-pix reconstruction error of this step,
                detached (the target, not a path into the MAE).

        The hypergradient of a learnable policy treats this term as independent of level 3:
        it never enters the pretrain loss that the mask level's hypergradient differentiates.
        None by default, and never called for a policy that does not override it.
        """
        return None

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained at the pretrain level (see the class docstring). None by default."""
        return iter(())

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called before every pretrain step with the step about to run (``1 ≤ step ≤
        total_steps``), for schedules over training. Does nothing by default.

        Keep what it sets in a buffer (``register_buffer``): buffers are checkpointed with the
        policy, so a resumed run and ``maskkit visualize`` see the schedule where it stood.
        """

    def statistics(self) -> dict[str, float]:
        """Scalars worth following over training (a learned β, learned ratios), logged as
        ``policy/<key>`` in ``metrics.jsonl`` and kept in the summary. Empty by default."""
        return {}
