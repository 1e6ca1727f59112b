"""The learned mask stays alive: bounded logits, sampled masks, a scaled first layer, and the
score-function estimator checked against a brute-force expectation."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import yaml

from maskkit.config import LEGACY_LEARNED_MASK, LearnedMaskConfig, RunConfig, build_config, load_run_config
from maskkit.engine.mask_health import image_dependence, jaccard_distance, saturated_share
from maskkit.errors import ConfigError, MaskkitWarning, PluginError
from maskkit.masking import SlotCentring, bounded_logits, plackett_luce_log_prob, sample_decision
from maskkit.plugins import create_policy
from maskkit.policy import MaskBatch, PolicyContext, validate_decision
from maskkit.weighting import loss_weighting
from maskkit_plugins.mlo import MLOMasking

# ViT-S/2 at 32 px: 256 patches of width 384, so mlo's first layer has a fan-in of 98 304.
VIT_S2 = {"num_patches": 256, "embed_dim": 384, "grid_size": 16, "patch_size": 2}


def _tokens(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, 256, 384]`` tokens like a ViT's: a large position component every image shares
    (most of their energy, as measured at ViT-S/2) plus a smaller per-image part."""
    position = torch.randn(1, 256, 384, generator=generator) * 2.0
    return position + torch.randn(batch, 256, 384, generator=generator)


