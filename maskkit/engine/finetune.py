"""Stage 2: end-to-end fine-tuning of encoder + head (the seed's recipe), then evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkit.checkpoint import save_checkpoint
from maskkit.data import DeviceBatches
from maskkit.engine.context import RunContext
from maskkit.engine.evaluate import evaluate_classifier
from maskkit.engine.optim import adamw, cosine_schedule
from maskkit.errors import TrainingDivergedError
from maskkit.models import ViTClassifier
from maskkit.runtime import full_precision


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


def run_finetuning(context: RunContext, model: ViTClassifier, step_offset: int = 0) -> FinetuneResult:
    """Train ``model`` end to end on all training images; evaluate on the eval split each epoch."""
    config = context.config.finetune
    per_epoch, total = finetune_steps(context)
    model.train()
    trainable = torch.nn.ModuleDict({"encoder": _EncoderView(model), "head": model.head})
    optimizer = adamw(trainable, config.lr, config.weight_decay, config.betas)
    scheduler = cosine_schedule(optimizer, total, warmup_steps=round(config.warmup_epochs * per_epoch))
    batches = DeviceBatches(
        context.splits.pretrain,
        config.batch_size,
        context.device,
        context.mean,
        context.std,
        augment=config.augment,
        seed=context.config.seed * 1000 + 4,
    )
    history: list[dict] = []
    started = time.perf_counter()
    running_loss, running_correct, running_count = 0.0, 0, 0
    with context.progress() as progress:
        task = progress.add_task("fine-tune", total=total, status="")
        for step in range(1, total + 1):
            images, labels = batches.next()
            with context.autocast():
                logits = model(images)
            loss = F.cross_entropy(full_precision(logits), labels, label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"the fine-tuning loss became {loss.item()} at step {step}. The pretrained "
                    "checkpoint is kept; lower finetune.lr or run in fp32 (--set precision=fp32)."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item() * len(labels)
            running_correct += int((logits.argmax(1) == labels).sum())
            running_count += len(labels)
            progress.advance(task)
            if step % per_epoch == 0 or step == total:
                epoch = step / per_epoch
                metrics = evaluate_classifier(
                    model,
                    context.splits.eval,
                    context.dataset.class_names,
                    context.config.data.eval_batch_size,
                    context.device,
                    context.mean,
                    context.std,
                    context.autocast,
                )
                record = {
                    "stage": "finetune",
                    "step": step,
                    "epoch": round(epoch, 3),
                    "train/loss": running_loss / running_count,
                    "train/accuracy": running_correct / running_count,
                    f"{context.splits.eval_name}/accuracy": metrics["accuracy"],
                    f"{context.splits.eval_name}/weighted_f1": metrics["weighted_f1"],
                    "lr/finetune": optimizer.param_groups[0]["lr"],
                    "time": round(time.perf_counter() - started, 3),
                }
                context.run.log(record)
                history.append(record)
                progress.update(
                    task,
                    status=f"epoch {epoch:.1f}  loss {record['train/loss']:.4f}  "
                    f"{context.splits.eval_name} acc {metrics['accuracy']:.4f}",
                )
                running_loss, running_correct, running_count = 0.0, 0, 0
    model.eval()
    save_checkpoint(
        context.run.checkpoints,
        step_offset + total,
        {"mae": model.mae, "head": model.head},
        {"stage": "finetune", "step": total},
        pointers=("final",),
    )
    return FinetuneResult(config.epochs, total, time.perf_counter() - started, history)


class _EncoderView(torch.nn.Module):
    """The encoder's parameters under one module, so the decoder gets no optimiser state."""

    def __init__(self, model: ViTClassifier) -> None:
        super().__init__()
        mae = model.mae
        self.patch_embed, self.blocks, self.norm = mae.patch_embed, mae.blocks, mae.norm
        self.cls_token, self.pos_embed = mae.cls_token, mae.pos_embed
