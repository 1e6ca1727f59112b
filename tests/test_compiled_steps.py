"""The ``compile`` and ``fused_adamw`` options compute what the eager engine computes.

A tiny three-level run is stepped twice eager and twice compiled (or with fused AdamW) from the
same seed; the level losses and the gradients every level's optimiser steps with (the mask
level's is its hypergradient) must agree to float rounding, and with fused AdamW the weights after
the first step too. (Compiled, the weights after a step cannot be compared entry by entry: a
gradient that is zero up to rounding, such as the attention's key bias, gets a different rounding
noise, and AdamW's first steps move a weight by ±lr whatever the gradient's size.) A
perturbation of the compiled passes by one part in a thousand must make the check fail, so the
tolerances are tight enough to catch a compiled pass that computes something else.

Compiling the two passes of the tiny model takes inductor (and the C++ compiler) about 35 s on the
2-core development CPU with an empty inductor cache (45 s for the module, imports included, at
load average 4; 2026-12-06), about 6 s with a warm one; the tests share the one compiled run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch._dynamo.utils
from helpers import quiet_context, synthetic_dataset, tiny_config

from maskkit.engine import compiled
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.runtime import use_fused_adamw

STEPS = 2
#: Tolerances: float32 rounding of a reordered sum is about 1e-7 per operation; a weight of
#: about 1 is stored to 6e-8.
LOSS_RTOL = 1e-5
GRADIENT_RTOL = 1e-4
WEIGHT_ATOL = 3e-7


@dataclass
class Trace:
    """What a short run computed: the level losses of every step, every level's gradient of
    every step (flattened, as its optimiser stepped with it), and the weights after step 1."""

    losses: list[dict[str, float]]
    gradients: list[dict[str, torch.Tensor]]
    first_weights: dict[str, torch.Tensor]


def run_steps(tmp_path, wrap_passes: Callable | None = None, **options) -> Trace:
    """:data:`STEPS` steps of a tiny ``mlo-light`` run with the config ``options`` (by default
    eager, with torch's default AdamW kernel); ``wrap_passes`` may replace the objectives' passes
    (to perturb them)."""
    torch.manual_seed(0)
    options = {"compile": False, "fused_adamw": False, **options}
    config = tiny_config("mlo-light", policy_options={"hidden_dim": 4}, **options)
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, policy, head = build_models(config, len(dataset.class_names), context.device)
    pretrainer = Pretrainer(context, mae, policy, head)
    if wrap_passes is not None:
        pretrainer.objectives.passes = wrap_passes(pretrainer.objectives.passes)
    gradients: list[dict[str, torch.Tensor]] = []

    def recorder(level: str) -> Callable:
        def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
            grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
            gradients[-1][level] = torch.cat([g for g in grads if g is not None]).clone()

        return record

    for name, level in pretrainer.mlo.levels.items():
        level.optimizer.register_step_pre_hook(recorder(name))
    losses, first_weights = [], {}
    for step in range(1, STEPS + 1):
        gradients.append({})
        pretrainer.step(step)
        losses.append(dict(pretrainer.mlo.last_losses()))
        if step == 1:
            first_weights = {
                f"{name}.{key}": value.detach().clone()
                for name, module in pretrainer.modules().items()
                for key, value in module.state_dict().items()
            }
    return Trace(losses, gradients, first_weights)


def assert_same_numbers(expected: Trace, actual: Trace, weights: bool = False) -> None:
    """The two traces agree to float rounding (``weights``: also the weights after step 1)."""
    for step, (a, b) in enumerate(zip(expected.losses, actual.losses, strict=True), start=1):
        for level in a:
            assert b[level] == pytest.approx(a[level], rel=LOSS_RTOL), f"step {step}, {level} loss"
    for step, (a, b) in enumerate(zip(expected.gradients, actual.gradients, strict=True), start=1):
        assert a.keys() == b.keys() == {"pretrain", "finetune", "mask"}
        for level, gradient in a.items():
            assert float(gradient.norm()) > 0
            relative = float((gradient - b[level]).norm() / gradient.norm())
            assert relative < GRADIENT_RTOL, f"step {step}: {level} gradients differ by {relative:.2e}"
    if weights:
        for key, value in expected.first_weights.items():
            torch.testing.assert_close(actual.first_weights[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> Trace:
    return run_steps(tmp_path_factory.mktemp("eager"))


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> Trace:
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trace = run_steps(tmp_path_factory.mktemp("compiled"), compile=True)
    # Both passes were captured and compiled (a silent fallback to eager would prove nothing).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2
    return trace


def test_compiled_steps_give_the_eager_losses_gradients_and_hypergradients(eager, compiled_run):
    assert_same_numbers(eager, compiled_run)


def _perturbed(which: str) -> Callable:
    """Passes whose ``which`` output is off by one part in a thousand."""

    def wrap(passes: compiled.StepPasses) -> compiled.StepPasses:
        if which == "reconstruct":

            def reconstruct(*args):
                pred, error = passes.reconstruct(*args)
                return pred, error * 1.001

            return replace(passes, reconstruct=reconstruct)
        # Not a plain scale: the head's LayerNorm would undo it.
        return replace(passes, features=lambda *args: (f := passes.features(*args)) + 1e-3 * f.flip(-1))

    return wrap


@pytest.mark.parametrize("which", ["reconstruct", "features"])
def test_the_check_fails_when_a_compiled_pass_is_perturbed(eager, compiled_run, tmp_path, which):
    # The compiled code is cached by now: these runs reuse it.
    perturbed = run_steps(tmp_path, _perturbed(which), compile=True)
    with pytest.raises(AssertionError):
        assert_same_numbers(eager, perturbed)


def test_cg_runs_through_the_compiled_passes(compiled_run, tmp_path):
    # cg retains the graph of the level-2 features for its vector products, and differentiates
    # the pretrain loss twice (that evaluation stays eager).
    options = {"pretrain": {"hypergradient": {"estimator": "cg", "cg_iterations": 2}}}
    eager_cg = run_steps(tmp_path / "eager", **options)
    compiled_cg = run_steps(tmp_path / "compiled", compile=True, **options)
    assert_same_numbers(eager_cg, compiled_cg)


def test_fused_adamw_gives_the_same_numbers(eager, tmp_path):
    fused = run_steps(tmp_path / "fused", fused_adamw=True)
    assert_same_numbers(eager, fused, weights=True)
    # ... but the check notices an update one part in a thousand larger.
    other_lr = run_steps(tmp_path / "lr", fused_adamw=True, pretrain={"mae": {"lr": 1.001e-3}})
    with pytest.raises(AssertionError):
        assert_same_numbers(eager, other_lr, weights=True)


def test_compile_off_uses_the_eager_passes():
    assert compiled.step_passes(False) is compiled.EAGER_PASSES
    assert compiled.step_passes(True).compiled


def test_the_defaults_are_eager_steps_and_fused_adamw_on_the_cpu_only(tmp_path):
    config = tiny_config("mlo-light")
    assert config.compile is False and config.fused_adamw == "auto"
    assert use_fused_adamw(torch.device("cpu"), "auto")
    assert not use_fused_adamw(torch.device("cuda"), "auto")
    assert not use_fused_adamw(torch.device("cpu"), False)
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    pretrainer = Pretrainer(context, *build_models(config, len(dataset.class_names), context.device))
    assert not pretrainer.objectives.passes.compiled
    for level in pretrainer.mlo.levels.values():
        assert all(group["fused"] for group in level.optimizer.param_groups)
