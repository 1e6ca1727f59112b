"""maskkit's corrections to betty-ml 0.1.1, each shown on a toy three-level problem.

The toy mirrors MLO-MAE's structure: the pretrain level owns an encoder *and* a decoder that the
upper levels never touch; the mask level's parameters weight the pretrain loss per sample.
"""

from __future__ import annotations

import betty.hypergradient
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskkit.config import HypergradientConfig
from maskkit.engine.betty_glue import LevelSpec, MultiLevelOptimizer
from maskkit.engine.hypergradient import darts_product


class ToyAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)


def _batches(seed: int, size: int = 8):
    generator = torch.Generator().manual_seed(seed)

    def next_batch():
        images = torch.randn(size, 4, generator=generator)
        return images, (images.sum(1) > 0).long()

    return next_batch


def toy_levels(unroll: tuple[int, int, int] = (2, 1, 1), hypergradient: str = "darts"):
    torch.manual_seed(0)
    autoencoder, head, weighting = ToyAutoencoder(), nn.Linear(4, 2), nn.Linear(4, 1)

    def pretrain_loss(batch):
        images, _ = batch
        weights = torch.sigmoid(weighting(images)).squeeze(1)  # the mask level's parameters
        errors = ((autoencoder.decoder(autoencoder.encoder(images)) - images) ** 2).mean(1)
        return (weights * errors).mean()

    def classification_loss(batch):
        images, labels = batch
        return F.cross_entropy(head(torch.tanh(autoencoder.encoder(images))), labels)

    def spec(name, module, loss, steps, seed):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        return LevelSpec(
            name=name,
            module=module,
            optimizer=optimizer,
            scheduler=None,
            next_batch=_batches(seed),
            loss=loss,
            unroll_steps=steps,
        )

    specs = {
        "pretrain": spec("pretrain", autoencoder, pretrain_loss, unroll[0], 1),
        "finetune": spec("finetune", head, classification_loss, unroll[1], 2),
        "mask": spec("mask", weighting, classification_loss, unroll[2], 3),
    }
    estimator = HypergradientConfig(estimator=hypergradient)
    return MultiLevelOptimizer(specs, torch.device("cpu"), total_steps=100, estimator=estimator), weighting


@pytest.mark.parametrize(
    ("unroll", "expected"), [((2, 1, 1), (12, 6, 6)), ((2, 3, 1), (12, 6, 2)), ((1, 1, 1), (12, 12, 12))]
)
def test_unroll_steps_set_the_ratio_of_level_steps(unroll, expected):
    # betty 0.1.1 asserts equal unroll steps for the mask level's two lower levels (defect a).
    mlo, _ = toy_levels(unroll)
    for step in range(1, 13):
        mlo.step(step)
    counts = mlo.step_counts()
    assert (counts["pretrain"], counts["finetune"], counts["mask"]) == expected


def test_two_one_one_orders_the_steps_like_the_reference():
    mlo, _ = toy_levels((2, 1, 1))
    history = []
    for step in range(1, 5):
        before = mlo.step_counts()
        mlo.step(step)
        after = mlo.step_counts()
        history.append(tuple(name for name in ("pretrain", "finetune", "mask") if after[name] > before[name]))
    assert history == [("pretrain",), ("pretrain", "finetune", "mask")] * 2


def test_unused_parameters_get_zero_gradient_instead_of_a_crash():
    mlo, _ = toy_levels((1, 1, 1))
    mlo.step(1)  # one full MLO iteration: the decoder is unused by the finetune and mask losses
    mask_level = mlo.levels["mask"]
    assert mask_level.last_hypergradient is not None
    assert all(torch.isfinite(g).all() for g in mask_level.last_hypergradient)
    assert any(g.abs().sum() > 0 for g in mask_level.last_hypergradient)
    # betty's own get_grads raises on the same paths: that is the defect being corrected.
    loss = mask_level.training_step(mask_level.cur_batch)
    with pytest.raises(RuntimeError, match="not have been used"):
        betty.hypergradient.get_grads(loss, mask_level.paths[0], retain_graph=True)


def test_darts_restores_the_perturbed_weights_exactly():
    mlo, _ = toy_levels((1, 1, 1))
    mlo.step(1)
    pretrain, mask = mlo.levels["pretrain"], mlo.levels["mask"]
    before = [p.detach().clone() for p in pretrain.trainable_parameters()]
    vector = [torch.randn_like(p) for p in pretrain.trainable_parameters()]
    product = darts_product(vector, pretrain, mask)
    after = list(pretrain.trainable_parameters())
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert any(g.abs().sum() > 0 for g in product)


def test_betty_darts_leaves_weights_shifted_which_maskkit_avoids():
    """Defect (c) exists in the pinned betty: its darts leaves the weights at θ − εv."""
    mlo, _ = toy_levels((1, 1, 1))
    mlo.step(1)
    pretrain, mask = mlo.levels["pretrain"], mlo.levels["mask"]
    before = [p.detach().clone() for p in pretrain.trainable_parameters()]
    vector = [torch.randn_like(p) for p in before]
    eps = pretrain.estimator.darts_alpha / torch.cat([v.flatten() for v in vector]).norm()
    betty.hypergradient.darts(vector, pretrain, mask)
    for b, v, p in zip(before, vector, pretrain.trainable_parameters(), strict=True):
        assert not torch.equal(p.detach(), b)
        torch.testing.assert_close(p.detach(), b - eps * v)


@pytest.mark.parametrize("method", ["darts", "cg"])
def test_every_hypergradient_method_runs_with_unused_parameters(method):
    mlo, weighting = toy_levels((1, 1, 1), hypergradient=method)
    before = [p.detach().clone() for p in weighting.parameters()]
    for step in range(1, 4):
        mlo.step(step)
    assert any(not torch.equal(b, p) for b, p in zip(before, weighting.parameters(), strict=True))


def test_shared_perturbation_pair_matches_separate_paths():
    """Summing the vectors of both paths before the last finite difference (one pair instead of
    two) gives the same hypergradient as pushing each path on its own, to first order."""
    mlo, _ = toy_levels((1, 1, 1))
    mlo.step(1)
    pretrain, finetune, mask = (mlo.levels[name] for name in ("pretrain", "finetune", "mask"))
    loss = mask.training_step(mask.cur_batch)
    inputs = list(finetune.trainable_parameters()) + list(pretrain.trainable_parameters())
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads, strict=True)]
    seed_head, seed_encoder = grads[:2], grads[2:]
    through_head = darts_product(darts_product(seed_head, finetune, pretrain), pretrain, mask)
    direct = darts_product(seed_encoder, pretrain, mask)
    separate = [a + b for a, b in zip(through_head, direct, strict=True)]
    via_finetune = darts_product(seed_head, finetune, pretrain)
    shared = darts_product([a + b for a, b in zip(seed_encoder, via_finetune, strict=True)], pretrain, mask)
    for s, t in zip(shared, separate, strict=True):
        torch.testing.assert_close(s, t, rtol=2e-2, atol=1e-5)
    assert any(s.abs().sum() > 0 for s in shared)
