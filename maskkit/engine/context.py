"""What every stage of a run shares: config, device, data, run dir, progress display."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress

from maskkit.config import RunConfig
from maskkit.data import ImageSplit, LabelledDataset, MLOSplits
from maskkit.engine.evaluate import evaluate_classifier
from maskkit.engine.progress import PlainProgress, progress_display
from maskkit.rundir import RunDir
from maskkit.runtime import autocast, use_bf16


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
    def mean(self) -> tuple[float, ...]:
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.dataset.std

    def evaluate(self, model: torch.nn.Module, split: ImageSplit) -> dict:
        """Classification metrics of ``model`` (images → logits) on ``split``."""
        return evaluate_classifier(
            model,
            split,
            self.dataset.class_names,
            self.config.data.eval_batch_size,
            self.device,
            self.mean,
            self.std,
            self.autocast,
        )

    def progress(self) -> Progress | PlainProgress:
        """A rich progress bar with a free-text status field (loss, throughput) on a terminal;
        plain lines every so often when the output goes to a file or a pipe."""
        return progress_display(self.console)
