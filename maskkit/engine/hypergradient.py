"""The hypergradient of the mask level: its paths, and the best-response-Jacobian products.

The mask level's gradient dL_val/dT runs through every path of lower levels betty lists
(``[mask, finetune, pretrain, mask]`` and ``[mask, pretrain, mask]``). Along a path the vector
``v`` (first dL_val/d(first problem's params)) is pushed through one product per edge,
``-(∂²L_current / ∂following ∂current) · H⁻¹ v``, where the inverse Hessian of the current
level's loss is approximated by an *estimator*:

- ``darts`` (:func:`darts_product`): ``H⁻¹ ≈ I`` (a unit inner step), the mixed product
  evaluated exactly in forward mode (``darts_mode: exact``) or by betty's central difference
  (``finite-difference``, ε = ``darts_alpha`` / ‖v‖);
- ``cg`` (:func:`cg_product`): ``H⁻¹ v`` by truncated conjugate gradient (``cg_iterations``).

:data:`ESTIMATORS` is the one registry of estimators; the run's ``pretrain.hypergradient``
(:class:`maskkit.config.HypergradientConfig`) picks one and its options, for every level at once.
This module knows nothing of betty: a level is anything with the :class:`Level` interface (the
betty adapter, :mod:`maskkit.engine.betty_glue`, provides it).

Several processes: the output of every product is averaged across processes
(:func:`global_product`), and so is each Hessian-vector product inside conjugate gradient; see
:mod:`maskkit.engine.betty_glue` for why that gives the global batch's hypergradient.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.distributed import average_across_ranks
from maskkit.runtime import full_precision

if TYPE_CHECKING:
    from maskkit.config import HypergradientConfig
    from maskkit.engine.betty_glue import LevelSpec


class Level(Protocol):
    """What a product needs of a level (the betty adapter's ``_Level`` provides it).

    Attributes:
        name: ``pretrain``, ``finetune`` or ``mask``.
        module: the level's module.
        spec: its :class:`~maskkit.engine.betty_glue.LevelSpec` (for ``functional``).
        cur_batch: the batch of the level's latest step (the products evaluate its loss there).
        estimator: the run's hypergradient settings.
    """

    name: str
    module: nn.Module
    spec: LevelSpec
    cur_batch: Any
    estimator: HypergradientConfig

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def hypergradient_objective(self, batch: Any) -> Tensor: ...


#: ``product(vector, current, following)``: ``-(∂²L_current/∂following ∂current) · H⁻¹ v`` as a
#: list of tensors shaped like ``following``'s trainable parameters.
JacobianProduct = Callable[[list[Tensor], Level, Level], list[Tensor]]


def grad_or_zeros(output: Tensor, inputs: list[Tensor], retain_graph: bool = False, **kwargs) -> list[Tensor]:
    """``torch.autograd.grad`` where unused inputs get zeros instead of an error (defect b)."""
    grads = torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads, strict=True)]


def path_name(path: list[Level]) -> str:
    """A path named by the problems it passes: ``[mask, finetune, pretrain, mask]`` is
    ``finetune-pretrain``."""
    return "-".join(problem.name for problem in path[1:-1])


def hypergradient(
    upper: Level, paths: list[list[Level]], seeds: dict[Level, list[Tensor]], per_path: bool = False
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
    successors: dict[Level, list[Level]] = {}
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


def global_product(vector: list[Tensor], current: Level, following: Level) -> list[Tensor]:
    """The best-response-Jacobian product of ``current`` toward ``following`` for the global batch,
    under a profiler label (``maskkit.product.<level>``; the levels' own work is
    ``maskkit.<level>.forward/backward``).

    Each process computes the product on its slice of ``current``'s batch with the same global
    ``vector``; the product is linear in the level's loss, a mean over the batch, so the mean of
    the processes' products is the global batch's product (the product itself with one process).
    """
    with record_function(f"maskkit.product.{current.name}"):
        return average_across_ranks(ESTIMATORS[current.estimator.estimator](vector, current, following))


def _topological_order(successors: dict[Level, list[Level]], upper: Level) -> list[Level]:
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
    return grad_or_zeros(list(kept), inputs, retain_graph=True, grad_outputs=list(weights))


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


def darts_product(vector: list[Tensor], current: Level, previous: Level) -> list[Tensor]:
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
    if current.estimator.darts_mode == "exact":
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
        return [-g for g in grad_or_zeros(directional, targets)]
    eps = current.estimator.darts_alpha / float(norm)
    plus = {n: p.detach() + eps * v for n, p, v in zip(names, params, vector, strict=True)}
    minus = {n: p.detach() - eps * v for n, p, v in zip(names, params, vector, strict=True)}
    with same_random_draws(device):
        loss_plus = functional.loss_at(shared, plus)
    with same_random_draws(device):
        loss_minus = functional.loss_at(shared, minus)
    difference = loss_minus - loss_plus
    if not difference.requires_grad:
        return [torch.zeros_like(p) for p in targets]
    return [g / (2 * eps) for g in grad_or_zeros(difference, targets)]


def _difference_in_place(
    vector: list[Tensor], current: Level, targets: list[Tensor], norm: float
) -> list[Tensor]:
    """The finite-difference product for a level without a :class:`FunctionalLoss`."""
    params = current.trainable_parameters()
    eps = current.estimator.darts_alpha / norm
    batch, device = current.cur_batch, params[0].device
    originals = [p.detach().clone() for p in params]
    try:
        _shift(params, originals, vector, eps)
        with same_random_draws(device):
            grad_plus = grad_or_zeros(current.hypergradient_objective(batch), targets)
        _shift(params, originals, vector, -eps)
        with same_random_draws(device):
            grad_minus = grad_or_zeros(current.hypergradient_objective(batch), targets)
    finally:
        _shift(params, originals, [torch.zeros_like(p) for p in params], 0.0)
    return [(gm - gp) / (2 * eps) for gm, gp in zip(grad_minus, grad_plus, strict=True)]


def _inner_gradient(current: Level) -> list[Tensor]:
    loss = current.hypergradient_objective(current.cur_batch)
    return grad_or_zeros(loss, current.trainable_parameters(), retain_graph=True, create_graph=True)


def cg_product(vector: list[Tensor], current: Level, previous: Level) -> list[Tensor]:
    """``-(∂²L/∂prev∂cur) · H⁻¹ v`` with ``H⁻¹ v`` from conjugate gradient (betty's ``cg``)."""
    with second_order_attention():
        inner = _inner_gradient(current)
        params = current.trainable_parameters()
        # Hessian-vector products of the global batch's loss: the mean of the processes'.
        solution = conjugate_gradient(
            lambda d: average_across_ranks(_vjp(inner, params, d)), vector, current.estimator.cg_iterations
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


#: The best-response-Jacobian products, by the name ``pretrain.hypergradient.estimator`` takes
#: (the config's allowed names are this registry's keys). A new estimator is one function with
#: the signature of :data:`JacobianProduct` and one entry here.
ESTIMATORS: dict[str, JacobianProduct] = {
    "darts": darts_product,
    "cg": cg_product,
}
