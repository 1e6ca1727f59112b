"""``region-ratio`` and ``region-ratio-fixed``: hard guidance by two masking ratios, one for the
prior's foreground patches and one for the background, with the overall ratio fixed.

Per image b, with ``n_f`` foreground patches (pooled foreground ≥ ``foreground_threshold``),
``n_g = L − n_f`` background ones, and ``M = L − int(L·(1 − r))`` patches to mask (the same for
every image, so the batch stays rectangular), the nominal ratios ``ρ_f, ρ_g`` are rescaled by one
common factor so that the expected counts add up to M:

    m_f = clamp(M · n_f ρ_f / (n_f ρ_f + n_g ρ_g),  max(0, M − n_g),  min(n_f, M))
    m_g = M − m_f

and ``round(m_f)`` random foreground patches plus ``M − round(m_f)`` random background patches are
masked: exactly M per image, whatever the split. Only the proportion ``ρ_f : ρ_g`` matters. The
effective ratios are ``r_f = m_f / n_f`` and ``r_g = m_g / n_g``.

``region-ratio`` (learnable, level 3 of MLO): ``ρ = σ(θ)``, ``θ ∈ R²``. Its weights are each
patch's probability of being masked, ``w_bj = r_f`` on the foreground and ``r_g`` on the
background (the continuous ``m_f``, before rounding), so the hypergradient reaches θ through
``∂r_f/∂θ`` and ``∂r_g/∂θ``: it asks whether the validation loss gains from weighting the masked
foreground's reconstruction more than the background's, and moves the ratios accordingly.

``region-ratio-fixed`` (single level): the same masking with the ratios fixed, no weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores
from maskkit.priors.provider import FOREGROUND


def _check_ratios(foreground_ratio: float, background_ratio: float, foreground_threshold: float) -> None:
    for option, value in (("foreground_ratio", foreground_ratio), ("background_ratio", background_ratio)):
        if not 0 < value < 1:
            raise ValueError(f"{option} must be strictly between 0 and 1, got {value!r}")
    if not 0 < foreground_threshold <= 1:
        raise ValueError(f"foreground_threshold must be in (0, 1], got {foreground_threshold!r}")


def region_counts(foreground: Tensor, ratios: Tensor, num_masked: int) -> Tensor:
    """The continuous number of foreground patches to mask per image, ``m_f [B]``.

    Args:
        foreground: ``[B, L]`` 1 on foreground patches, 0 elsewhere.
        ratios: ``[2]`` nominal ratios ``(ρ_f, ρ_g)``.
        num_masked: M, patches masked per image.
    """
    num_patches = foreground.shape[1]
    n_fg = foreground.sum(dim=1)  # [B]
    n_bg = num_patches - n_fg
    demand_fg, demand_bg = n_fg * ratios[0], n_bg * ratios[1]
    share = demand_fg / (demand_fg + demand_bg).clamp_min(1e-12)
    low = (num_masked - n_bg).clamp_min(0)
    high = n_fg.clamp_max(num_masked)
    return torch.minimum(torch.maximum(num_masked * share, low), high)


def region_decision(
    foreground: Tensor, masked_fg: Tensor, num_masked: int, mask_ratio: float, weights: Tensor | None
) -> MaskDecision:
    """Mask ``round(masked_fg)`` random foreground patches and the rest of M in the background.

    Args:
        foreground: ``[B, L]`` 1 on foreground patches.
        masked_fg: ``[B]`` continuous foreground counts from :func:`region_counts`.
        num_masked: M.
        mask_ratio: r, with ``M = L − int(L·(1 − r))``.
        weights: ``[B, L]`` loss weights to pass through, or None.
    """
    count_fg = masked_fg.detach().round()  # [B], within the clamp's integer bounds
    count_bg = num_masked - count_fg
    noise = torch.rand(foreground.shape, device=foreground.device)  # [B, L]
    is_fg = foreground > 0.5
    # Rank every patch among its own region by its noise (0 = first to be masked).
    rank_fg = _rank(torch.where(is_fg, noise, -1.0))
    rank_bg = _rank(torch.where(is_fg, -1.0, noise))
    chosen = torch.where(is_fg, rank_fg < count_fg[:, None], rank_bg < count_bg[:, None])  # exactly M
    scores = chosen.float() + 0.5 * noise  # the M chosen patches score highest
    return decision_from_scores(scores, mask_ratio, weights=weights)


def _rank(keys: Tensor) -> Tensor:
    """Each entry's position in its row sorted by ``keys`` descending, ``[B, L]`` int64."""
    return torch.argsort(torch.argsort(keys, dim=1, descending=True), dim=1)


class RegionRatioMasking(MaskPolicy):
    """Two masking ratios, foreground and background, learned at level 3; overall ratio fixed."""

    name = "region-ratio"
    description = "Foreground/background masking ratios learned at level 3; every image masks r·L."
    learnable = True
    requires = frozenset({FOREGROUND})

    def __init__(
        self,
        context: PolicyContext,
        foreground_ratio: float = 0.5,
        background_ratio: float = 0.9,
        foreground_threshold: float = 0.5,
    ) -> None:
        super().__init__(context)
        _check_ratios(foreground_ratio, background_ratio, foreground_threshold)
        self.foreground_threshold = float(foreground_threshold)
        self.ratio_logits = nn.Parameter(torch.logit(torch.tensor([foreground_ratio, background_ratio])))

    def ratios(self) -> Tensor:
        """``[2]`` nominal ratios ``(ρ_f, ρ_g)``."""
        return self.ratio_logits.sigmoid()

    def forward(self, batch: MaskBatch) -> MaskDecision:
        foreground = (batch.priors[FOREGROUND] >= self.foreground_threshold).float()  # [B, L]
        num_masked = batch.num_patches - batch.num_keep
        masked_fg = region_counts(foreground, self.ratios(), num_masked)  # [B]
        n_fg = foreground.sum(dim=1)
        ratio_fg = masked_fg / n_fg.clamp_min(1)
        ratio_bg = (num_masked - masked_fg) / (batch.num_patches - n_fg).clamp_min(1)
        weights = foreground * ratio_fg[:, None] + (1 - foreground) * ratio_bg[:, None]  # [B, L]
        return region_decision(foreground, masked_fg, num_masked, batch.mask_ratio, weights)

    def statistics(self) -> dict[str, float]:
        foreground, background = self.ratios().tolist()
        return {"foreground_ratio": foreground, "background_ratio": background}


class RegionRatioFixedMasking(MaskPolicy):
    """The same foreground/background masking with fixed ratios; nothing is learned."""

    name = "region-ratio-fixed"
    description = "Fixed foreground/background masking ratios (region-ratio without MLO)."
    learnable = False
    requires = frozenset({FOREGROUND})

    def __init__(
        self,
        context: PolicyContext,
        foreground_ratio: float = 0.5,
        background_ratio: float = 0.9,
        foreground_threshold: float = 0.5,
    ) -> None:
        super().__init__(context)
        _check_ratios(foreground_ratio, background_ratio, foreground_threshold)
        self.foreground_threshold = float(foreground_threshold)
        self.register_buffer("nominal", torch.tensor([foreground_ratio, background_ratio]))

    def forward(self, batch: MaskBatch) -> MaskDecision:
        foreground = (batch.priors[FOREGROUND] >= self.foreground_threshold).float()
        num_masked = batch.num_patches - batch.num_keep
        masked_fg = region_counts(foreground, self.nominal, num_masked)
        return region_decision(foreground, masked_fg, num_masked, batch.mask_ratio, None)


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [RegionRatioMasking, RegionRatioFixedMasking]