def _saturation_after_noise_steps(learned_mask: LearnedMaskConfig, steps: int = 5) -> float:
    """``mlo`` at ViT-S/2 width stepped by AdamW (lr 1e-3, the mask level's) on a gradient of pure
    noise; the share of its probabilities within 1e-3 of 0 or 1 afterwards."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    policy = MLOMasking(PolicyContext(**VIT_S2, learned_mask=learned_mask), hidden_dim=64)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95))
    tokens = _tokens(8, generator)
    for _ in range(steps):
        logits = bounded_logits(policy.mask_logits(tokens), learned_mask.logit_bound)
        loss = (logits.sigmoid() * torch.randn(logits.shape, generator=generator)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        policy.eval()
        weights = policy(MaskBatch(tokens, tokens, 0.75)).weights
    return saturated_share(weights)


def test_the_reference_mlo_saturates_within_five_steps_at_vit_s2_width():
    # Today's (and the paper's) formulation: raw logits, an unscaled first layer of fan-in 98 304.
    legacy = LearnedMaskConfig(**LEGACY_LEARNED_MASK)
    assert _saturation_after_noise_steps(legacy) > 0.5


def test_the_default_mlo_does_not_saturate_at_vit_s2_width():
    assert _saturation_after_noise_steps(LearnedMaskConfig(), steps=10) <= 0.10


def test_centred_tokens_let_mlo_depend_on_the_image_at_vit_s2_width():
    """Tokens dominated by a shared position component give the normalised, flattened input
    nearly the same for every image: the mask is one mask for all. Centring each slot removes
    the shared part (in training by the batch's mean, in evaluation by the running mean)."""
    generator = torch.Generator().manual_seed(1)
    tokens = _tokens(16, generator)
    dependence = {}
    for centre in (False, True):
        torch.manual_seed(0)
        policy = MLOMasking(PolicyContext(**VIT_S2, learned_mask=LearnedMaskConfig(centre_tokens=centre)), 64)
        with torch.no_grad():
            policy.train()
            policy.mask_logits(tokens)  # one training batch sets the running mean
            policy.eval()
            dependence[centre] = image_dependence(policy.mask_logits(tokens))
    assert dependence[False] < 0.2 < 0.5 < dependence[True]  # measured: 0.14 and 0.60
    fresh = SlotCentring(256, 384).eval()  # before any training batch: the batch's own mean
    torch.testing.assert_close(fresh(tokens + 5.0), tokens - tokens.mean(0, keepdim=True))
    centring = SlotCentring(256, 384).train()
    shifted = centring(tokens + 5.0)
    torch.testing.assert_close(shifted, tokens - tokens.mean(0, keepdim=True))
    torch.testing.assert_close(centring.eval()(tokens), tokens - tokens.mean(0, keepdim=True) - 5.0)


def test_bounded_logits_are_bounded_standardised_and_scale_free():
    logits = torch.randn(4, 16) * 1e4
    bounded = bounded_logits(logits, 3.0)
    assert bounded.abs().max() < 3.0
    torch.testing.assert_close(bounded, bounded_logits(logits * 1e-3, 3.0), atol=1e-4, rtol=1e-4)
    assert torch.equal(bounded_logits(logits, 0.0), logits)  # 0: the raw logits (the reference)


def test_plackett_luce_log_prob_is_the_probability_of_the_ordered_draw():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    order = torch.tensor([[2, 0, 3, 1]])
    weights = scores.exp()[0]
    expected = (
        weights[2] / weights.sum() * weights[0] / (weights.sum() - weights[2])
    ).log()  # two draws: patch 2, then patch 0
    torch.testing.assert_close(plackett_luce_log_prob(scores, order, 2)[0], expected)


def _ordered_probability(logits: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """P(drawing ``order`` first, in that order) under Plackett–Luce with ``softmax(logits)``."""
    remaining = list(range(len(logits)))
    probability = logits.new_tensor(1.0)
    for patch in order:
        probability = probability * logits[patch].exp() / logits[remaining].exp().sum()
        remaining.remove(patch)
    return probability


def _score_function_estimate(
    logits: torch.Tensor, d: torch.Tensor, samples: int, flip_sign: bool = False
) -> torch.Tensor:
    """The mean over ``samples`` sampled masks of ∂/∂logits of ``Σ_j c_j d_j``, with c the
    ``score-function`` weighting's coefficients: the derivative the pretrain path of the
    hypergradient takes (``d_j = ∇_E err_j · v`` stands fixed here)."""
    weighting = loss_weighting("score-function")
    batch = logits.detach().expand(samples, -1).clone().requires_grad_(True)
    decision = sample_decision(batch, mask_ratio=0.5, temperature=1.0)
    log_prob = -decision.log_prob if flip_sign else decision.log_prob
    coefficients = weighting.coefficients(decision.mask, batch.sigmoid(), log_prob)
    # The coefficients average over the batch (1/B); × B gives each sample's own estimate.
    (gradient,) = torch.autograd.grad((coefficients * d).sum() * samples, batch)
    return gradient.mean(0)


def test_score_function_estimator_agrees_with_the_brute_force_expectation():
    """E_m[Σ_j m_j d_j / M] over masks sampled by Gumbel-top-k: its exact gradient (every ordered
    draw enumerated) against the mean of the estimator over many samples."""
    torch.manual_seed(0)
    logits = torch.tensor([0.8, -0.4, 0.1, -1.2], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    num_masked = 2
    expectation = sum(
        _ordered_probability(logits, order) * d[list(order)].sum() / num_masked
        for order in itertools.permutations(range(4), num_masked)
    )
    (exact,) = torch.autograd.grad(expectation, logits)
    estimate = _score_function_estimate(logits, d, samples=200_000)
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0.05)
    broken = _score_function_estimate(logits, d, samples=200_000, flip_sign=True)
    assert not torch.allclose(broken, exact, atol=0.02, rtol=0.05)


def test_a_sampled_decision_is_valid_and_varies_while_the_mode_does_not():
    torch.manual_seed(0)
    logits = torch.randn(3, 16)
    batch = MaskBatch(torch.zeros(3, 3, 8, 8), torch.zeros(3, 16, 4), 0.75)
    first = sample_decision(logits, 0.75, temperature=1.0, weights=logits.sigmoid())
    second = sample_decision(logits, 0.75, temperature=1.0, weights=logits.sigmoid())
    validate_decision(first, batch, "sampled")
    assert first.log_prob is not None and first.log_prob.shape == (3,)
    assert not torch.equal(first.mask, second.mask)
    assert jaccard_distance(first.mask, second.mask) > 0
    # Low temperature: the draws approach the top-k.
    cold = sample_decision(logits, 0.75, temperature=1e-4)
    top = torch.zeros_like(logits).scatter_(1, logits.topk(12, dim=1).indices, 1.0)
    assert torch.equal(cold.mask, top)


def test_health_figures_tell_a_dead_mask_from_a_live_one():
    dead = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    assert saturated_share(dead) == 1.0
    assert saturated_share(torch.full((2, 4), 0.5)) == 0.0
    same_everywhere = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert image_dependence(same_everywhere) == 0.0
    assert image_dependence(torch.tensor([[1.0, 2.0], [2.0, 1.0]])) == pytest.approx(1.0)
    assert jaccard_distance(dead, dead) == 0.0


def test_tempered_weighting_keeps_the_mae_scale_and_reaches_the_encoder():
    torch.manual_seed(0)
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1
    weights = torch.rand(2, 8, requires_grad=True)
    error = torch.rand(2, 8, requires_grad=True)
    tempered = loss_weighting("tempered", tempered_alpha=0.5)
    coefficients = tempered.coefficients(mask, weights)
    assert float(coefficients.detach().sum()) == pytest.approx(1.0)  # the masked weights average 1
    (error_grad,) = torch.autograd.grad(tempered.loss(error, mask, weights), error, retain_graph=True)
    plain = mask / mask.sum()
    assert not torch.allclose(error_grad, plain)  # E's step applies the re-weighting
    (weight_grad,) = torch.autograd.grad(tempered.loss(error, mask, weights), weights)
    per_image = (weight_grad * mask).sum(1)
    torch.testing.assert_close(per_image, torch.zeros(2), atol=1e-6, rtol=0)  # centred per image


def test_old_configs_naming_hypergradient_only_load_as_straight_through():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build_config("smoke", overrides=[{"pretrain": {"weighting": "hypergradient-only"}}])
    assert config.pretrain.weighting == "straight-through"
    messages = [str(w.message) for w in caught if issubclass(w.category, MaskkitWarning)]
    assert len(messages) == 1 and "'hypergradient-only' is now called 'straight-through'" in messages[0]
    assert loss_weighting("hypergradient-only") == loss_weighting("straight-through")


def test_score_function_without_sampling_is_refused_before_the_run():
    overrides = [{"pretrain": {"weighting": "score-function", "learned_mask": {"selection": "top-k"}}}]
    with pytest.raises(ConfigError, match="'score-function' needs sampled masks"):
        build_config("smoke", overrides=overrides)
    build_config("smoke", overrides=[{"pretrain": {"weighting": "score-function"}}])  # sampling: fine


def test_a_policy_state_saved_with_progress_and_an_output_bias_loads():
    """States saved in early 2026-12 hold ``progress`` and the scorer's output bias; both are
    dropped on load, which changes no bounded logit."""
    context = PolicyContext(
        num_patches=16, embed_dim=8, grid_size=4, patch_size=8, learned_mask=LearnedMaskConfig()
    )
    light = create_policy("mlo-light", context)
    saved = {**light.state_dict(), "progress": torch.tensor(0.5), "scorer.3.bias": torch.tensor([4.0])}
    fresh = create_policy("mlo-light", context)
    fresh.load_state_dict(saved)
    tokens = torch.randn(2, 16, 8)
    torch.testing.assert_close(fresh.mask_logits(tokens), light.mask_logits(tokens))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**saved, "scorer.3.other": torch.tensor([1.0])})


