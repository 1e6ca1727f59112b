"""A whole run: resolve, pretrain, fine-tune, evaluate, and write the summary and plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from maskkit.checkpoint import Checkpoint, checkpoint_path, load_checkpoint
from maskkit.config import RunConfig, config_to_yaml, deep_merge, load_run_config, validate_config
from maskkit.data import (
    ImageSplit,
    LabelledDataset,
    MLOSplits,
    default_data_dir,
    load_dataset,
    make_splits,
)
from maskkit.engine.context import RunContext
from maskkit.engine.finetune import Finetuner, FinetuneResult
from maskkit.engine.pretrain import Pretrainer, PretrainResult
from maskkit.errors import ConfigError, TrainingDivergedError
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier
from maskkit.plugins import create_policy, policy_info
from maskkit.policy import MaskPolicy, PolicyContext
from maskkit.report import plot_confusion_matrix, plot_training_curves, print_metrics
from maskkit.rundir import RunDir, atomic_write_text
from maskkit.runtime import device_description, seed_everything, select_device, tune_cpu_runtime
from maskkit.tensorboard_log import TENSORBOARD_DIR, TensorBoardMirror, require_tensorboard


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


# Keeps the stage-2 head's draw apart from the models' (seeded with the seed itself).
STAGE2_HEAD_SEED_OFFSET = 7919


def stage2_head(config: RunConfig, num_classes: int, device: torch.device) -> ClassifierHead:
    """The head stage 2 starts from: fresh, and seeded by the run's seed alone, so every policy
    fine-tunes from the very same head (as the reference does, with a fresh head)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + STAGE2_HEAD_SEED_OFFSET)
        head = ClassifierHead(config.model.embed_dim, num_classes, config.finetune.head_dropout)
    return head.to(device)


def prepare(config: RunConfig, console: Console) -> tuple[torch.device, LabelledDataset, MLOSplits]:
    """Everything that can fail on user input, done before a run dir is created."""
    policy_info(config.policy)
    if config.tensorboard:
        require_tensorboard()
    device = select_device(config.device)
    if device.type == "cpu":
        tune_cpu_runtime()
    data_dir = config.data.data_dir or default_data_dir()
    dataset = load_dataset(
        config.data.dataset, data_dir, image_size=config.model.img_size, download=config.data.download
    )
    if config.data.subset is not None:
        dataset = limit_dataset(dataset, config.data.subset)
    splits = make_splits(dataset, config.data.train_portion, config.data.mask_source, config.data.val_portion)
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
    """A new run: stage 1 (pretrain), stage 2 (fine-tune) and the test evaluation."""
    device, dataset, splits = prepare(config, console)
    models = build_models(config, dataset.num_classes, device)
    run = RunDir.create(run_dir, config.policy, config.data.dataset, root=runs_root)
    try:
        run.config_path.write_text(config_to_yaml(config))
        context = RunContext(config, device, dataset, splits, run, console)
        _execute(context, *models, resume=None)
    except Exception as error:
        # A run that fails before its first checkpoint (a policy that raises in its first forward,
        # say) leaves nothing behind, so the same --run-dir works again. A diverged run keeps its
        # metrics to look at; Ctrl-C (not an Exception) keeps the dir for --resume.
        if not isinstance(error, TrainingDivergedError):
            run.discard_unstarted()
        raise
    return run


def resume(run_dir: Path, overrides: list[dict], console: Console) -> RunDir:
    """Continue an interrupted run from its last checkpoint, with its saved config.

    ``overrides`` may change only ``precision`` and ``device``; anything else would make the
    resumed run a different experiment, and is refused.
    """
    run = RunDir.open(run_dir)
    saved = load_run_config(run.config_path)
    config = _resumed_config(saved, overrides, run)
    if run.summary_path.exists():
        console.print(f"{run.path} is already finished (summary.json exists); nothing to resume")
        return run
    device, dataset, splits = prepare(config, console)
    models = build_models(config, dataset.num_classes, device)
    if config != saved:  # an allowed change, e.g. --set precision=fp32
        atomic_write_text(run.config_path, config_to_yaml(config))
    checkpoint = None
    if checkpoint_path(run.checkpoints, "last") is not None:
        checkpoint = load_checkpoint(run.checkpoints, "last", map_location=str(device))
    context = RunContext(config, device, dataset, splits, run, console)
    _execute(context, *models, resume=checkpoint)
    return run


# What a resumed run may change: how it computes or reports, not what it computes.
ADJUSTABLE_ON_RESUME = ("precision", "device", "tensorboard")


