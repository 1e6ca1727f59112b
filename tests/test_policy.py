"""The masking-policy contract: decision_from_scores, validate_decision and the built-in policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from maskkit.config import LEGACY_LEARNED_MASK, LearnedMaskConfig
from maskkit.errors import MaskkitError, PluginError
from maskkit.plugins import create_policy
from maskkit.policy import (
    MalformedDecisionError,
    MaskBatch,
    MaskDecision,
    MaskPolicy,
    PolicyContext,
    decision_from_scores,
    num_kept,
    validate_decision,
)

POLICY = "test-policy"


def make_batch(
    batch_size: int = 3, num_patches: int = 16, embed_dim: int = 8, ratio: float = 0.75
) -> MaskBatch:
    """A batch of ``[B, 3, 32, 32]`` images and ``[B, L, D]`` random tokens."""
    return MaskBatch(
        images=torch.randn(batch_size, 3, 32, 32),
        tokens=torch.randn(batch_size, num_patches, embed_dim),
        mask_ratio=ratio,
    )


def masked_in_score_order(scores: Tensor, mask: Tensor) -> Tensor:
    """``[B, L-K]``: the masked patch ids of each row, in ascending score order (MAE's shuffle)."""
    order = torch.argsort(scores, dim=1)
    rows = [row_order[mask[b, row_order] == 1] for b, row_order in enumerate(order)]
    return torch.stack(rows)


# --- decision_from_scores ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_patches", "ratio", "expected_keep"),
    [(16, 0.75, 4), (10, 0.75, 2), (10, 0.7, 3), (10, 0.3, 7), (49, 0.6, 19), (64, 0.9, 6), (16, 0.0, 16)],
)
def test_num_kept_follows_mae(num_patches: int, ratio: float, expected_keep: int) -> None:
    assert num_kept(num_patches, ratio) == int(num_patches * (1 - ratio)) == expected_keep


@pytest.mark.parametrize(("num_patches", "ratio"), [(16, 0.75), (10, 0.75), (49, 0.6), (64, 0.9), (9, 0.5)])
def test_decision_keeps_the_lowest_scores(num_patches: int, ratio: float) -> None:
    torch.manual_seed(0)
    batch_size = 4
    scores = torch.rand(batch_size, num_patches)
    decision = decision_from_scores(scores, ratio)
    keep = int(num_patches * (1 - ratio))

    assert decision.ids_keep.shape == (batch_size, keep)
    assert decision.ids_restore.shape == decision.mask.shape == (batch_size, num_patches)
    assert decision.ids_keep.dtype == decision.ids_restore.dtype == torch.int64
    lowest = torch.topk(scores, keep, dim=1, largest=False).indices
    for row in range(batch_size):
        assert set(decision.ids_keep[row].tolist()) == set(lowest[row].tolist())
    # exactly L - K ones per row, and zeros exactly at the kept ids
    assert torch.equal(decision.mask.sum(dim=1), torch.full((batch_size,), float(num_patches - keep)))
    assert bool((torch.gather(decision.mask, 1, decision.ids_keep) == 0).all())
    assert set(decision.mask.unique().tolist()) <= {0.0, 1.0}
    assert decision.weights is None
    validate_decision(decision, make_batch(batch_size, num_patches, ratio=ratio), POLICY)


