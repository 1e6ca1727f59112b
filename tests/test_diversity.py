"""``pretrain.learned_mask.diversity``: a level-3 penalty on the map every image shares, which
pushes a learned mask to depend on the image (docs/mlo.md, "A diversity term")."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.config import LearnedMaskConfig
from maskkit.engine.mask_health import image_dependence
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.masking import shared_map_share, standardised_logits
from maskkit.plugins import create_policy
from maskkit.policy import MaskBatch, PolicyContext
from maskkit_plugins.mlo import MLOMasking

#: A small grid whose tokens share a large position component, as a ViT's do.
SMALL = {"num_patches": 64, "embed_dim": 32, "grid_size": 8, "patch_size": 4}


def _tokens(batch: int, images_seed: int) -> torch.Tensor:
    """``[B, 64, 32]``: a position part every image shares (most of the energy, always the same)
    plus an image part drawn from ``images_seed``."""
    position = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0)) * 2.0
    return position + torch.randn(batch, 64, 32, generator=torch.Generator().manual_seed(images_seed))


def test_the_shared_share_is_one_for_one_map_and_about_one_over_b_for_unrelated_maps():
    generator = torch.Generator().manual_seed(0)
    one_map = torch.randn(1, 50, generator=generator)
    # Every image ranks the patches alike; each row shifted and scaled: still one map.
    same = one_map * torch.rand(16, 1, generator=generator).add(0.5) + torch.randn(16, 1, generator=generator)
    assert shared_map_share(same).item() == pytest.approx(1.0, abs=1e-5)
    unrelated = torch.randn(2048, 50, generator=generator)
    assert shared_map_share(unrelated).item() == pytest.approx(1 / 2048, rel=0.2)
    # In between it is 1 − the image dependence of the standardised logits.
    mixed = one_map + 0.7 * torch.randn(64, 50, generator=generator)
    expected = 1 - image_dependence(standardised_logits(mixed))
    assert shared_map_share(mixed).item() == pytest.approx(expected, abs=1e-5)


def _image_dependence_after_training(sign: float, steps: int = 30, cap: float = 0.0) -> tuple[float, float]:
    """``mlo`` (uncentred tokens, so it starts as nearly one map) stepped by AdamW on ``sign`` ×
    its diversity penalty alone (with ``shared_map_cap`` ``cap``); its image dependence in
    evaluation before and after."""
    torch.manual_seed(0)
    settings = LearnedMaskConfig(centre_tokens=False, diversity=1.0, shared_map_cap=cap)
    policy = MLOMasking(PolicyContext(**SMALL, learned_mask=settings), hidden_dim=64)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95))
    tokens = _tokens(32, images_seed=1)
    batch = MaskBatch(tokens, tokens, 0.75)
    held_out = _tokens(32, images_seed=2)  # other images at the same positions
    with torch.no_grad():
        before = image_dependence(policy.eval().mask_logits(held_out))
    policy.train()
    for _ in range(steps):
        penalty = policy.regularizer(policy(batch), batch)
        optimizer.zero_grad()
        (sign * penalty).backward()
        optimizer.step()
    with torch.no_grad():
        after = image_dependence(policy.eval().mask_logits(held_out))
    return before, after


def test_the_diversity_penalty_makes_the_mask_depend_on_the_image():
    before, after = _image_dependence_after_training(+1.0)
    assert before < 0.3 and after > 3 * before  # measured: 0.13 → 0.93
    # Its sign is what moves it: ascending the penalty makes the mask one map for all.
    _, ascended = _image_dependence_after_training(-1.0)
    assert ascended < before / 3  # measured: 0.13 → 0.009


def test_the_capped_term_is_a_hinge_on_the_share():
    """``shared_map_cap`` s₀: the penalty is λ·max(0, share − s₀), its gradient λ·∇share above
    the cap and exactly 0 at or under it."""
    tokens = _tokens(16, images_seed=4)
    batch = MaskBatch(tokens, tokens, 0.75)
    torch.manual_seed(0)
    plain = MLOMasking(
        PolicyContext(**SMALL, learned_mask=LearnedMaskConfig(diversity=2.0, shared_map_cap=0.0)),
        hidden_dim=16,
    )
    share = shared_map_share(plain.mask_logits(tokens))
    (plain_gradient,) = torch.autograd.grad(plain.regularizer(plain(batch), batch), plain.scorer[-1].weight)
    assert plain_gradient.abs().max() > 0
    for cap, active in ((share.item() - 0.05, True), (share.item() + 0.05, False)):
        torch.manual_seed(0)
        settings = LearnedMaskConfig(diversity=2.0, shared_map_cap=cap)
        capped = MLOMasking(PolicyContext(**SMALL, learned_mask=settings), hidden_dim=16)
        penalty = capped.regularizer(capped(batch), batch)
        (gradient,) = torch.autograd.grad(penalty, capped.scorer[-1].weight)
        if active:
            assert penalty.item() == pytest.approx(2.0 * (share.item() - cap), rel=1e-4)
            torch.testing.assert_close(gradient, plain_gradient)
        else:
            assert penalty.item() == 0.0 and not gradient.any()
        # The share itself is logged either way (``policy/shared_map_share``), to set beside the cap.
        assert capped.statistics()["shared_map_share"] == pytest.approx(share.item(), rel=1e-5)


def test_the_capped_term_stops_at_the_cap():
    """Stepped on the hinge alone from a mask that is mostly one map, the image dependence rises
    until the shared share reaches the cap and no further; the uncapped term goes on."""
    before, uncapped = _image_dependence_after_training(+1.0, steps=60)
    _, capped = _image_dependence_after_training(+1.0, steps=60, cap=0.6)
    assert before < 0.3  # a shared share of more than 0.7
    assert 0.3 < capped < 0.6 < uncapped  # measured: 0.13 → 0.38 capped (0.37 after 200 steps), 0.95 uncapped


def test_diversity_zero_adds_no_regulariser_and_constraint_adds_both_terms():
    torch.manual_seed(0)
    context = PolicyContext(**SMALL, learned_mask=LearnedMaskConfig(diversity=0.0))
    for name in ("mlo", "mlo-light"):
        assert not create_policy(name, context).has_regularizer()
    assert create_policy("constraint", context).has_regularizer()  # its own penalty

    diverse = PolicyContext(**SMALL, learned_mask=LearnedMaskConfig(diversity=0.5, shared_map_cap=0.0))
    tokens = _tokens(8, images_seed=3)
    importance = torch.rand(8, 64, generator=torch.Generator().manual_seed(3))
    batch = MaskBatch(tokens, tokens, 0.75, {"importance": importance})
    mlo = create_policy("mlo", diverse)
    assert mlo.has_regularizer()
    with torch.no_grad():
        expected = 0.5 * shared_map_share(mlo.mask_logits(tokens))
        assert mlo.regularizer(mlo(batch), batch) == pytest.approx(expected)
    torch.manual_seed(0)
    both = create_policy("constraint", diverse, {"penalty": 2.0})
    torch.manual_seed(0)
    own = create_policy("constraint", context, {"penalty": 2.0})
    with torch.no_grad():
        decision = both(batch)
        total = both.regularizer(decision, batch)
        diversity = 0.5 * shared_map_share(both.mask_logits(tokens))
        assert total == pytest.approx(own.regularizer(decision, batch) + diversity)
        penalty_free = create_policy("constraint", diverse, {"penalty": 0.0})
        assert penalty_free.regularizer(decision, batch) is not None  # the diversity term alone


def test_the_diversity_term_enters_the_mask_objective_and_moves_t(tmp_path):
    """A tiny run with the term logs it as ``loss/mask_regularizer`` and ends with another T than
    the same run without it; with it off, the mask level decides no extra batch."""
    dataset = synthetic_dataset()
    policies = {}
    for diversity in (0.0, 1.0):
        torch.manual_seed(0)
        config = tiny_config(
            "mlo", pretrain={"learned_mask": {"diversity": diversity, "shared_map_cap": 0.0}}
        )
        context = quiet_context(config, dataset, tmp_path / f"run-{diversity}")
        mae, policy, head = build_models(config, dataset.num_classes, context.device)
        pretrainer = Pretrainer(context, mae, policy, head)
        torch.manual_seed(1)
        for step in (1, 2, 3):
            pretrainer.mlo.step(step)
        regularizer = pretrainer.objectives.last_regularizer
        assert (regularizer is None) == (diversity == 0.0)
        assert ("shared_map_share" in policy.statistics()) == (diversity > 0.0)
        policies[diversity] = {name: value.clone() for name, value in policy.state_dict().items()}
    assert 0.0 < float(regularizer) <= 1.0 + 1e-6
    moved = [not torch.equal(policies[1.0][name], value) for name, value in policies[0.0].items()]
    assert any(moved)
