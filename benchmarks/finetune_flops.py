"""Count the FLOPs of one stage-2 (fine-tuning) step and of one image's evaluation.

``step_time.py`` counts stage 1; this counts the rest of a cell's compute with the same counter
(``torch.utils.flop_counter.FlopCounterMode``): one training step of stage 2 (the encoder on all
patches, no masking, and the head; forward and backward) at the config's ``finetune.batch_size``,
and one forward of the classifier per image, what evaluation and the protocols' feature pass
cost. The optimiser's update is not counted (as in ``step_time.py``).

    python benchmarks/finetune_flops.py --preset cpu --set model.embed_dim=192 --set model.depth=6

It runs on the CPU, on random images, and writes nothing.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskkit.config import build_config, parse_override
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier

NUM_CLASSES = 7


def count_flops(preset: str, overrides: list[str], batch_size: int | None) -> dict[str, float]:
    """``{"finetune_step": F, "eval_per_image": F, "batch_size": B}`` for the config.

    ``finetune_step`` is a forward and backward of ``[B, 3, H, W]`` random images through the
    encoder and a ``NUM_CLASSES``-way head; ``eval_per_image`` a forward of one image's share of
    the same batch, without gradients.
    """
    config = build_config(preset, overrides=[parse_override(item) for item in overrides])
    batch = batch_size or config.finetune.batch_size
    model = ViTClassifier(
        MaskedAutoencoderViT(config.model), ClassifierHead(config.model.embed_dim, NUM_CLASSES, 0.0)
    )
    images = torch.randn(batch, 3, config.model.img_size, config.model.img_size)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    with FlopCounterMode(display=False) as train:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        model(images)
    return {
        "batch_size": batch,
        "finetune_step": float(train.get_total_flops()),
        "eval_per_image": evaluation.get_total_flops() / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=None, help="default: finetune.batch_size")
    args = parser.parse_args()
    print(json.dumps(count_flops(args.preset, args.overrides, args.batch_size)))


if __name__ == "__main__":
    main()
