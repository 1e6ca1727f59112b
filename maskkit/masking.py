"""Masking primitives for policies, built-in and third-party alike.

Small functions over per-patch scores ``[B, L]`` (patch ``j`` of an image is row ``j // g``,
column ``j % g`` of its grid, as everywhere in maskkit), and :class:`LearnedMasking`, the base of
every mask learned at level 3 (``mlo``, ``mlo-light``, ``semantic-soft``, ``constraint``).

Why a learned mask needs more than ``σ(logits)`` and a top-k: with raw logits one AdamW step on
a wide first layer can push every logit to ±30, where σ′ ≈ e^−|z| is 0; the deterministic top-k
then picks the same patches for ever, and the hypergradient that could undo it is 0 too, so every
saturated state is a fixed point. :class:`LearnedMasking` bounds the logits
(:func:`bounded_logits`) and, in training, *samples* the mask by Gumbel-top-k
(:func:`sample_decision`, Plackett–Luce sampling without replacement), so every patch is masked
now and then. The run's ``pretrain.learned_mask`` (:class:`maskkit.config.LearnedMaskConfig`,
handed over as ``PolicyContext.learned_mask``) sets both; the ``paper`` preset turns them off.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskkit.distributed import mean_of_rows
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores


def mask_probability(logits: Tensor) -> Tensor:
    """``[B, L]`` logits → ``[B, L]`` mask probabilities σ(logits), in fp32 or wider.

    Under bf16 autocast (on CUDA) the scorer's logits are bf16, and σ in bf16 rounds to exactly 1
    from a logit of about 6.2 on: σ's derivative, computed from its output as σ(1 − σ), is then
    exactly 0 and the hypergradient of every confident patch is cut. In fp32 that takes a logit
    of about 17. fp64 logits (the hypergradient tests) stay fp64.
    """
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).sigmoid()


def bounded_logits(logits: Tensor, bound: float) -> Tensor:
    """``[B, L]`` raw logits → standardised per image and bounded: ``b·tanh(ẑ / b)``.

    ``ẑ = (z − mean_j z) / (std_j z + 1e-6)`` per image, so the logits' scale (which AdamW can
    blow up in a step) does not reach the probabilities, and ``|result| < b``: σ stays within
    ``(σ(−b), σ(b))`` and its derivative never vanishes. ``bound = 0`` returns ``logits`` as they
    are (the reference). Computed in fp32 or wider.
    """
    if bound == 0:
        return logits
    return bound * torch.tanh(standardised_logits(logits) / bound)


def standardised_logits(logits: Tensor) -> Tensor:
    """``[B, L]`` logits → ``ẑ = (z − mean_j z) / (std_j z + 1e-6)`` per image (row), in fp32 or
    wider: what :func:`bounded_logits` bounds."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    centred = logits - logits.mean(dim=1, keepdim=True)
    # Scaled to at most 1 first, so huge logits (a diverged encoder's tokens) cannot overflow the
    # variance: the result is the same, and the divergence is left for the loss to report.
    scale = centred.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # [B, 1]
    unit = centred / scale
    return unit / (unit.std(dim=1, keepdim=True) + 1e-6 / scale)  # = centred / (std + 1e-6)


def shared_map_share(logits: Tensor) -> Tensor:
    """``[B, L]`` logits → 0-d: how much of them is one map for every image of the batch.

    ``mean_j (mean_b ẑ_bj)²`` with ``ẑ`` the logits standardised per image
    (:func:`standardised_logits`): the share of ẑ's variance that lies in the batch-mean map,
    1 when every image gets the same ranking, about 1/B when the images' rankings are unrelated
    (1 − the share is ``mask/image_dependence`` of the standardised logits). The batch is the
    global one in a data-parallel run (:func:`maskkit.distributed.mean_of_rows`), so every
    process penalises what one process would. Differentiable; what the ``diversity`` regulariser
    of :class:`LearnedMasking` penalises.
    """
    shared = mean_of_rows(standardised_logits(logits))  # [1, L]
    # ẑ's population variance per image is (L − 1)/L (std is the unbiased one): rescaled to 1.
    length = logits.shape[1]
    return shared.pow(2).mean() * length / max(1, length - 1)