def test_ids_restore_inverts_the_shuffle() -> None:
    torch.manual_seed(1)
    batch_size, num_patches, dim = 3, 16, 5
    scores = torch.rand(batch_size, num_patches)
    decision = decision_from_scores(scores, 0.75)
    tokens = torch.randn(batch_size, num_patches, dim)

    masked_ids = masked_in_score_order(scores, decision.mask)  # [B, L-K]
    shuffled_ids = torch.cat([decision.ids_keep, masked_ids], dim=1)  # [B, L]: kept ++ masked
    shuffled = torch.gather(tokens, 1, shuffled_ids.unsqueeze(-1).expand(-1, -1, dim))
    restored = torch.gather(shuffled, 1, decision.ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(restored, tokens)
    # the same statement on ids alone, and: position < K exactly for the kept patches
    assert torch.equal(
        torch.gather(shuffled_ids, 1, decision.ids_restore), torch.arange(num_patches).expand(3, -1)
    )
    assert torch.equal((decision.ids_restore < decision.ids_keep.shape[1]).float(), 1 - decision.mask)


def test_weights_pass_through_with_gradient() -> None:
    torch.manual_seed(2)
    producer = nn.Linear(8, 1)
    tokens = torch.randn(2, 16, 8)
    prob = producer(tokens).squeeze(-1).sigmoid()  # [B, L]
    decision = decision_from_scores(prob, 0.75, weights=prob)

    assert decision.weights is prob
    assert decision.scores is not None and not decision.scores.requires_grad
    assert not decision.ids_keep.requires_grad and not decision.mask.requires_grad
    (decision.weights * decision.mask).sum().backward()
    assert producer.weight.grad is not None and bool(producer.weight.grad.abs().sum() > 0)
    assert producer.bias.grad is not None


def test_ratio_zero_keeps_everything() -> None:
    scores = torch.rand(2, 16)
    decision = decision_from_scores(scores, 0.0)
    assert decision.ids_keep.shape == (2, 16)
    assert not bool(decision.mask.any())
    assert torch.equal(torch.sort(decision.ids_keep, dim=1).values, torch.arange(16).expand(2, -1))
    validate_decision(decision, make_batch(2, 16, ratio=0.0), POLICY)


# --- validate_decision --------------------------------------------------------------------------


@pytest.fixture
def good() -> tuple[MaskDecision, MaskBatch]:
    torch.manual_seed(3)
    batch = make_batch(3, 16, ratio=0.75)
    weights = torch.rand(3, 16, requires_grad=True)
    maps = {"predicted loss": torch.randn(3, 16)}
    return decision_from_scores(torch.rand(3, 16), batch.mask_ratio, weights=weights, maps=maps), batch


def test_validate_accepts_a_good_decision(good: tuple[MaskDecision, MaskBatch]) -> None:
    decision, batch = good
    validate_decision(decision, batch, POLICY)
    validate_decision(dataclasses.replace(decision, weights=None, scores=None, maps={}), batch, POLICY)


def test_maps_pass_through_with_their_graph_and_detached_drops_it() -> None:
    producer = nn.Linear(8, 1)
    predicted = producer(torch.randn(2, 16, 8)).squeeze(-1)  # [B, L]
    decision = decision_from_scores(torch.rand(2, 16), 0.75, maps={"predicted loss": predicted})
    assert decision.maps["predicted loss"] is predicted and predicted.requires_grad
    kept = decision.detached()
    assert not kept.maps["predicted loss"].requires_grad
    assert torch.equal(kept.maps["predicted loss"], predicted.detach())
    assert decision.maps["predicted loss"].requires_grad  # the original keeps its graph


def _swap_kept_and_masked(decision: MaskDecision) -> MaskDecision:
    """Same count of ones per row, but the first kept patch is marked masked and vice versa."""
    mask = decision.mask.clone()
    kept = decision.ids_keep[0, 0]
    masked = int(torch.nonzero(mask[0])[0])
    mask[0, kept], mask[0, masked] = 1.0, 0.0
    return dataclasses.replace(decision, mask=mask)


def _set(tensor: Tensor, value: float | int, row: int = 0, col: int = 0) -> Tensor:
    changed = tensor.detach().clone()
    changed[row, col] = value
    return changed


# name → (breaker, what the message names, the advice it must give). The advice fits the failure:
# non-finite weights get no "use decision_from_scores" (which cannot help), a wrong count of
# masked patches points at batch.mask_ratio, a wrong dtype at the cast.
BUILD = "decision_from_scores(scores [B, L], batch.mask_ratio)"
RATIO = "at the run's ratio batch.mask_ratio"
BREAKAGES = {
    "ids_keep shape": (lambda d: dataclasses.replace(d, ids_keep=d.ids_keep[:, :-1]), "shape", RATIO),
    "ids_keep rows": (lambda d: dataclasses.replace(d, ids_keep=d.ids_keep[:-1]), "shape", BUILD),
    "ids_keep int32": (lambda d: dataclasses.replace(d, ids_keep=d.ids_keep.int()), "int32", "drop the cast"),
    "ids_restore int32": (
        lambda d: dataclasses.replace(d, ids_restore=d.ids_restore.int()),
        "int32",
        "as torch.argsort returns them",
    ),
    "mask shape": (lambda d: dataclasses.replace(d, mask=d.mask[:, :-1]), "shape", BUILD),
    "mask not a tensor": (lambda d: dataclasses.replace(d, mask=d.mask.tolist()), "not a tensor", BUILD),
    "mask bool": (lambda d: dataclasses.replace(d, mask=d.mask.bool()), "torch.bool", "mask.float()"),
    "ids_keep out of range": (
        lambda d: dataclasses.replace(d, ids_keep=_set(d.ids_keep, 16)),
        "outside",
        BUILD,
    ),
    "ids_keep negative": (lambda d: dataclasses.replace(d, ids_keep=_set(d.ids_keep, -1)), "outside", BUILD),
    "ids_restore out of range": (
        lambda d: dataclasses.replace(d, ids_restore=_set(d.ids_restore, 16)),
        "outside",
        BUILD,
    ),
    "ids_restore not a permutation": (
        lambda d: dataclasses.replace(d, ids_restore=_set(d.ids_restore, int(d.ids_restore[0, 1]))),
        "permutation",
        BUILD,
    ),
    "mask count": (
        lambda d: dataclasses.replace(d, mask=_set(d.mask, 0.0, col=int(torch.nonzero(d.mask[0])[0]))),
        "exactly 12 of 16",
        RATIO,
    ),
    "mask not binary": (lambda d: dataclasses.replace(d, mask=d.mask * 0.5), "other than 0 and 1", BUILD),
    "mask inconsistent with ids_keep": (_swap_kept_and_masked, "ids_keep names patches", BUILD),
    "weights nan": (
        lambda d: dataclasses.replace(d, weights=_set(d.weights, float("nan"))),
        "weights: NaN/inf in 1 of 48 values",
        "check the policy's scores and sigmoid",
    ),
    "weights inf": (
        lambda d: dataclasses.replace(d, weights=_set(d.weights, float("inf"))),
        "NaN/inf",
        "lower pretrain.mask.lr",
    ),
    "weights shape": (
        lambda d: dataclasses.replace(d, weights=d.weights[:, :-1]),
        "got [3, 15]",
        "a w shaped like scores",
    ),
    "weights a list": (lambda d: dataclasses.replace(d, weights=[0.5] * 16), "got list", "[B, L]"),
    "map shape": (
        lambda d: dataclasses.replace(d, maps={"predicted loss": d.maps["predicted loss"][:, :-1]}),
        "map 'predicted loss' must be a [B, L] = [3, 16] tensor, got [3, 15]",
        "each m shaped like scores",
    ),
    "map nan": (
        lambda d: dataclasses.replace(d, maps={"x": _set(d.maps["predicted loss"], float("nan"))}),
        "map 'x': NaN/inf in 1 of 48 values",
        "check the computation behind the map",
    ),
    "maps not a dict": (lambda d: dataclasses.replace(d, maps=[d.mask]), "maps is list", "a dict of [B, L]"),
    "a tuple": (
        lambda d: (d.ids_keep, d.ids_restore, d.mask),
        "expected a MaskDecision, got tuple",
        "forward must return a MaskDecision",
    ),
    "None": (lambda d: None, "got NoneType", "forward must return a MaskDecision"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_validate_rejects_a_malformed_decision(breakage: str, good: tuple[MaskDecision, MaskBatch]) -> None:
    decision, batch = good
    validate_decision(decision, batch, POLICY)  # the unbroken one is fine
    breaker, fragment, advice = BREAKAGES[breakage]
    broken = breaker(decision)
    with pytest.raises(MalformedDecisionError) as caught:
        validate_decision(broken, batch, POLICY)
    message = str(caught.value)
    assert f"'{POLICY}'" in message
    assert fragment in message
    assert f"Fix: {advice}" in message or advice in message.split("Fix: ", 1)[1], message
    assert "\n" not in message
    assert isinstance(caught.value, PluginError) and isinstance(caught.value, MaskkitError)


def test_advice_for_non_finite_weights_does_not_send_the_author_to_decision_from_scores(
    good: tuple[MaskDecision, MaskBatch],
) -> None:
    decision, batch = good
    with pytest.raises(MalformedDecisionError) as caught:
        validate_decision(
            dataclasses.replace(decision, weights=_set(decision.weights, float("nan"))), batch, POLICY
        )
    assert "decision_from_scores" not in str(caught.value)


def test_validate_rejects_ids_restore_that_does_not_put_kept_first(
    good: tuple[MaskDecision, MaskBatch],
) -> None:
    decision, batch = good
    # a valid permutation, consistent counts, but the kept patches are not placed first
    flipped = dataclasses.replace(decision, ids_restore=15 - decision.ids_restore)
    with pytest.raises(MalformedDecisionError, match=f"'{POLICY}'.*kept patches first"):
        validate_decision(flipped, batch, POLICY)


# --- built-in policies ------------------------------------------------------------------------

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8)


def test_random_policy_masks_differ_between_calls() -> None:
    policy = create_policy("random", CONTEXT)
    assert isinstance(policy, MaskPolicy) and not policy.learnable
    assert not list(policy.parameters())
    batch = make_batch(4, 16, ratio=0.75)
    first, second = policy(batch), policy(batch)
    for decision in (first, second):
        validate_decision(decision, batch, "random")
        assert decision.weights is None
    assert not torch.equal(first.mask, second.mask)
    assert not torch.equal(first.mask[0], first.mask[1])  # and between images of one batch


@pytest.mark.parametrize("name", ["mlo", "mlo-light"])
def test_learned_policies_give_weights_in_unit_interval_with_gradient(name: str) -> None:
    torch.manual_seed(4)
    policy = create_policy(name, CONTEXT)
    assert policy.learnable and type(policy).learnable
    batch = make_batch(3, 16, ratio=0.75)
    decision = policy(batch)
    validate_decision(decision, batch, name)

    weights = decision.weights
    assert weights is not None and weights.shape == (3, 16)
    assert bool(((weights > 0) & (weights < 1)).all())
    assert weights.requires_grad
    # In training the mask is sampled (it has a log-probability); in eval mode, its mode, the
    # kept patches are those with the lowest mask probability.
    assert decision.log_prob is not None and decision.log_prob.requires_grad
    policy.eval()
    mode = policy(batch)
    assert mode.log_prob is None
    kept_weights = torch.gather(mode.weights.detach(), 1, mode.ids_keep)
    masked_weights = mode.weights.detach()[mode.mask == 1].view(3, -1)
    assert bool((kept_weights.max(dim=1).values <= masked_weights.min(dim=1).values).all())
    policy.train()

    (weights * decision.mask).sum().backward()
    for param_name, param in policy.named_parameters():
        assert param.grad is not None, param_name
    assert any(bool(param.grad.abs().sum() > 0) for param in policy.parameters())


@pytest.mark.parametrize(("num_patches", "embed_dim"), [(16, 8), (4, 6)])
def test_mlo_parameter_count(num_patches: int, embed_dim: int) -> None:
    grid = int(num_patches**0.5)
    context = PolicyContext(num_patches=num_patches, embed_dim=embed_dim, grid_size=grid, patch_size=8)
    policy = create_policy("mlo", context)
    count = sum(param.numel() for param in policy.parameters())
    length, dim = num_patches, embed_dim
    assert count == length * dim * 512 + 512 + 512 * length + length


def test_mlo_light_is_much_smaller_than_mlo() -> None:
    context = PolicyContext(num_patches=64, embed_dim=32, grid_size=8, patch_size=4)
    light = sum(p.numel() for p in create_policy("mlo-light", context).parameters())
    # LayerNorm(D) + Linear(D, 64) + Linear(64, 1) without its bias (bounded logits make it moot)
    assert light == 2 * 32 + (32 * 64 + 64) + 64
    assert light * 100 < sum(p.numel() for p in create_policy("mlo", context).parameters())


def test_policy_options_reach_the_constructor() -> None:
    policy = create_policy("mlo", CONTEXT, {"hidden_dim": 7})
    count = sum(param.numel() for param in policy.parameters())
    assert count == 16 * 8 * 7 + 7 + 7 * 16 + 16
    with pytest.raises(PluginError, match=r"'mlo'.*rejected its options"):
        create_policy("mlo", CONTEXT, {"no_such_option": 1})


@pytest.mark.parametrize("name", ["mlo", "mlo-light"])
def test_confident_mask_probabilities_keep_their_gradient_under_bf16_autocast(name) -> None:
    """A logit of 8 is σ = 1 exactly in bf16, and σ(1 − σ) = 0 would cut the hypergradient: the
    learned policies take σ in fp32, so the weights still have a gradient there. (With the
    reference's raw logits: bounded logits never reach 8.)"""
    raw = LearnedMaskConfig(**LEGACY_LEARNED_MASK)
    context = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=4, learned_mask=raw)
    policy = create_policy(name, context)
    last = [module for module in policy.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(8.0)
    batch = make_batch(batch_size=4, num_patches=16, embed_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decision = policy(batch)
    assert decision.weights.dtype == torch.float32
    (decision.weights * decision.mask).sum().backward()
    # σ'(8) ≈ 3.4e-4 for each of the 4 · 12 masked patches; exactly 0 if σ is taken in bf16.
    assert last.bias.grad.abs().sum() > 0.01
