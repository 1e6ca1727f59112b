"""The three guided policies: what each promises, checked exactly, and the hypergradient reaching
their learnable parts (β, the two ratios) against a finite difference as in test_hypergradient."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config, with_priors
from hypergradient_check import (
    DELTA,
    ETA_PRETRAIN,
    HEAD_DROPOUT,
    check_paths,
    cosine,
    finite_difference,
    run_engine,
)

from maskkit.checkpoint import load_checkpoint
from maskkit.config import LearnedMaskConfig
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.errors import PluginError
from maskkit.masking import bounded_logits
from maskkit.plugins import create_policy
from maskkit.policy import MaskBatch, PolicyContext, validate_decision
from maskkit_plugins.region_ratio import region_counts

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=4)


def _batch(priors: dict[str, torch.Tensor], mask_ratio: float = 0.5, seed: int = 0) -> MaskBatch:
    batch_size = next(iter(priors.values())).shape[0]
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, 16, 8, generator=generator)
    return MaskBatch(
        images=torch.zeros(batch_size, 3, 16, 16), tokens=tokens, mask_ratio=mask_ratio, priors=priors
    )


def _foreground_rows() -> torch.Tensor:
    """``[B, 16]`` foreground patterns: none, all, one, all but one, and random ones."""
    generator = torch.Generator().manual_seed(1)
    fixed = torch.zeros(4, 16)
    fixed[1], fixed[2, 5], fixed[3, 1:] = 1, 1, 1
    return torch.cat([fixed, (torch.rand(60, 16, generator=generator) < 0.4).float()])


# --- region-ratio ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["region-ratio", "region-ratio-fixed"])
@pytest.mark.parametrize("mask_ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("ratios", [(0.5, 0.9), (0.9, 0.2), (0.3, 0.3)])
def test_region_ratios_hold_exactly_per_sample(name, mask_ratio, ratios) -> None:
    foreground = _foreground_rows()
    options = {"foreground_ratio": ratios[0], "background_ratio": ratios[1]}
    policy = create_policy(name, CONTEXT, options)
    batch = _batch({"foreground": foreground}, mask_ratio)
    torch.manual_seed(0)
    decision = policy(batch)
    validate_decision(decision, batch, name)  # exactly M masked in every row
    num_masked = 16 - batch.num_keep
    expected_fg = region_counts(foreground, torch.tensor(ratios), num_masked).round()
    masked_fg = (decision.mask * foreground).sum(dim=1)
    assert torch.equal(masked_fg, expected_fg)  # the foreground's share, image by image
    assert torch.equal((decision.mask * (1 - foreground)).sum(dim=1), num_masked - expected_fg)
    n_fg = foreground.sum(dim=1)
    assert bool((masked_fg >= (num_masked - (16 - n_fg)).clamp_min(0)).all())
    assert bool((masked_fg <= n_fg.clamp_max(num_masked)).all())
    if ratios[0] == ratios[1]:  # equal ratios: every region masked in proportion to its size
        assert bool(((masked_fg - num_masked * n_fg / 16).abs() <= 0.5).all())
    if name == "region-ratio":  # weights: each patch's probability of being masked; they sum to M
        weights = decision.weights
        assert torch.allclose(weights.sum(dim=1), torch.full((64,), float(num_masked)))
        assert bool(((weights >= 0) & (weights <= 1)).all())
    else:
        assert decision.weights is None


def test_region_ratio_draws_which_patches_at_random_within_each_region() -> None:
    foreground = torch.zeros(1, 16)
    foreground[0, :8] = 1
    policy = create_policy("region-ratio-fixed", CONTEXT)
    masks = {tuple(policy(_batch({"foreground": foreground})).mask[0].tolist()) for _ in range(20)}
    assert len(masks) > 5


def test_region_ratio_reports_its_learned_ratios() -> None:
    policy = create_policy("region-ratio", CONTEXT, {"foreground_ratio": 0.4, "background_ratio": 0.8})
    stats = policy.statistics()
    assert stats == pytest.approx({"foreground_ratio": 0.4, "background_ratio": 0.8})


# --- semantic-soft -------------------------------------------------------------------------------


def _graded_importance(batch_size: int = 256) -> torch.Tensor:
    """``[B, 16]``: four patches per image at importance 1 (at random places), the rest in [0, 0.5]."""
    generator = torch.Generator().manual_seed(2)
    importance = 0.5 * torch.rand(batch_size, 16, generator=generator)
    top = torch.rand(batch_size, 16, generator=generator).argsort(dim=1)[:, :4]
    return importance.scatter(1, top, 1.0)


@pytest.mark.parametrize("name", ["semantic-soft-fixed", "semantic-soft"])
def test_as_beta_grows_soft_guidance_stops_masking_the_highest_prior_patches(name) -> None:
    importance = _graded_importance()
    highest = (importance == 1).float()
    shares = []
    for beta in (0.0, 1.0, 4.0, 16.0, 64.0):
        torch.manual_seed(0)
        policy = create_policy(name, CONTEXT, {"beta": beta})
        if name == "semantic-soft":  # a scorer that says nothing: the prior alone decides
            torch.nn.init.zeros_(policy.scorer[-1].weight)
            if policy.scorer[-1].bias is not None:
                torch.nn.init.zeros_(policy.scorer[-1].bias)
        batch = _batch({"importance": importance})
        decision = policy(batch)
        validate_decision(decision, batch, name)
        shares.append(float((decision.mask * highest).sum() / highest.sum()))
    assert shares[0] == pytest.approx(0.5, abs=0.05)  # β = 0: random masking at r = 0.5
    assert all(later <= earlier for earlier, later in itertools.pairwise(shares)), shares
    assert 0 < shares[1] < shares[0] and shares[2] < shares[1]  # less often, but not never
    assert shares[-1] == 0.0  # the highest-prior patches are kept


def test_semantic_soft_weights_are_the_biased_mask_probability() -> None:
    torch.manual_seed(0)
    policy = create_policy("semantic-soft", CONTEXT, {"beta": 3.0})
    importance = _graded_importance(8)
    batch = _batch({"importance": importance})
    bounded = bounded_logits(policy.mask_logits(batch.tokens), CONTEXT.learned_mask.logit_bound)
    expected = (bounded - 3.0 * importance).sigmoid()
    assert torch.allclose(policy(batch).weights, expected)
    assert "beta" in dict(policy.named_parameters())
    frozen = create_policy("semantic-soft", CONTEXT, {"beta": 3.0, "learn_beta": False})
    assert "beta" not in dict(frozen.named_parameters()) and float(frozen.beta) == 3.0


# --- constraint ----------------------------------------------------------------------------------


def test_constraint_fixed_masks_critical_patches_only_when_it_must() -> None:
    critical = _foreground_rows()
    policy = create_policy("constraint-fixed", CONTEXT)
    for mask_ratio in (0.25, 0.75):
        batch = _batch({"importance": critical}, mask_ratio)
        decision = policy(batch)
        validate_decision(decision, batch, "constraint-fixed")
        num_masked = 16 - batch.num_keep
        must = (num_masked - (16 - critical.sum(dim=1))).clamp_min(0)
        assert torch.equal((decision.mask * critical).sum(dim=1), must)


def test_constraint_penalty_is_the_mean_mask_probability_of_critical_patches() -> None:
    torch.manual_seed(0)
    # Its own term alone (the run's diversity term, added to it, has tests/test_diversity.py).
    own_term_only = dataclasses.replace(CONTEXT, learned_mask=LearnedMaskConfig(diversity=0.0))
    policy = create_policy("constraint", own_term_only, {"penalty": 2.0})
    importance = _graded_importance(8)
    batch = _batch({"importance": importance})
    decision = policy(batch)
    critical = importance >= 0.5
    penalty = policy.regularizer(decision, batch)
    assert torch.allclose(penalty, 2.0 * decision.weights[critical].mean())
    # Its gradient lowers the critical patches' mask probability.
    grads = torch.autograd.grad(penalty, list(policy.parameters()))
    with torch.no_grad():
        for parameter, grad in zip(policy.parameters(), grads, strict=True):
            parameter.sub_(0.5 * grad)
    assert policy(batch).weights[critical].mean() < decision.weights[critical].mean()


def _random_priors(split):
    """Per-patch random priors (4-px patches) upsampled to pixels: importance and foreground."""
    generator = torch.Generator().manual_seed(len(split) + 3)
    count, size = len(split), split.images.shape[-1]
    patches = torch.rand(count, size // 4, size // 4, generator=generator)
    up = patches.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    foreground = (torch.rand(count, size // 4, size // 4, generator=generator) < 0.5).to(torch.uint8) * 255
    return {
        "importance": (up * 255).round().to(torch.uint8),
        "foreground": foreground.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2),
    }


def _pretrainer(tmp_path, policy: str, options: dict | None = None, **config) -> Pretrainer:
    torch.manual_seed(0)
    run_config = tiny_config(policy, policy_options=options or {}, **config)
    dataset = with_priors(synthetic_dataset(), _random_priors)
    context = quiet_context(run_config, dataset, tmp_path / f"run-{policy}-{len(list(tmp_path.iterdir()))}")
    mae, mask_policy, head = build_models(run_config, dataset.num_classes, context.device)
    return Pretrainer(context, mae, mask_policy, head if mask_policy.learnable else None)


def test_lambda_zero_makes_constraint_the_plain_learned_mask(tmp_path) -> None:
    plain = _pretrainer(tmp_path, "mlo-light")
    constrained = _pretrainer(tmp_path, "constraint", {"penalty": 0.0})
    assert constrained.policy.state_dict().keys() == plain.policy.state_dict().keys()
    # Each from the same random state (the masks are sampled from the global stream).
    for pretrainer in (plain, constrained):
        torch.manual_seed(1)
        for step in (1, 2, 3):
            pretrainer.mlo.step(step)
    for name, value in plain.policy.state_dict().items():
        assert torch.equal(constrained.policy.state_dict()[name], value), name
    for name, value in plain.mae.state_dict().items():
        assert torch.equal(constrained.mae.state_dict()[name], value), name
    # What is left of its regulariser is the run's diversity term, exactly mlo-light's.
    assert plain.objectives.last_regularizer is not None
    assert torch.equal(constrained.objectives.last_regularizer, plain.objectives.last_regularizer)
    # With λ > 0 the same start ends elsewhere.
    penalised = _pretrainer(tmp_path, "constraint", {"penalty": 5.0})
    torch.manual_seed(1)
    for step in (1, 2, 3):
        penalised.mlo.step(step)
    assert penalised.objectives.last_regularizer is not None
    changed = [
        not torch.equal(penalised.policy.state_dict()[n], v) for n, v in plain.policy.state_dict().items()
    ]
    assert any(changed)


def test_guided_policies_reject_bad_options() -> None:
    for name, options, fragment in (
        ("region-ratio", {"foreground_ratio": 1.5}, "foreground_ratio"),
        ("semantic-soft", {"noise": -1}, "noise"),
        ("constraint", {"penalty": -0.1}, "penalty"),
        ("constraint-fixed", {"critical_threshold": 0}, "critical_threshold"),
    ):
        with pytest.raises(PluginError, match=fragment):
            create_policy(name, CONTEXT, options)


# --- the hypergradient reaches β and the two ratios -------------------------------------------------


def _double(pretrainer: Pretrainer) -> Pretrainer:
    """float64 modules and batches, and the pretrain pair's random draws pinned, so the engine's
    products and the finite difference see the same (random) mask decision."""
    for module in (pretrainer.mae, pretrainer.policy, pretrainer.head):
        module.double()
    for level in pretrainer.mlo.levels.values():
        source = level.spec.next_batch
        level.spec.next_batch = lambda source=source: (lambda b: b._replace(images=b.images.double()))(
            source()
        )

    def pinned(function):
        def wrapped(batch):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                return function(batch)

        return wrapped

    functional = pretrainer.mlo.levels["pretrain"].spec.functional
    functional.prepare = pinned(functional.prepare)
    pretrainer.objectives.pretrain_pair = pinned(pretrainer.objectives.pretrain_pair)
    return pretrainer


@pytest.mark.parametrize(
    ("policy", "options", "parameter"),
    [
        ("region-ratio", {}, "ratio_logits"),
        ("semantic-soft", {"hidden_dim": 2}, "beta"),
    ],
)
def test_the_hypergradient_reaches_the_guidance_parameters(tmp_path, policy, options, parameter) -> None:
    pretrainer = _double(_pretrainer(tmp_path, policy, options, finetune={"head_dropout": HEAD_DROPOUT}))
    run = run_engine(pretrainer)
    # A larger step than test_hypergradient's 1e-6: the loss moves by ~1e-14 at that step here,
    # at float64's noise floor (measured: the ratio entries' finite difference drifts by 3x).
    references = {
        "pretrain": finite_difference(pretrainer, run, "pretrain", step=1e-4) / ETA_PRETRAIN,
        "finetune-pretrain": finite_difference(pretrainer, run, "finetune-pretrain", step=1e-4)
        / (ETA_PRETRAIN * DELTA),
    }
    assert check_paths(run, references) == []
    # The guidance parameters' own entries: non-zero and as the finite difference says.
    names = [name for name, _ in pretrainer.policy.named_parameters()]
    sizes = [p.numel() for p in pretrainer.policy.parameters()]
    start = sum(sizes[: names.index(parameter)])
    entries = slice(start, start + sizes[names.index(parameter)])
    for path in ("pretrain", "finetune-pretrain"):
        got, want = run.parts[path][entries], references[path][entries]
        assert want.abs().max() > 0 and got.abs().max() > 0, path
        assert torch.allclose(got, want, rtol=0.2, atol=0.05 * float(want.abs().max())), (path, got, want)
    if policy == "region-ratio":
        assert cosine(run.parts["pretrain"], references["pretrain"]) > 0.95


def test_a_guided_run_resumes_bit_exactly(tmp_path, monkeypatch) -> None:
    settings = {"pretrain": {"steps": 6, "checkpoint_every": 3, "augment": "crop_flip"}}
    straight = _pretrainer(tmp_path, "semantic-soft", {"hidden_dim": 4}, **settings)
    straight.run()

    interrupted = _pretrainer(tmp_path, "semantic-soft", {"hidden_dim": 4}, **settings)
    save = interrupted.save

    def save_then_stop(step, pointers):
        save(step, pointers)
        if step == 3:
            raise KeyboardInterrupt

    interrupted.save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    resumed = _pretrainer(tmp_path, "semantic-soft", {"hidden_dim": 4}, **settings)
    resumed.context.run = interrupted.context.run
    resumed.resume_from(load_checkpoint(interrupted.context.run.checkpoints, "last"))
    resumed.run()
    for module in ("mae", "policy", "head"):
        expected = getattr(straight, module).state_dict()
        for name, value in getattr(resumed, module).state_dict().items():
            assert torch.equal(value, expected[name]), (module, name)