def logistic_noise(like: Tensor) -> Tensor:
    """``[B, L]`` draws of Logistic(0, 1), ``log u − log(1 − u)``, from the global RNG."""
    uniform = torch.rand(like.shape, device=like.device).clamp_(1e-6, 1 - 1e-6)
    return uniform.log() - (-uniform).log1p()


def gumbel_noise(like: Tensor) -> Tensor:
    """``[B, L]`` draws of Gumbel(0, 1), ``−log(−log u)``, from the global RNG."""
    uniform = torch.rand(like.shape, device=like.device).clamp_(1e-10, 1 - 1e-7)
    return -(-uniform.log()).log()


def plackett_luce_log_prob(scores: Tensor, order: Tensor, num_selected: int) -> Tensor:
    """Log-probability ``[B]`` of drawing ``order[:, :num_selected]`` in that order, one at a
    time without replacement, with probabilities ``softmax(scores)`` over the patches left.

    Args:
        scores: ``[B, L]`` Plackett–Luce log-weights (graph kept: the result differentiates).
        order: ``[B, L]`` int64, the patches in the order they were drawn (all L of them).
        num_selected: how many draws count (the masked patches).
    """
    ordered = torch.gather(scores, 1, order)  # [B, L]
    # log Σ of the weights still in the urn before each draw: a cumulative logsumexp from the end.
    remaining = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)  # [B, L]
    return (ordered - remaining)[:, :num_selected].sum(dim=1)


def sample_decision(
    logits: Tensor, mask_ratio: float, temperature: float, weights: Tensor | None = None
) -> MaskDecision:
    """Sample which patches to mask: the top ``M = L − int(L(1 − r))`` of ``logits / T + G``
    with ``G ~ Gumbel(0, 1)``, i.e. M draws without replacement from ``softmax(logits / T)``
    (Gumbel-top-k). Every patch has a chance; a higher logit, a higher one.

    Args:
        logits: ``[B, L]`` (graph kept into the policy for ``log_prob``).
        mask_ratio: r.
        temperature: T > 0; small T approaches the deterministic top-k, large T uniform masks.
        weights: ``[B, L]`` loss weights to pass through, or None.

    Returns:
        A decision whose ``log_prob [B]`` is the log-probability of the draw (in its order),
        differentiable in ``logits``: the score of the score-function estimator.
    """
    scaled = logits / temperature
    perturbed = scaled.detach() + gumbel_noise(scaled)  # [B, L]
    decision = decision_from_scores(perturbed, mask_ratio, weights=weights)
    num_masked = logits.shape[1] - decision.ids_keep.shape[1]
    order = torch.argsort(perturbed, dim=1, descending=True)  # drawn first = masked first
    decision.log_prob = plackett_luce_log_prob(scaled, order, num_masked)
    return decision


