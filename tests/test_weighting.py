"""How a policy's weights enter the pretrain loss (``maskkit/weighting.py``): what E can and
cannot change, what T's hypergradient can and cannot move, and the collapse mechanism of the
reference formulation."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.config import LEGACY_LEARNED_MASK
from maskkit.engine.objectives import masked_reconstruction
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.weighting import WEIGHTINGS, loss_weighting

DEFAULT = tiny_config().pretrain.weighting


def _batch(seed: int = 0, batch: int = 3, patches: int = 8):
    generator = torch.Generator().manual_seed(seed)
    error = torch.rand(batch, patches, generator=generator, dtype=torch.float64)
    mask = torch.zeros(batch, patches, dtype=torch.float64)
    for row in range(batch):
        mask[row, torch.randperm(patches, generator=generator)[: patches // 2]] = 1
    weights = torch.rand(batch, patches, generator=generator, dtype=torch.float64).requires_grad_()
    return error, mask, weights


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_without_weights_every_weighting_is_the_mae_loss(name):
    error, mask, _ = _batch()
    mae_loss = (error * mask).sum() / mask.sum()
    assert torch.allclose(loss_weighting(name).loss(error, mask, None), mae_loss)


def test_hypergradient_only_gives_e_the_exact_mae_step_and_t_a_centred_gradient():
    error, mask, weights = _batch()
    error = error.clone().requires_grad_()
    loss = loss_weighting("straight-through").loss(error, mask, weights)
    mae_loss = (error * mask).sum() / mask.sum()
    assert torch.allclose(loss, mae_loss)  # the value E sees is MAE's …
    (error_grad,) = torch.autograd.grad(loss, error, retain_graph=True)
    (mae_grad,) = torch.autograd.grad(mae_loss, error)
    assert torch.allclose(error_grad, mae_grad)  # … and so is its gradient, whatever w is
    (weight_grad,) = torch.autograd.grad(loss, weights)
    assert weight_grad.abs().sum() > 0  # T still sees how each patch's weight would matter
    assert torch.allclose(weight_grad.sum(dim=1), torch.zeros(3, dtype=torch.float64))  # centred
    assert torch.all(weight_grad[mask == 0] == 0)  # kept patches are not reconstructed


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_only_the_normalized_weightings_leave_the_scale_of_the_weights_free_of_gradient(name):
    # The collapse of `detached`: scaling every weight up is a larger pretrain step, so T's
    # gradient has a component along w itself. Normalizing per image removes it exactly.
    error, mask, weights = _batch()
    weighting = loss_weighting(name)
    if weighting.score_function:  # the weights take no part: T learns through log_prob
        assert not weighting.loss(error, mask, weights).requires_grad
        return
    (weight_grad,) = torch.autograd.grad(weighting.loss(error, mask, weights), weights)
    if weighting.tempered_alpha is not None:
        # Centred instead: adding a constant to an image's weights changes nothing ...
        torch.testing.assert_close((weight_grad * mask).sum(dim=1), torch.zeros(3, dtype=torch.float64))
        # ... but their spread does (the re-weighting E's step applies).
        assert torch.all((weight_grad * weights).sum(dim=1).abs() > 1e-5)
        return
    scale = weights if weighting.in_pretrain_step else torch.ones_like(weights)
    along_scale = (weight_grad * scale).sum(dim=1)  # per image
    if weighting.normalized:
        assert torch.allclose(along_scale, torch.zeros(3, dtype=torch.float64))
    else:
        assert torch.all(along_scale.abs() > 1e-3)


def _pretrainer(tmp_path, weighting: str, lr: float = 1e-3, learned_mask: dict | None = None) -> Pretrainer:
    torch.manual_seed(0)
    pretrain = {"weighting": weighting, "mae": {"lr": lr}}
    if learned_mask is not None:
        pretrain["learned_mask"] = learned_mask
    config = tiny_config("mlo-light", pretrain=pretrain)
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / weighting)
    mae, policy, head = build_models(config, len(dataset.class_names), context.device)
    return Pretrainer(context, mae, policy, head)


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_only_reference_lets_the_pretrain_gradient_reach_e_through_the_weights(tmp_path, name):
    pretrainer = _pretrainer(tmp_path, name)
    images = pretrainer.batches["pretrain"].next()[0]
    embedding = list(pretrainer.mae.patch_embed.parameters())
    result = masked_reconstruction(pretrainer.mae, pretrainer.policy, images, 0.5, pretrainer.weighting)
    through_everything = torch.autograd.grad(result.loss, embedding, retain_graph=True)
    # The same loss with the weights cut off from E (their values kept):
    weights = result.decision.weights.detach().requires_grad_()
    frozen = pretrainer.weighting.loss(result.error, result.decision.mask, weights)
    through_error_only = torch.autograd.grad(frozen, embedding)
    same = all(torch.allclose(a, b) for a, b in zip(through_everything, through_error_only, strict=True))
    assert same == (name != "reference")


def _mean_masked_weight(pretrainer: Pretrainer, images: torch.Tensor) -> float:
    with torch.no_grad():
        result = masked_reconstruction(pretrainer.mae, pretrainer.policy, images, 0.5, pretrainer.weighting)
    mask = result.decision.mask
    return float((result.decision.weights * mask).sum() / mask.sum())


def test_the_reference_pretrain_level_shrinks_its_own_loss_weights_and_the_default_does_not(tmp_path):
    # T is frozen: only the pretrain level steps. Under `reference` E lowers its loss by moving
    # the tokens until the masked patches' weights shrink (the collapse measured at the cpu
    # preset); under the default the weights move only as a side effect of reconstruction. Both
    # with the reference's raw logits: bounded logits (standardised per image) also stop it.
    changes = {}
    for name in ("reference", DEFAULT):
        pretrainer = _pretrainer(tmp_path, name, lr=1e-2, learned_mask=LEGACY_LEARNED_MASK)
        level = pretrainer.mlo.levels["pretrain"]
        images = pretrainer.batches["pretrain"].next()[0]
        before = _mean_masked_weight(pretrainer, images)
        for _ in range(50):
            loss = pretrainer.objectives.pretrain_loss(level.get_batch())
            level.optimizer.zero_grad()
            loss.backward()
            level.optimizer.step()
        changes[name] = _mean_masked_weight(pretrainer, images) - before
    assert changes["reference"] < -0.05
    assert abs(changes[DEFAULT]) < abs(changes["reference"]) / 5