def test_the_paper_preset_keeps_the_reference_mask():
    learned = build_config("paper").pretrain.learned_mask
    assert (learned.logit_bound, learned.selection, learned.fan_in_scaling) == (0, "top-k", False)
    assert (learned.random_warmup, learned.lr_warmup, learned.head_refit_every) == (0, 0, None)
    assert not learned.centre_tokens and learned.diversity == 0
    assert math.isclose(build_config("cpu").pretrain.learned_mask.logit_bound, 3.0)
    assert build_config("cpu").pretrain.learned_mask.centre_tokens


def _saved(tmp_path, config: dict) -> RunConfig:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_run_config(path)


def test_a_run_saved_before_centred_tokens_loads_as_it_ran(tmp_path):
    """``pretrain.learned_mask.centre_tokens`` (on by default since 2026-12-06) is off for a
    saved run whose config does not name it, so its ``mlo`` state loads into the network it
    trained (no centring buffers); one that set the former policy option keeps it, with one
    warning, and a new config takes the default."""
    config = build_config("cpu", overrides=[{"policy": "mlo"}]).model_dump(mode="json")
    del config["pretrain"]["learned_mask"]["centre_tokens"]
    before = _saved(tmp_path, config)
    assert not before.pretrain.learned_mask.centre_tokens
    context = PolicyContext(
        num_patches=16, embed_dim=8, grid_size=4, patch_size=8, learned_mask=before.pretrain.learned_mask
    )
    assert "centring.running_mean" not in MLOMasking(context).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        option = _saved(tmp_path, {**config, "policy_options": {"centre_tokens": True}})
    assert option.pretrain.learned_mask.centre_tokens and option.policy_options == {}
    messages = [str(w.message) for w in caught if issubclass(w.category, MaskkitWarning)]
    assert len(messages) == 1 and "pretrain.learned_mask.centre_tokens" in messages[0]
    context = PolicyContext(
        num_patches=16, embed_dim=8, grid_size=4, patch_size=8, learned_mask=option.pretrain.learned_mask
    )
    assert "centring.running_mean" in MLOMasking(context).state_dict()
    random_option = {**config, "policy": "random", "policy_options": {"centre_tokens": True}}
    with pytest.raises(PluginError, match="centre_tokens"):  # not mlo's: not moved, refused as unknown
        create_policy("random", context, _saved(tmp_path, random_option).policy_options)
    assert build_config("cpu", overrides=[{"policy": "mlo"}]).pretrain.learned_mask.centre_tokens


