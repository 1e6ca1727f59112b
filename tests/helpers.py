"""Small builders shared by the tests: synthetic datasets, tiny configs, a quiet run context."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from maskkit.config import RunConfig, build_config
from maskkit.data import ImageSplit, LabelledDataset, make_splits
from maskkit.engine.context import RunContext
from maskkit.rundir import RunDir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# ``maskkit ARGS`` in a subprocess, seeing only maskkit's own plugins and those installed under
# $MASKKIT_TEST_PLUGIN_SITES (see plugin_isolation.py).
MASKKIT_CLI = [sys.executable, str(Path(__file__).resolve().parent / "isolated_cli.py")]

TINY_MODEL = {
    "img_size": 8,
    "patch_size": 4,
    "embed_dim": 8,
    "depth": 1,
    "num_heads": 2,
    "decoder_embed_dim": 8,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def synthetic_dataset(size: int = 8, num_classes: int = 3, train: int = 32, seed: int = 0) -> LabelledDataset:
    """Random uint8 images whose mean brightness encodes the class, so a classifier can learn."""
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> ImageSplit:
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        base = (labels.float() + 0.5) / num_classes * 200
        noise = torch.randint(0, 56, (count, 3, size, size), generator=generator).float()
        images = (base.view(-1, 1, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
        return ImageSplit(images=images, labels=labels)

    return LabelledDataset(
        name="synthetic",
        train=split(train),
        val=split(train // 2),
        test=split(train // 2),
        class_names=[f"class {i}" for i in range(num_classes)],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def tiny_config(policy: str = "mlo-light", **overrides) -> RunConfig:
    levels = {"lr": 1e-3, "batch_size": 8, "unroll_steps": 1}
    base = {
        "policy": policy,
        "mask_ratio": 0.5,
        "model": TINY_MODEL,
        "data": {"eval_batch_size": 16},
        "pretrain": {
            "steps": 4,
            "augment": "none",
            "mae": levels,
            "head": levels,
            "mask": levels,
            # Bounded logits and sampled masks, as by default; no warm-ups or head refits, which
            # would take all of a 4-step run (tests of those set them).
            "learned_mask": {"random_warmup": 0, "lr_warmup": 0, "head_refit_every": None},
        },
        "finetune": {"epochs": 1, "batch_size": 8, "augment": "none", "head_dropout": 0.0},
    }
    return build_config("smoke", overrides=[base, overrides])


def quiet_context(config: RunConfig, dataset: LabelledDataset, run_path: Path) -> RunContext:
    run = RunDir.create(run_path, config.policy, dataset.name)
    return RunContext(
        config=config,
        device=torch.device("cpu"),
        dataset=dataset,
        splits=make_splits(dataset, config.data.train_portion, config.data.mask_source),
        run=run,
        console=Console(quiet=True),
    )


def write_medmnist_npz(
    path: Path,
    sizes: tuple[int, int, int] = (64, 32, 32),
    classes: int = 7,
    test_labels: np.ndarray | None = None,
) -> Path:
    """A small file in the MedMNIST npz layout (``*_images [N, 28, 28, 3]``, ``*_labels [N, 1]``).

    Labels cycle through the classes, except ``test_labels`` (``[N_test]``) when given."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8).reshape(-1, 1)
    if test_labels is not None:
        arrays["test_labels"] = np.asarray(test_labels, dtype=np.uint8).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def with_priors(dataset: LabelledDataset, maps) -> LabelledDataset:
    """``dataset`` with per-pixel priors attached to every split; ``maps(split)`` gives
    name → ``[N, H, W]`` uint8 for a split."""
    import dataclasses

    def attach(split: ImageSplit | None) -> ImageSplit | None:
        return None if split is None else dataclasses.replace(split, priors=maps(split))

    return dataclasses.replace(
        dataset, train=attach(dataset.train), val=attach(dataset.val), test=attach(dataset.test)
    )


def red_channel_priors(split: ImageSplit) -> dict[str, torch.Tensor]:
    """Priors that are a copy of the images' red channel, so alignment is checkable pixel for
    pixel: ``importance`` = red, ``foreground`` = red ≥ 128 (as 0/255)."""
    red = split.images[:, 0].clone()  # [N, H, W] uint8
    return {"importance": red, "foreground": (red >= 128).to(torch.uint8) * 255}
