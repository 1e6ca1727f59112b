"""What every stage of a run shares: config, device, data, run dir, progress display.

In a multi-process run every process holds a context; rank 0's writes the run dir (the others
hold a :class:`~maskkit.rundir.RunDir` with ``writer=False`` and a quiet console).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress

from maskkit.checkpoint import save_checkpoint
from maskkit.config import RunConfig
from maskkit.data import ImageSplit, LabelledDataset, MLOSplits
from maskkit.distributed import with_every_rank_rng
from maskkit.engine.evaluate import evaluate_predictions
from maskkit.progress import PlainProgress, progress_display
from maskkit.report.predictions import Predictions
from maskkit.rundir import RunDir
from maskkit.runtime import autocast, use_bf16, use_fused_adamw


@dataclass
class RunContext:
    config: RunConfig
    device: torch.device
    dataset: LabelledDataset
    splits: MLOSplits
    run: RunDir
    console: Console

    @functools.cached_property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A fresh bf16 autocast context on CUDA (fp32 on CPU, unless the config says otherwise)."""
        enabled = use_bf16(self.device, self.config.precision)
        return functools.partial(autocast, self.device, enabled)

    @property
    def fused_adamw(self) -> bool:
        """Whether every AdamW of the run uses torch's fused kernel (the config's ``fused_adamw``)."""
        return use_fused_adamw(self.device, self.config.fused_adamw)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.dataset.std

    def evaluate(self, model: torch.nn.Module, split: ImageSplit) -> dict:
        """Classification metrics of ``model`` (images → logits) on ``split``."""
        return self.evaluate_with_predictions(model, split)[0]

    def evaluate_with_predictions(
        self, model: torch.nn.Module, split: ImageSplit
    ) -> tuple[dict, Predictions]:
        """Classification metrics of ``model`` on ``split`` and the labels and class scores they
        come from (``[N]``, ``[N, C]``)."""
        return evaluate_predictions(
            model,
            split,
            self.dataset.class_names,
            self.config.data.eval_batch_size,
            self.device,
            self.mean,
            self.std,
            self.autocast,
        )

    def save_checkpoint(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        state: dict,
        pointers: tuple[str, ...] = ("last",),
    ) -> None:
        """Checkpoint the run as ``step`` (:func:`maskkit.checkpoint.save_checkpoint`).

        With several processes every process calls it at the same step: the RNG state of each
        is gathered into ``state`` (a collective), and rank 0 alone writes.
        """
        state = with_every_rank_rng(state)
        if self.run.writer:
            save_checkpoint(self.run.checkpoints, step, modules, state, pointers)

    def progress(self) -> Progress | PlainProgress:
        """A rich progress bar with a free-text status field (loss, throughput) on a terminal;
        plain lines every so often when the output goes to a file or a pipe."""
        return progress_display(self.console)
