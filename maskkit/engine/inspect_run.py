"""Look at a finished run again: re-evaluate it, or draw its masks and reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from maskkit.checkpoint import checkpoint_path, load_checkpoint
from maskkit.config import load_run_config
from maskkit.data import normalize
from maskkit.engine.context import RunContext
from maskkit.engine.objectives import decide, masked_reconstruction
from maskkit.engine.pretrain import pretrain_steps
from maskkit.engine.run import build_models, prepare
from maskkit.errors import ConfigError
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier
from maskkit.policy import MaskDecision, MaskPolicy
from maskkit.report import plot_confusion_matrix, plot_mask_grid, print_metrics
from maskkit.report.predictions import predictions_file, write_predictions
from maskkit.rundir import RunDir
from maskkit.weighting import loss_weighting


def _first_available(run: RunDir, pointers: tuple[str, ...]) -> str:
    for pointer in pointers:
        if checkpoint_path(run.checkpoints, pointer) is not None:
            return pointer
    raise ConfigError(
        f"{run.path} has no {' or '.join(pointers)} checkpoint yet; "
        "wait for the run to reach one, or resume it"
    )


def _open(
    run_dir: Path, console: Console, with_priors: bool = True
) -> tuple[RunContext, MaskedAutoencoderViT, MaskPolicy, ClassifierHead]:
    """A finished (or interrupted) run's context and freshly built models, before any weights
    load; the priors of its policy are attached unless ``with_priors`` is False."""
    run = RunDir.open(run_dir)
    config = load_run_config(run.config_path)
    device, dataset, splits = prepare(config, console, with_priors)
    mae, policy, head = build_models(config, dataset.num_classes, device)
    return RunContext(config, device, dataset, splits, run, console), mae, policy, head


def confusion_matrix_file(split: str) -> str:
    """The test split's matrix is the run's own ``confusion_matrix.png`` (redrawn, not copied
    beside it); another split's is ``confusion_matrix_<split>.png``."""
    return "confusion_matrix.png" if split == "test" else f"confusion_matrix_{split}.png"


def evaluate_run(run_dir: Path, split: str, console: Console) -> dict:
    """Evaluate the fine-tuned model of a run on ``split`` (test or val); save the metrics
    (``evaluation_<split>.json``), the labels and class scores (``predictions_<split>.npz``) and
    the confusion matrix PNG."""
    if split not in ("test", "val"):
        raise ConfigError(f"unknown split '{split}'; use test or val")
    context, mae, _, head = _open(run_dir, console, with_priors=False)  # the classifier needs none
    run = context.run
    target = context.splits.test if split == "test" else context.dataset.val
    if target is None:
        raise ConfigError(f"{context.config.data.dataset} has no val split; use --split test")
    pointer = _first_available(run, ("final",))
    device = str(context.device)
    load_checkpoint(run.checkpoints, pointer, map_location=device).load_into({"mae": mae, "head": head})
    metrics, predictions = context.evaluate_with_predictions(ViTClassifier(mae, head), target)
    print_metrics(metrics, console, title=f"{split} metrics of {run.path.name}")
    scores = write_predictions(run.path / predictions_file(split), predictions, metrics["class_names"])
    run.write_json(f"evaluation_{split}.json", metrics)
    png = plot_confusion_matrix(
        metrics["confusion_matrix"], metrics["class_names"], run.plots / confusion_matrix_file(split)
    )
    saved = run.path / f"evaluation_{split}.json"
    console.print(f"saved [cyan]{saved}[/], [cyan]{scores}[/] and [cyan]{png}[/]")
    return metrics


def patch_maps(decision: MaskDecision, grid_size: int) -> dict[str, np.ndarray]:
    """The per-patch maps to draw beside a decision's mask, by column title, each ``[N, g, g]``
    in [0, 1]: the weights as "mask probability" (as they are), then each of the policy's
    ``maps`` (e.g. ``hpm``'s predicted loss) scaled to [0, 1] per image (min to max)."""
    maps = {}
    if decision.weights is not None:
        maps["mask probability"] = decision.weights.float().clamp(0, 1)
    for name, values in decision.maps.items():
        values = values.float()
        low, high = values.min(dim=1, keepdim=True).values, values.max(dim=1, keepdim=True).values
        maps[name] = (values - low) / (high - low).clamp_min(1e-12)
    return {name: values.reshape(-1, grid_size, grid_size).cpu().numpy() for name, values in maps.items()}


