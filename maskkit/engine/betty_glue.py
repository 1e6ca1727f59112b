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

The hypergradient itself is maskkit's (:func:`hypergradient`), registered in place of betty's by
overriding ``Problem.backward``. It also removes work the mathematics doesn't need: paths that
enter the same problem share one finite-difference pair (the product is linear in its vector),
and the finetune level evaluates its encoder once per pair (the perturbation touches only the
head). See ``docs/mlo.md`` for the evaluation count per iteration.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem
from torch import Tensor, nn

from maskkit.errors import TrainingDivergedError
from maskkit.runtime import full_precision

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
        hypergradient: how the best-response Jacobian of this level is approximated when an
            upper level's hypergradient passes through it: ``darts``, ``neumann`` or ``cg``.
        trunk, head_loss: optional split of the loss as ``head_loss(trunk(batch), batch, params)``
            where ``trunk`` does not depend on this level's parameters. When given, a
            finite-difference pair evaluates the trunk once.
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    next_batch: Callable[[], tuple]
    loss: Callable[[tuple], Tensor]
    unroll_steps: int = 1
    hypergradient: str = "darts"
    darts_alpha: float = 0.01
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0
    cg_iterations: int = 1
    cg_alpha: float = 1.0
    hypergradient_loss: Callable[[tuple], Tensor] | None = None
    trunk: Callable[[tuple], Tensor] | None = None
    head_loss: Callable[[Tensor, tuple, dict | None], Tensor] | None = None


class _Level(ImplicitProblem):
    """A betty problem whose batches, loss and modules come from a :class:`LevelSpec`."""

    def __init__(self, spec: LevelSpec, device: torch.device) -> None:
        config = Config(
            type=spec.hypergradient,
            unroll_steps=spec.unroll_steps,
            retain_graph=True,
            allow_unused=True,
            darts_alpha=spec.darts_alpha,
            neumann_iterations=spec.neumann_iterations,
            neumann_alpha=spec.neumann_alpha,
            cg_iterations=spec.cg_iterations,
            cg_alpha=spec.cg_alpha,
        )
        super().__init__(
            name=spec.name,
            config=config,
            module=spec.module,
            optimizer=spec.optimizer,
            scheduler=spec.scheduler,
            device=str(device),
        )
        self.spec = spec
        self.last_loss: float | None = None
        self.last_hypergradient: list[Tensor] | None = None

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
            loss, loss_dict = super().get_loss(batch)
        except TrainingDivergedError as error:
            self._diverged(str(error))
        self.last_loss = loss_dict["loss"]
        if not math.isfinite(self.last_loss):
            self._diverged(f"its loss became {self.last_loss}")
        return loss, loss_dict

    def _diverged(self, what: str) -> None:
        raise TrainingDivergedError(
            f"the {self.name} level diverged at its step {self._count}: {what}. The last good "
            f"checkpoint is kept. Start a new run with a lower lr (--set pretrain.{self.name}.lr=...), "
            "or resume this one in fp32 (--resume RUN_DIR --set precision=fp32)."
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

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
        first_hops = _unique(path[1] for path in paths)
        hop_params = [list(problem.trainable_parameters()) for problem in first_hops]
        inputs = params + [p for group in hop_params for p in group]
        grads = _grad(loss, inputs, retain_graph=False)
        self.set_grads(params, [g for g in grads[: len(params)]])
        if not paths:
            return
        offset, seeds = len(params), {}
        for problem, group in zip(first_hops, hop_params, strict=True):
            seeds[problem] = list(grads[offset : offset + len(group)])
            offset += len(group)
        implicit = hypergradient(self, paths, seeds)
        self.last_hypergradient = [g.detach().clone() for g in implicit]
        self.set_grads(params, implicit)


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


def _unique(items) -> list:
    seen: list = []
    for item in items:
        if all(item is not other for other in seen):
            seen.append(item)
    return seen


def _grad(output: Tensor, inputs: list[Tensor], retain_graph: bool = False, **kwargs) -> list[Tensor]:
    """``torch.autograd.grad`` where unused inputs get zeros instead of an error (defect b)."""
    grads = torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads, strict=True)]


