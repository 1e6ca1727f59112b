"""Is a learned mask alive? Its saturation, its change from the start, its dependence on the
image, the agreement of its hypergradient between batches, and the level-2 head's skill.

A mean mask probability says none of this (a mix of ones and zeros has a healthy mean). Every
``diagnostics_every`` pretrain steps, :class:`MaskHealth` runs the policy in eval mode (its mode,
the deterministic top-k) on a fixed batch of the val split and logs:

- ``mask/saturated_share``: the share of the policy's probabilities (its weights) within 1e-3
  of 0 or 1, over every patch of the fixed batch;
- ``mask/logit_abs_max``: the largest ``|score|`` the policy ranked by (its logits);
- ``mask/turnover``: the mean Jaccard distance between each fixed image's mask now and at the
  start of stage 1 (0: the mask never moved);
- ``mask/image_dependence``: the share of the scores' variance that lies between images at the
  same position (0: one mask for every image);
- ``hypergradient/snr``: the cosine between the mask level's hypergradient of a mask step (on
  the step's own batch) and its hypergradient on a fixed batch of the mask split, taken inside
  that step before T is updated, so both stand at the same parameters (near 0: the direction
  is noise);
- ``level2/balanced_accuracy``: the level-2 head's balanced accuracy on a fixed subset of at most
  :data:`LEVEL2_IMAGES` images of the mask split that keeps every class's images up to a common
  cap (:func:`maskkit.data.class_capped_subset`): a balanced accuracy's noise comes from its smallest classes,
  which the cap keeps whole, while the majority class, which costs most of the time, is cut.

The mask figures are cheap and come at every record. The other two are the diagnostics' cost
(E's features of the subset; one more hypergradient), so each comes at every other chance: the
balanced accuracy at every other record and at the last (:meth:`MaskHealth.level2_due`), the
probe at every other record that follows a mask step (:meth:`MaskHealth.probe_at_next_chance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from sklearn.metrics import balanced_accuracy_score
from torch import Tensor

from maskkit.data import Batch, ImageSplit, class_capped_subset, iterate_eval
from maskkit.distributed import rank, world_size
from maskkit.engine.objectives import decide
from maskkit.models import ClassifierHead, MaskedAutoencoderViT
from maskkit.policy import MaskPolicy
from maskkit.weighting import LossWeighting

#: Probabilities within this of 0 or 1 count as saturated.
SATURATION_TOLERANCE = 1e-3
#: Images in the fixed batch the mask statistics are taken on.
FIXED_IMAGES = 128
#: Most images of the mask split the level-2 head's balanced accuracy is taken on.
LEVEL2_IMAGES = 512


def saturated_share(probabilities: Tensor) -> float:
    """Share of ``[B, L]`` probabilities within :data:`SATURATION_TOLERANCE` of 0 or 1."""
    p = probabilities.float()
    return float(((p < SATURATION_TOLERANCE) | (p > 1 - SATURATION_TOLERANCE)).float().mean())


def jaccard_distance(masks: Tensor, reference: Tensor) -> float:
    """Mean over images of ``1 − |A ∩ B| / |A ∪ B|`` between ``[B, L]`` binary masks."""
    a, b = masks.bool(), reference.bool()
    union = (a | b).sum(1).clamp_min(1)
    return float((1 - (a & b).sum(1) / union).mean())


def image_dependence(scores: Tensor) -> float:
    """Share of the variance of ``[B, L]`` scores that lies between images at the same
    position: ``mean_j Var_b(s_bj) / Var_bj(s_bj)`` (0 when every image gets the same scores)."""
    s = scores.double()
    total = s.var(unbiased=False)
    if float(total) == 0.0:
        return 0.0
    return float(s.var(dim=0, unbiased=False).mean() / total)


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Cosine between two lists of tensors taken as one vector each."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum((x.double() ** 2).sum() for x in a))
    nb = torch.sqrt(sum((y.double() ** 2).sum() for y in b))
    return float(dot / (na * nb).clamp_min(1e-300))


def _first_batches(split: ImageSplit, size: int, count: int, device, mean, std, priors) -> list[Batch]:
    batches = []
    for batch in iterate_eval(split, size, device, mean, std, priors):
        if len(batch.labels) < size and batches:
            break
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


class MaskHealth:
    """The diagnostics above for one run (see the module docstring)."""

    def __init__(
        self,
        mae: MaskedAutoencoderViT,
        policy: MaskPolicy,
        head: ClassifierHead,
        eval_split: ImageSplit,
        mask_split: ImageSplit,
        mask_ratio: float,
        weighting: LossWeighting,
        mean: Sequence[float],
        std: Sequence[float],
        autocast: Callable,
        mask_batch_size: int,
        seed: int = 0,
    ) -> None:
        self.mae, self.policy, self.head = mae, policy, head
        self.mask_ratio, self.weighting, self.autocast = mask_ratio, weighting, autocast
        self.mean, self.std = mean, std
        self.level2_split = class_capped_subset(mask_split, LEVEL2_IMAGES, seed)
        self.device = next(mae.parameters()).device
        priors = sorted(policy.requires)
        fixed = _first_batches(eval_split, FIXED_IMAGES, 1, self.device, mean, std, priors)
        self.fixed: Batch | None = fixed[0] if fixed else None
        # A fixed batch of the mask split, the hypergradient's agreement is taken against: the
        # global batch's first images, this process's equal slice of them (the probe averages the
        # slices' hypergradients across processes, as the mask level's own step does).
        local = min(mask_batch_size, len(mask_split)) // world_size()
        rows = mask_split[rank() * local : (rank() + 1) * local]
        probe = _first_batches(rows, local, 1, self.device, mean, std, priors) if local else []
        self.snr_batch: Batch | None = probe[0] if probe else None
        self.initial_masks: Tensor | None = None
        self.snr_chances = 0  # records that followed a mask step: the probe runs at every other

    @torch.no_grad()
    def _mode(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The policy's deterministic decision on the fixed batch: ``(mask, scores, weights)``."""
        assert self.fixed is not None
        modes = (self.mae.training, self.policy.training)
        self.mae.eval()
        self.policy.eval()
        try:
            with self.autocast():
                fixed = self.fixed
                _, _, decision = decide(
                    self.mae, self.policy, fixed.images, self.mask_ratio, self.weighting, fixed.priors
                )
        finally:
            self.mae.train(modes[0])
            self.policy.train(modes[1])
        scores = decision.scores if decision.scores is not None else decision.mask
        return decision.mask.float(), scores.float(), decision.weights

    def remember_start(self) -> None:
        """Keep the masks at the start of stage 1, which :data:`mask/turnover` compares with."""
        if self.fixed is not None:
            self.initial_masks = self._mode()[0].bool().cpu()

    def state_dict(self) -> dict:
        return {"initial_masks": self.initial_masks, "snr_chances": self.snr_chances}

    def load_state_dict(self, state: dict) -> None:
        self.initial_masks = state.get("initial_masks")
        self.snr_chances = state.get("snr_chances", 0)

    def probe_at_next_chance(self) -> bool:
        """Whether the hypergradient probe runs at the next record that follows a mask step (the
        first such record, the third, …; :meth:`count_chance` counts them)."""
        return self.snr_batch is not None and self.snr_chances % 2 == 0

    def count_chance(self) -> None:
        """A record followed a mask step."""
        self.snr_chances += 1

    @staticmethod
    def level2_due(record: int, last: bool) -> bool:
        """Whether the ``record``-th record (0 at the start of stage 1) takes the level-2 head's
        balanced accuracy: every other one, and the ``last``."""
        return record % 2 == 0 or last

    def mask_figures(self) -> dict[str, float]:
        """The mask's saturation, largest score, turnover and image dependence."""
        if self.fixed is None:
            return {}
        mask, scores, weights = self._mode()
        figures = {
            "mask/logit_abs_max": float(scores.abs().max()),
            "mask/image_dependence": image_dependence(scores),
        }
        if weights is not None:
            figures["mask/saturated_share"] = saturated_share(weights.detach())
        if self.initial_masks is not None:
            figures["mask/turnover"] = jaccard_distance(mask.cpu(), self.initial_masks)
        return figures

    @torch.no_grad()
    def level2_balanced_accuracy(self) -> float:
        """Balanced accuracy of E + the level-2 head on the fixed class-capped subset of the mask
        split (eval mode)."""
        modes = (self.mae.training, self.head.training)
        self.mae.eval()
        self.head.eval()
        predictions, labels = [], []
        try:
            for batch in iterate_eval(self.level2_split, 256, self.device, self.mean, self.std):
                with self.autocast():
                    logits = self.head(self.mae.features(batch.images))
                predictions.append(logits.float().argmax(1).cpu())
                labels.append(batch.labels.cpu())
        finally:
            self.mae.train(modes[0])
            self.head.train(modes[1])
        if not labels:
            return float("nan")
        return float(balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(predictions).numpy()))

    def hypergradient_agreement(
        self, step_hypergradient: Sequence[Tensor], hypergradient_on: Callable[[Batch], list[Tensor]]
    ) -> float | None:
        """Cosine between a mask step's own hypergradient and the one ``hypergradient_on`` gives
        on the fixed batch at the same parameters, without touching the training RNG stream."""
        if self.snr_batch is None:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            fixed = hypergradient_on(self.snr_batch)
        return cosine(step_hypergradient, fixed)
