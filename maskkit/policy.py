"""The masking-policy contract that every plugin implements.

A policy sees a :class:`MaskBatch` (images and their patch tokens) and returns a
:class:`MaskDecision`: which patches the encoder keeps, how to restore the order, the binary
mask and, optionally, a differentiable per-patch weight for the reconstruction loss. The last
is how a learnable policy receives gradient in the MLO loop (equation 1 of the MLO-MAE paper);
how the weights enter the pretrain loss, and what gradient reaches what, is decided in one place:
:mod:`maskkit.weighting`.

Every policy turns its per-patch scores into a decision with :func:`decision_from_scores`, and
every decision is checked by :func:`validate_decision` before the model sees it.

What a plugin's author must know (``docs/plugins.md`` has the whole contract):

- **Patch order.** Patch ``j`` of an image is row ``j // g``, column ``j % g`` of its ``g × g``
  grid (``g = PolicyContext.grid_size``): row-major, as the patch embedding flattens it. Tokens,
  priors, scores, weights and the mask all index patches this way.
- **Gradient into the MAE.** ``batch.tokens`` carries the MAE's graph only when the run's
  ``pretrain.weighting`` is ``reference`` (the paper's code); under every other weighting, the
  default ``hypergradient-only`` included, the tokens are detached and nothing a policy computes
  reaches the MAE's gradient (:meth:`maskkit.weighting.LossWeighting.policy_tokens`).
- **Weights.** ``MaskDecision.weights`` ``[B, L]`` enter the pretrain loss on the masked patches
  only, ``L = Σ_bj c_bj · err_bj`` with ``c = m·w / Σm`` (``reference``, ``detached``) or
  normalised per image (``normalized``, ``hypergradient-only``, which also keeps the MAE's step
  exactly MAE's). :mod:`maskkit.weighting` decides it. For a learnable policy the weights (and
  the regulariser) are the only ways gradient reaches its parameters.
- **Regulariser.** :meth:`MaskPolicy.regularizer` returns a scalar that is added to the
  level-3 (mask) objective, computed on held-out batches with detached tokens; it is logged on
  its own as ``loss/mask_regularizer``, beside ``loss/mask`` (the sum). It is called only when
  :meth:`MaskPolicy.has_regularizer` says so (by default: when a policy overrides it).
- **Priors.** ``batch.priors`` holds each map named in ``requires`` as ``[B, L]`` in [0, 1]: the
  run's ``--prior`` provider computed it per pixel, it rode with the image in the data loader's
  ``Batch(images, labels, priors)`` (cropped and flipped with it), and the engine pooled it to the
  patch grid.
- **Pretrain-level hooks.** Parameters named by :meth:`MaskPolicy.pretrain_parameters` train with
  the MAE, from :meth:`MaskPolicy.pretrain_loss` (which receives the step's decision, its
  ``maps`` with their graphs, and the detached per-patch error); :meth:`MaskPolicy.set_progress`
  and :meth:`MaskPolicy.statistics` serve schedules and logging. Each parameter is trained by
  one level only.
- **Options.** ``policy_options`` reach the constructor as keyword arguments, as YAML parsed
  them: ``--set policy_options.k=2`` gives ``int`` 2, ``0.5`` a float, ``true`` a bool,
  ``[1, 2]`` a list, ``abc`` a str, and ``1e-3`` the *string* ``"1e-3"`` (YAML 1.1 wants
  ``1.0e-3``): convert (``float(x)``) before checking. Raise ``ValueError`` for a bad value.
- **Randomness.** Use torch's global generator (``torch.rand``), so that ``--seed`` reproduces
  a run.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from maskkit.config import LearnedMaskConfig
from maskkit.errors import PluginError

if TYPE_CHECKING:
    from maskkit.models import MaskedAutoencoderViT

#: The levels of stage 1 that may train a policy's parameters (:meth:`MaskPolicy.training_levels`):
#: level 1, beside the MAE, and level 3, the mask level of the MLO loop.
PRETRAIN_LEVEL = "pretrain"
MASK_LEVEL = "mask"


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may need to know about the model when it is built.

    Attributes:
        num_patches: L, patches per image.
        embed_dim: D, width of the patch tokens the policy sees.
        grid_size: patches per side (L = grid_size ** 2).
        patch_size: pixels per patch side.
        in_chans: image channels.
        learned_mask: the run's ``pretrain.learned_mask``: how a learned mask is bounded,
            sampled and warmed up (read by :class:`maskkit.masking.LearnedMasking`).
    """

    num_patches: int
    embed_dim: int
    grid_size: int
    patch_size: int
    in_chans: int = 3
    learned_mask: LearnedMaskConfig = field(default_factory=LearnedMaskConfig)


