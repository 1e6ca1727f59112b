"""A whole run: resolve, pretrain, fine-tune, evaluate, and write the summary and plots.

Under torchrun every process runs :func:`train` (or :func:`resume`): it joins the process
group, checks that the batches divide evenly, and builds the same models; rank 0 alone creates
and writes the run dir, and the others follow it (``docs/distributed.md``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from maskkit.checkpoint import Checkpoint, load_newest_intact
from maskkit.config import (
    ADJUSTABLE_ON_RESUME,
    RunConfig,
    batch_sizes,
    config_differences,
    config_to_yaml,
    load_run_config,
    merge_config_layers,
    validate_config,
)
from maskkit.data import (
    LabelledDataset,
    MLOSplits,
    default_data_dir,
    limit_dataset,
    load_dataset,
    make_splits,
)
from maskkit.distributed import (
    DEFAULT_TIMEOUT_S,
    broadcast_modules_,
    check_batch_sizes,
    is_main,
    main_first,
    on_main,
    separate_random_streams,
    start,
    world_size,
)
from maskkit.engine.context import RunContext
from maskkit.engine.finetune import Finetuner, FinetuneResult
from maskkit.engine.pretrain import Pretrainer, PretrainResult
from maskkit.engine.priors import PriorSpec, attach_priors, check_prior_choice
from maskkit.engine.protocols import (
    frozen_encoder_protocols,
    paired_protocols,
    protocols_line,
    protocols_summary,
)
from maskkit.errors import ConfigError, TrainingDivergedError
from maskkit.loggers import open_loggers, require_loggers
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier
from maskkit.plugins import create_policy, policy_info
from maskkit.policy import MASK_LEVEL, PRETRAIN_LEVEL, MaskPolicy, policy_context
from maskkit.report import plot_confusion_matrix, plot_training_curves, print_metrics
from maskkit.report.predictions import PREDICTIONS_FILE, write_predictions
from maskkit.rundir import PROTOCOLS_FILE, SUMMARY_FILE, RunDir, atomic_write_text
from maskkit.runtime import device_description, seed_everything, select_device, tune_cpu_runtime
from maskkit.torchrun_env import note_run_dir

#: The entry points: all that the CLI, ``maskkit bench`` and the other commands may import from
#: here (``tests/test_layering.py``). The names a run dir's files have are in
#: :mod:`maskkit.rundir`, what a config allows in :mod:`maskkit.config`.
__all__ = ["build_models", "prepare", "resume", "stage2_head", "train"]


def build_models(
    config: RunConfig, num_classes: int, device: torch.device
) -> tuple[MaskedAutoencoderViT, MaskPolicy, ClassifierHead]:
    """The MAE, the policy and the head, seeded and on ``device``."""
    seed_everything(config.seed)
    mae = MaskedAutoencoderViT(config.model).to(device)
    context = policy_context(mae, config.pretrain.learned_mask)
    policy = create_policy(config.policy, context, config.policy_options).to(device)
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


def prepare(
    config: RunConfig,
    console: Console,
    with_priors: bool = True,
    device: torch.device | None = None,
) -> tuple[torch.device, LabelledDataset, MLOSplits]:
    """Everything that can fail on user input, done before a run dir is created: the policy, its
    prior provider, TensorBoard when asked for, the batch sizes, the device, the data and the
    priors (built here when the user asked; ``with_priors=False`` skips them for work that never
    calls the policy, like evaluation). ``device``: the process's device when the caller already
    chose it, as a multi-process run does."""
    info = policy_info(config.policy)
    requires = info.requires if with_priors else frozenset()
    if with_priors:
        check_prior_choice(config, requires)
    require_loggers(config)  # a missing package (wandb, mlflow, tensorboard) stops here, before a run dir
    device = select_device(config.device) if device is None else device
    check_batch_sizes(batch_sizes(config, MASK_LEVEL in info.policy_class.training_levels()))
    if device.type == "cpu":
        tune_cpu_runtime()
    data_dir = config.data.data_dir or default_data_dir()

    def load() -> LabelledDataset:
        return load_dataset(
            config.data.dataset, data_dir, image_size=config.model.img_size, download=config.data.download
        )

    # A download goes into one folder: rank 0 fetches it before the other processes read it.
    dataset = whole = main_first(load) if config.data.download else load()
    if config.data.subset is not None:
        dataset = limit_dataset(dataset, config.data.subset)
    if requires:
        spec = PriorSpec.from_config(config)
        # Building priors writes the store: rank 0 builds them before the others read them. A
        # subset's priors may come from the whole dataset's (built without --subset).
        dataset = main_first(lambda: attach_priors(dataset, spec, console, whole=whole))
    splits = make_splits(dataset, config.data.train_portion, config.data.mask_source, config.data.val_portion)
    return device, dataset, splits


def _process_console(console: Console) -> Console:
    """Rank 0 prints; the other processes of a multi-process run stay quiet."""
    return console if is_main() else Console(quiet=True)


def train(
    config: RunConfig,
    run_dir: Path | None,
    console: Console,
    runs_root: Path = Path("runs"),
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunDir:
    """A new run: stage 1 (pretrain), stage 2 (fine-tune) and the test evaluation.

    Under torchrun every process calls it; ``collective_timeout_s`` bounds each collective.
    """
    device = start(config.device, collective_timeout_s)
    console = _process_console(console)
    device, dataset, splits = prepare(config, console, device=device)
    models = build_models(config, dataset.num_classes, device)
    separate_random_streams(config.seed)

    def create() -> tuple[Path, bool]:
        run = RunDir.create(run_dir, config.policy, config.data.dataset, root=runs_root)
        try:
            run.config_path.write_text(config_to_yaml(config))
        except Exception:
            run.discard_unstarted()
            raise
        return run.path, run.created_here

    path, created_here = on_main(create)
    run = RunDir(path, writer=is_main())
    run.created_here = created_here
    note_run_dir(run.path)
    try:
        context = RunContext(config, device, dataset, splits, run, console)
        _execute(context, *models, resume=None)
    except Exception as error:
        # A run that fails before its first checkpoint (a policy that raises in its first forward,
        # say) leaves nothing behind, so the same --run-dir works again. A diverged run keeps its
        # metrics to look at; Ctrl-C (not an Exception) keeps the dir for --resume. Rank 0 alone
        # removes it (the other processes' view does not write).
        if not isinstance(error, TrainingDivergedError):
            run.discard_unstarted()
        raise
    return run


def resume(
    run_dir: Path,
    overrides: list[dict],
    console: Console,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunDir:
    """Continue an interrupted run from its last checkpoint, with its saved config.

    ``overrides`` may change only what :data:`~maskkit.config.ADJUSTABLE_ON_RESUME` names (how
    the run computes or reports); anything else would make the resumed run a different
    experiment, and is refused.
    The number of processes may differ from the interrupted run's: the saved data order is that
    of the global batches.
    Under torchrun every process reads the run dir (on a filesystem all nodes share).
    """
    run = RunDir.open(run_dir)
    saved = load_run_config(run.config_path)
    config = _resumed_config(saved, overrides, run)
    device = start(config.device, collective_timeout_s)
    console = _process_console(console)
    run = RunDir(run.path, writer=is_main())
    note_run_dir(run.path)
    if run.summary_path.exists():
        console.print(f"{run.path} is already finished ({SUMMARY_FILE} exists); nothing to resume")
        return run
    device, dataset, splits = prepare(config, console, device=device)
    models = build_models(config, dataset.num_classes, device)
    separate_random_streams(config.seed)
    if config != saved and run.writer:  # an allowed change, e.g. --set precision=fp32
        atomic_write_text(run.config_path, config_to_yaml(config))
    # The newest checkpoint that reads back whole: a damaged `last` falls back, with a warning.
    checkpoint, damaged = load_newest_intact(run.checkpoints, str(device), set_aside=run.writer)
    for warning in damaged:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    context = RunContext(config, device, dataset, splits, run, console)
    _execute(context, *models, resume=checkpoint)
    return run


def _resumed_config(config: RunConfig, overrides: list[dict], run: RunDir) -> RunConfig:
    """The saved config with the allowed ``overrides`` applied; anything else is refused."""
    saved = config.model_dump(mode="json")
    merged = validate_config(merge_config_layers(saved, *overrides))
    differing = sorted(config_differences(saved, merged.model_dump(mode="json")))
    refused = [item for item in differing if item.split(" ")[0] not in ADJUSTABLE_ON_RESUME]
    if refused:
        raise ConfigError(
            f"--resume {run.path}: the given options change {', '.join(refused)} from the run's saved "
            f"config; resume without them (only {', '.join(ADJUSTABLE_ON_RESUME)} may change), "
            "or start a new run"
        )
    return merged


def _execute(
    context: RunContext,
    mae: MaskedAutoencoderViT,
    policy: MaskPolicy,
    head: ClassifierHead,
    resume: Checkpoint | None,
) -> None:
    config, run, console = context.config, context.run, context.console
    broadcast_modules_([mae, policy, head])  # every process starts from rank 0's weights
    stage = resume.state.get("stage") if resume is not None else None
    verb = "resuming" if resume is not None else "starting"
    console.print(
        f"[bold]maskkit[/] {verb} run [cyan]{run.path}[/]: policy [green]{config.policy}[/] "
        f"({_how_trained(policy, config)}), "
        f"{config.data.dataset} ({len(context.splits.pretrain)} train / {len(context.splits.test)} test), "
        f"device {context.device}"
        + (f" (rank 0 of {world_size()} processes)" if world_size() > 1 else "")
        + f", preset {config.preset}"
        + (f", from its {stage} checkpoint at step {resume.state['step']}" if resume is not None else "")
    )
    run.truncate_metrics(_resume_position(resume))
    run.mirrors.extend(open_loggers(config, run, _resume_position(resume)))  # rank 0's run dir only
    try:
        if stage == "finetune":
            pretrain_summary = resume.state["carry"]["pretrain"]
        else:
            multilevel = MASK_LEVEL in policy.training_levels()
            pretrainer = Pretrainer(context, mae, policy, head if multilevel else None)
            if resume is not None:
                pretrainer.resume_from(resume)
            pretrain_summary = _pretrain_summary(pretrainer.run())
        classifier = ViTClassifier(mae, stage2_head(config, context.dataset.num_classes, context.device))
        if stage != "finetune":
            # Stage 2 draws (dropout) from a stream of the run's seed alone, not from wherever
            # stage 1 left it: every policy fine-tunes under the same draws (a resume restores its own).
            torch.manual_seed(config.seed + STAGE2_HEAD_SEED_OFFSET + 1)
            separate_random_streams(config.seed + STAGE2_HEAD_SEED_OFFSET + 1)
        finetuner = Finetuner(
            context, classifier, step_offset=pretrain_summary["steps"], carry={"pretrain": pretrain_summary}
        )
        if stage == "finetune":
            finetuner.resume_from(resume)
        finetuned = finetuner.run()
    except KeyboardInterrupt:
        processes = f" --nproc {world_size()}" if world_size() > 1 else ""
        console.print(f"interrupted: continue with [bold]maskkit train --resume {run.path}{processes}[/]")
        raise
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{error} Run dir: {run.path}.") from None
    finally:
        run.close_mirrors()
    _finish(context, classifier, pretrain_summary, finetuned)


def _how_trained(policy: MaskPolicy, config: RunConfig) -> str:
    if config.pretrain.steps == 0:
        return "no pretraining: pretrain.steps=0, the ViT is trained from scratch"
    levels = policy.training_levels()
    if MASK_LEVEL in levels:
        return "learnable, three-level MLO"
    if PRETRAIN_LEVEL in levels:
        return "pretrain level only, its own parameters trained with the MAE"
    return "fixed, pretrain level only"


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
    test_metrics, test_predictions = context.evaluate_with_predictions(classifier, context.splits.test)
    print_metrics(
        test_metrics, context.console, title=f"Test metrics ({config.policy}, {config.data.dataset})"
    )
    summary = {
        "policy": config.policy,
        "dataset": config.data.dataset,
        "preset": config.preset,
        "test": test_metrics,
        "test_accuracy": test_metrics["accuracy"],
        "test_balanced_accuracy": test_metrics["balanced_accuracy"],
        "test_auc": test_metrics["auc"],
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
            "processes": world_size(),
        },
    }
    if not run.writer:  # rank 0 writes the summary and the plots
        return
    if config.protocols:  # before the summary: a run with a summary has all its results
        protocols = frozen_encoder_protocols(context)
        protocols.update(paired_protocols(context))  # the trial, when trial.forks asks for it
        run.write_json(PROTOCOLS_FILE, protocols)
        summary["protocols"] = protocols_summary(protocols)
        context.console.print(protocols_line(protocols), highlight=False)
    write_predictions(run.path / PREDICTIONS_FILE, test_predictions, test_metrics["class_names"])
    run.write_json(SUMMARY_FILE, summary)
    write_plots(run, test_metrics)
    context.console.print(f"summary: [cyan]{run.summary_path}[/]  plots: [cyan]{run.plots}[/]")


def write_plots(run: RunDir, test_metrics: dict) -> None:
    plot_confusion_matrix(
        test_metrics["confusion_matrix"], test_metrics["class_names"], run.plots / "confusion_matrix.png"
    )
    plot_training_curves(run.read_metrics(), run.plots / "training_curves.png")
