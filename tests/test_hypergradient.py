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
import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.engine import hypergradient
from maskkit.engine.objectives import mask_batch
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.weighting import WEIGHTINGS, loss_weighting

PATHS = ("pretrain", "finetune-pretrain")
ETA_PRETRAIN, DELTA = 1e-3, 1e-2
HEAD_DROPOUT = 0.1
_RUN_NUMBERS = itertools.count()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def _build(tmp_path, policy: str, weighting: str, precision: str = "fp32", **estimator) -> Pretrainer:
    """A tiny three-level run in float64 (``precision="bf16"``: float32 weights under bf16
    autocast instead); ``estimator`` sets options of ``pretrain.hypergradient``."""
    torch.manual_seed(0)
    config = tiny_config(
        policy,
        precision=precision,
        policy_options={"hidden_dim": 4 if policy == "mlo-light" else 2},
        pretrain={"weighting": weighting, "hypergradient": estimator},
        finetune={"head_dropout": HEAD_DROPOUT},
    )
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / f"run-{next(_RUN_NUMBERS)}")
    mae, mask_policy, head = build_models(config, len(dataset.class_names), context.device)
    pretrainer = Pretrainer(context, mae, mask_policy, head)
    if precision == "bf16":
        return pretrainer
    for module in (mae, mask_policy, head):
        module.double()
    for level in pretrainer.mlo.levels.values():
        source = level.spec.next_batch
        level.spec.next_batch = lambda source=source: (lambda b: b._replace(images=b.images.double()))(
            source()
        )
    return pretrainer


@dataclass
class EngineRun:
    """What one MLO iteration of the engine leaves for the comparison."""

    parts: dict[str, torch.Tensor]  # path name → [P]
    total: torch.Tensor  # [P]
    policy_before: list[torch.Tensor]
    moved: torch.Tensor  # [P], the mask level's update
    val_rng: torch.Tensor  # RNG state when the level-3 loss drew its dropout
    finetune_pair_rng: torch.Tensor | None  # RNG state when the level-2 product drew its dropout
    pretrain_pair: object = None  # the pretrain product's shared part: its (sampled) decision


def _run_engine(pretrainer: Pretrainer) -> EngineRun:
    """One iteration with the hypergradient split by path, recording the RNG states of the
    level-3 loss and of the level-2 pair."""
    objectives = pretrainer.objectives
    states: dict[str, torch.Tensor] = {}

    def recording(name, function):
        def wrapped(*args, **kwargs):
            states.setdefault(name, torch.get_rng_state())
            return function(*args, **kwargs)

        return wrapped

    mask_spec = pretrainer.mlo.levels["mask"].spec
    finetune_pair = pretrainer.mlo.levels["finetune"].spec.functional
    mask_spec.loss = recording("val", mask_spec.loss)
    finetune_pair.prepare = recording("finetune_pair", finetune_pair.prepare)
    pretrain_functional = pretrainer.mlo.levels["pretrain"].spec.functional
    pairs: list = []
    prepare_pretrain = pretrain_functional.prepare

    def keeping_the_pair(batch):
        pairs.append(prepare_pretrain(batch))
        return pairs[-1]

    pretrain_functional.prepare = keeping_the_pair
    policy_before = [p.detach().clone() for p in pretrainer.policy.parameters()]
    pretrainer.mlo.request_path_hypergradients()
    pretrainer.mlo.step(1)  # pretrain step, finetune step, mask step (hypergradient)
    mask_level = pretrainer.mlo.levels["mask"]
    assert objectives.counts["mask/step"] == 1
    return EngineRun(
        parts={name: _flat(part) for name, part in mask_level.last_path_hypergradients.items()},
        total=_flat(mask_level.last_hypergradient),
        policy_before=policy_before,
        moved=_flat(pretrainer.policy.parameters()) - _flat(policy_before),
        val_rng=states["val"],
        finetune_pair_rng=states.get("finetune_pair"),
        pretrain_pair=pairs[0] if pairs else None,  # cg evaluates the loss, not the pair
    )


