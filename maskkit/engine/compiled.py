"""``torch.compile`` of stage 1's once-differentiated passes (the run's ``compile`` option).

Two passes of an MLO iteration are pure tensor work over the MAE with static shapes, and
autograd differentiates each of them once:

- :func:`reconstruct`: the encoder over the kept tokens, the decoder and the per-patch error, in
  the pretrain level's own step (its backward is the level's gradient);
- :func:`encoder_features`: the unmasked encoder's CLS features, in the finetune and mask
  levels' steps (their backward passes, and the finetune-level product's backward into E, run
  through them once each).

Nothing else is compiled. The pretrain-level product evaluates the MAE in forward mode
(``torch.func.jvp`` over ``functional_call``) and differentiates the result again, and ``cg``
differentiates the levels' gradients: compiled autograd supports neither, so those evaluations,
the mask policy (data-dependent sorting and sampling) and the optimiser steps stay eager.
:class:`~maskkit.engine.objectives.MLOObjectives` runs the reconstruction compiled in the pretrain
level's own step only (``purpose == "step"``), never in a hypergradient's evaluation of the
pretrain loss; the features pass serves every use of the level-2 and level-3 features (each
differentiated once: the steps, the finetune product's features, the SNR probe).

A compiled pass is compiled for each new input shape (``dynamic=False``: the batch sizes of a run
are few and fixed), on its first call: 59–79 s for the ``cpu`` preset's passes on the 2-core
development CPU (docs/benchmarks.md). Its backward keeps its saved tensors when a caller asks autograd to
retain the graph, as ``cg``'s vector products do: compiling switches torch's donated buffers off
for the process (``torch._functorch.config.donated_buffer``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from maskkit.models.mae import MaskedAutoencoderViT

Pass = TypeVar("Pass", bound=Callable)


def reconstruct(
    mae: MaskedAutoencoderViT, tokens: Tensor, ids_keep: Tensor, ids_restore: Tensor, images: Tensor
) -> tuple[Tensor, Tensor]:
    """Encode the kept ``[B, K]`` of ``tokens [B, L, D]``, decode every patch and compare it
    with ``images [B, C, H, W]``: ``(pred [B, L, p·p·C], error [B, L])``."""
    pred = mae.decode(mae.encode(tokens, ids_keep), ids_restore)
    return pred, mae.reconstruction_error(images, pred)


def encoder_features(mae: MaskedAutoencoderViT, images: Tensor) -> Tensor:
    """The unmasked encoder's CLS features ``[B, D]`` of ``images [B, C, H, W]``."""
    return mae.features(images)


@dataclass(frozen=True)
class StepPasses:
    """The passes a level's own step runs, eager or compiled (same signatures as
    :func:`reconstruct` and :func:`encoder_features`)."""

    reconstruct: Callable[[MaskedAutoencoderViT, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    features: Callable[[MaskedAutoencoderViT, Tensor], Tensor]
    compiled: bool = False


#: The eager passes (``compile: false``, the default).
EAGER_PASSES = StepPasses(reconstruct, encoder_features)


def compile_pass(fn: Pass) -> Pass:
    """``fn`` under ``torch.compile`` (inductor, static shapes), its backward safe to run with
    ``retain_graph=True``."""
    # Donated buffers (saved tensors the compiled backward frees as it goes) forbid running it
    # with retain_graph=True. torch reads the flag when it compiles a backward and again when it
    # runs one (outside this call), so it is switched off for the process.
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


@functools.cache
def _compiled_passes() -> StepPasses:
    # One compiled wrapper per process: torch.compile's cache is per code object anyway, and
    # modules of the same shape share the compiled code (inlined modules are not guarded by id).
    return StepPasses(compile_pass(reconstruct), compile_pass(encoder_features), compiled=True)


def step_passes(enabled: bool) -> StepPasses:
    """The passes of the levels' own steps: compiled when ``enabled``, else :data:`EAGER_PASSES`."""
    return _compiled_passes() if enabled else EAGER_PASSES
