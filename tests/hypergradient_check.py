"""The finite-difference check of the mask level's hypergradient, path by path (shared by
``test_hypergradient.py``, which explains the method, and ``test_guided_policies.py``).

On a tiny model (float64, the head's dropout on), one MLO iteration (unroll 1/1/1) runs through
the real engine (:func:`run_engine`), which reports the mask parameters' hypergradient split by
path; :func:`finite_difference` differentiates the validation loss after one unrolled step of the
lower levels along one path alone, with the engine's random draws replayed, and
:func:`check_paths` compares the two.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.engine.objectives import mask_batch
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.weighting import loss_weighting

PATHS = ("pretrain", "finetune-pretrain")
ETA_PRETRAIN, DELTA = 1e-3, 1e-2
HEAD_DROPOUT = 0.1
_RUN_NUMBERS = itertools.count()


def flat(tensors) -> torch.Tensor:
    """The tensors, detached, as one flat vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine similarity of two flat vectors."""
    return float(F.cosine_similarity(a, b, dim=0))


def build_pretrainer(
    tmp_path, policy: str, weighting: str, precision: str = "fp32", **estimator
) -> Pretrainer:
    """A tiny three-level run in float64 (``precision="bf16"``: float32 weights under bf16
    autocast instead); ``estimator`` sets options of ``pretrain.hypergradient``."""
    torch.manual_seed(0)
    config = tiny_config(
        policy,
        precision=precision,
        policy_options={"hidden_dim": 4 if policy == "mlo-light" else 2},
        # No diversity term: it reaches T directly, not through the hypergradient checked here
        # (tests/test_diversity.py checks it).
        pretrain={"weighting": weighting, "hypergradient": estimator, "learned_mask": {"diversity": 0.0}},
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


def run_engine(pretrainer: Pretrainer) -> EngineRun:
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
        parts={name: flat(part) for name, part in mask_level.last_path_hypergradients.items()},
        total=flat(mask_level.last_hypergradient),
        policy_before=policy_before,
        moved=flat(pretrainer.policy.parameters()) - flat(policy_before),
        val_rng=states["val"],
        finetune_pair_rng=states.get("finetune_pair"),
        pretrain_pair=pairs[0] if pairs else None,  # cg evaluates the loss, not the pair
    )


def unrolled_validation_loss(pretrainer: Pretrainer, run: EngineRun, path: str, pair) -> float:
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
            # The validation loss alone: a penalty of the policy's own (its regulariser, e.g.
            # the diversity term) reaches T directly, on no path through E or C.
            images, labels, _ = levels["mask"].cur_batch
            return float(objectives.head_loss(mae.features(images), labels))
    finally:
        with torch.no_grad():
            for p, s in zip(encoder_params + head_params, saved, strict=True):
                p.copy_(s)


def finite_difference(pretrainer: Pretrainer, run: EngineRun, path: str, step: float = 1e-6):
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
            plus = unrolled_validation_loss(pretrainer, run, path, pair)
            flat[index] = original - step
            minus = unrolled_validation_loss(pretrainer, run, path, pair)
            flat[index] = original
            estimates.append((plus - minus) / (2 * step))
    return torch.tensor(estimates, dtype=torch.float64)


def path_references(pretrainer: Pretrainer, run: EngineRun) -> dict[str, torch.Tensor]:
    return {
        "pretrain": finite_difference(pretrainer, run, "pretrain") / ETA_PRETRAIN,
        "finetune-pretrain": finite_difference(pretrainer, run, "finetune-pretrain") / (ETA_PRETRAIN * DELTA),
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
        similarity = cosine(part, reference)
        if similarity < threshold:
            problems.append(f"path {path}: cosine {similarity:.3f} with its finite difference")
        ratio = float(part.norm() / reference.norm())
        if not 2 / 3 < ratio < 3 / 2:
            problems.append(f"path {path}: norm {ratio:.2f}× its finite difference's")
    return problems
