"""Everything that knows betty-ml exists.

maskkit runs the MLO levels as betty ``ImplicitProblem`` s under a betty ``Engine``, with the
reference's dependencies::

    u2l = {mask: [pretrain]}
    l2u = {pretrain: [finetune, mask], finetune: [mask]}

betty-ml 0.1.1 (the only release for Python >= 3.11) has three defects, corrected here:

(a) ``Problem.initialize`` asserts that all lower problems of a problem share one
    ``unroll_steps``, which forbids the reference's 2/1/1. The ready-flag protocol that
    schedules the levels does not need that: the mask level steps once both its lower levels
    have finished their unroll, so with 2/1/1 the levels step 2:1:1. :meth:`_Level.initialize`
    shows betty equal unroll steps for the assertion only; the real ones, captured at
    construction, drive the schedule. ``tests/test_betty_glue.py`` checks the ratio.
(b) Its ``get_grads`` and ``darts`` call ``torch.autograd.grad`` without ``allow_unused``,
    which raises for parameters a loss never touches (the MAE decoder in the level-2/3 losses).
    Here unused parameters get a zero gradient.
(c) Its ``darts`` "restores" the perturbed weights with ``p.data.add(...)`` (not in place), so
    they stay shifted by −ε·v after every hypergradient. Here the weights are copied back
    exactly.

The hypergradient itself is maskkit's (:func:`maskkit.engine.hypergradient.hypergradient`, with
the estimators of :data:`~maskkit.engine.hypergradient.ESTIMATORS`), registered in place of
betty's by overriding ``Problem.backward``. It also removes work the mathematics doesn't need: paths that
enter the same problem share one finite-difference pair (the product is linear in its vector),
and a level's :class:`FunctionalLoss` computes what both sides of a pair share once (the
finetune level's encoder features; the pretrain level's mask decision). Both sides of every pair
draw the same random numbers (:func:`same_random_draws`), so dropout in the head does not turn
the finite difference into noise, a flaw the reference shares. See ``docs/mlo.md`` for the
evaluation count per iteration.

Several processes (``docs/distributed.md``): each level's batch is split across the processes,
and every level's loss is a mean over its batch, so the global batch's loss is the mean of the
processes' losses, and its gradient the mean of theirs. All averaging across processes happens
here, in three places:

1. :meth:`_Level.backward`: a level's own gradients, and for the mask level the seeds
   dL_val/d(first problem of each path), in one all-reduce.
2. :func:`~maskkit.engine.hypergradient.hypergradient`: the output of every
   best-response-Jacobian product. A product is linear in its vector but is computed from one
   process's slice of the level's batch; with the same (global) vector on every process, the
   mean of the processes' products is the product of the global batch's loss. Seeds and
   products being global, every vector that enters a product is global, and the hypergradient
   equals the single-process one on the global batch (up to floating-point reduction order).
   Averaging finished per-process hypergradients instead would not: each would be a product of
   a per-process vector.
3. :func:`~maskkit.engine.hypergradient.cg_product`: each Hessian-vector product inside
   conjugate gradient, for the same reason.

:meth:`_Level.get_loss` averages the logged loss, so divergence is detected on every process at
once. All of it is the identity with one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from maskkit.config import LEVEL_KEYS
from maskkit.distributed import average_across_ranks, mean_of
from maskkit.engine.hypergradient import grad_or_zeros, hypergradient
from maskkit.errors import TrainingDivergedError

if TYPE_CHECKING:
    from maskkit.config import HypergradientConfig

get_logger().setLevel(logging.WARNING)  # betty prints set-up chatter at INFO

LEVELS = ("pretrain", "finetune", "mask")


@dataclass
class LevelSpec:
    """One level, in maskkit's terms.

    Attributes:
        name: ``pretrain``, ``finetune`` or ``mask``.
        module: the level's parameters (E+D, C, or T).
        optimizer, scheduler: its optimiser and per-step LR schedule.
        next_batch: returns the level's next ``(images, labels)``.
        loss: the level's own objective on a batch (its step).
        unroll_steps: steps of this level per step of the level above.
        hypergradient_loss: this level's loss with every graph an upper level needs (for
            ``cg``); ``loss`` when None.
        functional: this level's loss as a function of its own parameters
            (:class:`FunctionalLoss`), which ``darts`` differentiates exactly in forward mode or
            evaluates at ±εv; None perturbs the parameters in place and differentiates each
            side's ``loss`` (finite differences only).
        extra_parameters: parameters outside ``module`` that this level's optimiser also steps
            by the gradient of ``loss`` (a policy's pretrain-level parameters). They are not
            the level's variables in any hypergradient: upper levels treat them as constants.
        excluded_parameters: parameters of ``module`` that this level does not train (they
            belong to another level).
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    next_batch: Callable[[], tuple]
    loss: Callable[[tuple], Tensor]
    unroll_steps: int = 1
    hypergradient_loss: Callable[[tuple], Tensor] | None = None
    functional: FunctionalLoss | None = None
    extra_parameters: list[nn.Parameter] = field(default_factory=list)
    excluded_parameters: list[nn.Parameter] = field(default_factory=list)


@dataclass
class FunctionalLoss:
    """A level's loss as a function of its own parameters, for the ``darts`` product.

    ``prepare(batch)`` computes once what does not depend on this level's parameters (with any
    graph into the upper levels' parameters); ``loss_at(shared, params)`` gives the loss at this
    level's parameters ``params`` (name → tensor, used out of place). The product differentiates
    ``loss_at`` along ``v`` in forward mode, or evaluates it at ``θ ± εv``, and then
    differentiates the result once.
    """

    prepare: Callable[[tuple], Any]
    loss_at: Callable[[Any, dict[str, Tensor]], Tensor]
    # The precision of the exact (forward-mode) product: the levels' own (bf16 autocast on CUDA).
    # It carries no ε, so bf16 cannot round a step away; the finite difference stays in fp32.
    exact_precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class _Level(ImplicitProblem):
    """A betty problem whose batches, loss and modules come from a :class:`LevelSpec`; the
    run's hypergradient settings (``estimator``) say how a hypergradient passes through it.
    betty's own hypergradient options are unused: :meth:`backward` replaces its hypergradient."""

    def __init__(self, spec: LevelSpec, device: torch.device, estimator: HypergradientConfig) -> None:
        config = Config(unroll_steps=spec.unroll_steps, retain_graph=True, allow_unused=True)
        super().__init__(
            name=spec.name,
            config=config,
            module=spec.module,
            optimizer=spec.optimizer,
            scheduler=spec.scheduler,
            device=str(device),
        )
        self.spec = spec
        self.estimator = estimator
        self._excluded = {id(p) for p in spec.excluded_parameters}
        self.last_loss: float | None = None
        self.last_hypergradient: list[Tensor] | None = None
        # Set to compute the next hypergradient path by path (one more product; for diagnostics).
        self.split_next_hypergradient = False
        self.last_path_hypergradients: dict[str, list[Tensor]] = {}
        # Norms of the latest hypergradient ("total") and of the latest split one's paths.
        self.hypergradient_norms: dict[str, float] = {}
        # Called once with the next hypergradient before it is applied (for diagnostics).
        self.next_hypergradient_hook: Callable[[list[Tensor]], None] | None = None

    # --- defect (a): the unroll assertion -------------------------------------------------
    def initialize(self, engine_config: EngineConfig) -> None:
        with _uniform_unroll_view(self.children):
            super().initialize(engine_config)

    # --- data and loss ---------------------------------------------------------------------
    def get_batch(self) -> tuple:
        return self.spec.next_batch()

    def training_step(self, batch: tuple) -> Tensor:
        return self.spec.loss(batch)

    def get_loss(self, batch: tuple) -> tuple[Tensor, dict]:
        try:
            with record_function(f"maskkit.{self.name}.forward"):
                loss, loss_dict = super().get_loss(batch)
        except TrainingDivergedError as error:
            self.diverged(str(error))
        # The global batch's loss: the mean of the processes' (equal-sized) slices' losses.
        self.last_loss = mean_of(loss_dict["loss"])
        if not math.isfinite(self.last_loss):
            self.diverged(f"its loss became {self.last_loss}")
        return loss, loss_dict

    def diverged(self, what: str) -> NoReturn:
        """Stop the run: this level diverged (``what`` says how), the last good checkpoint kept."""
        raise TrainingDivergedError(
            f"the {self.name} level diverged at its step {self._count}: {what}. The last good "
            "checkpoint is kept. Start a new run with a lower lr "
            f"(--set pretrain.{LEVEL_KEYS[self.name]}.lr=...), "
            "or resume this one in fp32 (--resume RUN_DIR --set precision=fp32)."
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The level's variables: its module's parameters, less the excluded ones."""
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in self._excluded]

    def zero_grad(self) -> None:
        super().zero_grad()
        for param in self.spec.extra_parameters:
            param.grad = None

    def hypergradient_objective(self, batch: tuple) -> Tensor:
        """This level's loss with every graph kept (used when a hypergradient passes through)."""
        if self.spec.hypergradient_loss is not None:
            return self.spec.hypergradient_loss(batch)
        return self.spec.loss(batch)

    # --- defects (b), (c): maskkit's hypergradient in place of betty's --------------------
    def backward(
        self,
        loss: Tensor,
        params: list[Tensor],
        paths: list[list[_Level]],
        create_graph: bool = False,
        retain_graph: bool = True,
        allow_unused: bool = True,
    ) -> None:
        params = list(params)
        extras = [p for p in self.spec.extra_parameters if p.requires_grad]
        with record_function(f"maskkit.{self.name}.backward"):
            grads, seeds = self.gradients_and_seeds(loss, params + extras, paths)
        self.set_grads(params, [g for g in grads[: len(params)]])
        self.set_grads(extras, grads[len(params) :])
        if not paths:
            return
        implicit, parts = hypergradient(self, paths, seeds, per_path=self.split_next_hypergradient)
        self.last_hypergradient = [g.detach().clone() for g in implicit]
        self.hypergradient_norms["total"] = _norm(implicit)
        hook, self.next_hypergradient_hook = self.next_hypergradient_hook, None
        if hook is not None:  # every level still stands where this hypergradient was taken
            hook(self.last_hypergradient)
        if parts:
            self.last_path_hypergradients = parts
            self.hypergradient_norms.update({name: _norm(part) for name, part in parts.items()})
            self.split_next_hypergradient = False
        self.set_grads(params, implicit)

    def gradients_and_seeds(
        self, loss: Tensor, inputs: list[Tensor], paths: list[list[_Level]]
    ) -> tuple[list[Tensor], dict[_Level, list[Tensor]]]:
        """``loss``'s gradients with respect to ``inputs``, and the seeds of ``paths``
        (dL/d(first problem of each path)), in one backward pass averaged over the processes."""
        first_hops = _unique(path[1] for path in paths)
        hop_params = [list(problem.trainable_parameters()) for problem in first_hops]
        everything = inputs + [p for group in hop_params for p in group]
        grads = average_across_ranks(grad_or_zeros(loss, everything, retain_graph=False))
        seeds, offset = {}, len(inputs)
        for problem, group in zip(first_hops, hop_params, strict=True):
            seeds[problem] = list(grads[offset : offset + len(group)])
            offset += len(group)
        return grads[: len(inputs)], seeds


@contextlib.contextmanager
def _uniform_unroll_view(children: list[_Level]) -> Iterator[None]:
    """Let betty's equal-unroll assertion pass; the real unroll steps live in ``_unroll_steps``."""
    originals = [child._config for child in children]
    if children:
        shown = originals[0].unroll_steps
        for child in children:
            child._config = replace(child._config, unroll_steps=shown)
    try:
        yield
    finally:
        for child, config in zip(children, originals, strict=True):
            child._config = config


def _norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def _unique(items) -> list:
    seen: list = []
    for item in items:
        if all(item is not other for other in seen):
            seen.append(item)
    return seen


class _Engine(Engine):
    """betty's engine, stepped one iteration at a time by maskkit's training loop."""

    def step(self, global_step: int) -> None:
        self.global_step = global_step
        self.train_step()


class MultiLevelOptimizer:
    """The MLO loop over betty: one :meth:`step` is one step of the pretrain level.

    With only a ``pretrain`` spec (a policy with ``learnable = False``) it is plain MAE
    pretraining, the reference's ``--baseline``; with all three it is MLO-MAE.
    """

    def __init__(
        self,
        specs: dict[str, LevelSpec],
        device: torch.device,
        total_steps: int,
        estimator: HypergradientConfig | None = None,
    ) -> None:
        unknown = set(specs) - set(LEVELS)
        if unknown or "pretrain" not in specs or len(specs) == 2:
            raise ValueError(
                f"levels must be {{pretrain}} or {{pretrain, finetune, mask}}, got {sorted(specs)}"
            )
        if estimator is None:
            from maskkit.config import HypergradientConfig

            estimator = HypergradientConfig()
        self.levels = {name: _Level(spec, device, estimator) for name, spec in specs.items()}
        if len(specs) == 3:
            pretrain, finetune, mask = (self.levels[name] for name in LEVELS)
            dependencies = {"u2l": {mask: [pretrain]}, "l2u": {pretrain: [finetune, mask], finetune: [mask]}}
        else:
            dependencies = {"u2l": {}, "l2u": {}}
        config = EngineConfig(train_iters=total_steps, valid_step=total_steps + 1, logger_type="none")
        self.engine = _Engine(list(self.levels.values()), config=config, dependencies=dependencies)

    @property
    def is_multilevel(self) -> bool:
        return len(self.levels) == 3

    def step(self, global_step: int) -> None:
        self.engine.step(global_step)

    def request_path_hypergradients(self) -> None:
        """Compute the mask level's next hypergradient path by path (for diagnostics)."""
        if self.is_multilevel:
            self.levels["mask"].split_next_hypergradient = True

    def hypergradient_norms(self) -> dict[str, float]:
        """Norms of the mask level's latest hypergradient (``total``) and of each path's part
        from the latest split one (empty before the first)."""
        return dict(self.levels["mask"].hypergradient_norms) if self.is_multilevel else {}

    def inspect_next_hypergradient(self, hook: Callable[[list[Tensor]], None] | None) -> None:
        """Call ``hook`` with the mask level's next hypergradient (detached, one tensor per
        parameter), inside its step, before the optimiser applies it, so that every level's
        parameters and batches are still those it was taken at; ``None`` withdraws a request the
        step did not use."""
        if self.is_multilevel:
            self.levels["mask"].next_hypergradient_hook = hook

    def hypergradient_on(self, batch: tuple) -> list[Tensor]:
        """The mask level's hypergradient with its loss on ``batch`` instead of its own, at the
        current parameters and the lower levels' latest batches; nothing is stepped or stored
        (``hypergradient/snr`` compares one with the step's own, from inside the step:
        :meth:`inspect_next_hypergradient`)."""
        mask = self.levels["mask"]
        _, seeds = mask.gradients_and_seeds(mask.training_step(batch), [], mask.paths)
        total, _ = hypergradient(mask, mask.paths, seeds)
        return total

    def step_counts(self) -> dict[str, int]:
        return {name: level.count for name, level in self.levels.items()}

    def last_losses(self) -> dict[str, float | None]:
        return {name: level.last_loss for name, level in self.levels.items()}

    def state_dict(self) -> dict:
        """Counters, schedule flags and last losses of every level (modules and optimisers are
        saved apart)."""
        return {
            name: {
                "count": level._count,
                "ready": list(level.ready),
                "inner_loop_start": level._inner_loop_start,
                "last_loss": level.last_loss,
                "split_next_hypergradient": level.split_next_hypergradient,
                "hypergradient_norms": dict(level.hypergradient_norms),
            }
            for name, level in self.levels.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for name, level in self.levels.items():
            level._count = state[name]["count"]
            level.ready = list(state[name]["ready"])
            level._inner_loop_start = state[name]["inner_loop_start"]
            level.last_loss = state[name]["last_loss"]
            level.split_next_hypergradient = state[name]["split_next_hypergradient"]
            level.hypergradient_norms = dict(state[name]["hypergradient_norms"])
