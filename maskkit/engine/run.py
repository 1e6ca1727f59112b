"""A whole run: resolve, pretrain, fine-tune, evaluate, and write the summary and plots."""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch
from rich.console import Console

from maskkit.config import RunConfig, config_to_yaml
from maskkit.data import (
    ImageSplit,
    LabelledDataset,
    MLOSplits,
    default_data_dir,
    load_dataset,
    make_splits,
)
from maskkit.engine.context import RunContext
from maskkit.engine.evaluate import evaluate_classifier
from maskkit.engine.finetune import run_finetuning
from maskkit.engine.pretrain import Pretrainer
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier
from maskkit.plugins import create_policy, policy_info
from maskkit.policy import MaskPolicy, PolicyContext
from maskkit.report import plot_confusion_matrix, plot_training_curves, print_metrics
from maskkit.rundir import RunDir
from maskkit.runtime import seed_everything, select_device


def policy_context(model: MaskedAutoencoderViT) -> PolicyContext:
    config = model.config
    return PolicyContext(
        num_patches=model.num_patches,
        embed_dim=config.embed_dim,
        grid_size=model.grid_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
    )


def build_models(
    config: RunConfig, num_classes: int, device: torch.device
) -> tuple[MaskedAutoencoderViT, MaskPolicy, ClassifierHead]:
    """The MAE, the policy and the head, seeded and on ``device``."""
    seed_everything(config.seed)
    mae = MaskedAutoencoderViT(config.model).to(device)
    policy = create_policy(config.policy, policy_context(mae), config.policy_options).to(device)
    head = ClassifierHead(config.model.embed_dim, num_classes, config.finetune.head_dropout).to(device)
    return mae, policy, head


def prepare(config: RunConfig, console: Console) -> tuple[torch.device, LabelledDataset, MLOSplits]:
    """Everything that can fail on user input, done before a run dir is created."""
    policy_info(config.policy)
    device = select_device(config.device)
    data_dir = config.data.data_dir or default_data_dir()
    dataset = load_dataset(
        config.data.dataset, data_dir, image_size=config.model.img_size, download=config.data.download
    )
    if config.data.subset is not None:
        dataset = limit_dataset(dataset, config.data.subset)
    splits = make_splits(dataset, config.data.train_portion, config.data.mask_source)
    return device, dataset, splits


def limit_dataset(dataset: LabelledDataset, count: int) -> LabelledDataset:
    """Keep the first ``count`` images of each split (``data.subset``, for quick runs)."""

    def first(split: ImageSplit | None) -> ImageSplit | None:
        return None if split is None else split.subset(torch.arange(min(count, len(split))))

    return dataclasses.replace(
        dataset, train=first(dataset.train), val=first(dataset.val), test=first(dataset.test)
    )


def train(
    config: RunConfig, run_dir: Path | None, console: Console, runs_root: Path = Path("runs")
) -> RunDir:
    """Run stage 1 (pretrain), stage 2 (fine-tune) and the test evaluation."""
    started = time.perf_counter()
    device, dataset, splits = prepare(config, console)
    mae, policy, head = build_models(config, dataset.num_classes, device)
    run = RunDir.create(run_dir, config.policy, config.data.dataset, root=runs_root)
    run.config_path.write_text(config_to_yaml(config))
    context = RunContext(config, device, dataset, splits, run, console)
    console.print(
        f"[bold]maskkit[/] run [cyan]{run.path}[/]: policy [green]{config.policy}[/] "
        f"({'learnable, three-level MLO' if policy.learnable else 'fixed, pretrain level only'}), "
        f"{config.data.dataset} ({len(splits.pretrain)} train / {len(splits.test)} test), "
        f"device {device}, preset {config.preset}"
    )
    pretrainer = Pretrainer(context, mae, policy, head if policy.learnable else None)
    pretrained = pretrainer.run()
    classifier = ViTClassifier(mae, head)
    finetuned = run_finetuning(context, classifier, step_offset=pretrained.steps)
    test_metrics = evaluate_classifier(
        classifier,
        splits.test,
        dataset.class_names,
        config.data.eval_batch_size,
        device,
        dataset.mean,
        dataset.std,
        context.autocast,
    )
    print_metrics(test_metrics, console, title=f"Test metrics ({config.policy}, {config.data.dataset})")
    summary = {
        "policy": config.policy,
        "dataset": config.data.dataset,
        "preset": config.preset,
        "test": test_metrics,
        "test_accuracy": test_metrics["accuracy"],
        "test_weighted_f1": test_metrics["weighted_f1"],
        "pretrain": {
            "steps": pretrained.steps,
            "level_steps": pretrained.level_steps,
            "evaluation_counts": pretrained.evaluation_counts,
            "seconds": round(pretrained.seconds, 2),
            f"best_{splits.eval_name}_accuracy": pretrained.best_eval_accuracy,
            "evaluations": pretrained.evaluations,
        },
        "finetune": {
            "epochs": finetuned.epochs,
            "steps": finetuned.steps,
            "seconds": round(finetuned.seconds, 2),
            "final_eval": finetuned.eval_history[-1] if finetuned.eval_history else None,
        },
        "wall_time_s": round(time.perf_counter() - started, 2),
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    run.write_json("summary.json", summary)
    write_plots(run, test_metrics)
    console.print(f"summary: [cyan]{run.summary_path}[/]  plots: [cyan]{run.plots}[/]")
    return run


def write_plots(run: RunDir, test_metrics: dict) -> None:
    plot_confusion_matrix(
        test_metrics["confusion_matrix"], test_metrics["class_names"], run.plots / "confusion_matrix.png"
    )
    plot_training_curves(run.read_metrics(), run.plots / "training_curves.png")
