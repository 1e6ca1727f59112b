"""Optimisers and schedules shared by every stage."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from maskkit.config import OptimizerConfig


def parameter_groups(
    module: nn.Module,
    weight_decay: float,
    only: Iterable[nn.Parameter] | None = None,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict]:
    """timm's ``param_groups_weight_decay`` groups of ``module`` (decay on weights, none on
    biases and norms, as the reference), restricted to the parameters in ``only`` (all when
    None) and not in ``exclude``; empty groups are dropped."""
    wanted = None if only is None else {id(p) for p in only}
    unwanted = {id(p) for p in exclude}
    groups = []
    for group in param_groups_weight_decay(module, weight_decay=weight_decay):
        params = [p for p in group["params"] if (wanted is None or id(p) in wanted) and id(p) not in unwanted]
        if params:
            groups.append({**group, "params": params})
    return groups


def adamw(
    parameters: nn.Module | list[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over a module's :func:`parameter_groups`, or over groups built by it; ``fused``
    (the run's ``fused_adamw``) runs torch's fused kernel instead of its ``foreach`` one: the same
    update up to float rounding."""
    groups = parameter_groups(parameters, weight_decay) if isinstance(parameters, nn.Module) else parameters
    if not groups:  # a policy with no parameters still gets a (no-op) optimiser
        groups = [{"params": [nn.Parameter(torch.zeros(0))], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def adamw_from_config(
    parameters: nn.Module | list[dict], config: OptimizerConfig, fused: bool = False
) -> torch.optim.AdamW:
    return adamw(parameters, config.lr, config.weight_decay, config.betas, fused)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, frozen_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr 0 for ``frozen_steps``, then a linear warm-up over ``warmup_steps``, then cosine decay
    to zero at ``total_steps`` (stepped once per step)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        step -= frozen_steps
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - frozen_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
