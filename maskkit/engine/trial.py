"""``maskkit trial``: a paired fork test of two mask policies from one checkpoint.

From a run's checkpoint the encoder is forked N times. In fork ``i`` two *arms* start from the
very same state (the MAE's weights and the pretrain level's AdamW state) and each takes K steps
of the plain pretrain level (level 1 alone: no MLO, the policies frozen) on the very same batches
(same images in the same order, same crop and flip draws); they differ only in the policy that
masks the patches, A in one arm and B (default ``random``) in the other. Torch's global
generator, which policies draw from, is reset to the same per-fork seed at the start of each
arm, so ``random`` against ``random`` gives exactly the same encoder unless the arms get
different mask seeds. Forks differ by their batch order and augmentation draws.

Each arm's encoder is scored by a class-balanced linear probe on its frozen CLS features:
scikit-learn's ``LogisticRegression(class_weight="balanced")`` at one fixed ``C`` on standardised
features of ``probe_images`` training images (the same images for every fork and arm), scored on
the dataset's val split (never test) by its cross-entropy (log loss) and balanced accuracy. The
paired differences A − B over the forks give a mean and a 95 % Student-t interval per metric.

Design choices (docs/trial.md):

- **Loss**: the run's ``pretrain.weighting`` (:mod:`maskkit.weighting`) applied to the policy's
  weights, as the run's pretrain level computes it; the policy's own pretrain-level loss (hpm's
  predictor) is not added, since the policy is frozen. For ``random`` every weighting is plain MAE.
- **Optimiser**: the checkpoint's pretrain-level AdamW moments when the checkpoint holds them
  (a stage-1 checkpoint), else a fresh AdamW, identical in both arms. The learning rate is held
  constant at the run's pretrain-level base rate (``--lr`` to change): at the end of stage 1 the
  cosine schedule is at zero, and K steps at zero would change nothing.
- **Probe C**: chosen once, on the starting encoder, from :data:`LINEAR_PROBE_C` by val
  cross-entropy (or given), then fixed for every fork and arm, so that both arms of a pair are
  scored by the very same procedure.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from maskkit.checkpoint import Checkpoint, checkpoint_path, load_checkpoint
from maskkit.config import RunConfig, deep_merge, load_run_config, validate_config
from maskkit.data import DeviceBatches, ImageSplit
from maskkit.engine.context import RunContext
from maskkit.engine.objectives import masked_reconstruction
from maskkit.engine.optim import adamw, parameter_groups
from maskkit.engine.policy_calls import checked_set_progress
from maskkit.engine.priors import check_prior_choice
from maskkit.engine.protocols import LINEAR_PROBE_C, LINEAR_PROBE_MAX_ITER, Features, encoder_features
from maskkit.engine.run import prepare
from maskkit.errors import ConfigError, TrainingDivergedError
from maskkit.masking import LearnedMasking
from maskkit.models import MaskedAutoencoderViT
from maskkit.plugins import create_policy, policy_info
from maskkit.policy import MaskPolicy, policy_context
from maskkit.progress import progress_display
from maskkit.report.statistics import paired_difference
from maskkit.rundir import RunDir, atomic_write_text
from maskkit.weighting import loss_weighting

#: The metrics of a trial, by JSON key: what each arm's probe is scored by on val.
METRICS: dict[str, str] = {
    "val_cross_entropy": "val cross-entropy (lower is better)",
    "balanced_accuracy": "val balanced accuracy (higher is better)",
}
DEFAULT_POINTER = "last"
#: Where a learned policy's trained state is looked for when the chosen checkpoint has none (a
#: fine-tuning checkpoint saves no policy).
POLICY_FALLBACK_POINTER = "pretrained"


@dataclass(frozen=True)
class RunSource:
    """``RUN_DIR[:POINTER]``: a run directory and the checkpoint pointer in it."""

    path: Path
    pointer: str = DEFAULT_POINTER

    @classmethod
    def parse(cls, text: str) -> RunSource:
        """``runs/x`` → (runs/x, last); ``runs/x:pretrained`` → (runs/x, pretrained)."""
        head, separator, tail = text.rpartition(":")
        if separator and tail and "/" not in tail and head:
            return cls(Path(head), tail)
        return cls(Path(text))

    def __str__(self) -> str:
        return f"{self.path}:{self.pointer}"


@dataclass(frozen=True)
class ArmSpec:
    """One arm of the trial: the policy that masks, its options and where its state comes from.

    Attributes:
        policy: the policy's name (any installed policy, third-party ones included).
        options: policy options given on the command line, merged over the run's when the
            policy is the run's.
        mask_ratio: the arm's mask ratio (None: the run's).
        mask_seed: mixed into the seed of torch's global generator at the start of each arm.
        state_from: the run whose checkpoint holds the policy's trained state (None: the forked
            run when the policy is its policy, else the policy's initialisation).
        inverse: mask with the policy's inverse, its logits negated (−z; learned policies only,
            :attr:`maskkit.masking.LearnedMasking.inverted`).
    """

    policy: str
    options: dict[str, Any] = field(default_factory=dict)
    mask_ratio: float | None = None
    mask_seed: int = 0
    state_from: RunSource | None = None
    inverse: bool = False


#: How an arm's learning rate runs over its K steps: ``constant`` at the trial's lr; ``decay``
#: linearly from it to 0 (step k of K at lr·(1 − k/K)), as a run's schedule ends its training.
LrSchedule = Literal["constant", "decay"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)


def arm_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of an arm's pretrain step ``step`` (0-based) of ``steps``."""
    return lr if schedule == "constant" else lr * (1 - step / steps)


