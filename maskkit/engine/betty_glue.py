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
2. :func:`hypergradient`: the output of every best-response-Jacobian product. A product is
   linear in its vector but is computed from one process's slice of the level's batch; with the
   same (global) vector on every process, the mean of the processes' products is the product of
   the global batch's loss. Seeds and products being global, every vector that enters a product
   is global, and the hypergradient equals the single-process one on the global batch (up to
   floating-point reduction order). Averaging finished per-process hypergradients instead would
   not: each would be a product of a per-process vector.
3. :func:`cg_product`: each Hessian-vector product inside conjugate gradient, for the same reason.

:meth:`_Level.get_loss` averages the logged loss, so divergence is detected on every process at
once. All of it is the identity with one process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.logging.logger_base import get_logger
from betty.problems import ImplicitProblem
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.distributed import average_across_ranks, mean_of
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
            upper level's hypergradient passes through it: ``darts`` or ``cg``.
        hypergradient_loss: this level's loss with every graph an upper level needs (for
            ``cg``); ``loss`` when None.
        functional: this level's loss as a function of its own parameters
            (:class:`FunctionalLoss`), which ``darts`` differentiates exactly in forward mode or
            evaluates at ±εv; None perturbs the parameters in place and differentiates each
            side's ``loss`` (finite differences only).
        darts_mode: ``exact`` (forward-mode, needs ``functional``) or ``finite-difference``.
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
    hypergradient: str = "darts"
    darts_alpha: float = 0.01
    cg_iterations: int = 1
    hypergradient_loss: Callable[[tuple], Tensor] | None = None
    functional: FunctionalLoss | None = None
    darts_mode: str = "exact"
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
    """A betty problem whose batches, loss and modules come from a :class:`LevelSpec`."""

    def __init__(self, spec: LevelSpec, device: torch.device) -> None:
        config = Config(
            type=spec.hypergradient,
            unroll_steps=spec.unroll_steps,
            retain_graph=True,
            allow_unused=True,
            darts_alpha=spec.darts_alpha,
            cg_iterations=spec.cg_iterations,
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
        self._excluded = {id(p) for p in spec.excluded_parameters}
        self.last_loss: float | None = None
        self.last_hypergradient: list[Tensor] | None = None
        # Set to compute the next hypergradient path by path (one more product; for diagnostics).
        self.split_next_hypergradient = False
        self.last_path_hypergradients: dict[str, list[Tensor]] = {}
        # Norms of the latest hypergradient ("total") and of the latest split one's paths.
        self.hypergradient_norms: dict[str, float] = {}

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
            self._diverged(str(error))
        # The global batch's loss: the mean of the processes' (equal-sized) slices' losses.
        self.last_loss = mean_of(loss_dict["loss"])
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
        first_hops = _unique(path[1] for path in paths)
        hop_params = [list(problem.trainable_parameters()) for problem in first_hops]
        inputs = params + extras + [p for group in hop_params for p in group]
        with record_function(f"maskkit.{self.name}.backward"):
            # The level's own gradients and the seeds of its paths, averaged over the processes.
            grads = average_across_ranks(_grad(loss, inputs, retain_graph=False))
        self.set_grads(params, [g for g in grads[: len(params)]])
        self.set_grads(extras, grads[len(params) : len(params) + len(extras)])
        if not paths:
            return
        offset, seeds = len(params) + len(extras), {}
        for problem, group in zip(first_hops, hop_params, strict=True):
            seeds[problem] = list(grads[offset : offset + len(group)])
            offset += len(group)
        implicit, parts = hypergradient(self, paths, seeds, per_path=self.split_next_hypergradient)
        self.last_hypergradient = [g.detach().clone() for g in implicit]
        self.hypergradient_norms["total"] = _norm(implicit)
        if parts:
            self.last_path_hypergradients = parts
            self.hypergradient_norms.update({name: _norm(part) for name, part in parts.items()})
            self.split_next_hypergradient = False
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


def _norm(tensors: list[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


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


def path_name(path: list[_Level]) -> str:
    """A path named by the problems it passes: ``[mask, finetune, pretrain, mask]`` is
    ``finetune-pretrain``."""
    return "-".join(problem.name for problem in path[1:-1])


def hypergradient(
    upper: _Level, paths: list[list[_Level]], seeds: dict[_Level, list[Tensor]], per_path: bool = False
) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    """dL_upper/d(upper's params) through every path of lower problems.

    Each path is ``[upper, a, b, …, upper]``. By default the vector that enters a problem is
    summed over all paths before it is pushed to the next problem, so every edge of the path
    graph costs one best-response-Jacobian product, however many paths share it. With
    ``per_path`` each path is pushed on its own (one product per edge of each path) and its
    contribution is returned too; the total is their sum.

    Args:
        upper: the problem whose parameters receive the hypergradient.
        paths: betty's backpropagation paths of ``upper``.
        seeds: for each first problem of a path, dL_upper/d(its params).
        per_path: also return each path's contribution, by :func:`path_name`.

    Returns:
        ``(total, parts)``: the hypergradient, and the per-path contributions (empty unless
        ``per_path``).
    """
    if per_path:
        parts = {}
        for path in paths:
            vector = seeds[path[1]]
            for current, following in itertools.pairwise(path[1:]):
                vector = global_product(vector, current, following)
            parts[path_name(path)] = [v.detach() for v in vector]
        total = [torch.stack(terms).sum(0) for terms in zip(*parts.values(), strict=True)]
        return total, parts
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
            product = global_product(vector, current, following)
            target = (
                result
                if following is upper
                else vectors.setdefault(
                    following, [torch.zeros_like(p) for p in following.trainable_parameters()]
                )
            )
            for accumulated, term in zip(target, product, strict=True):
                accumulated.add_(term)
    return result, {}


def global_product(vector: list[Tensor], current: _Level, following: _Level) -> list[Tensor]:
    """The best-response-Jacobian product of ``current`` toward ``following`` for the global batch,
    under a profiler label (``maskkit.product.<level>``; the levels' own work is
    ``maskkit.<level>.forward/backward``).

    Each process computes the product on its slice of ``current``'s batch with the same global
    ``vector``; the product is linear in the level's loss, a mean over the batch, so the mean of
    the processes' products is the global batch's product (the product itself with one process).
    """
    with record_function(f"maskkit.product.{current.name}"):
        return average_across_ranks(JACOBIAN_PRODUCTS[current.config.type](vector, current, following))


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


def same_random_draws(device: torch.device) -> contextlib.AbstractContextManager:
    """Run an evaluation from the current RNG state and put the state back afterwards.

    Both sides of a finite difference run under it, so every stochastic layer they contain
    (the head's dropout, a policy's noise) draws the *same* numbers at θ+εv and θ−εv, and the
    difference measures the parameters' effect instead of the difference of two random draws
    (common random numbers). The pair is an unbiased sample of the derivative of the level's
    stochastic loss, as the level's own step is of its value; and it consumes no randomness
    from the training stream.
    """
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def second_order_attention() -> contextlib.AbstractContextManager:
    """The math kernel of ``scaled_dot_product_attention``. The fused kernels (flash, and
    flash-for-CPU) support neither forward-mode derivatives (the exact ``darts`` product) nor a
    derivative of their backward (``cg``)."""
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _quiet_jvp_setup() -> Iterator[None]:
    """Silence the FutureWarning torch prints the first time forward mode is used: loading its
    decompositions calls the deprecated ``torch.jit.script`` inside torch itself, which no user
    of maskkit can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        yield


@torch.no_grad()
def _shift(params: list[Tensor], base: list[Tensor], vector: list[Tensor], scale: float) -> None:
    for p, b, v in zip(params, base, vector, strict=True):
        p.copy_(b).add_(v, alpha=scale)


def darts_product(vector: list[Tensor], current: _Level, previous: _Level) -> list[Tensor]:
    """``-(∂²L_current / ∂previous ∂current) · v``, the product betty's ``darts`` approximates.

    ``exact`` (the default, when the level gives a :class:`FunctionalLoss`): the directional
    derivative of the loss along ``v`` comes from one forward-mode pass (``torch.func.jvp``),
    with no ε, and is differentiated with respect to ``previous``. A single evaluation draws its
    random numbers once, so stochastic layers cannot make it noisy.

    ``finite-difference`` (betty's way): ``ε = α / ‖v‖``, and the gradient with respect to
    ``previous`` of the loss difference at ``current ± ε v``, with the same random draws on both
    sides (:func:`same_random_draws`). Without a :class:`FunctionalLoss` the weights are shifted
    in place and restored bit for bit afterwards (defect c).
    """
    params = current.trainable_parameters()
    targets = previous.trainable_parameters()
    norm = torch.sqrt(sum((full_precision(v) ** 2).sum() for v in vector))
    if float(norm) == 0.0:
        return [torch.zeros_like(p) for p in targets]
    batch, spec, device = current.cur_batch, current.spec, params[0].device
    functional = spec.functional
    if functional is None:
        return _difference_in_place(vector, current, targets, float(norm))
    shared = functional.prepare(batch)
    names = [name for name, p in current.module.named_parameters() if p.requires_grad]
    if spec.darts_mode == "exact":
        # Parameters along which v is zero (the decoder, which no upper level reads) stay fixed
        # inputs: forward mode then carries no tangent for them.
        moving = torch.stack([v.ne(0).any() for v in vector]).tolist()
        fixed = {n: p.detach() for n, p, m in zip(names, params, moving, strict=True) if not m}
        primals = {n: p.detach() for n, p, m in zip(names, params, moving, strict=True) if m}
        tangents = {n: v for n, v, m in zip(names, vector, moving, strict=True) if m}
        with second_order_attention(), _quiet_jvp_setup(), functional.exact_precision():
            _, directional = jvp(
                lambda at: functional.loss_at(shared, {**fixed, **at}), (primals,), (tangents,)
            )
        if not directional.requires_grad:  # the loss does not depend on `previous` at all
            return [torch.zeros_like(p) for p in targets]
        return [-g for g in _grad(directional, targets)]
    eps = current.config.darts_alpha / float(norm)
    plus = {n: p.detach() + eps * v for n, p, v in zip(names, params, vector, strict=True)}
    minus = {n: p.detach() - eps * v for n, p, v in zip(names, params, vector, strict=True)}
    with same_random_draws(device):
        loss_plus = functional.loss_at(shared, plus)
    with same_random_draws(device):
        loss_minus = functional.loss_at(shared, minus)
    difference = loss_minus - loss_plus
    if not difference.requires_grad:
        return [torch.zeros_like(p) for p in targets]
    return [g / (2 * eps) for g in _grad(difference, targets)]


def _difference_in_place(
    vector: list[Tensor], current: _Level, targets: list[Tensor], norm: float
) -> list[Tensor]:
    """The finite-difference product for a level without a :class:`FunctionalLoss`."""
    params = current.trainable_parameters()
    eps = current.config.darts_alpha / norm
    batch, device = current.cur_batch, params[0].device
    originals = [p.detach().clone() for p in params]
    try:
        _shift(params, originals, vector, eps)
        with same_random_draws(device):
            grad_plus = _grad(current.hypergradient_objective(batch), targets)
        _shift(params, originals, vector, -eps)
        with same_random_draws(device):
            grad_minus = _grad(current.hypergradient_objective(batch), targets)
    finally:
        _shift(params, originals, [torch.zeros_like(p) for p in params], 0.0)
    return [(gm - gp) / (2 * eps) for gm, gp in zip(grad_minus, grad_plus, strict=True)]


def _inner_gradient(current: _Level) -> list[Tensor]:
    loss = current.hypergradient_objective(current.cur_batch)
    return _grad(loss, current.trainable_parameters(), retain_graph=True, create_graph=True)


def cg_product(vector: list[Tensor], current: _Level, previous: _Level) -> list[Tensor]:
    """``-(∂²L/∂prev∂cur) · H⁻¹ v`` with ``H⁻¹ v`` from conjugate gradient (betty's ``cg``)."""
    with second_order_attention():
        inner = _inner_gradient(current)
        params = current.trainable_parameters()
        # Hessian-vector products of the global batch's loss: the mean of the processes'.
        solution = conjugate_gradient(
            lambda d: average_across_ranks(_vjp(inner, params, d)), vector, current.config.cg_iterations
        )
        return [-g for g in _vjp(inner, previous.trainable_parameters(), solution)]


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], vector: list[Tensor], iterations: int
) -> list[Tensor]:
    """Approximately solve ``H x = v`` by at most ``iterations`` conjugate-gradient steps.

    ``H`` (given as ``matvec``) is a loss Hessian, which away from a minimum need not be
    positive definite. CG is only valid along directions of positive curvature, so it stops at
    the first direction with ``dᵀHd ≤ 0`` (truncated CG); if that is the very first one, the
    identity stands in for ``H⁻¹`` (the ``darts`` approximation) and ``v`` is returned. It also
    stops once the residual has shrunk by 10⁻⁶.
    """

    def dot(a: list[Tensor], b: list[Tensor]) -> float:
        return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))

    solution = [torch.zeros_like(v) for v in vector]
    residual = [v.clone() for v in vector]
    direction = [v.clone() for v in vector]
    rr = first_rr = dot(residual, residual)
    for iteration in range(iterations):
        if rr <= 1e-12 * first_rr:
            break
        product = matvec(direction)
        curvature = dot(direction, product)
        if curvature <= 0:
            return [v.clone() for v in vector] if iteration == 0 else solution
        step = rr / curvature
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * h for r, h in zip(residual, product, strict=True)]
        rr, previous_rr = dot(residual, residual), rr
        direction = [r + (rr / previous_rr) * d for r, d in zip(residual, direction, strict=True)]
    return solution


JACOBIAN_PRODUCTS: dict[str, Callable[[list[Tensor], _Level, _Level], list[Tensor]]] = {
    "darts": darts_product,
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

    def request_path_hypergradients(self) -> None:
        """Compute the mask level's next hypergradient path by path (for diagnostics)."""
        if self.is_multilevel:
            self.levels["mask"].split_next_hypergradient = True

    def hypergradient_norms(self) -> dict[str, float]:
        """Norms of the mask level's latest hypergradient (``total``) and of each path's part
        from the latest split one (empty before the first)."""
        return dict(self.levels["mask"].hypergradient_norms) if self.is_multilevel else {}

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