def policy_context(
    model: MaskedAutoencoderViT, learned_mask: LearnedMaskConfig | None = None
) -> PolicyContext:
    """What a policy built for ``model`` may know; ``learned_mask`` is the run's
    ``pretrain.learned_mask`` (its defaults when None)."""
    config = model.config
    return PolicyContext(
        num_patches=model.num_patches,
        embed_dim=config.embed_dim,
        grid_size=model.grid_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        learned_mask=learned_mask or LearnedMaskConfig(),
    )


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
        log_prob: ``[B]`` log-probability of each image's mask under the policy's sampling
            distribution, with its graph into the policy, or None (a deterministic or fixed
            mask). The ``score-function`` weighting reads it (:mod:`maskkit.weighting`).
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor
    weights: Tensor | None = None
    scores: Tensor | None = None
    maps: dict[str, Tensor] = field(default_factory=dict)
    log_prob: Tensor | None = None

    def detached(self) -> MaskDecision:
        """A copy whose weights and maps carry no graph (to keep for diagnostics)."""
        return MaskDecision(
            ids_keep=self.ids_keep,
            ids_restore=self.ids_restore,
            mask=self.mask,
            weights=None if self.weights is None else self.weights.detach(),
            scores=self.scores,
            maps={name: value.detach() for name, value in self.maps.items()},
            log_prob=None if self.log_prob is None else self.log_prob.detach(),
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


# What to do about each kind of malformed decision (the last part of the error line).
BUILD_ADVICE = (
    "build the decision with maskkit.policy.decision_from_scores(scores [B, L], batch.mask_ratio), "
    "which keeps ids_keep, ids_restore and mask consistent"
)
RATIO_ADVICE = (
    "mask exactly L - int(L * (1 - batch.mask_ratio)) patches per image, at the run's ratio "
    "batch.mask_ratio (not a ratio of the policy's own); decision_from_scores(scores, "
    "batch.mask_ratio) does this"
)
DTYPE_ADVICE = "indices must be torch.int64, as torch.argsort returns them: drop the cast"
WEIGHTS_SHAPE_ADVICE = (
    "weights are one value per patch, [B, L] in the order of batch.tokens (row-major over the "
    "grid): pass decision_from_scores(scores, batch.mask_ratio, weights=w) a w shaped like scores"
)
NONFINITE_WEIGHTS_ADVICE = (
    "check the policy's scores and sigmoid for a log of 0, a division by zero or an overflowing "
    "exp; if it starts only after some steps, its parameters diverged at level 3: lower "
    "pretrain.mask.lr (--set pretrain.mask.lr=...)"
)

MAPS_ADVICE = (
    "maps are named per-patch values, a dict of [B, L] tensors in the order of batch.tokens: pass "
    "decision_from_scores(scores, batch.mask_ratio, maps={name: m}) each m shaped like scores"
)
NONFINITE_MAP_ADVICE = (
    "check the computation behind the map (a log of 0, a division by zero, an overflowing exp); "
    "if the map is trained, its parameters may have diverged: lower their learning rate"
)


def _check_per_patch(
    value: object,
    what: str,
    shape: tuple[int, int],
    fail: Callable[[str, str], None],
    shape_advice: str,
    finite_advice: str,
) -> None:
    """Refuse (through ``fail``) a per-patch tensor of a decision that is not ``[B, L]`` or holds
    NaN/inf; ``what`` names it in the message ("weights", "map 'x'")."""
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        fail(f"{what} must be a [B, L] = {list(shape)} tensor, got {got}", shape_advice)
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        fail(f"{what}: NaN/inf in {bad} of {finite.numel()} values", finite_advice)


def validate_decision(decision: MaskDecision, batch: MaskBatch, policy_name: str) -> None:
    """Check a decision against the contract; raise :class:`MalformedDecisionError` if broken.

    Checks types, dtypes, shapes, the index range, that ``ids_restore`` is a permutation
    consistent with ``ids_keep``, that ``mask`` is binary with exactly ``L - K`` ones per row,
    and that ``weights`` (if any) are finite.
    """

    def fail(problem: str, advice: str = BUILD_ADVICE) -> None:
        raise MalformedDecisionError(
            f"mask policy '{policy_name}' returned a malformed decision: {problem}. Fix: {advice}."
        )

    if not isinstance(decision, MaskDecision):
        fail(
            f"expected a MaskDecision, got {type(decision).__name__}",
            "forward must return a MaskDecision, e.g. decision_from_scores(scores, batch.mask_ratio)",
        )
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
            # The right batch size but another count of kept patches: a ratio of the policy's own.
            other_keep = name == "ids_keep" and value.dim() == 2 and value.shape[0] == batch_size
            fail(
                f"{name} has shape {list(value.shape)}, expected {list(shape)}",
                RATIO_ADVICE if other_keep else BUILD_ADVICE,
            )
    for name in ("ids_keep", "ids_restore"):
        if getattr(decision, name).dtype != torch.int64:
            fail(f"{name} has dtype {getattr(decision, name).dtype}, expected torch.int64", DTYPE_ADVICE)
    if not decision.mask.is_floating_point():
        fail(
            f"mask has dtype {decision.mask.dtype}, expected a float dtype",
            "mask is float, 1 = masked, 0 = kept: convert it with mask.float()",
        )
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
            f"(ratio {batch.mask_ratio}), got {masked_per_row.tolist()[:4]}…",
            RATIO_ADVICE,
        )
    if num_keep and not bool((torch.gather(mask, 1, ids_keep) == 0).all()):
        fail("ids_keep names patches that mask marks as masked")
    # ids_restore must put the kept ids first: position ids_restore[j] < K  <=>  j is kept.
    if not torch.equal((ids_restore < num_keep).float(), 1.0 - mask):
        fail("ids_restore does not place the kept patches first")
    shape = (batch_size, num_patches)
    if decision.weights is not None:
        _check_per_patch(
            decision.weights,
            "weights",
            shape,
            fail,
            WEIGHTS_SHAPE_ADVICE,
            NONFINITE_WEIGHTS_ADVICE,
        )
    if decision.log_prob is not None:
        log_prob = decision.log_prob
        if not isinstance(log_prob, Tensor) or tuple(log_prob.shape) != (batch_size,):
            got = list(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob).__name__
            fail(
                f"log_prob must be a [B] = [{batch_size}] tensor, got {got}",
                "log_prob is one log-probability per image: sample_decision in maskkit.masking sets it",
            )
        if not bool(torch.isfinite(log_prob.detach()).all()):
            fail("log_prob holds NaN/inf", NONFINITE_WEIGHTS_ADVICE)
    if not isinstance(decision.maps, dict):
        fail(f"maps is {type(decision.maps).__name__}, not a dict of [B, L] tensors", MAPS_ADVICE)
    for name, value in decision.maps.items():
        _check_per_patch(
            value, f"map '{name}'", (batch_size, num_patches), fail, MAPS_ADVICE, NONFINITE_MAP_ADVICE
        )


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

    A policy with ``learnable = False`` runs the pretrain level alone. :meth:`training_levels`
    says which levels train a policy class; everything in maskkit asks it.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    learnable: ClassVar[bool] = False
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, context: PolicyContext) -> None:
        super().__init__()
        self.context = context

    @classmethod
    def training_levels(cls) -> tuple[str, ...]:
        """The levels of stage 1 that train this policy's parameters, decided by the class alone:
        :data:`MASK_LEVEL` (level 3 of the MLO loop, by the hypergradient) when ``learnable``, then
        :data:`PRETRAIN_LEVEL` (beside the MAE, by :meth:`pretrain_loss`) when the class overrides
        :meth:`pretrain_parameters`; empty for a fixed policy.

        The one place this is decided: ``maskkit policies``, the run's first line, the batch-size
        check, the pretrainer and the objectives all ask it. A policy with :data:`MASK_LEVEL` runs
        all three levels of the MLO loop; any other, the pretrain level alone.
        """
        levels = (MASK_LEVEL,) if cls.learnable else ()
        if cls.pretrain_parameters is not MaskPolicy.pretrain_parameters:
            levels += (PRETRAIN_LEVEL,)
        return levels

    @abc.abstractmethod
    def forward(self, batch: MaskBatch) -> MaskDecision:
        """Decide which patches of ``batch`` to mask."""

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
        """An optional scalar added to the level-3 (mask) objective. None by default."""
        return None

    def has_regularizer(self) -> bool:
        """Whether :meth:`regularizer` may return a penalty, so the mask level must decide a
        batch for it: True when the class overrides :meth:`regularizer`. A policy whose penalty
        depends on its settings may say False when they turn it off."""
        return type(self).regularizer is not MaskPolicy.regularizer

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