@dataclass(frozen=True)
class TrialSettings:
    """What a trial runs: ``forks`` pairs of ``steps`` pretrain steps, A against B."""

    source: RunSource
    arm_a: ArmSpec
    arm_b: ArmSpec
    forks: int = 8
    steps: int = 40
    probe_images: int = 2000
    probe_c: float | None = None
    seed: int = 0
    lr: float | None = None
    lr_schedule: LrSchedule = "decay"
    prior: str | None = None
    device: str | None = None

    def check(self) -> None:
        if self.forks < 2:
            raise ConfigError(f"--forks {self.forks}: a trial needs at least 2 forks for an interval")
        if self.steps < 1 or self.probe_images < 2:
            raise ConfigError("--steps must be at least 1 and --probe-images at least 2")
        if self.probe_c is not None and not self.probe_c > 0:
            raise ConfigError(f"--probe-c {self.probe_c}: the probe's C must be positive")
        if self.lr is not None and not self.lr >= 0:
            raise ConfigError(f"--lr {self.lr}: the learning rate must be 0 or more")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")


@dataclass
class Arm:
    """A built arm: its policy (frozen), the policy's state to restore, its mask ratio."""

    spec: ArmSpec
    policy: MaskPolicy
    state: dict[str, torch.Tensor]
    mask_ratio: float
    options: dict[str, Any]
    state_source: str


@dataclass
class TrialSetup:
    """Everything the forks share: the run, the starting state, the two arms, the probe data."""

    context: RunContext
    config: RunConfig
    checkpoint: Checkpoint
    mae_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    lr: float
    arms: dict[str, Arm]
    probe_split: ImageSplit
    val_split: ImageSplit
    num_classes: int


# --- seeds ---------------------------------------------------------------------------------------


def derived_seed(*parts: int) -> int:
    """A 62-bit seed drawn from ``parts`` (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 2)


def batch_seed(seed: int, fork: int) -> int:
    """The seed of fork ``fork``'s batch order and augmentation draws (shared by both arms)."""
    return derived_seed(seed, fork, 0)


def mask_seed(seed: int, fork: int, arm_mask_seed: int) -> int:
    """The seed torch's global generator gets at the start of an arm of fork ``fork``."""
    return derived_seed(seed, fork, 1, arm_mask_seed)


# --- opening the run -------------------------------------------------------------------------------