def _resumed_config(config: RunConfig, overrides: list[dict], run: RunDir) -> RunConfig:
    """The saved config with the allowed ``overrides`` applied; anything else is refused."""
    saved = config.model_dump(mode="json")
    merged = validate_config(deep_merge(saved, *overrides))
    differing = sorted(_differences(saved, merged.model_dump(mode="json")))
    refused = [item for item in differing if item.split(" ")[0] not in ADJUSTABLE_ON_RESUME]
    if refused:
        raise ConfigError(
            f"--resume {run.path}: the given options change {', '.join(refused)} from the run's saved "
            f"config; resume without them (only {', '.join(ADJUSTABLE_ON_RESUME)} may change), "
            "or start a new run"
        )
    return merged


def _differences(saved: dict, merged: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in saved.keys() | merged.keys():
        a, b = saved.get(key), merged.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} (saved {a!r}, given {b!r})")
    return keys


def _execute(
    context: RunContext,
    mae: MaskedAutoencoderViT,
    policy: MaskPolicy,
    head: ClassifierHead,
    resume: Checkpoint | None,
) -> None:
    config, run, console = context.config, context.run, context.console
    stage = resume.state.get("stage") if resume is not None else None
    verb = "resuming" if resume is not None else "starting"
    console.print(
        f"[bold]maskkit[/] {verb} run [cyan]{run.path}[/]: policy [green]{config.policy}[/] "
        f"({'learnable, three-level MLO' if policy.learnable else 'fixed, pretrain level only'}), "
        f"{config.data.dataset} ({len(context.splits.pretrain)} train / {len(context.splits.test)} test), "
        f"device {context.device}, preset {config.preset}"
        + (f", from its {stage} checkpoint at step {resume.state['step']}" if resume is not None else "")
    )
    run.truncate_metrics(_resume_position(resume))
    if config.tensorboard:
        run.mirrors.append(TensorBoardMirror(run.path / TENSORBOARD_DIR, _resume_position(resume)))
    try:
        if stage == "finetune":
            pretrain_summary = resume.state["carry"]["pretrain"]
        else:
            pretrainer = Pretrainer(context, mae, policy, head if policy.learnable else None)
            if resume is not None:
                pretrainer.resume_from(resume)
            pretrain_summary = _pretrain_summary(pretrainer.run())
        classifier = ViTClassifier(mae, stage2_head(config, context.dataset.num_classes, context.device))
        finetuner = Finetuner(
            context, classifier, step_offset=pretrain_summary["steps"], carry={"pretrain": pretrain_summary}
        )
        if stage == "finetune":
            finetuner.resume_from(resume)
        finetuned = finetuner.run()
    except KeyboardInterrupt:
        console.print(f"interrupted: continue with [bold]maskkit train --resume {run.path}[/]")
        raise
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{error} Run dir: {run.path}.") from None
    finally:
        run.close_mirrors()
    _finish(context, classifier, pretrain_summary, finetuned)


def _resume_position(resume: Checkpoint | None) -> tuple[str, int] | None:
    if resume is None:
        return None
    return resume.state["stage"], resume.state["step"]


def _pretrain_summary(result: PretrainResult) -> dict:
    return {
        "steps": result.steps,
        "level_steps": result.level_steps,
        "evaluation_counts": result.evaluation_counts,
        "seconds": round(result.seconds, 2),
        "best_val_accuracy": result.best_eval_accuracy,
        "evaluations": result.evaluations,
        "mask_statistics": result.mask_statistics,
    }


def _finish(
    context: RunContext, classifier: ViTClassifier, pretrain_summary: dict, finetuned: FinetuneResult
) -> None:
    config, device, run = context.config, context.device, context.run
    test_metrics = context.evaluate(classifier, context.splits.test)
    print_metrics(
        test_metrics, context.console, title=f"Test metrics ({config.policy}, {config.data.dataset})"
    )
    summary = {
        "policy": config.policy,
        "dataset": config.data.dataset,
        "preset": config.preset,
        "test": test_metrics,
        "test_accuracy": test_metrics["accuracy"],
        "test_weighted_f1": test_metrics["weighted_f1"],
        "pretrain": pretrain_summary,
        "finetune": {
            "epochs": finetuned.epochs,
            "steps": finetuned.steps,
            "seconds": round(finetuned.seconds, 2),
            "final_eval": finetuned.eval_history[-1] if finetuned.eval_history else None,
        },
        "wall_time_s": round(pretrain_summary["seconds"] + finetuned.seconds, 2),
        "environment": {
            "device": str(device),
            "device_name": device_description(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    run.write_json("summary.json", summary)
    write_plots(run, test_metrics)
    context.console.print(f"summary: [cyan]{run.summary_path}[/]  plots: [cyan]{run.plots}[/]")


def write_plots(run: RunDir, test_metrics: dict) -> None:
    plot_confusion_matrix(
        test_metrics["confusion_matrix"], test_metrics["class_names"], run.plots / "confusion_matrix.png"
    )
    plot_training_curves(run.read_metrics(), run.plots / "training_curves.png")
