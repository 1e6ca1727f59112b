"""Proof that the mask level learns through a real hypergradient.

On a tiny model (float64), one MLO iteration (unroll 1/1/1) is run through the real engine.
The mask parameters' gradient is then compared with a central finite-difference estimate of
d(val loss)/d(mask params), taken through one unrolled step of the two lower levels:

    E'(T) = E − η_p ∇_E L_pre(E, T)
    C'(T) = C − η_f ∇_C L_ft(C, E'(T))
    f(T)  = L_val(C'(T), E'(T))

betty's ``darts`` approximates each best-response Jacobian to first order with a unit inner
step. So the reference is f's derivative to first order in the inner steps: path 1
(mask → pretrain) from η_f = 0, path 2 (mask → finetune → pretrain) from the change between
η_f = 0 and a small η_f = δ, scaled to a unit step:

    ref = FD(η_p, 0) / η_p  +  (FD(η_p, δ) − FD(η_p, 0)) / (η_p δ)

A full unit step on the head is far outside the linear regime of a tiny model, which is why it
is not used directly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _build(tmp_path, policy: str):
    torch.manual_seed(0)
    config = tiny_config(policy, policy_options={"hidden_dim": 4 if policy == "mlo-light" else 2})
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, mask_policy, head = build_models(config, len(dataset.class_names), context.device)
    pretrainer = Pretrainer(context, mae, mask_policy, head)
    for module in (mae, mask_policy, head):
        module.double()
    for level in pretrainer.mlo.levels.values():
        source = level.spec.next_batch
        level.spec.next_batch = lambda source=source: (lambda batch: (batch[0].double(), batch[1]))(source())
    return pretrainer


def _unrolled_validation_loss(pretrainer: Pretrainer, eta_pretrain: float, eta_finetune: float) -> float:
    """f(T) at the policy's current parameters; leaves E and C as it found them."""
    objectives = pretrainer.objectives
    levels = pretrainer.mlo.levels
    encoder_params = list(pretrainer.mae.parameters())
    head_params = list(pretrainer.head.parameters())
    saved_encoder = [p.detach().clone() for p in encoder_params]
    saved_head = [p.detach().clone() for p in head_params]
    try:
        pretrain_loss = objectives.pretrain_loss(levels["pretrain"].cur_batch)
        grads = torch.autograd.grad(pretrain_loss, encoder_params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(encoder_params, grads, strict=True):
                if g is not None:
                    p.sub_(eta_pretrain * g)
        finetune_loss = objectives.finetune_loss(levels["finetune"].cur_batch)
        grads = torch.autograd.grad(finetune_loss, head_params)
        with torch.no_grad():
            for p, g in zip(head_params, grads, strict=True):
                p.sub_(eta_finetune * g)
            return float(objectives.mask_loss(levels["mask"].cur_batch))
    finally:
        with torch.no_grad():
            for p, s in zip(encoder_params + head_params, saved_encoder + saved_head, strict=True):
                p.copy_(s)


def _finite_difference_gradient(
    pretrainer: Pretrainer, eta_pretrain: float, eta_finetune: float, step: float = 1e-6
) -> torch.Tensor:
    """Central differences of f(T) over every mask parameter: ``[P]``."""
    estimates = []
    for parameter in pretrainer.policy.parameters():
        flat = parameter.data.view(-1)
        for index in range(flat.numel()):
            original = flat[index].item()
            flat[index] = original + step
            plus = _unrolled_validation_loss(pretrainer, eta_pretrain, eta_finetune)
            flat[index] = original - step
            minus = _unrolled_validation_loss(pretrainer, eta_pretrain, eta_finetune)
            flat[index] = original
            estimates.append((plus - minus) / (2 * step))
    return torch.tensor(estimates, dtype=torch.float64)


@pytest.mark.parametrize("policy", ["mlo-light", "mlo"])
def test_mask_update_follows_the_unrolled_finite_difference_gradient(tmp_path, policy):
    pretrainer = _build(tmp_path, policy)
    mask_level = pretrainer.mlo.levels["mask"]
    policy_before = [p.detach().clone() for p in pretrainer.policy.parameters()]

    pretrainer.mlo.step(1)  # pretrain step, finetune step, mask step (hypergradient)

    # The mask level's own loss does not depend on T: its direct gradient is exactly zero.
    direct = torch.autograd.grad(
        pretrainer.objectives.mask_loss(mask_level.cur_batch),
        list(pretrainer.policy.parameters()),
        allow_unused=True,
    )
    assert all(g is None or not g.any() for g in direct)

    hypergradient = _flat(mask_level.last_hypergradient)
    assert hypergradient.norm() > 0
    moved = _flat(pretrainer.policy.parameters()) - _flat(policy_before)
    assert moved.norm() > 0, "the mask parameters did not change"

    # Evaluate the finite difference at the parameters the hypergradient was taken at.
    with torch.no_grad():
        for p, before in zip(pretrainer.policy.parameters(), policy_before, strict=True):
            p.copy_(before)
    eta_pretrain, delta = 1e-3, 1e-2
    without_finetune_step = _finite_difference_gradient(pretrainer, eta_pretrain, 0.0)
    with_finetune_step = _finite_difference_gradient(pretrainer, eta_pretrain, delta)
    through_pretrain = without_finetune_step / eta_pretrain
    through_finetune = (with_finetune_step - without_finetune_step) / (eta_pretrain * delta)
    reference = through_pretrain + through_finetune

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    assert through_pretrain.norm() > 0 and through_finetune.norm() > 0
    assert cosine(hypergradient, reference) > 0.8, (
        f"hypergradient disagrees with the finite difference: cosine {cosine(hypergradient, reference):.3f}"
    )
    # The update is a descent step on the validation loss.
    assert torch.dot(moved, reference) < 0


def test_fixed_policy_runs_the_pretrain_level_alone(tmp_path):
    config = tiny_config("random")
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, policy, _ = build_models(config, len(dataset.class_names), context.device)
    pretrainer = Pretrainer(context, mae, policy, None)
    result = pretrainer.run()
    assert set(pretrainer.mlo.levels) == {"pretrain"}
    assert set(pretrainer.batches) == {"pretrain"}
    assert result.level_steps == {"pretrain": config.pretrain.steps}
    assert dict(pretrainer.objectives.counts) == {"pretrain/step": config.pretrain.steps}
    assert pretrainer.mlo.levels["pretrain"].paths == []
    saved = {path.name for path in next(context.run.checkpoints.glob("step-*")).iterdir()}
    assert saved == {"mae.safetensors", "policy.safetensors", "state.pt"}