def require_checkpoint(source: RunSource) -> RunDir:
    """``source``'s run dir, refused in one line when it is none or lacks the pointer."""
    run = RunDir.open(source.path)
    if checkpoint_path(run.checkpoints, source.pointer) is None:
        pointers = sorted(p.stem for p in run.checkpoints.glob("*.json")) if run.checkpoints.is_dir() else []
        raise ConfigError(
            f"{source.path} has no '{source.pointer}' checkpoint; pick one of "
            f"{', '.join(pointers) or '(none yet: the run has saved no checkpoint)'} after the colon "
            "(RUN_DIR:POINTER)"
        )
    return run


def _policy_state(source: RunSource, device: torch.device) -> tuple[dict[str, torch.Tensor], str] | None:
    """The ``policy`` weights of ``source``'s checkpoint, or of its run's ``pretrained`` one when
    the pointer's has none (a fine-tuning checkpoint); None when neither holds a policy."""
    for pointer in dict.fromkeys((source.pointer, POLICY_FALLBACK_POINTER)):
        candidate = RunSource(source.path, pointer)
        run = RunDir.open(source.path)
        if checkpoint_path(run.checkpoints, pointer) is None:
            continue
        weights = load_checkpoint(run.checkpoints, pointer, map_location=str(device)).weights
        if "policy" in weights:
            return weights["policy"], str(candidate)
    return None


def _arm_config(config: RunConfig, spec: ArmSpec, prior: str | None) -> RunConfig:
    """The run's config with the arm's policy, ratio and prior (validated: a ratio that keeps no
    token is refused here)."""
    override: dict[str, Any] = {"policy": spec.policy}
    if spec.mask_ratio is not None:
        override["mask_ratio"] = spec.mask_ratio
    if prior is not None:
        override["prior"] = prior
    if not policy_info(spec.policy).requires:
        override["prior"] = None
    return validate_config(deep_merge(config.model_dump(mode="json"), override))


def _build_arm(
    spec: ArmSpec,
    config: RunConfig,
    run_config: RunConfig,
    source: RunSource,
    mae: MaskedAutoencoderViT,
    device: torch.device,
    arm_name: str,
) -> Arm:
    """Arm ``arm_name``'s (A or B) policy with its options and trained state, frozen (no parameter trains).
    ``config`` is the arm's (the run's with the arm's policy and ratio), ``run_config`` the run's."""
    state_run = spec.state_from or source
    state_config = (
        run_config if spec.state_from is None else load_run_config(RunDir.open(state_run.path).config_path)
    )
    options = dict(state_config.policy_options) if state_config.policy == spec.policy else {}
    options.update(spec.options)
    torch.manual_seed(config.seed)  # the policy's initial draw does not depend on what ran before
    # The state's run says how its learned mask was built (pretrain.learned_mask: mlo's input).
    context = policy_context(mae, state_config.pretrain.learned_mask)
    policy = create_policy(spec.policy, context, options).to(device)
    state_source = "initialisation" if policy.state_dict() else "none (the policy holds no state)"
    if policy.state_dict() and (spec.state_from is not None or state_config.policy == spec.policy):
        found = _policy_state(state_run, device)
        if found is None and spec.state_from is not None:
            raise ConfigError(f"{state_run.path} holds no checkpoint with a policy state (--policy-from)")
        if found is not None:
            weights, state_source = found
            try:
                policy.load_state_dict(weights)
            except RuntimeError as error:
                detail = str(error).strip().splitlines()[0]
                raise ConfigError(
                    f"the policy state of {state_source} does not fit policy '{spec.policy}' with options "
                    f"{options} on this run's model ({detail}); give a run of the same model and policy"
                ) from None
    if spec.inverse:
        if not isinstance(policy, LearnedMasking):
            flag = "--inverse" if arm_name == "A" else "--against-inverse"
            raise ConfigError(
                f"{flag}: policy '{spec.policy}' has no logits to negate; the inverse (−z) exists for "
                "the learned policies built on maskkit.masking.LearnedMasking (mlo, mlo-light, "
                "semantic-soft, constraint)"
            )
        policy.inverted = True
    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    ratio = config.mask_ratio if spec.mask_ratio is None else spec.mask_ratio
    state = {key: value.detach().clone() for key, value in policy.state_dict().items()}
    return Arm(spec, policy, state, ratio, options, state_source)