def test_a_run_saved_before_the_diversity_hinge_loads_as_it_ran(tmp_path):
    """The diversity hinge (λ = 1 above a share of 0.5) is the default since 2026-12-07: a saved
    config without ``diversity`` ran without the term, and one with a ``diversity`` but no
    ``shared_map_cap`` (2026-12-06, night) penalised the whole share."""
    config = build_config("cpu", overrides=[{"policy": "mlo"}]).model_dump(mode="json")
    assert (
        config["pretrain"]["learned_mask"]["diversity"],
        config["pretrain"]["learned_mask"]["shared_map_cap"],
    ) == (1.0, 0.5)
    del config["pretrain"]["learned_mask"]["diversity"], config["pretrain"]["learned_mask"]["shared_map_cap"]
    assert _saved(tmp_path, config).pretrain.learned_mask.diversity == 0
    config["pretrain"]["learned_mask"]["diversity"] = 0.3
    plain = _saved(tmp_path, config).pretrain.learned_mask
    assert (plain.diversity, plain.shared_map_cap) == (0.3, 0)
    paper = build_config("paper").pretrain.learned_mask
    assert (paper.diversity, paper.shared_map_cap) == (0, 0)


def test_a_run_saved_before_the_learned_mask_section_loads_as_it_ran(tmp_path):
    """Its config.yaml has no pretrain.learned_mask: it is read as the reference formulation,
    and the policies then have exactly the parameters (and no buffer) they were saved with."""
    config = build_config("cpu").model_dump(mode="json")
    del config["pretrain"]["learned_mask"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    learned = load_run_config(path).pretrain.learned_mask
    assert learned == LearnedMaskConfig(**LEGACY_LEARNED_MASK)
    context = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8, learned_mask=learned)
    # The keys of the state dicts the policies had until 2026-12.
    assert sorted(MLOMasking(context).state_dict()) == [
        "scorer.0.bias", "scorer.0.weight", "scorer.2.bias", "scorer.2.weight"
    ]  # fmt: skip
    light = create_policy("mlo-light", context)
    assert sorted(light.state_dict()) == [
        "scorer.0.bias", "scorer.0.weight", "scorer.1.bias", "scorer.1.weight",
        "scorer.3.bias", "scorer.3.weight",
    ]  # fmt: skip
