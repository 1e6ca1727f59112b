"""What the learned-mask work costs per MLO iteration, each part timed on its own.

The work ``pretrain.learned_mask`` and the mask-health diagnostics add to stage 1
(``maskkit/masking.py``, ``maskkit/engine/head_refit.py``, ``maskkit/engine/mask_health.py``):

- **the mask decision**: the policy's forward pass (bounded logits, Gumbel-top-k sampling and its
  log-probability, or the reference's raw logits and top-k), at every call an iteration makes
  (counted by a forward hook during the timed iterations), and one backward pass into the
  policy per hypergradient (through the decision's weights);
- **the head refit**: every ``head_refit_every`` mask steps, E's features of the refit subset's
  rotating window (``head_refit_refresh`` of its ``head_refit_images`` images; all of them at the
  first refit, which is timed apart) and a logistic regression fitted to the whole subset's;
- **the diagnostics**: every ``max(1, T // 25)`` pretrain steps (and at step 0) the mask figures
  on the fixed batch; at every other one of these records (and the last) the level-2 head's
  balanced accuracy on a class-capped subset of the mask split; at every other record that
  follows a mask step, the SNR probe (one more hypergradient, inside that step).

Each part is timed ``repeats`` times after the timed iterations (the median counts) and amortised
over a run of ``T`` pretrain steps, ``T`` from the config's epochs over the synthetic pretrain
split (``--num-images``: 7007 is DermaMNIST's training set) at the pretrain batch size, the
length the run would have; the engine's own schedule (:class:`maskkit.engine.pretrain.Pretrainer`)
decides which steps run what.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from maskkit.config import PretrainConfig
from maskkit.cost.timing import synchronize
from maskkit.engine.head_refit import refit_head
from maskkit.engine.mask_health import MaskHealth
from maskkit.engine.objectives import mask_batch
from maskkit.engine.policy_calls import checked_decision
from maskkit.engine.pretrain import Pretrainer


class CallCounter:
    """Counts the calls of a module's forward pass while active (a forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def _median_seconds(work: Callable[[], object], repeats: int, device: torch.device) -> float:
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def run_schedule(config: PretrainConfig, total_steps: int) -> dict[str, int]:
    """How often a run of ``total_steps`` pretrain steps with the stage-1 ``config`` runs each
    part, by the engine's rules: ``iterations`` (mask steps), ``refits``, ``health_records``
    (step 0 included), ``level2_records`` (every other record and the last:
    :meth:`maskkit.engine.mask_health.MaskHealth.level2_due`) and ``snr_probes`` (every other
    record right after a mask step, the first included:
    :meth:`maskkit.engine.mask_health.MaskHealth.probe_at_next_chance`)."""
    per_mask_step = config.mae.unroll_steps * config.head.unroll_steps * config.mask.unroll_steps
    every = max(1, total_steps // 25)
    records = [step for step in range(1, total_steps + 1) if step % every == 0 or step == total_steps]
    mask_steps = total_steps // per_mask_step
    refit_every = config.learned_mask.head_refit_every
    return {
        "total_steps": total_steps,
        "iterations": mask_steps,
        "refits": mask_steps // refit_every if refit_every else 0,
        "health_records": 1 + len(records),
        "level2_records": sum(
            MaskHealth.level2_due(step // every, step == total_steps) for step in [0, *records]
        ),
        "snr_probes": (sum(1 for step in records if step % per_mask_step == 0) + 1) // 2,
    }


def run_length(pretrainer: Pretrainer) -> int:
    """Pretrain steps of a run of the config's epochs over the pretrain split (the benchmark's
    config sets ``pretrain.steps`` to its own few iterations, which this ignores)."""
    config = pretrainer.context.config.pretrain
    images = len(pretrainer.context.splits.pretrain)
    return max(1, math.ceil(config.epochs * images / config.mae.batch_size))


def decision_seconds(pretrainer: Pretrainer, repeats: int) -> tuple[float, float]:
    """``(forward, backward)``: median seconds of the policy's decision on a pretrain batch (in
    training mode, where stage 1 stands), and of one backward pass from its weights into the
    policy (what a hypergradient adds)."""
    objectives, device = pretrainer.objectives, pretrainer.context.device
    batch = pretrainer.batches["pretrain"].next()
    with torch.no_grad():
        tokens = objectives.mae.embed(batch.images)
    seen = mask_batch(
        objectives.mae,
        batch.images,
        objectives.weighting.policy_tokens(tokens),
        objectives.mask_ratio,
        batch.priors,
    )
    policy = objectives.policy
    parameters = [p for p in policy.parameters() if p.requires_grad]

    def forward() -> object:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return checked_decision(policy, seen)

    def forward_backward() -> None:
        decision = forward()
        weights = decision.weights
        if weights is not None and weights.requires_grad and parameters:
            torch.autograd.grad(weights.float().sum(), parameters, allow_unused=True)

    with pretrainer.context.autocast():
        forward_s = _median_seconds(forward, repeats, device)
        both_s = _median_seconds(forward_backward, repeats, device)
    return forward_s, max(0.0, both_s - forward_s)


def learned_mask_costs(
    pretrainer: Pretrainer, decisions_per_iteration: float, repeats: int = 3
) -> dict[str, Any] | None:
    """Each part's median seconds per call and amortised per MLO iteration (None for a policy
    without the mask level)."""
    if not pretrainer.mlo.is_multilevel:
        return None
    device, context = pretrainer.context.device, pretrainer.context
    schedule = run_schedule(context.config.pretrain, run_length(pretrainer))
    iterations = max(1, schedule["iterations"])
    forward_s, backward_s = decision_seconds(pretrainer, repeats)
    parts: dict[str, dict[str, Any]] = {
        "mask decision (forward)": {"seconds": forward_s, "per_iteration_calls": decisions_per_iteration},
        "mask decision (backward into the policy)": {"seconds": backward_s, "per_iteration_calls": 1.0},
    }
    cache = pretrainer.refit_features
    if cache is not None:
        assert pretrainer.head is not None
        head, mae = pretrainer.head, pretrainer.mae
        optimizer = pretrainer.mlo.levels["finetune"].optimizer
        saved = {key: value.clone() for key, value in head.state_dict().items()}
        kept = cache.state_dict()
        cache.update(mae, context.mean, context.std, context.autocast)  # every row computed once

        def update() -> tuple[torch.Tensor, torch.Tensor]:
            return cache.update(mae, context.mean, context.std, context.autocast)

        def refit() -> None:
            refit_head(head, *update(), optimizer)

        refits = schedule["refits"] / iterations
        parts["head refit"] = {
            "seconds": _median_seconds(refit, repeats, device),
            "per_iteration_calls": refits,
        }
        parts["of which E's features of the refreshed window"] = {
            "seconds": _median_seconds(update, repeats, device),
            "per_iteration_calls": refits,
            "included": True,  # in the head refit's time: not added to the total
        }
        head.load_state_dict(saved)
        cache.load_state_dict(kept)
    health = pretrainer.health
    if health is not None:
        records = schedule["health_records"] / iterations
        parts["mask figures (fixed batch)"] = {
            "seconds": _median_seconds(health.mask_figures, repeats, device),
            "per_iteration_calls": records,
        }
        parts["level-2 balanced accuracy (mask split)"] = {
            "seconds": _median_seconds(health.level2_balanced_accuracy, repeats, device),
            "per_iteration_calls": schedule["level2_records"] / iterations,
        }
        last = pretrainer.mlo.levels["mask"].last_hypergradient
        if health.snr_batch is not None and last is not None:
            counts = dict(pretrainer.objectives.counts)

            def snr() -> None:
                health.hypergradient_agreement(last, pretrainer.mlo.hypergradient_on)

            parts["SNR probe (one more hypergradient)"] = {
                "seconds": _median_seconds(snr, repeats, device),
                "per_iteration_calls": schedule["snr_probes"] / iterations,
            }
            pretrainer.objectives.counts.clear()
            pretrainer.objectives.counts.update(counts)
    for part in parts.values():
        part["per_iteration_s"] = part["seconds"] * part["per_iteration_calls"]
    return {
        "schedule": schedule,
        "repeats": repeats,
        "parts": parts,
        "per_iteration_s": sum(
            part["per_iteration_s"] for part in parts.values() if not part.get("included")
        ),
    }
