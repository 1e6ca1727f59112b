"""``mlo`` and ``mlo-light``: masks learned by downstream feedback (MLO-MAE, Guo et al., 2024).

Both are :class:`~maskkit.masking.LearnedMasking` policies: a scorer gives per-patch logits, σ of
the bounded logits is the mask probability (the loss weights), and the mask is sampled from them
in training (``pretrain.learned_mask``). How the weights enter the pretrain loss, and so how the
hypergradient reaches the policy, is the run's ``pretrain.weighting`` (``maskkit/weighting.py``;
equation 1 of the paper is ``reference``).
"""

from __future__ import annotations

from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.masking import FanInScaledLinear, LearnedMasking, PerPatchScorer, SlotCentring
from maskkit.policy import MaskPolicy, PolicyContext


class MLOMasking(LearnedMasking):
    """The reference masking network: an MLP over the *flattened* patch tokens.

    ``[B, L·D] → Linear(L·D, hidden) → ReLU → Linear(hidden, L)``. At ViT-B/2 (L=256, D=768)
    the first layer alone has ~100 M weights. With ``pretrain.learned_mask.fan_in_scaling`` (the
    default; off in ``paper``) each token is normalised (LayerNorm without affine) before the
    flattening and the first layer is a :class:`~maskkit.masking.FanInScaledLinear`, so an AdamW
    step cannot saturate it. With ``pretrain.learned_mask.centre_tokens`` (the default; off in
    ``paper``) each slot's mean token is subtracted first (:class:`~maskkit.masking.SlotCentring`),
    so the position embedding every image shares does not dominate the input and the mask can
    depend on the image (docs/mlo.md).
    """

    name = "mlo"
    description = "MLO-MAE reference masking network: MLP over flattened patch tokens (L·D → 512 → L)."

    def __init__(self, context: PolicyContext, hidden_dim: int = 512) -> None:
        super().__init__(context)
        fan_in = context.num_patches * context.embed_dim
        settings = context.learned_mask
        self.centring = (
            SlotCentring(context.num_patches, context.embed_dim) if settings.centre_tokens else nn.Identity()
        )
        self.input_norm = (
            nn.LayerNorm(context.embed_dim, elementwise_affine=False)
            if settings.fan_in_scaling
            else nn.Identity()
        )
        linear = FanInScaledLinear if settings.fan_in_scaling else nn.Linear
        first = linear(fan_in, hidden_dim)
        self.scorer = nn.Sequential(first, nn.ReLU(), nn.Linear(hidden_dim, context.num_patches))

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(self.input_norm(self.centring(tokens)).flatten(1))


class MLOLightMasking(LearnedMasking):
    """A per-patch scorer shared across positions: ``[B, L, D] → LayerNorm → MLP(D → h → 1)``.

    The tokens carry position embeddings, so the scorer can still learn where to mask. It has
    about ``D·h`` parameters instead of the reference's ``L·D·512``.
    """

    name = "mlo-light"
    description = "Learned MLO mask with a small per-patch scorer (D → 64 → 1), far fewer parameters."

    def __init__(self, context: PolicyContext, hidden_dim: int = 64) -> None:
        super().__init__(context)
        self.scorer = PerPatchScorer.for_context(context, hidden_dim)

    def mask_logits(self, tokens: Tensor) -> Tensor:
        return self.scorer(tokens)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [MLOMasking, MLOLightMasking]
