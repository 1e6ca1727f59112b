"""How much of a learned mask's scores is one map for every image, and what its mode would be
without it, on one checkpoint of a run.

The policy scores every image of the val split in eval mode (its bounded logits, as the mode
ranks them). The scores ``s [N, L]`` split into a position part, the mean map ``m_j = mean_b
s_bj``, and an image part ``s − m``. The script prints the image part's share of the variance
(``mask/image_dependence`` over the whole split) and the position variety of the mode (the
top-k of the scores) with the position part scaled by λ: ``s − m + λ·m``; λ = 1 is the policy
as it is, λ = 0 ranks on the image part alone. docs/mlo.md reads the ViT-S/2-width runs by it.

    OMP_NUM_THREADS=1 python benchmarks/logit_decomposition.py runs/RUN pretrained \
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from maskkit.checkpoint import load_checkpoint
from maskkit.config import load_run_config
from maskkit.data import iterate_eval, load_dataset
from maskkit.engine.diagnostics import mask_statistics
from maskkit.engine.mask_health import image_dependence
from maskkit.engine.objectives import decide
from maskkit.engine.run import build_models
from maskkit.policy import decision_from_scores
from maskkit.weighting import loss_weighting


def position_variety(scores: torch.Tensor, mask_ratio: float) -> float:
    """Position variety of the top-k masks of ``[N, L]`` scores (1: as random masks vary)."""
    return float(mask_statistics(decision_from_scores(scores, mask_ratio))["mask/position_variety"])


def varieties_by_scale(scores: torch.Tensor, mask_ratio: float, scales: list[float]) -> dict[float, float]:
    """λ → position variety of the mode of ``s − m + λ·m`` for ``[N, L]`` scores ``s`` whose
    mean map over the images is ``m [1, L]``."""
    position = scores.mean(dim=0, keepdim=True)
    return {scale: position_variety(scores - position + scale * position, mask_ratio) for scale in scales}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory of a learned policy without priors")
    parser.add_argument("checkpoint", help="a checkpoint pointer of it, e.g. pretrained or last")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.0])
    args = parser.parse_args()

    config = load_run_config(args.run / "config.yaml")
    dataset = load_dataset(config.data.dataset, args.data_dir, image_size=config.model.img_size)
    mae, policy, _ = build_models(config, len(dataset.class_names), torch.device("cpu"))
    if policy.requires:
        needs = ", ".join(sorted(policy.requires))
        parser.error(f"{config.policy} needs priors ({needs}); this script takes policies without")
    load_checkpoint(args.run / "checkpoints", args.checkpoint, map_location="cpu").load_into(
        {"mae": mae, "policy": policy}
    )
    mae.eval()
    policy.eval()
    weighting = loss_weighting(config.pretrain.weighting, config.pretrain.tempered_alpha)
    chunks = []
    with torch.no_grad():
        for batch in iterate_eval(dataset.val, 256, torch.device("cpu"), dataset.mean, dataset.std, ()):
            _, _, decision = decide(mae, policy, batch.images, config.mask_ratio, weighting)
            chunks.append(decision.scores.float())
    scores = torch.cat(chunks)  # [N, L]
    print(
        f"{args.run.name} {args.checkpoint}: {scores.shape[0]} val images, image part's share of the "
        f"scores' variance {image_dependence(scores):.3f}"
    )
    for scale, variety in varieties_by_scale(scores, config.mask_ratio, args.scales).items():
        print(f"  position part x {scale:g}: position variety of the mode {variety:.3f}")


if __name__ == "__main__":
    main()
