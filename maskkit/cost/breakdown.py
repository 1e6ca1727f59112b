"""Where an MLO iteration's time and FLOPs go, by level and part.

The engine labels its work with ``torch.autograd.profiler.record_function`` scopes
(``maskkit/engine/betty_glue.py``):

- ``maskkit.<level>.forward``: the level's loss evaluation (its step's forward);
- ``maskkit.<level>.backward``: the gradients of that loss (for the mask level, with respect to
  its own parameters and the first hop of each hypergradient path);
- ``maskkit.product.<level>``: each best-response-Jacobian product of the mask level's
  hypergradient at that level (top-level scopes: they run after ``maskkit.mask.backward``).

torch's optimisers label their ``step`` and ``zero_grad`` as ``Optimizer.step#AdamW.step`` and
``Optimizer.zero_grad#AdamW.zero_grad``; they are one more part, *optimizer steps*. Everything
outside these scopes (betty's bookkeeping, the next batch, the hypergradient's sums and norms,
Python between the ops) is *everything else*.

**Time** comes from ``torch.profiler`` over one extra iteration, after the timed ones (the
profiler's overhead would distort them). Each op's *self* time (its own duration without the
ops it calls: wall time on the calling thread on the CPU, the time of the kernels it launched on
CUDA) goes to the innermost labelled scope around it: its nearest labelled ancestor in the
profiler's call tree, or, for an op on another thread (CUDA's autograd worker threads), the
innermost labelled scope of the main thread whose interval contains the op's start. A scope's own
self time (Python between its ops) is its part's too. *Everything else* is the iteration's wall
time minus all that, so the parts add up to the profiled iteration's wall time.

**FLOPs** come from ``torch.utils.flop_counter.FlopCounterMode`` (the same count as the
``FLOP / iteration`` column) with :class:`ScopeFlopCounter`, a dispatch mode inside it that sees
``record_function``'s enter and exit ops (they are dispatched like any other op) and charges the
FLOPs counted between two scope boundaries to the innermost labelled scope open there. The parts
add up to the counter's total exactly.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .timing import IterationRecord

OPTIMIZER = "optimizer"
OTHER = "other"
#: The engine's labels, in the order the breakdown lists them, with their names in the tables.
ENGINE_PARTS: dict[str, str] = {
    "maskkit.pretrain.forward": "pretrain forward",
    "maskkit.pretrain.backward": "pretrain backward",
    "maskkit.finetune.forward": "finetune forward",
    "maskkit.finetune.backward": "finetune backward",
    "maskkit.mask.forward": "mask forward",
    "maskkit.mask.backward": "mask backward",
    "maskkit.product.pretrain": "product at the pretrain level",
    "maskkit.product.finetune": "product at the finetune level",
}
#: Labelled work that runs in some iterations only.
OCCASIONAL_PARTS: dict[str, str] = {
    "maskkit.head_refit": "head refit (every head_refit_every mask steps)",
}
PART_NAMES: dict[str, str] = {
    **ENGINE_PARTS,
    **OCCASIONAL_PARTS,
    OPTIMIZER: "optimizer steps (all levels)",
    OTHER: "everything else",
}
_ENTER_OPS = (torch.ops.profiler._record_function_enter_new, torch.ops.profiler._record_function_enter)
_EXIT_OPS = (torch.ops.profiler._record_function_exit,)
_MICROSECONDS = 1e-6


def part_of(label: str) -> str | None:
    """The part a ``record_function`` label belongs to: the label itself for the engine's
    ``maskkit.*`` labels (also ones added later), :data:`OPTIMIZER` for torch's optimiser labels,
    ``None`` for any other label (its ops belong to the scope around it)."""
    if label.startswith("maskkit."):
        return label
    if label.startswith("Optimizer."):
        return OPTIMIZER
    return None


def part_name(key: str) -> str:
    """The table name of a part (an unknown engine label is shown as it is)."""
    return PART_NAMES.get(key, key)


def part_order(keys: Iterable[str]) -> list[str]:
    """The engine's parts in :data:`ENGINE_PARTS` order, then other ``maskkit.*`` labels, the
    optimiser, everything else."""
    keys = set(keys)
    known = [key for key in ENGINE_PARTS if key in keys]
    extra = sorted(key for key in keys if key not in ENGINE_PARTS and key not in (OPTIMIZER, OTHER))
    return known + extra + [key for key in (OPTIMIZER, OTHER) if key in keys]


# --------------------------------------------------------------------------- FLOPs


class ScopeFlopCounter(TorchDispatchMode):
    """A ``FlopCounterMode`` whose FLOPs are also split by the innermost labelled scope.

    >>> with ScopeFlopCounter() as counter:
    ...     pretrainer.mlo.step(1)
    >>> counter.total_flops, counter.flops["maskkit.pretrain.forward"]

    Attributes:
        counter: the ``FlopCounterMode`` doing the counting.
        flops: FLOPs by part (:func:`part_of`; :data:`OTHER` outside every labelled scope).
        calls: how often each part's scopes were entered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counter = FlopCounterMode(display=False)
        self.flops: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._open: list[str | None] = []  # the part of each open scope, innermost last
        self._counted = 0

    @property
    def total_flops(self) -> int:
        return self.counter.get_total_flops()

    def _current_part(self) -> str:
        return next((part for part in reversed(self._open) if part is not None), OTHER)

    def _charge(self) -> None:
        """Give the FLOPs counted since the last scope boundary to the scope open over them."""
        total = self.counter.get_total_flops()
        self.flops[self._current_part()] += total - self._counted
        self._counted = total

    def __enter__(self) -> ScopeFlopCounter:
        self.counter.__enter__()  # the outer mode: this one's ops re-dispatch into it
        self.flops.clear()
        self.calls.clear()
        self._open.clear()
        self._counted = 0
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._charge()
        super().__exit__(*exc)
        self.counter.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        if packet in _ENTER_OPS:
            self._charge()
            part = part_of(str(args[0]))
            if part is not None:
                self.calls[part] += 1
            self._open.append(part)
            return func(*args, **kwargs)
        if packet in _EXIT_OPS:
            self._charge()
            # Scopes close in the order opened (context managers); the handle passed back is a
            # new Python wrapper, so the innermost open scope is the one closing.
            if self._open:
                self._open.pop()
            return func(*args, **kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- time


def _labelled_ancestor(event: Any) -> str | None:
    """The part of ``event``'s innermost labelled scope along the profiler's call tree
    (``event`` itself included)."""
    node = event
    while node is not None:
        part = part_of(node.name)
        if part is not None:
            return part
        node = node.cpu_parent
    return None


def attribute_self_times(events: Iterable[Any], device: torch.device) -> tuple[Counter, Counter]:
    """Seconds and scope entries by part, from a profiler's events (``profile.events()``).

    Each CPU-side event's self time (CPU self time; on CUDA the self time of the kernels it
    launched) goes to its innermost labelled scope (see the module docstring); events outside
    every labelled scope are left out: they are everything else, which the caller computes as
    the rest of the iteration's wall time.
    """
    cpu_events = [event for event in events if event.device_type == DeviceType.CPU]
    scopes = [event for event in cpu_events if part_of(event.name) is not None]
    threads = Counter(event.thread for event in scopes)
    main_thread = threads.most_common(1)[0][0] if threads else None
    intervals = sorted(
        (
            (event.time_range.start, event.time_range.end, part_of(event.name))
            for event in scopes
            if event.thread == main_thread
        ),
        key=lambda interval: interval[0],
    )

    def enclosing(start: float) -> str | None:
        inside = [part for begin, end, part in intervals if begin <= start <= end]
        return inside[-1] if inside else None  # sorted by start: the last is the innermost

    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter(part_of(event.name) for event in scopes)
    for event in cpu_events:
        part = _labelled_ancestor(event)
        if part is None and event.thread != main_thread:
            part = enclosing(event.time_range.start)
        if part is None:
            continue
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        seconds[part] += own * _MICROSECONDS
    return seconds, calls


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def time_profiler(device: torch.device) -> torch.profiler.profile:
    """The profiler for the breakdown's iteration: op events only (no shapes, stacks, memory)."""
    return torch.profiler.profile(activities=profiler_activities(device))


# --------------------------------------------------------------------------- the breakdown


@dataclass
class PartCost:
    """One part of an iteration.

    Attributes:
        part: the key (a ``maskkit.*`` label, :data:`OPTIMIZER` or :data:`OTHER`).
        name: its name in the tables.
        seconds: its time in the profiled iteration (None: not profiled).
        flops: its FLOPs (None: not counted).
        calls: how often its scopes were entered in one iteration.
    """

    part: str
    name: str
    seconds: float | None
    flops: int | None
    calls: int


@dataclass
class Breakdown:
    """An iteration's time and FLOPs by part; the parts add up to the totals.

    Attributes:
        total_seconds: wall time of the profiled iteration (None when not profiled).
        total_flops: the FLOP counter's total (None when not counted).
        time_source: what the seconds measure.
        parts: in :func:`part_order`.
    """

    total_seconds: float | None
    total_flops: int | None
    time_source: str
    parts: list[PartCost]

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_seconds": self.total_seconds,
            "total_flops": self.total_flops,
            "time_source": self.time_source,
            "parts": [asdict(part) for part in self.parts],
        }


