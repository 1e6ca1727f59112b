"""Proof that the mask level learns through a real hypergradient, path by path.

On a tiny model (float64, the head's dropout *on*), one MLO iteration (unroll 1/1/1) runs
through the real engine, which reports the mask parameters' hypergradient split by path:

- ``pretrain``: T → E → L_val (the mask → pretrain → mask path);
- ``finetune-pretrain``: T → E → C → L_val (the mask → finetune → pretrain → mask path).

Each part is compared on its own with a central finite difference through one unrolled step
of the lower levels, in which T reaches L_val along that path alone:

    E'(T) = E − η_p ∇_E L_pre(E, T)
    C'(T) = C − δ ∇_C L_ft(C, E'(T))
    pretrain path:          d/dT L_val(C, E'(T))  / η_p
    finetune-pretrain path: d/dT L_val(C'(T), E)  / (η_p δ)

betty's ``darts`` approximates each best-response Jacobian to first order with a unit inner
step, so these first-order (small η_p, δ) derivatives are what each path must match. Keeping
the other level fixed in each reference matters: differentiating L_val(C'(T), E'(T)) instead
mixes in a term no path contains (the change of ∂L_val/∂E when C moves), which dominates when
the finetune path is small.

Randomness is matched: the references replay the dropout draws the engine's level-3 loss and
level-2 product used. The mask decision is held at the one the engine's pretrain product used
(the top-k is not differentiable). Under ``straight-through`` E's step is plain MAE, so the
reference is the unrolled derivative of the surrogate that weighting defines: E's step under
the normalized weighting at weights ``1 + w(T) − w(T₀)``.

The checker itself is shown to catch a broken engine: a cut path, a flipped sign, a path buried
in noise, and a finite-difference product without matched random draws (the dropout defect)
each fail it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config
from hypergradient_check import (
    PATHS,
    build_pretrainer,
    check_paths,
    cosine,
    flat,
    path_references,
    run_engine,
)

from maskkit.engine import hypergradient
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.weighting import WEIGHTINGS


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Engine run and finite-difference references, built once per (policy, weighting)."""
    built = {}

    def get(policy: str, weighting: str):
        if (policy, weighting) not in built:
            pretrainer = build_pretrainer(tmp_path_factory.mktemp("run"), policy, weighting)
            run = run_engine(pretrainer)
            built[policy, weighting] = (pretrainer, run, path_references(pretrainer, run))
        return built[policy, weighting]

    return get


# `score-function` learns through the sampling distribution, not through an unrolled step at a
# fixed mask (its check is tests/test_learned_mask.py's brute-force expectation).
UNROLLED_WEIGHTINGS = [name for name in WEIGHTINGS if name != "score-function"]


@pytest.mark.parametrize("weighting", UNROLLED_WEIGHTINGS)
@pytest.mark.parametrize("policy", ["mlo-light", "mlo"])
def test_each_path_follows_its_unrolled_finite_difference(cases, policy, weighting):
    pretrainer, run, references = cases(policy, weighting)
    assert all(reference.norm() > 0 for reference in references.values())
    assert check_paths(run, references) == []
    # The paths add up to the hypergradient that moved T, and that move is a descent step.
    assert torch.allclose(run.parts["pretrain"] + run.parts["finetune-pretrain"], run.total)
    assert run.moved.norm() > 0
    assert torch.dot(run.moved, run.total) < 0
    # The mask level's own loss does not depend on T: its direct gradient is exactly zero.
    direct = torch.autograd.grad(
        pretrainer.objectives.mask_loss(pretrainer.mlo.levels["mask"].cur_batch),
        list(pretrainer.policy.parameters()),
        allow_unused=True,
    )
    assert all(g is None or not g.any() for g in direct)


def _mutant(kind: str, path: str, pretrainer: Pretrainer):
    """A Jacobian product broken on ``path``: at that path's last product (the one into T), the
    result is cut to zero, sign-flipped, or buried in noise three times its size. (Noise on an
    earlier product into E can shrink on its way to T below what the check sees.)"""
    # In per-path mode the engine pushes each path in betty's order, one product per edge.
    calls = [hypergradient.path_name(p) for p in pretrainer.mlo.levels["mask"].paths for _ in p[2:]]
    target = len(calls) - 1 - calls[::-1].index(path)
    original = hypergradient.darts_product
    count = {"calls": 0}
    generator = torch.Generator().manual_seed(0)

    def product(vector, current, previous):
        result = original(vector, current, previous)
        index, count["calls"] = count["calls"], count["calls"] + 1
        if index != target:
            return result
        if kind == "cut":
            return [torch.zeros_like(r) for r in result]
        if kind == "flip":
            return [-r for r in result]
        scale = float(flat(result).norm()) / max(1, flat(result).numel()) ** 0.5
        return [r + 3 * scale * torch.randn(r.shape, generator=generator, dtype=r.dtype) for r in result]

    return product


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["cut", "flip", "noise"])
def test_the_check_fails_when_a_path_is_broken(cases, tmp_path, monkeypatch, kind, path):
    _, _, references = cases("mlo-light", "straight-through")
    pretrainer = build_pretrainer(tmp_path, "mlo-light", "straight-through")
    monkeypatch.setitem(hypergradient.ESTIMATORS, "darts", _mutant(kind, path, pretrainer))
    run = run_engine(pretrainer)
    problems = check_paths(run, references)
    assert any(problem.startswith(f"path {path}:") for problem in problems), problems


