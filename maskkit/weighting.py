"""How a policy's per-patch weights enter the pretrain (level-1) loss, and what gradient reaches what.

This is the one place that decides it. A policy only *returns* weights (``MaskDecision.weights``,
``[B, L]``, e.g. the mask probability σ(M_j) of MLO-MAE); the engine applies them through the
run's :class:`LossWeighting` (``pretrain.weighting`` in the config), both in the pretrain
level's own step and in the pretrain path of the hypergradient.

Notation, for image b and patch j: ``err_bj`` the norm-pix reconstruction error (depends on the
MAE, E), ``m_bj ∈ {0, 1}`` the mask (1 = masked; chosen by the policy's top-k, not
differentiable), ``w_bj`` the policy's weight (depends on the policy, T), ``sg`` stop-gradient.
Every weighting writes the pretrain loss as ``L = Σ_bj c_bj · err_bj`` with coefficients
``c(m, w)`` (:meth:`LossWeighting.coefficients`):

==============================  =================================  ========  ============================
name                            c_bj                               policy    E's step follows
                                                                   reads     ∂L/∂E =
==============================  =================================  ========  ============================
``reference``                   m·w / Σm                           tokens    Σ m w ∇err/Σm + Σ m err ∇w/Σm
``detached``                    m·w / Σm                           sg(tok)   Σ m w ∇err / Σm
``normalized``                  m·w / (B Σ_j m·w), per image       sg(tok)   Σ_b Σ_j m w ∇err / (B Σ_j m w)
``hypergradient-only``          m·ŵ / (B Σ_j m·ŵ), ŵ = 1+w−sg(w)   sg(tok)   Σ m ∇err / Σm (plain MAE)
==============================  =================================  ========  ============================

What T receives is always the hypergradient of the validation loss. Its pretrain path is
``−(∂²L/∂T∂E)·v`` with ``v = dL_val/dE``; for every weighting except ``reference``
(where w also depends on E) it is exactly ``−∂/∂T Σ_bj c_bj(w) · d_bj`` with
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
- ``hypergradient-only`` gives E the exact MAE step (its loss *value and gradient* are the plain
  MAE's), while T's hypergradient sees the normalized weighting at w: the derivative of the
  validation loss with respect to up-weighting each masked patch's reconstruction, centred per
  image. The weights then decide *which* patches are masked (through the policy's top-k) but
  never how strongly E learns from them.

With no weights (``random``) every weighting gives MAE's ``Σ m err / Σm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

WeightingName = Literal["reference", "detached", "normalized", "hypergradient-only"]
WEIGHTINGS: tuple[str, ...] = get_args(WeightingName)


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
    """

    name: str
    policy_reads_encoder: bool
    normalized: bool
    in_pretrain_step: bool

    def policy_tokens(self, tokens: Tensor) -> Tensor:
        """The ``[B, L, D]`` tokens as the policy may see them: detached from E unless ``reference``."""
        return tokens if self.policy_reads_encoder else tokens.detach()

    def coefficients(self, mask: Tensor, weights: Tensor | None) -> Tensor:
        """Per-patch loss coefficients ``c [B, L]`` with ``L = Σ c · err``.

        Args:
            mask: ``[B, L]`` 1 = masked.
            weights: ``[B, L]`` the policy's weights (graph into T, and into E under
                ``reference``), or None.
        """
        if weights is None:
            return mask / mask.sum()
        if not self.in_pretrain_step:
            # Value 1, gradient that of w: E's step is MAE's, T sees d(loss)/d(weight) at w.
            weights = 1.0 + weights - weights.detach()
        weighted = mask * weights
        if self.normalized:
            per_image = weighted.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [B, 1]
            return weighted / (per_image * mask.shape[0])
        return weighted / mask.sum()

    def loss(self, error: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
        """The pretrain loss ``Σ_bj c_bj · err_bj`` for ``error``, ``mask``, ``weights`` all ``[B, L]``."""
        return (self.coefficients(mask, weights) * error).sum()


_DEFINITIONS = {
    weighting.name: weighting
    for weighting in (
        LossWeighting("reference", policy_reads_encoder=True, normalized=False, in_pretrain_step=True),
        LossWeighting("detached", policy_reads_encoder=False, normalized=False, in_pretrain_step=True),
        LossWeighting("normalized", policy_reads_encoder=False, normalized=True, in_pretrain_step=True),
        LossWeighting(
            "hypergradient-only", policy_reads_encoder=False, normalized=True, in_pretrain_step=False
        ),
    )
}


def loss_weighting(name: str) -> LossWeighting:
    """The weighting called ``name`` (one of :data:`WEIGHTINGS`)."""
    return _DEFINITIONS[name]
