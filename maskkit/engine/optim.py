"""Optimisers and schedules shared by every stage."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from maskkit.config import OptimizerConfig


def adamw(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on weights only (none on biases, norms, tokens, position
    embeddings), as the reference does through timm's ``param_groups_weight_decay``."""
    groups = param_groups_weight_decay(module, weight_decay=weight_decay)
    groups = [group for group in groups if group["params"]]
    if not groups:  # a policy with no parameters still gets a (no-op) optimiser
        groups = [{"params": [nn.Parameter(torch.zeros(0))], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def adamw_from_config(module: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    return adamw(module, config.lr, config.weight_decay, config.betas)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero at ``total_steps`` (stepped once per step)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
