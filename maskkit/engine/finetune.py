"""Stage 2: end-to-end fine-tuning of encoder + head (the seed's recipe).

The stage checkpoints at the end of every epoch (weights, optimiser, schedule, data order, RNG),
so an interrupted run resumes where it stopped. With several processes each trains on its slice
of every global batch and the gradients are averaged across them before each step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from maskkit.checkpoint import Checkpoint
from maskkit.data import DeviceBatches
from maskkit.distributed import average_gradients_, rank, restore_rng_state, sum_of, world_size
from maskkit.engine.class_weights import class_balanced_weights, weighted_cross_entropy
from maskkit.engine.context import RunContext
from maskkit.engine.optim import adamw, cosine_schedule
from maskkit.errors import TrainingDivergedError
from maskkit.models import ViTClassifier
from maskkit.runtime import full_precision, rng_state


@dataclass
class FinetuneResult:
    epochs: float
    steps: int
    seconds: float
    eval_history: list[dict]


def finetune_steps(context: RunContext) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)`` of stage 2 over all training images."""
    config = context.config.finetune
    per_epoch = max(1, math.ceil(len(context.splits.pretrain) / config.batch_size))
    return per_epoch, math.ceil(config.epochs * per_epoch)


@dataclass
class _Running:
    """Training loss and accuracy accumulated since the last epoch boundary."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class Finetuner:
    """Trains ``model`` end to end on all training images, evaluating on the eval split each epoch.

    ``step_offset`` numbers its checkpoints after stage 1's, and ``carry`` is stored in every
    checkpoint so that a resumed run can still write stage 1's part of the summary.
    """

    context: RunContext
    model: ViTClassifier
    step_offset: int = 0
    carry: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        config, context = self.context.config.finetune, self.context
        self.per_epoch, self.total = finetune_steps(context)
        # The decoder takes no part in classification, and gets no optimiser state.
        trainable = torch.nn.ModuleDict({"encoder": self.model.mae.encoder(), "head": self.model.head})
        self.optimizer = adamw(
            trainable, config.lr, config.weight_decay, config.betas, self.context.fused_adamw
        )
        self._parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        warmup = round(config.warmup_epochs * self.per_epoch)
        self.scheduler = cosine_schedule(self.optimizer, self.total, warmup_steps=warmup)
        self.batches = DeviceBatches(
            context.splits.pretrain,
            config.batch_size,
            context.device,
            context.mean,
            context.std,
            augment=config.augment,
            seed=context.config.seed * 1000 + 4,
            cutout=config.cutout,
            rank=rank(),
            world_size=world_size(),
        )
        # [C] inverse-frequency weights of the training labels, or None: plain cross-entropy.
        labels, num_classes = context.splits.pretrain.labels, context.dataset.num_classes
        self.class_weights = (
            class_balanced_weights(labels, num_classes).to(context.device) if config.class_balanced else None
        )
        self.history: list[dict] = []
        self.running = _Running()
        self.start_step = 0
        self.seconds_before = 0.0

    def training_state(self, step: int, seconds: float) -> dict:
        return {
            "stage": "finetune",
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_state(),
            "history": list(self.history),
            "running": vars(self.running).copy(),
            "seconds": seconds,
            "carry": self.carry,
        }

    def resume_from(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        checkpoint.load_into({"mae": self.model.mae, "head": self.model.head})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["batches"])
        restore_rng_state(state, self.context.config.seed)
        self.history = list(state["history"])
        self.running = _Running(**state["running"])
        self.seconds_before = state["seconds"]
        self.start_step = state["step"]

    def _train_step(self, step: int) -> None:
        config = self.context.config.finetune
        images, labels, _ = self.batches.next()
        with self.context.autocast():
            logits = self.model(images)
        logits = full_precision(logits)
        loss = weighted_cross_entropy(logits, labels, self.class_weights, config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The global batch's gradient and loss: the means over the processes' slices.
        global_loss = average_gradients_(self._parameters, loss)
        if not math.isfinite(global_loss):
            raise TrainingDivergedError(
                f"the fine-tuning loss became {global_loss} at its step {step}. The last good "
                "checkpoint is kept. Start a new run with a lower lr (--set finetune.lr=...), or "
                "resume this one in fp32 (--resume RUN_DIR --set precision=fp32)."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.running.loss += loss.item() * len(labels)
        self.running.correct += int((logits.argmax(1) == labels).sum())
        self.running.count += len(labels)

    def _end_of_epoch(self, step: int, seconds: float) -> dict:
        context = self.context
        metrics = context.evaluate(self.model, context.splits.eval)
        # The global batches' totals since the last epoch boundary.
        loss_sum, correct, count = sum_of([self.running.loss, self.running.correct, self.running.count])
        record = {
            "stage": "finetune",
            "step": step,
            "epoch": round(step / self.per_epoch, 3),
            "train/loss": loss_sum / max(1, count),
            "train/accuracy": correct / max(1, count),
            "val/accuracy": metrics["accuracy"],
            "val/weighted_f1": metrics["weighted_f1"],
            "lr/finetune": self.optimizer.param_groups[0]["lr"],
            "time": round(seconds, 3),
        }
        context.run.log(record)
        self.history.append(record)
        self.running = _Running()
        pointers = ("last", "final") if step == self.total else ("last",)
        context.save_checkpoint(
            self.step_offset + step,
            {"mae": self.model.mae, "head": self.model.head},
            self.training_state(step, seconds),
            pointers=pointers,
        )
        return record

    def run(self) -> FinetuneResult:
        started = epoch_started = time.perf_counter()
        batch_size = self.context.config.finetune.batch_size
        self.model.train()
        with self.context.progress() as progress:
            task = progress.add_task("fine-tune", total=self.total, completed=self.start_step, status="")
            for step in range(self.start_step + 1, self.total + 1):
                self._train_step(step)
                progress.advance(task)
                if step % self.per_epoch == 0 or step == self.total:
                    steps_done = (step - 1) % self.per_epoch + 1
                    rate = steps_done * batch_size / max(time.perf_counter() - epoch_started, 1e-9)
                    record = self._end_of_epoch(step, self.seconds_before + time.perf_counter() - started)
                    progress.update(
                        task,
                        status=f"epoch {record['epoch']:.1f}  loss {record['train/loss']:.4f}  "
                        f"val acc {record['val/accuracy']:.4f}  {rate:.0f} img/s",
                    )
                    epoch_started = time.perf_counter()
        self.model.eval()
        seconds = self.seconds_before + time.perf_counter() - started
        if self.total == 0:  # finetune.epochs = 0: evaluate the pretrained encoder and head as they are
            self.context.save_checkpoint(
                self.step_offset,
                {"mae": self.model.mae, "head": self.model.head},
                self.training_state(0, seconds),
                pointers=("last", "final"),
            )
        return FinetuneResult(self.context.config.finetune.epochs, self.total, seconds, self.history)