def hypergradient(
    upper: _Level, paths: list[list[_Level]], seeds: dict[_Level, list[Tensor]]
) -> list[Tensor]:
    """dL_upper/d(upper's params) through every path of lower problems.

    Each path is ``[upper, a, b, …, upper]``. The vector that enters a problem is summed over
    all paths before it is pushed to the next problem, so every edge of the path graph costs
    one best-response-Jacobian product, however many paths share it.

    Args:
        upper: the problem whose parameters receive the hypergradient.
        paths: betty's backpropagation paths of ``upper``.
        seeds: for each first problem of a path, dL_upper/d(its params).
    """
    successors: dict[_Level, list[_Level]] = {}
    for path in paths:
        for current, following in itertools.pairwise(path[1:]):
            targets = successors.setdefault(current, [])
            if all(following is not t for t in targets):
                targets.append(following)
    vectors = {problem: [v.clone() for v in vector] for problem, vector in seeds.items()}
    result = [torch.zeros_like(p) for p in upper.trainable_parameters()]
    for current in _topological_order(successors, upper):
        vector = vectors.pop(current, None)
        if vector is None:
            continue
        for following in successors[current]:
            product = JACOBIAN_PRODUCTS[current.config.type](vector, current, following)
            target = (
                result
                if following is upper
                else vectors.setdefault(
                    following, [torch.zeros_like(p) for p in following.trainable_parameters()]
                )
            )
            for accumulated, term in zip(target, product, strict=True):
                accumulated.add_(term)
    return result