def time_source(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA kernel self time per op (torch.profiler), by innermost labelled scope"
    return "CPU self time per op on the calling thread (torch.profiler), by innermost labelled scope"


def make_breakdown(
    device: torch.device,
    wall_seconds: float | None,
    scope_seconds: Counter | None,
    scope_calls: Counter | None,
    flop_counter: ScopeFlopCounter | None,
) -> Breakdown:
    """Join the profiled times (``scope_seconds`` over an iteration of ``wall_seconds``) and the
    scoped FLOP count; *everything else* takes the rest of each total."""
    seconds = Counter(scope_seconds or {})
    flops = Counter(flop_counter.flops) if flop_counter is not None else Counter()
    calls = Counter(scope_calls if scope_calls is not None else (flop_counter.calls if flop_counter else {}))
    if wall_seconds is not None:
        seconds[OTHER] = wall_seconds - sum(value for key, value in seconds.items() if key != OTHER)
    keys = {key for key in (*seconds, *flops, *calls) if seconds[key] or flops[key] or calls[key]}
    keys.add(OTHER)
    parts = [
        PartCost(
            part=key,
            name=part_name(key),
            seconds=seconds[key] if wall_seconds is not None else None,
            flops=flops[key] if flop_counter is not None else None,
            calls=calls[key],
        )
        for key in part_order(keys)
    ]
    return Breakdown(
        total_seconds=wall_seconds,
        total_flops=flop_counter.total_flops if flop_counter is not None else None,
        time_source=time_source(device),
        parts=parts,
    )


def profiled_breakdown(
    device: torch.device,
    iterate: Callable[[contextlib.AbstractContextManager | None], IterationRecord],
    flop_counter: ScopeFlopCounter | None,
) -> Breakdown:
    """Run one more iteration (``iterate(around)``) under the profiler and break it down, with
    the FLOPs of ``flop_counter`` (an earlier iteration's count, or None)."""
    profiler = time_profiler(device)
    profiled = iterate(profiler)
    seconds, calls = attribute_self_times(profiler.events(), device)
    return make_breakdown(device, profiled.seconds, seconds, calls, flop_counter)
