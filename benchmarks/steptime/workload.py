"""What is benchmarked: the run config of one policy in one variant, and its images (synthetic, or
``--dataset``). The rest of the workload (the ``Pretrainer`` as ``maskkit train`` builds it) is
:mod:`maskkit.cost.workload`."""

from __future__ import annotations

import argparse

from maskkit.config import LEVEL_KEYS, RunConfig, build_config, parse_override
from maskkit.cost.workload import LEVELS, named_options, synthetic_dataset
from maskkit.data import LabelledDataset

from .variants import Variant


def make_config(args: argparse.Namespace, policy: str, variant: Variant | None = None) -> RunConfig:
    """The preset, ``--config``, the workload's config (its model), ``--set``, then the command
    line's batch, device and variant choices, each over the one before."""
    overrides: list[dict] = [*args.workload_config, *(parse_override(item) for item in args.overrides)]
    extra = named_options(policy, args.device, args.precision)
    if args.batch_size is not None:
        extra["pretrain"] = {LEVEL_KEYS[level]: {"batch_size": args.batch_size} for level in LEVELS}
    layers = [*overrides, extra]
    if variant is not None:
        layers.append(variant.overrides())
    return build_config(args.config_preset, args.config, layers)


def benchmark_dataset(args: argparse.Namespace, config: RunConfig) -> LabelledDataset:
    """``--dataset NAME`` (from ``--data-dir``) when given, else synthetic images
    (``--num-images`` of them)."""
    if args.dataset is None:
        return synthetic_dataset(config, args.num_images, seed=config.seed)
    from maskkit.data.registry import load_dataset

    return load_dataset(args.dataset, args.data_dir, image_size=config.model.img_size)