def _pretrain_optimizer_state(
    checkpoint: Checkpoint, mae: MaskedAutoencoderViT, config: RunConfig
) -> dict | None:
    """The checkpoint's pretrain-level AdamW state for the MAE's parameter groups, or None when
    the checkpoint holds none (a fine-tuning checkpoint) or its groups do not match."""
    saved = checkpoint.state.get("optimizers", {}).get("pretrain")
    if saved is None:
        return None
    groups = parameter_groups(mae, config.pretrain.mae.weight_decay)
    saved_groups = saved["param_groups"][: len(groups)]  # the policy's own groups follow the MAE's
    if len(saved_groups) < len(groups) or any(
        len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups, strict=True)
    ):
        return None
    indices = {index for group in saved_groups for index in group["params"]}
    return {
        "state": {index: value for index, value in saved["state"].items() if index in indices},
        "param_groups": saved_groups,
    }


def open_trial(settings: TrialSettings, console: Console) -> TrialSetup:
    """Open the run, load the checkpoint, build both arms and pick the probe's images."""
    settings.check()
    run = require_checkpoint(settings.source)  # every source is checked before the data loads
    for spec in (settings.arm_a, settings.arm_b):
        if spec.state_from is not None:
            require_checkpoint(spec.state_from)
    config = load_run_config(run.config_path)
    if settings.device is not None:
        config = validate_config(deep_merge(config.model_dump(mode="json"), {"device": settings.device}))
    arm_configs = {
        name: _arm_config(config, spec, settings.prior)
        for name, spec in (("A", settings.arm_a), ("B", settings.arm_b))
    }
    needing = [name for name, cfg in arm_configs.items() if policy_info(cfg.policy).requires]
    for name in needing:
        check_prior_choice(arm_configs[name], policy_info(arm_configs[name].policy).requires)
    data_config = arm_configs[needing[0]] if needing else arm_configs["A"]
    device, dataset, splits = prepare(data_config, console, with_priors=bool(needing))
    checkpoint = load_checkpoint(run.checkpoints, settings.source.pointer, map_location=str(device))
    if "mae" not in checkpoint.weights:
        raise ConfigError(f"the checkpoint {settings.source} holds no MAE weights; pick another pointer")
    context = RunContext(config, device, dataset, splits, run, console)
    mae = MaskedAutoencoderViT(config.model).to(device)
    mae.load_state_dict(checkpoint.weights["mae"])
    arms = {
        name: _build_arm(spec, arm_configs[name], config, settings.source, mae, device, name)
        for name, spec in (("A", settings.arm_a), ("B", settings.arm_b))
    }
    total = _run_pretrain_steps(config, len(splits.pretrain))
    step = int(checkpoint.state.get("step", total))
    for arm in arms.values():
        checked_set_progress(arm.policy, min(step, total), total)  # frozen where the run stood
    chooser = torch.Generator().manual_seed(derived_seed(settings.seed, 2))
    count = min(settings.probe_images, len(splits.pretrain))
    probe_split = splits.pretrain.subset(torch.randperm(len(splits.pretrain), generator=chooser)[:count])
    return TrialSetup(
        context=context,
        config=config,
        checkpoint=checkpoint,
        mae_state={key: value.detach().clone() for key, value in mae.state_dict().items()},
        optimizer_state=_pretrain_optimizer_state(checkpoint, mae, config),
        lr=config.pretrain.mae.lr if settings.lr is None else settings.lr,
        arms=arms,
        probe_split=probe_split,
        val_split=splits.eval,
        num_classes=dataset.num_classes,
    )