class FanInScaledLinear(nn.Linear):
    """``nn.Linear`` whose weight is stored at unit scale and multiplied by ``1/√fan_in`` in the
    forward pass (an equalised learning rate).

    The effective weight has PyTorch's default initial scale, but AdamW, which moves every stored
    weight by about lr per step whatever its gradient, now moves an effective weight by lr/√fan_in:
    one step changes a unit's pre-activation by at most lr·‖x‖₁/√fan_in instead of lr·‖x‖₁, which
    for ``mlo``'s first layer (fan-in L·D, 8 192 at ``cpu`` and 98 304 at ViT-S/2) is the
    difference between a step and a saturation.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.scale = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)  # × scale: U(±1/√fan_in), PyTorch's default bound

    def forward(self, inputs: Tensor) -> Tensor:
        return F.linear(inputs, self.weight * self.scale, self.bias)


#: True while a loss is re-evaluated at other weights (the hypergradient's products): those
#: evaluations are not training batches, so policies' running statistics stay as they are.
_STATISTICS_FROZEN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "maskkit_statistics_frozen", default=False
)


@contextlib.contextmanager
def frozen_statistics() -> Iterator[None]:
    """Within it, a policy's running statistics (:class:`SlotCentring`'s running mean) are read,
    not updated: for evaluations of a loss at other weights, which are no training batches (and
    which ``torch.func`` transforms forbid to mutate a module's buffers)."""
    token = _STATISTICS_FROZEN.set(True)
    try:
        yield
    finally:
        _STATISTICS_FROZEN.reset(token)


class SlotCentring(nn.Module):
    """``[B, L, D]`` tokens minus each slot's (position's) mean token: the batch's mean in
    training (the global batch's, over every process of a data-parallel run, so that every
    process centres as one process would), a running mean (updated then, momentum ``momentum``)
    in evaluation (the batch's mean before any training batch).

    A ViT's tokens carry a position embedding that every image shares, most of their energy at
    ViT-S/2 (83 %); normalised per token and flattened, they give ``mlo``'s MLP nearly the same
    input for every image, and its mask becomes one mask for all. The slot (its input index)
    already says where a token is, so the shared part only hides the image: centring removes it.
    """

    def __init__(self, num_patches: int, dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(1, num_patches, dim))
        self.register_buffer("tracked", torch.zeros((), dtype=torch.bool))

    def forward(self, tokens: Tensor) -> Tensor:
        if not self.training and bool(self.tracked):
            return tokens - self.running_mean
        if not self.training:  # no training batch seen yet: this batch's mean, nothing recorded
            return tokens - tokens.mean(dim=0, keepdim=True)
        mean = mean_of_rows(tokens)  # [1, L, D]
        if not _STATISTICS_FROZEN.get():
            with torch.no_grad():
                observed = mean.detach().to(self.running_mean.dtype)
                rate = self.momentum if bool(self.tracked) else 1.0
                self.running_mean.lerp_(observed, rate)
                self.tracked.fill_(True)
        return tokens - mean


class PerPatchScorer(nn.Sequential):
    """A scorer shared across positions: ``[B, L, D] → LayerNorm → Linear(D, h) → GELU →
    Linear(h, 1) → [B, L]`` logits (``mlo-light``'s, and the guided policies').

    ``output_bias=False`` drops the last layer's bias, which bounded logits (standardised per
    image) make irrelevant: its gradient is 0 up to rounding, which AdamW would turn into steps
    of ±lr that change nothing but the weights' reproducibility."""

    def __init__(self, embed_dim: int, hidden_dim: int, output_bias: bool = True) -> None:
        super().__init__(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1, bias=output_bias),
        )

    @classmethod
    def for_context(cls, context: PolicyContext, hidden_dim: int) -> PerPatchScorer:
        """The scorer for a policy built in ``context``: an output bias only for raw logits."""
        return cls(context.embed_dim, hidden_dim, output_bias=context.learned_mask.logit_bound == 0)

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens).squeeze(-1)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A state saved with an output bias (runs of early 2026-12) loads into a scorer without
        one: the bias is dropped, which changes no bounded logit (standardisation removes it)."""
        if self[-1].bias is None:
            state_dict.pop(f"{prefix}{len(self) - 1}.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LearnedMasking(MaskPolicy):
    """A mask learned at level 3: a scorer gives logits ``[B, L]``, σ of the bounded logits is
    the mask probability (the loss weights), and the mask is sampled from them in training.

    Subclasses implement :meth:`mask_logits` (and may add a :meth:`logit_bias`, e.g. a prior's).
    The run's ``pretrain.learned_mask`` (``self.context.learned_mask``) decides:

    - the bound of the logits (:func:`bounded_logits`);
    - ``selection``: in training, ``sample`` draws the mask by Gumbel-top-k at a temperature
      annealed over stage 1 from ``temperature[0]`` to ``temperature[1]`` (:func:`sample_decision`,
      whose ``log_prob`` the ``score-function`` weighting reads); ``top-k`` and evaluation
      (``policy.eval()``, as ``maskkit visualize`` and the diagnostics run it) mask the k highest
      logits, the mode of the distribution;
    - ``random_warmup``: for that share of stage 1 the mask is uniformly random in training.

    ``inverted`` (False by default; ``maskkit trial --inverse`` sets it) negates the logits: the
    inverse mask, −z, masks what the policy would keep, the control a learned mask is tried
    against.
    """

    learnable = True
    inverted: bool = False

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        # Share of stage 1 done, set by set_progress before every step (so a resumed run sets it
        # again; not saved, and checkpoints of runs from before it existed still load). −1 until
        # the engine sets it: a policy used on its own has no warm-up and samples at the
        # starting temperature.
        self.register_buffer("progress", torch.full((), -1.0), persistent=False)
        # The shared map's share of the diversity term's last batch (None before it, or with the
        # term off): logged as ``policy/shared_map_share`` to set beside ``shared_map_cap``.
        self.last_shared_map_share: Tensor | None = None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A state that saved ``progress`` (runs of early 2026-12, when it was persistent) loads:
        the engine sets it again before every step."""
        state_dict.pop(f"{prefix}progress", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def mask_logits(self, tokens: Tensor) -> Tensor:
        """``[B, L, D]`` patch tokens → ``[B, L]`` raw logits."""
        raise NotImplementedError

    def logit_bias(self, batch: MaskBatch) -> Tensor | None:
        """An optional ``[B, L]`` term added to the logits *after* the bound (e.g. a prior's
        ``−β·h``), which keeps its own scale; None by default."""
        return None

    def logits(self, batch: MaskBatch) -> Tensor:
        """``[B, L]`` logits the mask is drawn from: the scorer's, bounded, plus the bias (all
        negated when :attr:`inverted`)."""
        logits = bounded_logits(self.mask_logits(batch.tokens), self.context.learned_mask.logit_bound)
        bias = self.logit_bias(batch)
        logits = logits if bias is None else logits + bias
        return -logits if self.inverted else logits

    def has_regularizer(self) -> bool:
        """True with a ``diversity`` above 0, or when a subclass has a penalty of its own."""
        own = type(self).regularizer is not LearnedMasking.regularizer
        return own or self.context.learned_mask.diversity > 0

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
        """``diversity · max(0, shared_map_share(scorer's logits) − shared_map_cap)``
        (:func:`shared_map_share`) when the run's ``pretrain.learned_mask.diversity`` is above 0,
        else None. A subclass with a penalty of its own adds this one to it
        (:meth:`diversity_penalty`)."""
        return self.diversity_penalty(batch)

    def diversity_penalty(self, batch: MaskBatch) -> Tensor | None:
        """The diversity term alone, ``diversity · max(0, share − shared_map_cap)`` with
        ``share = shared_map_share(scorer's logits)``: a 0-d tensor (0 while the share is at or
        under the cap, so T is left alone where its mask already depends on the image), or None
        when ``diversity`` is 0."""
        settings = self.context.learned_mask
        if settings.diversity == 0:
            return None
        share = shared_map_share(self.mask_logits(batch.tokens))
        self.last_shared_map_share = share.detach()
        return settings.diversity * (share - settings.shared_map_cap).clamp_min(0)

    def statistics(self) -> dict[str, float]:
        """``shared_map_share``: the share :meth:`diversity_penalty` saw last (its hinge acts
        above ``shared_map_cap``), once the term has run."""
        share = self.last_shared_map_share
        return {} if share is None else {"shared_map_share": float(share)}

    def set_progress(self, step: int, total_steps: int) -> None:
        self.progress.fill_((step - 1) / max(1, total_steps - 1))

    def temperature(self) -> float:
        """The sampling temperature where stage 1 stands (linear from start to end)."""
        start, end = self.context.learned_mask.temperature
        return start + (end - start) * max(0.0, float(self.progress))

    def in_random_warmup(self) -> bool:
        """In the first ``random_warmup`` share of stage 1 (never before the engine sets it)."""
        return 0.0 <= float(self.progress) < self.context.learned_mask.random_warmup

    def forward(self, batch: MaskBatch) -> MaskDecision:
        settings = self.context.learned_mask
        logits = self.logits(batch)  # [B, L]
        mask_prob = mask_probability(logits)
        if self.training and self.in_random_warmup():
            uniform = torch.rand(logits.shape, device=logits.device)
            decision = decision_from_scores(uniform, batch.mask_ratio, weights=mask_prob)
            decision.log_prob = torch.zeros(logits.shape[0], device=logits.device)  # T takes no part
            return decision
        if self.training and settings.selection == "sample":
            return sample_decision(logits, batch.mask_ratio, self.temperature(), weights=mask_prob)
        return decision_from_scores(logits, batch.mask_ratio, weights=mask_prob)
