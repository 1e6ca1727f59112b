"""Data-parallel training across processes: the process group torchrun starts, and the few
collectives maskkit needs.

``torchrun --nproc_per_node N -m maskkit train ...`` (or ``maskkit train --nproc N``, which runs
torchrun; see :mod:`maskkit.launch`) starts N processes. Each holds the whole model and every MLO
level, and takes a contiguous slice of every global batch: with a global batch of ``B`` images
(what the config says) and ``W`` processes, rank ``r`` takes rows ``[r·B/W, (r+1)·B/W)``
(:func:`local_rows`). Gradients, hypergradient vectors and logged values are averaged across
processes (:func:`average_across_ranks`, :func:`mean_of`), so every process keeps identical
parameters at every level and step. Where the averaging happens in the MLO engine is documented
in ``maskkit/engine/betty_glue.py`` and ``docs/distributed.md``.

Without torchrun, or with one process, no process group exists and every function here is the
identity: single-process runs are unchanged bit for bit.

Every collective goes through :func:`_collective`, which turns a failure (another process died,
raised, or did not answer within the collective timeout) into one :class:`CollectiveFailure`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from maskkit.errors import ConfigError, MaskkitError
from maskkit.runtime import rng_state, select_device, set_rng_state
from maskkit.torchrun_env import DEFAULT_TIMEOUT_S, CollectiveFailure, launched_by_torchrun

_timeout_s = DEFAULT_TIMEOUT_S

T = TypeVar("T")


def requested_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def is_distributed() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run dir, logs, checkpoints, plots and the progress bar."""
    return rank() == 0


def start(device_spec: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """This process's device; joins the process group when torchrun started several processes.

    Each process of a node takes GPU ``LOCAL_RANK`` (NCCL) when the device is ``auto`` or
    ``cuda`` and CUDA is present, else the CPU (gloo). ``timeout_s`` bounds every collective.

    Raises:
        ConfigError: ``cuda:N`` (one named GPU) with several processes, or fewer GPUs on this
            node than processes.
    """
    global _timeout_s
    if requested_world_size() == 1:
        return select_device(device_spec)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_spec.startswith("cuda:"):
        raise ConfigError(
            f"--device {device_spec} names one GPU, but {requested_world_size()} processes were "
            "started; use --device cuda (each process takes the GPU of its local rank) or auto"
        )
    device = select_device(device_spec)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} GPUs "
                "are visible; start at most that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        _timeout_s = float(timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        with _collective("joining the process group"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def stop() -> None:
    """Leave the process group (at the end of a successful run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as error:  # torch.distributed's errors (DistError and kin) are RuntimeErrors
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CollectiveFailure(
            f"lost contact with the other processes during {what}: another process died, raised "
            f"an error, or did not answer within the collective timeout of {_timeout_s:g} s "
            f"({detail})"
        ) from None


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: the process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- averaging -------------------------------------------------------------------------------
def average_across_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The element-wise mean of ``tensors`` over all processes (new tensors; shapes kept).

    Each process passes tensors of the same shapes in the same order. Tensors of one dtype and
    device travel in one flat all-reduce. Every process receives the same bits. With one process
    the tensors are returned as they are.
    """
    if not is_distributed():
        return list(tensors)
    averaged: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.dtype, tensor.device), []).append(index)
    for indices in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices])
        with _collective("averaging gradients"):
            dist.all_reduce(flat)
        flat.div_(world_size())
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices]), strict=True):
            averaged[i] = part.view_as(tensors[i])
    return averaged  # type: ignore[return-value]


class _SumOverRanks(torch.autograd.Function):
    """``Σ_r x_r`` over the processes, differentiable in both modes: its gradient and its
    tangent are themselves summed over the processes (each process's loss depends on every
    process's ``x``), so a data-parallel run differentiates as one process would."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _all_reduced(x, "summing a batch over the processes")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _all_reduced(grad, "summing a gradient over the processes")

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return _all_reduced(tangent, "summing a tangent over the processes")


def _all_reduced(tensor: Tensor, what: str) -> Tensor:
    staged = tensor.detach().to(_collective_device()).clone()
    with _collective(what):
        dist.all_reduce(staged)
    return staged.to(tensor.device)


def mean_of_rows(rows: Tensor) -> Tensor:
    """The mean of the global batch's rows, ``[1, ...]``, from this process's ``[n_r, ...]`` rows:
    on every process the value, gradient and tangent one process would have with the whole
    batch (up to the order of the summation). Every process must call it at the same point, and
    so take part in its backward and forward-mode passes (collectives)."""
    if not is_distributed():
        return rows.mean(dim=0, keepdim=True)
    count = sum_of([float(rows.shape[0])])[0]
    return _SumOverRanks.apply(rows.sum(dim=0, keepdim=True)) / count


def average_gradients_(parameters: Sequence[Tensor], loss: Tensor) -> float:
    """Replace each parameter's ``.grad`` by its mean over the processes, in place, and return
    the mean of ``loss`` (a scalar) over the processes, in one collective.

    Parameters without a gradient are skipped (the same ones on every process).
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not is_distributed():
        return float(loss.detach())
    *grads, mean_loss = average_across_ranks([p.grad for p in with_grad] + [loss.detach().reshape(1)])
    for parameter, grad in zip(with_grad, grads, strict=True):
        parameter.grad.copy_(grad)
    return float(mean_loss)


def mean_of(value: float) -> float:
    """The mean of a number over the processes (``value`` itself with one process)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    with _collective("averaging a logged value"):
        dist.all_reduce(tensor)
    return float(tensor) / world_size()


def sum_of(values: Sequence[float]) -> list[float]:
    """The element-wise sum of numbers over the processes."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    with _collective("summing logged values"):
        dist.all_reduce(tensor)
    return tensor.tolist()


