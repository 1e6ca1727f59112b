"""Which C the level-2 head's refit should use, on one checkpoint of a run.

The refit (``maskkit/engine/head_refit.py``) fits a class-balanced logistic regression to E's
features of a fixed subset of the finetune split. This script takes a stage-1 checkpoint, computes
E's features (through the head's LayerNorm, as the refit sees them) of several refit subsets
(random and class-capped, of the sizes given) and of the level-2 diagnostic's class-capped images
of the mask split, fits the probe at each C and prints its balanced cross-entropy and balanced
accuracy on the latter: the figures docs/mlo.md chose ``REFIT_C`` by.

    OMP_NUM_THREADS=1 python benchmarks/refit_c.py runs/RUN step-000000329 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss

from maskkit.config import load_run_config
from maskkit.data import ImageSplit, class_capped_subset, load_dataset, make_splits
from maskkit.engine.mask_health import LEVEL2_IMAGES
from maskkit.engine.protocols.features import encoder_features
from maskkit.engine.run import build_models


def _features(mae, head, split: ImageSplit, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, D] after the head's LayerNorm, labels [N])`` of ``split``, eval mode."""

    def normed(images: torch.Tensor) -> torch.Tensor:
        return head.norm(mae.features(images))

    features = encoder_features(normed, split, 256, torch.device("cpu"), mean, std, nullcontext)
    return features.values, features.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory")
    parser.add_argument("checkpoint", help="a checkpoint folder of it, e.g. step-000000329")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--c", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)  # as the refit (500 iterations at most)

    config = load_run_config(args.run / "config.yaml")
    dataset = load_dataset(config.data.dataset, args.data_dir, image_size=config.model.img_size)
    splits = make_splits(dataset, config.data.train_portion, config.data.mask_source)
    mae, _, head = build_models(config, len(dataset.class_names), torch.device("cpu"))
    folder = args.run / "checkpoints" / args.checkpoint
    mae.load_state_dict(load_file(folder / "mae.safetensors"))
    head.load_state_dict(load_file(folder / "head.safetensors"))
    mae.eval()
    head.eval()
    mean, std = dataset.mean, dataset.std
    val_x, val_y = _features(
        mae, head, class_capped_subset(splits.mask_val, LEVEL2_IMAGES, config.seed), mean, std
    )
    balanced = (1.0 / np.bincount(val_y))[val_y]  # each class weighs the same in the cross-entropy
    generator = torch.Generator().manual_seed(config.seed)
    finetune = splits.finetune
    subsets = {}
    for size in args.sizes:
        subsets[f"random {size}"] = finetune.subset(torch.randperm(len(finetune), generator=generator)[:size])
        subsets[f"class-capped {size}"] = class_capped_subset(finetune, size, config.seed)
    print(
        f"{args.run.name} {args.checkpoint}: balanced cross-entropy (balanced accuracy) on "
        f"{len(val_y)} class-capped mask-split images"
    )
    for name, subset in subsets.items():
        x, y = _features(mae, head, subset, mean, std)
        cells = []
        for c in args.c:
            probe = LogisticRegression(C=c, class_weight="balanced", max_iter=500).fit(x, y)
            probabilities = probe.predict_proba(val_x)
            accuracy = balanced_accuracy_score(val_y, probe.classes_[probabilities.argmax(1)])
            loss = log_loss(val_y, probabilities, labels=probe.classes_, sample_weight=balanced)
            cells.append(f"C={c:g}: {loss:.3f} ({accuracy:.3f})")
        print(f"  {name:>17}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