# betty's central difference, with an ε small enough for float64 on the tiny model; at the default
# α = 0.01 its truncation error alone costs the pretrain path up to half its cosine here.
FINITE_DIFFERENCE = {"darts_mode": "finite-difference", "darts_alpha": 1e-5}


@pytest.mark.parametrize("weighting", ["reference", "straight-through"])
def test_finite_difference_darts_follows_each_path_too(cases, tmp_path, weighting):
    _, _, references = cases("mlo-light", weighting)
    run = run_engine(build_pretrainer(tmp_path, "mlo-light", weighting, **FINITE_DIFFERENCE))
    assert check_paths(run, references) == []


def test_the_exact_product_runs_under_bf16_autocast_and_agrees_with_fp32(tmp_path, monkeypatch):
    # Under bf16 (the CUDA default) the exact product runs in the levels' own precision: it has
    # no ε for bf16 to round away. Same run, same draws: only the products' precision differs.
    under_autocast = []

    def recording_jvp(*args, **kwargs):
        under_autocast.append(torch.is_autocast_enabled("cpu"))
        return torch.func.jvp(*args, **kwargs)

    monkeypatch.setattr(hypergradient, "jvp", recording_jvp)
    bf16 = run_engine(build_pretrainer(tmp_path, "mlo-light", "straight-through", precision="bf16"))
    # Split by path: the finetune-level product, and the pretrain-level product once per path.
    assert under_autocast == [True, True, True]
    fp32_products = build_pretrainer(tmp_path, "mlo-light", "straight-through", precision="bf16")
    for level in fp32_products.mlo.levels.values():
        if level.spec.functional is not None:
            level.spec.functional.exact_precision = contextlib.nullcontext
    fp32 = run_engine(fp32_products)
    assert under_autocast[3:] == [False, False, False]
    for path in PATHS:
        assert cosine(bf16.parts[path], fp32.parts[path]) > 0.99


def test_finite_difference_without_matched_random_draws_fails_the_check(cases, tmp_path, monkeypatch):
    # The dropout defect: the two sides of the finetune pair draw different dropout masks.
    _, _, references = cases("mlo-light", "straight-through")
    monkeypatch.setattr(hypergradient, "same_random_draws", lambda device: contextlib.nullcontext())
    run = run_engine(build_pretrainer(tmp_path, "mlo-light", "straight-through", **FINITE_DIFFERENCE))
    assert any(problem.startswith("path finetune-pretrain:") for problem in check_paths(run, references))


def test_merged_paths_give_the_same_hypergradient_as_split_ones(tmp_path):
    split = run_engine(build_pretrainer(tmp_path, "mlo-light", "straight-through"))
    merged_pretrainer = build_pretrainer(tmp_path, "mlo-light", "straight-through")
    merged_pretrainer.mlo.step(1)  # no split requested: one pretrain pair for both paths
    merged = flat(merged_pretrainer.mlo.levels["mask"].last_hypergradient)
    assert merged_pretrainer.mlo.levels["mask"].last_path_hypergradients == {}
    assert cosine(merged, split.total) > 0.999
    # The finetune product differentiated through the finetune step's own features: no
    # second encoder pass for level 2.
    counts = merged_pretrainer.objectives.counts
    assert counts["finetune/step"] == 1 and counts["finetune/hypergradient"] == 0


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


@pytest.mark.parametrize("policy", ["mlo-light", "mlo"])
def test_cg_agrees_with_darts_on_each_path_of_a_tiny_vit(cases, tmp_path, policy):
    # It used to drop the finetune path (a zero product into E) and to crash on the ViT's
    # attention (no double backward through the fused kernel) at the first MLO iteration.
    _, darts, _ = cases(policy, "straight-through")
    run = run_engine(build_pretrainer(tmp_path, policy, "straight-through", estimator="cg"))
    for path in PATHS:
        assert run.parts[path].norm() > 0, path
        assert cosine(run.parts[path], darts.parts[path]) > 0.95, path


def test_conjugate_gradient_solves_positive_definite_systems_and_stops_at_negative_curvature():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0]
    vector = [torch.randn(6, generator=generator, dtype=torch.float64)]

    def matvec_of(eigenvalues):
        matrix = basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T
        return matrix, lambda d: [matrix @ d[0]]

    matrix, matvec = matvec_of([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
    (solution,) = hypergradient.conjugate_gradient(matvec, vector, iterations=6)
    assert torch.allclose(solution, torch.linalg.solve(matrix, vector[0]))
    (partial,) = hypergradient.conjugate_gradient(matvec, vector, iterations=2)
    assert (matrix @ partial - vector[0]).norm() < vector[0].norm()  # two steps already help
    _, indefinite = matvec_of([-4.0, -2.0, -1.0, -0.5, -0.1, -0.05])
    (fallback,) = hypergradient.conjugate_gradient(indefinite, vector, iterations=6)
    assert torch.equal(fallback, vector[0])  # no positive curvature: the identity (darts)