def _unrolled_validation_loss(pretrainer: Pretrainer, run: EngineRun, path: str, pair) -> float:
    """The validation loss after one unrolled step, with T's effect only along ``path``, at
    the policy's current parameters; leaves E and C as it found them."""
    levels, objectives = pretrainer.mlo.levels, pretrainer.objectives
    mae, head, policy, weighting = pretrainer.mae, pretrainer.head, pretrainer.policy, pretrainer.weighting
    encoder_params, head_params = list(mae.parameters()), list(head.parameters())
    saved = [p.detach().clone() for p in encoder_params + head_params]
    try:
        images, decision = pair.images, pair.decision
        tokens = mae.embed(images)
        batch = mask_batch(mae, images, weighting.policy_tokens(tokens), 0.5, pair.priors)
        weights = policy(batch).weights
        pred = mae.decode(mae.encode(tokens, decision.ids_keep), decision.ids_restore)
        error = mae.reconstruction_error(images, pred)
        if weighting.in_pretrain_step:
            pretrain_loss = weighting.loss(error, decision.mask, weights)
        else:  # the surrogate: normalized weighting at 1 + w(T) − w(T₀)
            surrogate = 1.0 + weights - pair.weights.detach()
            pretrain_loss = loss_weighting("normalized").loss(error, decision.mask, surrogate)
        grads = torch.autograd.grad(pretrain_loss, encoder_params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(encoder_params, grads, strict=True):
                if g is not None:
                    p.sub_(ETA_PRETRAIN * g)
        if path == "finetune-pretrain":
            torch.set_rng_state(run.finetune_pair_rng)
            images, labels, _ = levels["finetune"].cur_batch
            finetune_loss = objectives.head_loss(mae.features(images), labels)  # class-balanced
            grads = torch.autograd.grad(finetune_loss, head_params)
            with torch.no_grad():
                for p, g in zip(head_params, grads, strict=True):
                    p.sub_(DELTA * g)
                for p, s in zip(encoder_params, saved, strict=False):
                    p.copy_(s)  # E back at its value: T now reaches L_val through C alone
        with torch.no_grad():
            torch.set_rng_state(run.val_rng)
            return float(objectives.mask_loss(levels["mask"].cur_batch))
    finally:
        with torch.no_grad():
            for p, s in zip(encoder_params + head_params, saved, strict=True):
                p.copy_(s)


def _finite_difference(pretrainer: Pretrainer, run: EngineRun, path: str, step: float = 1e-6):
    """Central differences over every mask parameter, at the parameters the engine's
    hypergradient was taken at: ``[P]``."""
    with torch.no_grad():
        for p, before in zip(pretrainer.policy.parameters(), run.policy_before, strict=True):
            p.copy_(before)
    # The decision (sampled: the very draw) and, for the surrogate, w(T₀) the engine's pretrain
    # product used.
    pair = run.pretrain_pair
    estimates = []
    for parameter in pretrainer.policy.parameters():
        flat = parameter.data.view(-1)
        for index in range(flat.numel()):
            original = flat[index].item()
            flat[index] = original + step
            plus = _unrolled_validation_loss(pretrainer, run, path, pair)
            flat[index] = original - step
            minus = _unrolled_validation_loss(pretrainer, run, path, pair)
            flat[index] = original
            estimates.append((plus - minus) / (2 * step))
    return torch.tensor(estimates, dtype=torch.float64)


def _references(pretrainer: Pretrainer, run: EngineRun) -> dict[str, torch.Tensor]:
    return {
        "pretrain": _finite_difference(pretrainer, run, "pretrain") / ETA_PRETRAIN,
        "finetune-pretrain": _finite_difference(pretrainer, run, "finetune-pretrain")
        / (ETA_PRETRAIN * DELTA),
    }


def check_paths(run: EngineRun, references: dict[str, torch.Tensor], threshold: float = 0.95) -> list[str]:
    """The problems found with the engine's per-path hypergradients (empty when all is well):
    each path must point where its finite difference points and have about its size."""
    problems = []
    for path in PATHS:
        part, reference = run.parts.get(path), references[path]
        if part is None or part.norm() == 0:
            problems.append(f"path {path}: missing or zero")
            continue
        cosine = _cosine(part, reference)
        if cosine < threshold:
            problems.append(f"path {path}: cosine {cosine:.3f} with its finite difference")
        ratio = float(part.norm() / reference.norm())
        if not 2 / 3 < ratio < 3 / 2:
            problems.append(f"path {path}: norm {ratio:.2f}× its finite difference's")
    return problems


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Engine run and finite-difference references, built once per (policy, weighting)."""
    built = {}

    def get(policy: str, weighting: str):
        if (policy, weighting) not in built:
            pretrainer = _build(tmp_path_factory.mktemp("run"), policy, weighting)
            run = _run_engine(pretrainer)
            built[policy, weighting] = (pretrainer, run, _references(pretrainer, run))
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
        scale = float(_flat(result).norm()) / max(1, _flat(result).numel()) ** 0.5
        return [r + 3 * scale * torch.randn(r.shape, generator=generator, dtype=r.dtype) for r in result]

    return product


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["cut", "flip", "noise"])
def test_the_check_fails_when_a_path_is_broken(cases, tmp_path, monkeypatch, kind, path):
    _, _, references = cases("mlo-light", "straight-through")
    pretrainer = _build(tmp_path, "mlo-light", "straight-through")
    monkeypatch.setitem(hypergradient.ESTIMATORS, "darts", _mutant(kind, path, pretrainer))
    run = _run_engine(pretrainer)
    problems = check_paths(run, references)
    assert any(problem.startswith(f"path {path}:") for problem in problems), problems


# betty's central difference, with an ε small enough for float64 on the tiny model; at the default
# α = 0.01 its truncation error alone costs the pretrain path up to half its cosine here.
FINITE_DIFFERENCE = {"darts_mode": "finite-difference", "darts_alpha": 1e-5}


@pytest.mark.parametrize("weighting", ["reference", "straight-through"])
def test_finite_difference_darts_follows_each_path_too(cases, tmp_path, weighting):
    _, _, references = cases("mlo-light", weighting)
    run = _run_engine(_build(tmp_path, "mlo-light", weighting, **FINITE_DIFFERENCE))
    assert check_paths(run, references) == []


def test_the_exact_product_runs_under_bf16_autocast_and_agrees_with_fp32(tmp_path, monkeypatch):
    # Under bf16 (the CUDA default) the exact product runs in the levels' own precision: it has
    # no ε for bf16 to round away. Same run, same draws: only the products' precision differs.
    under_autocast = []

    def recording_jvp(*args, **kwargs):
        under_autocast.append(torch.is_autocast_enabled("cpu"))
        return torch.func.jvp(*args, **kwargs)

    monkeypatch.setattr(hypergradient, "jvp", recording_jvp)
    bf16 = _run_engine(_build(tmp_path, "mlo-light", "straight-through", precision="bf16"))
    # Split by path: the finetune-level product, and the pretrain-level product once per path.
    assert under_autocast == [True, True, True]
    fp32_products = _build(tmp_path, "mlo-light", "straight-through", precision="bf16")
    for level in fp32_products.mlo.levels.values():
        if level.spec.functional is not None:
            level.spec.functional.exact_precision = contextlib.nullcontext
    fp32 = _run_engine(fp32_products)
    assert under_autocast[3:] == [False, False, False]
    for path in PATHS:
        assert _cosine(bf16.parts[path], fp32.parts[path]) > 0.99


def test_finite_difference_without_matched_random_draws_fails_the_check(cases, tmp_path, monkeypatch):
    # The dropout defect: the two sides of the finetune pair draw different dropout masks.
    _, _, references = cases("mlo-light", "straight-through")
    monkeypatch.setattr(hypergradient, "same_random_draws", lambda device: contextlib.nullcontext())
    run = _run_engine(_build(tmp_path, "mlo-light", "straight-through", **FINITE_DIFFERENCE))
    assert any(problem.startswith("path finetune-pretrain:") for problem in check_paths(run, references))


def test_merged_paths_give_the_same_hypergradient_as_split_ones(tmp_path):
    split = _run_engine(_build(tmp_path, "mlo-light", "straight-through"))
    merged_pretrainer = _build(tmp_path, "mlo-light", "straight-through")
    merged_pretrainer.mlo.step(1)  # no split requested: one pretrain pair for both paths
    merged = _flat(merged_pretrainer.mlo.levels["mask"].last_hypergradient)
    assert merged_pretrainer.mlo.levels["mask"].last_path_hypergradients == {}
    assert _cosine(merged, split.total) > 0.999
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
    run = _run_engine(_build(tmp_path, policy, "straight-through", estimator="cg"))
    for path in PATHS:
        assert run.parts[path].norm() > 0, path
        assert _cosine(run.parts[path], darts.parts[path]) > 0.95, path


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