def _run_pretrain_steps(config: RunConfig, pretrain_images: int) -> int:
    """Stage 1's length in the run (as :func:`maskkit.engine.pretrain.pretrain_steps`)."""
    levels = config.pretrain
    if levels.steps is not None:
        return max(1, levels.steps)
    return max(1, math.ceil(levels.epochs * pretrain_images / levels.mae.batch_size))


# --- one arm ---------------------------------------------------------------------------------------


def arm_optimizer(setup: TrialSetup, mae: MaskedAutoencoderViT) -> torch.optim.AdamW:
    """The pretrain level's AdamW over ``mae``: the checkpoint's moments when it holds them (a
    copy: every arm starts from the same state), at the trial's constant learning rate."""
    level = setup.config.pretrain.mae
    optimizer = adamw(parameter_groups(mae, level.weight_decay), setup.lr, level.weight_decay, level.betas)
    if setup.optimizer_state is not None:
        optimizer.load_state_dict(copy.deepcopy(setup.optimizer_state))
    for group in optimizer.param_groups:  # constant lr, whatever the schedule had reached
        group["lr"] = setup.lr
    return optimizer


def train_arm(setup: TrialSetup, arm: Arm, fork: int, settings: TrialSettings) -> MaskedAutoencoderViT:
    """A fresh copy of the starting MAE after ``settings.steps`` pretrain steps masked by ``arm``'s
    policy, on fork ``fork``'s batches, from the starting optimiser state."""
    context, config = setup.context, setup.config
    device = context.device
    mae = MaskedAutoencoderViT(config.model).to(device)
    mae.load_state_dict(setup.mae_state)
    mae.train()
    level = config.pretrain.mae
    optimizer = arm_optimizer(setup, mae)
    arm.policy.load_state_dict(arm.state)
    arm.policy.train()
    weighting = loss_weighting(config.pretrain.weighting, config.pretrain.tempered_alpha)
    batches = DeviceBatches(
        setup.context.splits.pretrain,
        level.batch_size,
        device,
        context.mean,
        context.std,
        augment=config.pretrain.augment,
        seed=batch_seed(settings.seed, fork),
        priors=sorted(arm.policy.requires),
    )
    torch.manual_seed(mask_seed(settings.seed, fork, arm.spec.mask_seed))
    for step in range(settings.steps):
        batch = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = arm_lr(setup.lr, settings.lr_schedule, step, settings.steps)
        optimizer.zero_grad(set_to_none=True)
        with context.autocast():
            loss = masked_reconstruction(
                mae, arm.policy, batch.images, arm.mask_ratio, weighting, batch.priors
            ).loss
        if not bool(torch.isfinite(loss)):
            raise TrainingDivergedError(
                f"the trial's pretrain loss became non-finite under policy '{arm.spec.policy}'; lower --lr"
            )
        loss.backward()
        optimizer.step()
    mae.eval()
    return mae


# --- the probe -------------------------------------------------------------------------------------


@dataclass
class ProbeData:
    """Frozen features of the probe's training images and of val, for one encoder."""

    train: Features
    val: Features


def probe_features(setup: TrialSetup, mae: MaskedAutoencoderViT) -> ProbeData:
    """CLS features ``[N, D]`` of the probe images and of the val split under ``mae``'s encoder."""
    context = setup.context
    arguments = (
        context.config.data.eval_batch_size,
        context.device,
        context.mean,
        context.std,
        context.autocast,
    )
    return ProbeData(
        encoder_features(mae.features, setup.probe_split, *arguments),
        encoder_features(mae.features, setup.val_split, *arguments),
    )