def describe_checkpoint(pointer: str, state: dict, pretrain_total: int) -> tuple[str, bool]:
    """How ``maskkit visualize`` names the checkpoint it draws, and whether it is the end of
    pretraining: ``("checkpoint 'best' (mid-pretraining, step 120 of 200)", False)``."""
    step, stage = state.get("step"), state.get("stage", "pretrain")
    finished = pointer == "pretrained" or (stage == "pretrain" and step == pretrain_total)
    if step is None:
        where = "end of pretraining" if finished else "step unknown"
    elif stage != "pretrain":
        where = f"{stage} step {step}"
    elif finished:
        where = f"end of pretraining, step {step}"
    else:
        where = f"mid-pretraining, step {step} of {pretrain_total}"
    return f"checkpoint '{pointer}' ({where})", finished


#: Masks drawn to estimate the masking frequency of a policy that gives no mask probability.
FREQUENCY_DRAWS = 32


@torch.no_grad()
def visualize_run(run_dir: Path, num_images: int, output: Path | None, seed: int, console: Console) -> Path:
    """PNG grid of test images: original → masked → reconstruction (→ the policy's per-patch
    maps: mask probability, predicted loss, ...); for a policy that reads a prior: original →
    prior → the maps → masked → reconstruction."""
    context, mae, policy, _ = _open(run_dir, console)
    run, config, dataset, splits, device = (
        context.run,
        context.config,
        context.dataset,
        context.splits,
        context.device,
    )
    pointer = _first_available(run, ("pretrained", "best", "last"))
    checkpoint = load_checkpoint(run.checkpoints, pointer, map_location=str(device))
    checkpoint.load_into({"mae": mae, "policy": policy})
    drawn, finished = describe_checkpoint(pointer, checkpoint.state, pretrain_steps(context))
    if not finished:
        warning = f"{run.path.name} has not finished pretraining: drawing its {drawn}"
        console.print(f"[yellow]warning[/]: {escape(warning)}")
    mae.eval()
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    count = min(num_images, len(splits.test))
    indices = torch.randperm(len(splits.test), generator=generator)[:count]
    raw = splits.test.images[indices].to(device)  # [N, C, H, W] uint8
    images = normalize(raw, dataset.mean, dataset.std)
    priors = {  # name → [N, H, W] in [0, 1], as the batches serve them
        name: splits.test.priors[name][indices].to(device).float() / 255.0 for name in sorted(policy.requires)
    }
    weighting = loss_weighting(config.pretrain.weighting, config.pretrain.tempered_alpha)
    torch.manual_seed(seed)
    reconstruction = masked_reconstruction(mae, policy, images, config.mask_ratio, weighting, priors)
    decision, pred = reconstruction.decision, reconstruction.pred
    pixels = mae.unpatchify(mae.denormalized_prediction(images, pred.float()))  # [N, C, H, W]
    patch_mask = decision.mask.unsqueeze(-1).expand(-1, -1, mae.config.patch_size**2 * 3)
    mask_image = mae.unpatchify(patch_mask)  # [N, C, H, W], 1 = masked
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)

    def to_numpy(batch: torch.Tensor) -> np.ndarray:
        return (batch * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    originals = to_numpy(images)
    grey = torch.full_like(images, 0.5)
    grey = (grey - mean) / std
    masked = to_numpy(images * (1 - mask_image) + grey * mask_image)
    # As in the MAE paper: the reconstruction with the visible patches pasted back.
    reconstructions = to_numpy(images * (1 - mask_image) + pixels * mask_image)
    grid = mae.grid_size
    heatmaps = patch_maps(decision, grid)
    if not heatmaps and priors:  # no probability to show: how often the policy masks each patch
        draws = [
            decide(mae, policy, images, config.mask_ratio, weighting, priors)[2].mask
            for _ in range(FREQUENCY_DRAWS)
        ]
        frequency = torch.stack(draws).float().mean(0).reshape(-1, grid, grid).cpu().numpy()
        heatmaps = {f"mask frequency ({FREQUENCY_DRAWS} draws)": frequency}
    prior_maps, prior_label = None, "prior"
    if priors:
        shown = sorted(priors)[0]
        prior_maps, prior_label = priors[shown].cpu().numpy(), f"prior: {config.prior} {shown}"
    path = output or run.plots / f"masks_{pointer}.png"
    plot_mask_grid(
        originals,
        masked,
        reconstructions,
        path,
        heatmaps=heatmaps or None,
        priors=prior_maps,
        prior_label=prior_label,
        title=f"{run.path.name}: {config.policy}, {drawn}",
    )
    console.print(f"saved [cyan]{path}[/] ({count} test images, policy {config.policy}, {drawn})")
    return path
