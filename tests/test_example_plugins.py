"""The two example plugins of ``examples/`` (the tutorial's), in-process: each follows the
policy contract, and ``patch-scorer`` trains through its weights and its regulariser."""

from __future__ import annotations

import pytest
import torch
from plugin_packages import CHECKERBOARD_SOURCE, PATCH_SCORER_SOURCE

from maskkit.policy import MaskBatch, PolicyContext

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8)


def test_checkerboard_policy_follows_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(CHECKERBOARD_SOURCE))
    from maskkit_checkerboard.policy import CheckerboardMasking, maskkit_policies

    from maskkit.policy import validate_decision

    assert maskkit_policies() == [CheckerboardMasking]
    assert not CheckerboardMasking.learnable and CheckerboardMasking.requires == frozenset()
    torch.manual_seed(0)
    policy = CheckerboardMasking(CONTEXT)
    tokens = torch.randn(64, 16, 8)
    boards = set()
    for ratio in (0.5, 0.75, 0.25, 0.0):
        batch = MaskBatch(images=torch.zeros(64, 3, 32, 32), tokens=tokens, mask_ratio=ratio)
        decision = policy(batch)
        validate_decision(decision, batch, "checkerboard")
        grid = decision.mask.view(64, 4, 4)
        if ratio == 0.5:  # exactly a checkerboard, one of its two shifts
            assert bool((grid[:, :, 1:] != grid[:, :, :-1]).all())
            assert bool((grid[:, 1:, :] != grid[:, :-1, :]).all())
            boards = {tuple(row.tolist()) for row in decision.mask}
        if ratio == 0.75:  # a full checkerboard and a random half of the rest
            parity = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2
            masked_dark = (grid * parity).sum(dim=(1, 2))
            masked_light = (grid * (1 - parity)).sum(dim=(1, 2))
            assert bool((torch.maximum(masked_dark, masked_light) == 8).all())
    assert len(boards) == 2  # the shift varies across images
    with pytest.raises(ValueError, match="cell_size"):
        CheckerboardMasking(CONTEXT, cell_size=0)
    coarse = CheckerboardMasking(CONTEXT, cell_size=2)
    batch = MaskBatch(images=torch.zeros(8, 3, 32, 32), tokens=tokens[:8], mask_ratio=0.5)
    validate_decision(coarse(batch), batch, "checkerboard")


def test_patch_scorer_follows_the_contract_and_trains_through_weights_and_regularizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(PATCH_SCORER_SOURCE))
    from maskkit_patch_scorer.policy import PatchScorerMasking, maskkit_policies

    from maskkit.policy import validate_decision

    assert maskkit_policies() == [PatchScorerMasking]
    assert PatchScorerMasking.learnable and PatchScorerMasking.requires == frozenset()
    torch.manual_seed(0)
    policy = PatchScorerMasking(CONTEXT)
    assert sum(p.numel() for p in policy.parameters()) == CONTEXT.embed_dim + 1 + CONTEXT.num_patches
    batch = MaskBatch(images=torch.zeros(6, 3, 32, 32), tokens=torch.randn(6, 16, 8), mask_ratio=0.75)
    decision = policy(batch)
    validate_decision(decision, batch, "patch-scorer")
    assert decision.weights is not None and bool(((decision.weights > 0) & (decision.weights < 1)).all())
    # The masked patches are the most probable ones.
    masked_prob = decision.weights[decision.mask == 1].view(6, -1).min(dim=1).values
    kept_prob = decision.weights[decision.mask == 0].view(6, -1).max(dim=1).values
    assert bool((masked_prob >= kept_prob).all())
    # Gradient reaches every parameter through the weights (the hypergradient's only path) …
    (decision.weights * torch.rand(6, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.zero_grad()
    # … and through the regulariser, a scalar that is zero when the mean probability is r.
    penalty = policy.regularizer(policy(batch), batch)
    assert penalty.shape == () and float(penalty.detach()) >= 0
    penalty.backward()
    assert policy.position_bias.grad is not None and policy.position_bias.grad.abs().sum() > 0
    # The position bias runs row-major over the grid: a large bias at (row 1, column 2) masks it.
    with torch.no_grad():
        policy.position_bias[1 * CONTEXT.grid_size + 2] = 50.0
    assert bool((policy(batch).mask.view(6, 4, 4)[:, 1, 2] == 1).all())


def test_patch_scorer_options_arrive_as_yaml_parsed_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PATCH_SCORER_SOURCE))
    from maskkit_patch_scorer.policy import PatchScorerMasking

    from maskkit.config import parse_override

    # `--set policy_options.balance=1e-1` gives the string "1e-1" (YAML 1.1 wants a dot).
    options = parse_override("policy_options.balance=1e-1")["policy_options"]
    assert options == {"balance": "1e-1"}
    assert PatchScorerMasking(CONTEXT, **options).balance == pytest.approx(0.1)
    assert parse_override("policy_options.temperature=2")["policy_options"]["temperature"] == 2
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PatchScorerMasking(CONTEXT, temperature=0)
    with pytest.raises(ValueError, match="balance must be >= 0"):
        PatchScorerMasking(CONTEXT, balance=-1)