def probe_scores(data: ProbeData, c: float, num_classes: int) -> dict[str, float]:
    """A class-balanced multinomial logistic regression at ``c`` on standardised train features,
    scored on val: ``{"val_cross_entropy", "balanced_accuracy", "converged"}``. Classes absent
    from the probe's images get probability 1e-15 (as ``log_loss`` clips)."""
    scaler = StandardScaler().fit(data.train.values)
    train_x, val_x = scaler.transform(data.train.values), scaler.transform(data.val.values)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=LINEAR_PROBE_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_x, data.train.labels)
    probabilities = np.zeros((len(val_x), num_classes))
    probabilities[:, model.classes_] = model.predict_proba(val_x)
    predictions = probabilities.argmax(axis=1)
    floored = np.clip(probabilities, 1e-15, 1.0)
    floored /= floored.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a predicted class absent from val
        balanced = balanced_accuracy_score(data.val.labels, predictions)
    return {
        "val_cross_entropy": float(log_loss(data.val.labels, floored, labels=list(range(num_classes)))),
        "balanced_accuracy": float(balanced),
        "converged": bool(np.all(model.n_iter_ < LINEAR_PROBE_MAX_ITER)),
    }


def choose_c(data: ProbeData, num_classes: int) -> tuple[float, dict[str, float]]:
    """The C of :data:`LINEAR_PROBE_C` with the lowest val cross-entropy on ``data`` (the
    starting encoder's); returns it and the cross-entropy of every C."""
    scores = {c: probe_scores(data, c, num_classes)["val_cross_entropy"] for c in LINEAR_PROBE_C}
    return min(scores, key=lambda c: (scores[c], c)), {str(c): v for c, v in scores.items()}


# --- the whole trial --------------------------------------------------------------------------------


