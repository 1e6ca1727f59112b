"""What a user needs to see whether a learned mask is healthy: statistics of mask decisions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from maskkit.data import ImageSplit, iterate_eval
from maskkit.distributed import gather_rows, is_distributed, sum_of
from maskkit.engine.evaluate import share_of_split
from maskkit.engine.objectives import masked_reconstruction
from maskkit.models.mae import MaskedAutoencoderViT
from maskkit.policy import MaskDecision, MaskPolicy
from maskkit.priors.provider import FOREGROUND, IMPORTANCE
from maskkit.weighting import LossWeighting

#: A patch counts as important (foreground) when its pooled prior reaches this.
PRIOR_LEVEL = 0.5
# (prior, name of the patches at or above PRIOR_LEVEL, name of the others)
_GUIDANCE_GROUPS = ((IMPORTANCE, "important", "unimportant"), (FOREGROUND, "foreground", "background"))


def mask_statistics(
    decision: MaskDecision, error: Tensor | None = None, priors: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """What a user needs to see whether a learned mask is healthy, as 0-d tensors.

    - ``mask/prob_mean``, ``mask/prob_std``: mean and spread of the policy's weights (the mask
      probability) over all patches; ``mask/prob_masked``, ``mask/prob_kept``: their mean over
      the masked and the kept patches (only when the policy gives weights).
    - ``mask/position_variety``: how much the masked positions differ between images: the
      variance of each position's masked share across the batch, over its value under
      uniformly random masks (about 1 for random masks, 0 when every image gets the same mask).
    - ``pretrain/masked_error``: the unweighted mean error of the masked patches, to read
      beside the weighted loss.
    - ``guidance/masked_share_<group>``: with ``priors`` (name → ``[B, L]``), the share of the
      important and unimportant patches (importance ≥ 0.5 or not), or of the foreground and
      background ones, that is masked: what semantic guidance changes.
    """
    mask = decision.mask.float()  # [B, L]
    batch_size = mask.shape[0]
    stats: dict[str, Tensor] = {}
    weights = decision.weights
    if weights is not None:
        weights = weights.detach().float()
        stats["mask/prob_mean"] = weights.mean()
        stats["mask/prob_std"] = weights.std()
        stats["mask/prob_masked"] = (weights * mask).sum() / mask.sum()
        stats["mask/prob_kept"] = (weights * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1)
    if batch_size > 1:
        ratio = mask.mean()
        share = mask.mean(dim=0)  # [L], each position's masked share
        variance = (share * (1 - share)).mean() * batch_size / (batch_size - 1)
        stats["mask/position_variety"] = variance / (ratio * (1 - ratio)).clamp_min(1e-12)
    if error is not None:
        stats["pretrain/masked_error"] = (error.detach() * mask).sum() / mask.sum()
    for prior, high_name, low_name in _GUIDANCE_GROUPS:
        if priors and prior in priors:
            high = (priors[prior].detach() >= PRIOR_LEVEL).float()
            for group, members in ((high_name, high), (low_name, 1 - high)):
                if members.sum() > 0:
                    stats[f"guidance/masked_share_{group}"] = (mask * members).sum() / members.sum()
    return stats


def global_batch(decision: MaskDecision, error: Tensor | None) -> tuple[MaskDecision, Tensor | None]:
    """The mask ``[B, L]``, weights and error of the global batch, gathered in order from the
    processes' slices ``[b, L]``, for :func:`mask_statistics` (``decision`` and ``error``
    themselves with one process). ``ids_keep``/``ids_restore`` are not gathered (empty).

    A process with no rows (a split smaller than the processes' shares) may pass ``[0, L]``
    tensors and no weights; the weights are gathered when any process has them."""
    if not is_distributed():
        return decision, error
    mask = gather_rows(decision.mask.float())
    weights = None
    if sum_of([0.0 if decision.weights is None else 1.0])[0] > 0:
        local = decision.weights if decision.weights is not None else torch.zeros_like(decision.mask)
        weights = gather_rows(local.detach().float())
    ids = torch.zeros(mask.shape[0], 0, dtype=torch.int64, device=mask.device)
    return MaskDecision(ids, ids, mask, weights), None if error is None else gather_rows(error.detach())


@torch.no_grad()
def split_mask_statistics(
    mae: MaskedAutoencoderViT,
    policy: MaskPolicy,
    split: ImageSplit,
    mask_ratio: float,
    weighting: LossWeighting,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    autocast: Callable,
    priors: Sequence[str] = (),
) -> dict[str, float]:
    """:func:`mask_statistics` of ``policy``'s decisions over a whole split (un-augmented, the
    modules in eval mode, with the split's ``priors``), with the reconstruction error of the
    masked patches. With several processes each decides its share of the batches and the
    statistics cover all of them."""
    device = next(mae.parameters()).device
    modes = (mae.training, policy.training)
    mae.eval()
    policy.eval()
    masks, weights, errors = [], [], []
    pooled: dict[str, list[Tensor]] = {}
    try:
        for images, _, pixel_priors in iterate_eval(
            share_of_split(split, batch_size), batch_size, device, mean, std, priors
        ):
            with autocast():
                result = masked_reconstruction(mae, policy, images, mask_ratio, weighting, pixel_priors)
            masks.append(result.decision.mask.float())
            errors.append(result.error.float())
            if result.decision.weights is not None:
                weights.append(result.decision.weights.float())
            for name, values in result.batch.priors.items():
                pooled.setdefault(name, []).append(values.float())
    finally:
        mae.train(modes[0])
        policy.train(modes[1])
    empty = torch.zeros(0, mae.num_patches, device=device)  # a process whose share has no rows
    mask = torch.cat(masks) if masks else empty
    ids = torch.zeros(mask.shape[0], 0, dtype=torch.int64)
    decision = MaskDecision(ids, ids, mask, torch.cat(weights) if weights else None)
    decision, error = global_batch(decision, torch.cat(errors) if errors else empty)
    # Every process gathers every served prior, also one whose share had no rows.
    all_priors = {
        name: gather_rows(torch.cat(pooled[name]) if name in pooled else empty)
        for name in sorted(set(priors) | set(pooled))
    }
    return {key: float(value) for key, value in mask_statistics(decision, error, all_priors).items()}
