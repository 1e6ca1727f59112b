"""A few MLO iterations of a tiny model, in one process or in each process of a torchrun job.

``tests/test_distributed.py`` runs it under ``torchrun --nproc-per-node 2`` (gloo on the CPU)
and calls :func:`run_case` in its own process for the single-process reference. Each case
records, per pretrain-level step, every level's loss (the global batch's) and the mask level's
hypergradient, and at the end every level's parameters.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit import distributed
from maskkit.engine import hypergradient
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models

STEPS = 4
GLOBAL_BATCH = 8  # every level; 4 rows per process with 2 processes

#: name → config overrides. Head dropout is off (tiny_config), so nothing in stage 1 draws from
#: the processes' own random streams and the runs are comparable number for number, except
#: ``random``, whose noise each process draws for its own slice.
CASES: dict[str, dict] = {
    "mlo-light, darts exact, 2/1/1, class-balanced": {
        "policy": "mlo-light",
        "pretrain": {"mae": {"unroll_steps": 2}, "augment": "crop_flip", "class_balanced": True},
    },
    # The diversity term penalises the global batch's mean map (a collective in its backward).
    "mlo, cg, diversity term": {
        "policy": "mlo",
        "policy_options": {"hidden_dim": 4},
        "pretrain": {
            "hypergradient": {"estimator": "cg", "cg_iterations": 2},
            "learned_mask": {"diversity": 1.0, "shared_map_cap": 0.0},
        },
    },
    # mlo centres its tokens by the global batch's mean (a collective), and under the reference
    # weighting its forward is re-evaluated inside the forward-mode product.
    "mlo, darts exact, reference weighting": {
        "policy": "mlo",
        "policy_options": {"hidden_dim": 4},
        "pretrain": {"weighting": "reference"},
    },
    "mlo-light, darts finite-difference, reference weighting": {
        "policy": "mlo-light",
        "pretrain": {"weighting": "reference", "hypergradient": {"darts_mode": "finite-difference"}},
    },
    "random": {"policy": "random"},
}
#: The deterministic cases again in float64, where a 2-process run must agree with a 1-process
#: run to rounding (float32 leaves Adam's normalisation room to magnify it).
FLOAT64 = ", float64"
for _name in [name for name in CASES if name != "random"]:
    CASES[_name + FLOAT64] = CASES[_name]
#: The first case again, with a defect the comparison must catch: each process pushes the
#: global seeds through products of its own slice only (the products are not averaged), so the
#: mask level moves by a per-process hypergradient.
BROKEN = "broken: products not averaged"
FIRST = "mlo-light, darts exact, 2/1/1, class-balanced"
CASES[BROKEN] = CASES[FIRST]


@contextlib.contextmanager
def _products_not_averaged() -> Iterator[None]:
    original = hypergradient.global_product
    hypergradient.global_product = lambda vector, current, following: hypergradient.ESTIMATORS[
        current.estimator.estimator
    ](vector, current, following)
    try:
        yield
    finally:
        hypergradient.global_product = original


def _config(overrides: dict):
    levels = {"batch_size": GLOBAL_BATCH}
    # A sampled mask is drawn by each process for its own slice, from its own stream (as random's
    # noise is): number for number, the runs compare only under the deterministic top-k.
    base = {
        "pretrain": {
            "mae": levels,
            "head": levels,
            "mask": levels,
            "learned_mask": {"selection": "top-k"},
        }
    }
    policy = overrides.get("policy", "mlo-light")
    rest = {key: value for key, value in overrides.items() if key != "policy"}
    return tiny_config(policy, **_merge(base, rest))


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def run_case(name: str, workdir: Path, steps: int = STEPS) -> dict:
    """``steps`` pretrain-level steps of case ``name``; returns what the comparison needs."""
    config = _config(CASES[name])
    dataset = synthetic_dataset()
    run_path = workdir / f"{name.replace(', ', '-').replace(' ', '_')}-process{distributed.rank()}"
    context = quiet_context(config, dataset, run_path)
    mae, policy, head = build_models(config, dataset.num_classes, context.device)
    distributed.separate_random_streams(config.seed)
    if name.endswith(FLOAT64):
        for module in (mae, policy, head):
            module.double()
    pretrainer = Pretrainer(context, mae, policy, head if policy.learnable else None)
    if name.endswith(FLOAT64):
        _in_float64(pretrainer)
    mlo = pretrainer.mlo
    losses, hypergradients = [], []
    for step in range(1, steps + 1):
        mask_steps = mlo.step_counts().get("mask", 0)
        mlo.step(step)
        losses.append(dict(mlo.last_losses()))
        if mlo.is_multilevel and mlo.step_counts()["mask"] > mask_steps:
            hypergradients.append(torch.cat([g.reshape(-1) for g in mlo.levels["mask"].last_hypergradient]))
    parameters = {
        name: {key: value.detach().clone() for key, value in level.module.named_parameters()}
        for name, level in mlo.levels.items()
    }
    return {"losses": losses, "hypergradients": hypergradients, "parameters": parameters}


def _in_float64(pretrainer: Pretrainer) -> None:
    for level in pretrainer.mlo.levels.values():
        source = level.spec.next_batch

        def in_float64(source=source):
            batch = source()
            return batch._replace(images=batch.images.double())

        level.spec.next_batch = in_float64
    if pretrainer.objectives.class_weights is not None:
        pretrainer.objectives.class_weights = pretrainer.objectives.class_weights.double()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    distributed.start("cpu", timeout_s=120)
    results = {}
    for name in CASES:
        with _products_not_averaged() if name == BROKEN else contextlib.nullcontext():
            results[name] = run_case(name, out)
    torch.save(results, out / f"process{distributed.rank()}.pt")
    distributed.stop()