def paired_summary(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired A − B over the forks: ``{"mean", "ci95": [lo, hi], "per_fork", "a", "b"}`` (the
    interval is Student-t with n − 1 degrees of freedom, scipy.stats.t)."""
    difference = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert difference is not None and difference.low is not None and difference.high is not None
    return {
        "mean": difference.mean,
        "ci95": [difference.low, difference.high],
        "excludes_zero": difference.excludes_zero,
        "per_fork": [x - y for x, y in zip(a, b, strict=True)],
        "a": list(a),
        "b": list(b),
    }


def _arm_settings(arm: Arm) -> dict[str, Any]:
    return {
        "policy": arm.spec.policy,
        "options": arm.options,
        "mask_ratio": arm.mask_ratio,
        "mask_seed": arm.spec.mask_seed,
        "inverse": arm.spec.inverse,
        "policy_state": arm.state_source,
    }


def _status(values: dict[str, dict[str, list[float]]]) -> str:
    """The progress bar's status: the running mean A − B of each metric."""
    parts = []
    for metric, short in (("val_cross_entropy", "Δ val CE"), ("balanced_accuracy", "Δ bal. acc.")):
        a, b = values["A"][metric], values["B"][metric]
        parts.append(f"{short} {np.mean(np.subtract(a, b)):+.4f}")
    return "  ".join(parts)


def run_trial(settings: TrialSettings, console: Console) -> dict[str, Any]:
    """Run the trial; returns what ``--json`` writes (settings, metrics, cost)."""
    started, started_cpu = time.perf_counter(), time.process_time()
    setup = open_trial(settings, console)
    start_features = probe_features(setup, _starting_mae(setup))
    if settings.probe_c is None:
        c, c_scores = choose_c(start_features, setup.num_classes)
        c_choice: dict[str, Any] = {
            "chosen_on": "the starting encoder, by val cross-entropy",
            "scores": c_scores,
        }
    else:
        c, c_choice = settings.probe_c, {"chosen_on": "given (--probe-c)"}
    baseline = probe_scores(start_features, c, setup.num_classes)
    console.print(
        f"trial of [green]{settings.arm_a.policy}[/] against [green]{settings.arm_b.policy}[/] from "
        f"[cyan]{settings.source}[/] (step {setup.checkpoint.state.get('step', '?')}): "
        f"{settings.forks} forks × "
        f"{settings.steps} steps, probe C {c:g} on {len(setup.probe_split)} images, "
        f"val {len(setup.val_split)} images; starting encoder: val CE {baseline['val_cross_entropy']:.4f}, "
        f"balanced accuracy {baseline['balanced_accuracy']:.4f}",
        highlight=False,
    )
    values: dict[str, dict[str, list[float]]] = {arm: {m: [] for m in METRICS} for arm in setup.arms}
    converged = True
    with progress_display(console) as progress:
        task = progress.add_task("trial forks", total=settings.forks, status="")
        for fork in range(settings.forks):
            for name, arm in setup.arms.items():
                scores = probe_scores(
                    probe_features(setup, train_arm(setup, arm, fork, settings)), c, setup.num_classes
                )
                converged &= scores["converged"]
                for metric in METRICS:
                    values[name][metric].append(scores[metric])
            progress.update(task, status=_status(values))
            progress.advance(task)
    metrics = {metric: paired_summary(values["A"][metric], values["B"][metric]) for metric in METRICS}
    seconds = time.perf_counter() - started
    return {
        "settings": {
            "run": str(settings.source.path),
            "pointer": settings.source.pointer,
            "checkpoint_step": setup.checkpoint.state.get("step"),
            "checkpoint_stage": setup.checkpoint.state.get("stage"),
            "dataset": setup.config.data.dataset,
            "preset": setup.config.preset,
            "A": _arm_settings(setup.arms["A"]),
            "B": _arm_settings(setup.arms["B"]),
            "forks": settings.forks,
            "steps": settings.steps,
            "seed": settings.seed,
            "lr": setup.lr,
            "lr_schedule": settings.lr_schedule,
            "weighting": setup.config.pretrain.weighting,
            "batch_size": setup.config.pretrain.mae.batch_size,
            "augment": setup.config.pretrain.augment,
            "optimizer_state": "checkpoint" if setup.optimizer_state is not None else "fresh",
            "probe": {
                "C": c,
                **c_choice,
                "class_weight": "balanced",
                "train_images": len(setup.probe_split),
                "train_source": "random subset of the pretrain split (the run's training images)",
                "val_images": len(setup.val_split),
                "val_source": setup.context.splits.eval_source,
                "converged": converged,
            },
            "device": str(setup.context.device),
            "threads": torch.get_num_threads(),
        },
        "starting_encoder": {metric: baseline[metric] for metric in METRICS},
        "metrics": metrics,
        "cost": {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(time.process_time() - started_cpu, 2),
            "seconds_per_fork": round(seconds / settings.forks, 2),
            "pretrain_steps": 2 * settings.forks * settings.steps,
            "forks": settings.forks,
            "steps_per_arm": settings.steps,
        },
    }


def _starting_mae(setup: TrialSetup) -> MaskedAutoencoderViT:
    mae = MaskedAutoencoderViT(setup.config.model).to(setup.context.device)
    mae.load_state_dict(setup.mae_state)
    return mae.eval()


def print_trial(result: dict[str, Any], console: Console) -> None:
    """The trial's table: per metric, the paired mean A − B, its 95 % interval and each arm's mean."""
    settings = result["settings"]
    a, b = settings["A"]["policy"], settings["B"]["policy"]
    table = Table(title=f"trial: {a} (A) − {b} (B), {settings['forks']} forks × {settings['steps']} steps")
    for column in ("metric", "mean A − B", "95 % interval", "mean A", "mean B", "excludes 0"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, description in METRICS.items():
        summary = result["metrics"][metric]
        low, high = summary["ci95"]
        table.add_row(
            description,
            f"{summary['mean']:+.4f}",
            f"[{low:+.4f}, {high:+.4f}]",
            f"{np.mean(summary['a']):.4f}",
            f"{np.mean(summary['b']):.4f}",
            "yes" if summary["excludes_zero"] else "no",
        )
    console.print(table)
    cost = result["cost"]
    console.print(
        f"cost: {cost['seconds']:.1f} s ({cost['seconds_per_fork']:.1f} s per fork), "
        f"{cost['pretrain_steps']} pretrain steps",
        highlight=False,
    )


def write_trial(result: dict[str, Any], path: Path) -> Path:
    """``result`` as indented JSON at ``path`` (written atomically; folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return path


__all__ = [
    "ArmSpec",
    "RunSource",
    "TrialSettings",
    "paired_summary",
    "print_trial",
    "run_trial",
    "write_trial",
]
