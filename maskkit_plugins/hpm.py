"""``hpm``: Hard Patches Mining (Wang et al., "Hard Patches Mining for Masked Image Modeling",
CVPR 2023; reference code ``Haochen-Wang409/HPM``).

An auxiliary predictor estimates each patch's reconstruction loss; the policy masks the patches
it predicts hardest. What HPM does and how maskkit does it:

- **Which patches are masked (easy to hard).** Of the ``N = L − int(L·(1−r))`` masked patches,
  the ``int(N·α_t)`` with the highest predicted loss are masked, and the rest are drawn at
  random from the other patches. ``α_t`` grows linearly over training from
  ``hard_share_start`` to ``hard_share_end`` (HPM: from 0 to 0.5, ``(epoch + 1) / epochs · 0.5``;
  here per pretrain step, ``step / total_steps``), so masking starts as MAE's random masking
  and ends half mined, half random.
- **How the predictor learns.** By HPM's relative (ranking) loss, jointly with the MAE at the
  pretrain level: for every pair (i, j) of masked patches of an image with different errors,
  binary cross-entropy between ``sigmoid(p_j − p_i)`` and whether patch j's actual norm-pix
  error exceeds patch i's (ties are left out), averaged over the pairs. The errors are the
  targets, detached. The predictor's parameters join the pretrain level's optimiser (they are
  the policy's :meth:`pretrain_parameters`); no hypergradient is involved, so one step costs a
  plain MAE step plus the small predictor's forward and backward pass.
- **What the predictor sees (the deviation).** HPM's predictor is a second decoder (as deep as
  the reconstruction decoder) on the encoder's output; at training time it reads the visible
  patches' latents with mask tokens, and for the mask decision an EMA copy of the whole MAE
  encodes *all* patches of the image first. A maskkit policy decides before the encoder runs
  (the encoder only ever sees the kept patches), so encoder features of all patches would
  cost an extra full-image encoder pass each step (about 4× the masked encoder's forward at
  r = 0.75) plus an EMA copy of the MAE. Instead the predictor reads
  :attr:`MaskBatch.tokens`, the patch embeddings with position embeddings (detached: its loss
  trains the predictor only, where HPM's also reaches the encoder), through a small
  transformer (``depth`` timm blocks of width ``width``, attention over all patches for
  context) and a linear head. It sees the same full image at decision and at training time,
  as HPM's teacher does when it decides. There is no EMA teacher: decisions come from the
  predictor being trained.

``maskkit visualize`` draws the predicted loss (rank-scaled per image) beside the mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maskkit.hookspecs import hookimpl
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

PREDICTED_LOSS = "predicted loss"


def relative_loss(predicted: Tensor, error: Tensor) -> Tensor:
    """HPM's relative loss: learn the *order* of the patches' errors, not their values.

    Args:
        predicted: ``[B, M]`` predicted losses (logits of an order, any scale).
        error: ``[B, M]`` actual errors of the same patches.

    Returns:
        The mean over every ordered pair (i, j) of patches of one image with
        ``error_i ≠ error_j`` of ``BCE(sigmoid(p_j − p_i), [error_j > error_i])``; ln 2 ≈ 0.693
        for a predictor that knows nothing.
    """
    difference = predicted[:, None, :] - predicted[:, :, None]  # [B, M, M]: p_j − p_i at (i, j)
    harder = error[:, None, :] > error[:, :, None]  # [B, M, M]: error_j > error_i
    ordered = harder | (error[:, None, :] < error[:, :, None])
    losses = F.binary_cross_entropy_with_logits(difference, harder.to(difference.dtype), reduction="none")
    return (losses * ordered).sum() / ordered.sum().clamp_min(1)


def easy_to_hard_share(progress: float, start: float, end: float) -> float:
    """HPM's share α of the masked patches chosen by predicted loss at ``progress`` ∈ [0, 1]."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