def _topological_order(successors: dict[_Level, list[_Level]], upper: _Level) -> list[_Level]:
    """Problems so that each comes before every problem it feeds (Kahn's algorithm)."""
    nodes = list(successors)
    incoming = {node: 0 for node in nodes}
    for targets in successors.values():
        for target in targets:
            if target is not upper:
                incoming[target] = incoming.get(target, 0) + 1
    ready = [node for node in nodes if incoming[node] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for target in successors.get(node, []):
            if target is upper:
                continue
            incoming[target] -= 1
            if incoming[target] == 0:
                ready.append(target)
    return order


def _vjp(outputs: list[Tensor], inputs: list[Tensor], grad_outputs: list[Tensor]) -> list[Tensor]:
    """Σ_i grad_outputs_i · ∂outputs_i/∂inputs, skipping outputs with no graph (unused parameters)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(p) for p in inputs]
    kept, weights = zip(*pairs, strict=True)
    return _grad(list(kept), inputs, retain_graph=True, grad_outputs=list(weights))


@contextlib.contextmanager
def _repeatable_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield a function that rewinds the RNG, so both sides of a finite difference draw the
    same random numbers (a policy with noise must see the same noise at θ+εv and θ−εv)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    yield rewind


@torch.no_grad()
def _shift(params: list[Tensor], base: list[Tensor], vector: list[Tensor], scale: float) -> None:
    for p, b, v in zip(params, base, vector, strict=True):
        p.copy_(b).add_(v, alpha=scale)


def darts_product(vector: list[Tensor], current: _Level, previous: _Level) -> list[Tensor]:
    """``-(∂²L_current / ∂previous ∂current) · v`` by a central difference (betty's ``darts``).

    ``ε = α / ‖v‖``; the loss gradient w.r.t. ``previous`` is taken at ``current ± ε v``. The
    weights of ``current`` are restored bit for bit afterwards (defect c).
    """
    params = current.trainable_parameters()
    norm = torch.sqrt(sum((full_precision(v) ** 2).sum() for v in vector))
    if float(norm) == 0.0:
        return [torch.zeros_like(p) for p in previous.trainable_parameters()]
    eps = current.config.darts_alpha / float(norm)
    targets = previous.trainable_parameters()
    batch = current.cur_batch
    spec = current.spec
    if spec.trunk is not None and spec.head_loss is not None:
        # The perturbation touches only this level's own parameters, so the trunk (which depends
        # on the lower level alone) is evaluated once and the loss difference is differentiated once.
        features = spec.trunk(batch)
        names = [name for name, p in current.module.named_parameters() if p.requires_grad]
        plus = {n: p.detach() + eps * v for n, p, v in zip(names, params, vector, strict=True)}
        minus = {n: p.detach() - eps * v for n, p, v in zip(names, params, vector, strict=True)}
        difference = spec.head_loss(features, batch, minus) - spec.head_loss(features, batch, plus)
        return [g / (2 * eps) for g in _grad(difference, targets)]
    originals = [p.detach().clone() for p in params]
    try:
        with _repeatable_randomness(params[0].device) as rewind:
            _shift(params, originals, vector, eps)
            grad_plus = _grad(current.hypergradient_objective(batch), targets)
            rewind()
            _shift(params, originals, vector, -eps)
            grad_minus = _grad(current.hypergradient_objective(batch), targets)
    finally:
        _shift(params, originals, [torch.zeros_like(p) for p in params], 0.0)
    return [(gm - gp) / (2 * eps) for gm, gp in zip(grad_minus, grad_plus, strict=True)]


def _inner_gradient(current: _Level) -> list[Tensor]:
    loss = current.hypergradient_objective(current.cur_batch)
    return _grad(loss, current.trainable_parameters(), retain_graph=True, create_graph=True)


def neumann_product(vector: list[Tensor], current: _Level, previous: _Level) -> list[Tensor]:
    """``-(∂²L/∂prev∂cur) · H⁻¹ v`` with a truncated Neumann series for ``H⁻¹`` (betty's ``neumann``)."""
    config = current.config
    inner = _inner_gradient(current)
    params = current.trainable_parameters()
    term, total = list(vector), list(vector)
    for _ in range(config.neumann_iterations):
        hvp = _vjp(inner, params, term)
        term = [t - config.neumann_alpha * h for t, h in zip(term, hvp, strict=True)]
        total = [t + s for t, s in zip(term, total, strict=True)]
    total = [config.neumann_alpha * t for t in total]
    return [-g for g in _vjp(inner, previous.trainable_parameters(), total)]


def cg_product(vector: list[Tensor], current: _Level, previous: _Level) -> list[Tensor]:
    """``-(∂²L/∂prev∂cur) · H⁻¹ v`` with ``H⁻¹ v`` from conjugate gradient (betty's ``cg``)."""
    config = current.config
    inner = _inner_gradient(current)
    params = current.trainable_parameters()

    def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))

    solution = [torch.zeros_like(v) for v in vector]
    residual = [v.clone() for v in vector]
    direction = [v.clone() for v in vector]
    for _ in range(config.cg_iterations):
        hvp = [config.cg_alpha * h for h in _vjp(inner, params, direction)]
        rr = dot(residual, residual)
        step = rr / dot(hvp, direction).clamp_min(1e-12)
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * h for r, h in zip(residual, hvp, strict=True)]
        beta = dot(residual, residual) / rr.clamp_min(1e-12)
        direction = [r + beta * d for r, d in zip(residual, direction, strict=True)]
    solution = [config.cg_alpha * x for x in solution]
    return [-g for g in _vjp(inner, previous.trainable_parameters(), solution)]


JACOBIAN_PRODUCTS: dict[str, Callable[[list[Tensor], _Level, _Level], list[Tensor]]] = {
    "darts": darts_product,
    "neumann": neumann_product,
    "cg": cg_product,
}


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

    def __init__(self, specs: dict[str, LevelSpec], device: torch.device, total_steps: int) -> None:
        unknown = set(specs) - set(LEVELS)
        if unknown or "pretrain" not in specs or len(specs) == 2:
            raise ValueError(
                f"levels must be {{pretrain}} or {{pretrain, finetune, mask}}, got {sorted(specs)}"
            )
        self.levels = {name: _Level(spec, device) for name, spec in specs.items()}
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
            }
            for name, level in self.levels.items()
        }

    def load_state_dict(self, state: dict) -> None:
        for name, level in self.levels.items():
            level._count = state[name]["count"]
            level.ready = list(state[name]["ready"])
            level._inner_loop_start = state[name]["inner_loop_start"]
            level.last_loss = state[name]["last_loss"]
