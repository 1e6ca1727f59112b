"""How a policy's per-patch weights enter the pretrain (level-1) loss, and what gradient reaches what.

This is the one place that decides it. A policy only *returns* weights (``MaskDecision.weights``,
``[B, L]``, e.g. the mask probability σ(M_j) of MLO-MAE); the engine applies them through the
run's :class:`LossWeighting` (``pretrain.weighting`` in the config), both in the pretrain
level's own step and in the pretrain path of the hypergradient.

Notation, for image b and patch j: ``err_bj`` the norm-pix reconstruction error (depends on the
MAE, E), ``m_bj ∈ {0, 1}`` the mask (1 = masked; chosen by the policy's top-k or sampled, not
differentiable), ``w_bj`` the policy's weight (depends on the policy, T), ``lp_b`` the log-
probability of image b's sampled mask (depends on T; :attr:`MaskDecision.log_prob`), ``M`` the
masked patches per image, ``sg`` stop-gradient. Every weighting writes the pretrain loss as
``L = Σ_bj c_bj · err_bj`` with coefficients ``c`` (:meth:`LossWeighting.coefficients`):

==================  ====================================================  ========  ===================
name                c_bj                                                  policy    E's step is
                                                                          reads
==================  ====================================================  ========  ===================
``reference``       m·w / Σm                                              tokens    weighted (+ via w)
``detached``        m·w / Σm                                              sg(tok)   weighted by w
``normalized``      m·w / (B Σ_j m·w), per image                          sg(tok)   weighted by w
``tempered``        m·ŵ / Σm, ŵ = 1 + α(w − mean_masked(w))               sg(tok)   weighted by ŵ
``straight-through`` m·ŵ / (B Σ_j m·ŵ), ŵ = 1 + w − sg(w)                 sg(tok)   plain MAE
``score-function``  m/Σm + (m/M − 1/L)(lp − sg(lp))/B                     sg(tok)   plain MAE
==================  ====================================================  ========  ===================

What T receives is always the hypergradient of the validation loss. Its pretrain path is
``−(∂²L/∂T∂E)·v`` with ``v = dL_val/dE``; for every weighting except ``reference``
(where w also depends on E) it is exactly ``−∂/∂T Σ_bj c_bj · d_bj`` with
``d_bj = ∇_E err_bj · v``, the change of each patch's error along v.

- ``reference`` is the MLO-MAE paper's code. The policy reads the patch tokens, which belong to
  E, so E's gradient also flows through w: E lowers its own loss by shrinking the masked
  patches' weights, and the mask collapses (docs/mlo.md, "Why the reference mask collapses").
- ``detached`` stops that path; w depends on T only. The overall scale of w stays free: scaling
  all weights up is a larger pretrain learning rate, and the hypergradient learns that scale
  instead of where to mask.
- ``normalized`` divides by each image's total masked weight, so only the *relative* weight of
  an image's masked patches matters: ``Σ_j w_bj ∂L/∂w_bj = 0`` for every image, and the
  hypergradient has no component along the scale.
- ``tempered`` (α = ``pretrain.tempered_alpha``) re-weights each masked patch's reconstruction by
  ``1 + α·(w − the mean of w over the image's masked patches)``: the weights average 1 per image,
  so the loss keeps MAE's scale, and E's step *does* apply them. The hypergradient is then the
  gradient of the system that is trained (a unit inner step), not of a surrogate.
- ``straight-through`` (called ``hypergradient-only`` before 2026-12) gives E the exact MAE step
  (its loss value and gradient are the plain MAE's), while T's hypergradient sees the normalized
  weighting at w: the derivative of the validation loss with respect to up-weighting each masked
  patch's reconstruction, centred per image. E never applies that re-weighting, and T reaches
  E's step only through the top-k, whose derivative is zero: a straight-through surrogate.
- ``score-function`` gives E the exact MAE step too, and T the score-function (REINFORCE)
  estimate of how the *sampling distribution* of the mask changes the one-step validation loss:
  ``−(1/B) Σ_b (Σ_j m_bj d_bj / M − Σ_j d_bj / L) ∇_T lp_b``. The reward of image b's sampled
  mask is what E's step on it does to the validation loss; its baseline is the same for a
  uniformly random mask (every patch's ``d``, so the kept patches count too). It needs a policy
  that samples its mask and reports ``log_prob`` (:class:`maskkit.masking.LearnedMasking` with
  ``pretrain.learned_mask.selection: sample``). The baseline reads this sample's d, which
  depends on the mask only through the kept tokens' effect on the errors: a second-order bias.

With no weights (``random``) every weighting gives MAE's ``Σ m err / Σm``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, get_args

from maskkit.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the config imports this module, and `maskkit --help` no torch
    from torch import Tensor

WeightingName = Literal[
    "reference", "detached", "normalized", "tempered", "straight-through", "score-function"
]
WEIGHTINGS: tuple[str, ...] = get_args(WeightingName)
#: Former names, still read from old configs (with a warning): old → current.
RENAMED_WEIGHTINGS = {"hypergradient-only": "straight-through"}


@dataclass(frozen=True)
class LossWeighting:
    """One way for a policy's weights to enter the pretrain loss (see the module docstring).

    Attributes:
        name: the config name.
        policy_reads_encoder: the policy sees the tokens with their graph into E, so E's gradient
            also flows through the weights (only ``reference``).
        normalized: coefficients are divided by each image's total masked weight.
        in_pretrain_step: the weights' values scale E's loss; False gives E the exact MAE step
            and lets the weights act only through their gradient (the hypergradient path).
        tempered_alpha: α of ``tempered``, the re-weighting's strength (None: not tempered).
        score_function: T's pretrain path is the score-function estimate through ``log_prob``.
    """

    name: str
    policy_reads_encoder: bool
    normalized: bool
    in_pretrain_step: bool
    tempered_alpha: float | None = None
    score_function: bool = False

    def policy_tokens(self, tokens: Tensor) -> Tensor:
        """The ``[B, L, D]`` tokens as the policy may see them: detached from E unless ``reference``."""
        return tokens if self.policy_reads_encoder else tokens.detach()

    def coefficients(self, mask: Tensor, weights: Tensor | None, log_prob: Tensor | None = None) -> Tensor:
        """Per-patch loss coefficients ``c [B, L]`` with ``L = Σ c · err``.

        Args:
            mask: ``[B, L]`` 1 = masked.
            weights: ``[B, L]`` the policy's weights (graph into T, and into E under
                ``reference``), or None.
            log_prob: ``[B]`` log-probability of each image's sampled mask (graph into T), or
                None; only ``score-function`` reads it.
        """
        if self.score_function:
            return self._score_function_coefficients(mask, log_prob)
        if weights is None:
            return mask / mask.sum()
        if self.tempered_alpha is not None:
            masked_mean = (mask * weights).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
            tempered = 1.0 + self.tempered_alpha * (weights - masked_mean)  # [B, L], masked mean 1
            return mask * tempered / mask.sum()
        if not self.in_pretrain_step:
            # Value 1, gradient that of w: E's step is MAE's, T sees d(loss)/d(weight) at w.
            weights = 1.0 + weights - weights.detach()
        weighted = mask * weights
        if self.normalized:
            per_image = weighted.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [B, 1]
            return weighted / (per_image * mask.shape[0])
        return weighted / mask.sum()

    def _score_function_coefficients(self, mask: Tensor, log_prob: Tensor | None) -> Tensor:
        """Plain MAE in value and E-gradient; ``(m/M − 1/L)(lp − sg lp)/B`` carries T's term
        (none without ``log_prob``: a fixed policy, or a learned one's deterministic mode)."""
        plain = mask / mask.sum()
        if log_prob is None:
            return plain
        batch_size, num_patches = mask.shape
        reward_weight = mask / mask.sum(1, keepdim=True).clamp_min(1) - 1.0 / num_patches  # [B, L]
        score = (log_prob - log_prob.detach())[:, None]  # [B, 1], value 0, gradient ∇_T lp
        return plain + reward_weight * score / batch_size

    def check_decision(self, weights: Tensor | None, log_prob: Tensor | None) -> None:
        """Refuse a training step whose decision this weighting cannot learn from: a learned
        policy's (it gives weights) without ``log_prob`` under ``score-function``."""
        if self.score_function and weights is not None and log_prob is None:
            raise ScoreFunctionNeedsSamplesError(
                "pretrain.weighting 'score-function' needs a policy that samples its mask and "
                "returns its log_prob (a LearnedMasking policy with pretrain.learned_mask.selection="
                "sample); use another weighting (tempered, straight-through) for this policy"
            )

    def loss(
        self, error: Tensor, mask: Tensor, weights: Tensor | None, log_prob: Tensor | None = None
    ) -> Tensor:
        """The pretrain loss ``Σ_bj c_bj · err_bj`` for ``error``, ``mask``, ``weights`` all
        ``[B, L]`` (and ``log_prob [B]`` for ``score-function``)."""
        return (self.coefficients(mask, weights, log_prob) * error).sum()


class ScoreFunctionNeedsSamplesError(ConfigError):
    """``score-function`` met a learned policy whose decision has no ``log_prob``."""


_DEFINITIONS = {
    weighting.name: weighting
    for weighting in (
        LossWeighting("reference", policy_reads_encoder=True, normalized=False, in_pretrain_step=True),
        LossWeighting("detached", policy_reads_encoder=False, normalized=False, in_pretrain_step=True),
        LossWeighting("normalized", policy_reads_encoder=False, normalized=True, in_pretrain_step=True),
        LossWeighting("tempered", policy_reads_encoder=False, normalized=False, in_pretrain_step=True),
        LossWeighting(
            "straight-through", policy_reads_encoder=False, normalized=True, in_pretrain_step=False
        ),
        LossWeighting(
            "score-function",
            policy_reads_encoder=False,
            normalized=False,
            in_pretrain_step=False,
            score_function=True,
        ),
    )
}

#: α of ``tempered`` when none is given.
DEFAULT_TEMPERED_ALPHA = 0.5


def loss_weighting(name: str, tempered_alpha: float = DEFAULT_TEMPERED_ALPHA) -> LossWeighting:
    """The weighting called ``name`` (one of :data:`WEIGHTINGS`, or a former name of one);
    ``tempered_alpha`` is α of ``tempered``."""
    weighting = _DEFINITIONS[RENAMED_WEIGHTINGS.get(name, name)]
    if weighting.name == "tempered":
        return replace(weighting, tempered_alpha=tempered_alpha)
    return weighting