class LossPredictor(nn.Module):
    """Predicts each patch's reconstruction loss from the patch tokens: ``[B, L, D] → [B, L]``.

    ``Linear(D → width)``, ``depth`` timm ViT blocks (self-attention over all L patches),
    LayerNorm, ``Linear(width → 1)``. Linear layers are xavier-uniform, as in MAE and HPM,
    except the head's weight, which starts at zero.
    """

    def __init__(self, embed_dim: int, width: int, depth: int, num_heads: int) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(embed_dim, width)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(width)
        self.head = nn.Linear(width, 1)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Every patch starts equally hard, so the relative loss starts at its chance level, ln 2.
        nn.init.zeros_(self.head.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)  # [B, L, width]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).squeeze(-1)  # [B, L]


class HardPatchesMining(MaskPolicy):
    """Mask the patches a jointly trained predictor expects to be hardest, easy to hard.

    Options (``policy_options``, e.g. ``--set policy_options.depth=2``):
        hard_share_start, hard_share_end: the share α of masked patches chosen by predicted
            loss at the first and the last pretrain step (HPM: 0 and 0.5), in [0, 1].
        width: the predictor's width; default min(D, 64).
        depth: its transformer blocks (>= 0; 0 predicts each patch on its own).
        num_heads: attention heads per block (must divide ``width``).
    """

    name = "hpm"
    description = "Hard Patches Mining (CVPR 2023): mask the patches a loss predictor expects hardest."
    learnable = False  # nothing at level 3: the predictor trains at the pretrain level

    def __init__(
        self,
        context: PolicyContext,
        hard_share_start: float = 0.0,
        hard_share_end: float = 0.5,
        width: int | None = None,
        depth: int = 1,
        num_heads: int = 4,
    ) -> None:
        super().__init__(context)
        for option, value in (("hard_share_start", hard_share_start), ("hard_share_end", hard_share_end)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"{option} must be a number in [0, 1], got {value!r}")
        width = min(context.embed_dim, 64) if width is None else width
        for option, value, lowest in (("width", width, 1), ("depth", depth, 0), ("num_heads", num_heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{option} must be an integer >= {lowest}, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.hard_share_range = (float(hard_share_start), float(hard_share_end))
        self.predictor = LossPredictor(context.embed_dim, width, depth, num_heads)
        # (step, total_steps) of the latest set_progress; a buffer, so checkpoints carry it.
        self.register_buffer("progress", torch.tensor([0, 1], dtype=torch.int64))

    def set_progress(self, step: int, total_steps: int) -> None:
        self.progress.copy_(torch.tensor([step, max(1, total_steps)]))

    def hard_share(self) -> float:
        """α at the current progress: the share of masked patches chosen by predicted loss."""
        step, total = self.progress.tolist()
        return easy_to_hard_share(step / total, *self.hard_share_range)

    def pretrain_parameters(self) -> Iterator[nn.Parameter]:
        return self.predictor.parameters()

    def forward(self, batch: MaskBatch) -> MaskDecision:
        tokens = batch.tokens.detach()  # [B, L, D]
        batch_size, num_patches = tokens.shape[:2]
        predicted = self.predictor(tokens)  # [B, L], graph into the predictor
        num_hard = int((num_patches - batch.num_keep) * self.hard_share())
        rank = predicted.detach().argsort(dim=1, descending=True).argsort(dim=1)  # [B, L], 0 = hardest
        hardest = (rank < num_hard).float()  # [B, L]
        # The predicted-hardest patches first; random ones fill the rest of the quota.
        scores = hardest + 0.5 * torch.rand(batch_size, num_patches, device=tokens.device)
        return decision_from_scores(scores, batch.mask_ratio, maps={PREDICTED_LOSS: predicted})

    def pretrain_loss(self, decision: MaskDecision, batch: MaskBatch, error: Tensor) -> Tensor:
        """The relative loss over each image's masked patches (HPM learns on those only)."""
        num_keep = decision.ids_keep.shape[1]
        masked = torch.argsort(decision.ids_restore, dim=1)[:, num_keep:]  # [B, M]
        predicted = decision.maps[PREDICTED_LOSS].float().gather(1, masked)
        return relative_loss(predicted, error.gather(1, masked))


@hookimpl
def maskkit_policies() -> list[type[MaskPolicy]]:
    return [HardPatchesMining]
