"""What is measured: one policy's run config sized for the measurement, synthetic data, and the
``Pretrainer`` built exactly as ``maskkit train`` builds it.

An *MLO iteration* is ``unroll(pretrain) × unroll(finetune)`` pretrain steps (2 with the presets'
2/1/1 unroll): for a learnable policy the finetune steps and one mask step with the mask level's
hypergradient run within them; a policy without level 3 (``random``) runs the same pretrain
steps alone, so that iterations of any two policies pretrain the MAE as much.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from maskkit.config import LEVEL_KEYS, RunConfig
from maskkit.data import ImageSplit, LabelledDataset, MLOSplits, make_splits
from maskkit.engine.context import RunContext
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.priors import computed_priors
from maskkit.engine.run import build_models
from maskkit.models import ClassifierHead, MaskedAutoencoderViT
from maskkit.plugins import create_policy, create_provider, policy_info
from maskkit.policy import MASK_LEVEL, PRETRAIN_LEVEL, policy_context
from maskkit.rundir import RunDir

#: The MLO levels by their names in the loop, in order (``pretrain/finetune/mask``).
LEVELS: tuple[str, ...] = tuple(LEVEL_KEYS)
#: Classes of the synthetic images.
NUM_CLASSES = 7


def is_multilevel(policy: str) -> bool:
    """Whether ``policy`` runs all three levels (level 3 trains it:
    :meth:`maskkit.policy.MaskPolicy.training_levels`); else the pretrain level alone."""
    return MASK_LEVEL in policy_info(policy).policy_class.training_levels()


def named_options(policy: str, device: str | None, precision: str | None) -> dict[str, Any]:
    """The config layer of what a command line names: the policy, and the device and precision
    when given (None: the config's)."""
    layer: dict[str, Any] = {"policy": policy}
    if device is not None:
        layer["device"] = device
    if precision is not None:
        layer["precision"] = precision
    return layer


def steps_per_iteration(config: RunConfig) -> int:
    """Pretrain steps in one MLO iteration: the finetune and mask levels step once per this many."""
    levels = config.pretrain
    return levels.level("pretrain").unroll_steps * levels.level("finetune").unroll_steps


def level_settings(config: RunConfig) -> dict[str, str]:
    """Batch sizes and unroll steps as ``8/8/8`` and ``1/1/1`` (pretrain/finetune/mask)."""
    levels = [config.pretrain.level(level) for level in LEVELS]
    return {
        "batch_sizes": "/".join(str(level.batch_size) for level in levels),
        "unroll": "/".join(str(level.unroll_steps) for level in levels),
    }


def with_iterations(config: RunConfig, iterations: int) -> RunConfig:
    """``config`` as a run of ``iterations`` MLO iterations (``pretrain.steps``), so that the
    schedules that depend on the run's length (the learning rates' warm-up and decay, the
    learned mask's warm-ups) are those of the run measured."""
    steps = steps_per_iteration(config) * iterations
    return config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"steps": steps})})


def synthetic_dataset(config: RunConfig, num_images: int | None = None, seed: int = 0) -> LabelledDataset:
    """Random uint8 images of the model's size in :data:`NUM_CLASSES` classes, with a val split:
    ``num_images`` training images (default: max(256, 2 × the largest batch)), ``[N, 3, S, S]``."""
    largest = max(config.pretrain.level(level).batch_size for level in LEVELS)
    count = num_images or max(256, 2 * largest)
    size = config.model.img_size
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        return ImageSplit(images, torch.randint(0, NUM_CLASSES, (n,), generator=generator))

    train = split(count)
    pixels = train.images.float().div_(255.0)
    mean = tuple(float(v) for v in pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in pixels.std(dim=(0, 2, 3)))
    return LabelledDataset(
        name="synthetic",
        train=train,
        val=split(max(16, count // 4)),
        test=split(16),
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


def synthetic_splits(config: RunConfig, dataset: LabelledDataset) -> MLOSplits:
    """The MLO splits of ``dataset``, cut as ``maskkit train`` cuts them; a policy that reads
    priors gets the weight-free ``center`` prior attached, which needs no store."""
    data = config.data
    if policy_info(config.policy).requires:
        dataset = computed_priors(dataset, create_provider("center"))
    return make_splits(dataset, data.train_portion, data.mask_source, data.val_portion)


def count_parameters(config: RunConfig) -> dict[str, int]:
    """Parameters of the MAE, the policy and (for a learnable policy) the head, built on the meta
    device so that no memory is allocated; ``trained`` is what the run trains."""
    learnable = is_multilevel(config.policy)
    with torch.device("meta"):
        mae = MaskedAutoencoderViT(config.model)
        policy = create_policy(
            config.policy, policy_context(mae, config.pretrain.learned_mask), config.policy_options
        )
        head = ClassifierHead(config.model.embed_dim, NUM_CLASSES, config.finetune.head_dropout)
    counts = {
        "mae": sum(p.numel() for p in mae.parameters()),
        "policy": sum(p.numel() for p in policy.parameters()),
        # the policy's parameters that the pretrain level trains (hpm's loss predictor)
        "policy_pretrain": sum(p.numel() for p in policy.pretrain_parameters())
        if PRETRAIN_LEVEL in policy.training_levels()
        else 0,
        "head": sum(p.numel() for p in head.parameters()) if learnable else 0,
    }
    policy_trained = counts["policy"] if learnable else counts["policy_pretrain"]
    counts["trained"] = counts["mae"] + policy_trained + counts["head"]
    return counts


@contextlib.contextmanager
def built_pretrainer(
    config: RunConfig, dataset: LabelledDataset, splits: MLOSplits, device: torch.device
) -> Iterator[Pretrainer]:
    """The models (``build_models``) and the ``Pretrainer`` as ``maskkit train`` makes them (a
    fixed policy gets the pretrain level alone), over a temporary run directory that is removed
    afterwards."""
    mae, mask_policy, head = build_models(config, len(dataset.class_names), device)
    with tempfile.TemporaryDirectory(prefix="maskkit-cost-") as run_path:
        context = RunContext(
            config, device, dataset, splits, RunDir(Path(run_path)), Console(stderr=True, quiet=True)
        )
        yield Pretrainer(context, mae, mask_policy, head if is_multilevel(config.policy) else None)