# --- gathering and broadcasting ---------------------------------------------------------------
def gather_rows(tensor: Tensor) -> Tensor:
    """Every process's ``[n_r, ...]`` rows concatenated in rank order, ``[Σ n_r, ...]``, on every
    process (``n_r`` may differ). With contiguous shares (:func:`local_rows`,
    :func:`owned_rows`) this restores the order a single process would have."""
    if not is_distributed():
        return tensor
    device = _collective_device()
    local = tensor.detach().to(device)
    with _collective("gathering results"):
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
        longest = max(int(size) for size in sizes)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded)
    rows = [part[: int(size)] for part, size in zip(parts, sizes, strict=True)]
    return torch.cat(rows).to(tensor.device)


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (picklable objects)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    with _collective("gathering state"):
        dist.all_gather_object(gathered, value)
    return gathered


def broadcast_modules_(modules: Sequence[torch.nn.Module]) -> None:
    """Copy rank 0's parameters and buffers into every process's modules, in place (as
    ``DistributedDataParallel`` does at construction), so all processes start identical."""
    if not is_distributed():
        return
    with _collective("copying rank 0's weights"), torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                staged = tensor.to(_collective_device())
                dist.broadcast(staged, src=0)
                if staged is not tensor:
                    tensor.copy_(staged)


def on_main(function: Callable[[], T]) -> T:
    """``function()`` run by rank 0 alone; its result, or the user error it raised, reaches every
    process (each raises the error too, so all stop with the same message)."""
    if not is_distributed():
        return function()
    payload: list[Any] = [None]
    error: MaskkitError | None = None
    if is_main():
        try:
            payload = [("ok", function())]
        except MaskkitError as raised:
            error, payload = raised, [("error", str(raised))]
    with _collective("sharing rank 0's result"):
        dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    kind, value = payload[0]
    if kind == "error":
        raise MaskkitError(value)
    return value


def main_first(function: Callable[[], T]) -> T:
    """``function()`` on rank 0, then on every other process (each gets its own result): for
    work that must happen once before the others read it, such as a download into a shared
    folder. A user error on rank 0 stops every process with its message."""
    if not is_distributed():
        return function()
    results: list[T] = []
    on_main(lambda: results.append(function()))
    return results[0] if is_main() else function()


# --- dividing work ----------------------------------------------------------------------------
def check_batch_sizes(batch_sizes: dict[str, int], processes: int | None = None) -> None:
    """Refuse global batch sizes (config key → size) that ``processes`` (default: this group's)
    cannot share equally.

    Equal shares are what make the mean of the processes' losses the global batch's loss.
    """
    count = world_size() if processes is None else processes
    uneven = [f"{key}={size}" for key, size in batch_sizes.items() if size % count]
    if uneven:
        raise ConfigError(
            f"{', '.join(uneven)} cannot be split evenly across {count} processes: each process "
            f"takes an equal slice of every global batch, so every batch size must be a multiple of "
            f"{count} (set it with --set KEY=VALUE, or start a different number of processes)"
        )


def local_rows(global_batch_size: int, part: int | None = None, parts: int | None = None) -> slice:
    """The rows of a global batch that process ``part`` of ``parts`` takes: a contiguous slice of
    ``global_batch_size / parts`` rows (default: this process of this group)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    if global_batch_size % parts:
        raise ValueError(f"a batch of {global_batch_size} cannot be split evenly across {parts} processes")
    size = global_batch_size // parts
    return slice(part * size, (part + 1) * size)


def owned_rows(count: int, block: int) -> range:
    """This process's share of ``count`` rows processed in blocks of ``block`` (evaluation
    batches): a contiguous run of whole blocks, so every block is the one a single process
    would form, and every process gets ``⌊blocks / W⌋`` or one more."""
    blocks = -(-count // block)
    first = rank() * blocks // world_size()
    last = (rank() + 1) * blocks // world_size()
    return range(min(first * block, count), min(last * block, count))


# --- randomness -------------------------------------------------------------------------------
def _stream_seed(seed: int, part: int, salt: int = 0) -> int:
    return (seed * 0x9E3779B97F4A7C15 + part * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) % (1 << 63)


def separate_random_streams(seed: int) -> None:
    """Give every process but rank 0 its own stream of the global RNG (dropout, a policy's
    noise), so the processes' draws for their slices are independent, as a single process's
    draws for the rows of one batch are. Rank 0 keeps the stream a single process would use.
    Call after the models are built (their initialisation is the same on every process)."""
    if is_distributed() and not is_main():
        torch.manual_seed(_stream_seed(seed, rank()))


def with_every_rank_rng(state: dict) -> dict:
    """A checkpoint's training ``state`` with every process's RNG state (``rng_by_rank``), so a
    resumed run with the same number of processes continues every stream. A collective."""
    if not is_distributed():
        return state
    return {**state, "rng_by_rank": gather_objects(rng_state())}


def restore_rng_state(state: dict, seed: int) -> None:
    """Restore this process's RNG from a checkpoint's training ``state``.

    One process: ``state["rng"]``, as before. Several: each its own saved stream when the
    checkpoint was written by the same number of processes; otherwise rank 0 takes the saved
    main stream and the others fresh streams derived from the seed and the step.
    """
    saved = state.get("rng_by_rank")
    if saved is not None and len(saved) == world_size():
        set_rng_state(saved[rank()])
    elif is_main():
        set_rng_state(state["rng"])
    else:
        torch.manual_seed(_stream_seed(seed, rank(), salt=int(state.get("step", 0)) + 1))
