"""Stage 1: MAE pretraining, as the three-level MLO loop when the policy is learnable.

The levels (pretrain, finetune, mask) are described in betty-free terms
(:class:`~maskkit.engine.betty_glue.LevelSpec`) and stepped by
:class:`~maskkit.engine.betty_glue.MultiLevelOptimizer`. A policy with ``learnable = False``
runs the pretrain level alone.

With several processes every process runs this loop in step; each level's batches are the
process's slices of the global batches, and the averaging across processes happens in the
betty glue. Logged values are those of the global batch; rank 0 writes them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.autograd.profiler import record_function

from maskkit.checkpoint import Checkpoint
from maskkit.data import DeviceBatches, class_capped_subset
from maskkit.distributed import gather_rows, mean_of, rank, restore_rng_state, world_size
from maskkit.engine.betty_glue import FunctionalLoss, LevelSpec, MultiLevelOptimizer
from maskkit.engine.class_weights import class_balanced_weights
from maskkit.engine.compiled import step_passes
from maskkit.engine.context import RunContext
from maskkit.engine.diagnostics import global_batch, mask_statistics, split_mask_statistics
from maskkit.engine.head_refit import RefitFeatures, refit_head
from maskkit.engine.mask_health import MaskHealth
from maskkit.engine.objectives import MLOObjectives
from maskkit.engine.optim import adamw_from_config, cosine_schedule, parameter_groups
from maskkit.engine.policy_calls import (
    checked_set_progress,
    checked_statistics,
    distribution_of,
    plugin_code,
)
from maskkit.errors import PluginError, TrainingDivergedError
from maskkit.models import ClassifierHead, MaskedAutoencoderViT, ViTClassifier
from maskkit.policy import MASK_LEVEL, PRETRAIN_LEVEL, MaskPolicy
from maskkit.runtime import rng_state
from maskkit.weighting import loss_weighting


def pretrain_steps(context: RunContext) -> int:
    """Pretrain-level steps: ``pretrain.steps`` if set, else epochs over all training images."""
    config = context.config.pretrain
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * len(context.splits.pretrain) / config.mae.batch_size))


def policy_pretrain_parameters(policy: MaskPolicy) -> list[torch.nn.Parameter]:
    """The policy's parameters that the pretrain level trains (:meth:`MaskPolicy.pretrain_parameters`),
    checked to be its own; the rest of a learnable policy's parameters are level 3's."""
    if PRETRAIN_LEVEL not in policy.training_levels():
        return []
    with plugin_code(policy, "pretrain_parameters"):
        chosen = list(policy.pretrain_parameters())
    own = {id(p) for p in policy.parameters()}
    if any(not isinstance(p, torch.nn.Parameter) or id(p) not in own for p in chosen):
        raise PluginError(
            f"mask policy '{policy.name}' ({distribution_of(policy)}): pretrain_parameters() must "
            "yield parameters of the policy itself (nn.Parameter attributes of the policy module)"
        )
    return chosen


@dataclass
class PretrainResult:
    steps: int
    level_steps: dict[str, int]
    evaluation_counts: dict[str, int]
    seconds: float
    best_eval_accuracy: float | None = None
    evaluations: list[dict] = field(default_factory=list)
    mask_statistics: dict[str, float] = field(default_factory=dict)


@dataclass
class Pretrainer:
    """Builds the levels of stage 1 and runs them with progress, metrics and checkpoints."""

    context: RunContext
    mae: MaskedAutoencoderViT
    policy: MaskPolicy
    head: ClassifierHead | None

    def __post_init__(self) -> None:
        config, device = self.context.config, self.context.device
        self.total_steps = pretrain_steps(self.context)
        self.weighting = loss_weighting(config.pretrain.weighting, config.pretrain.tempered_alpha)
        self.policy_pretrain_parameters = policy_pretrain_parameters(self.policy)
        self.objectives = MLOObjectives(
            mae=self.mae,
            policy=self.policy,
            head=self.head,
            mask_ratio=config.mask_ratio,
            autocast=self.context.autocast,
            weighting=self.weighting,
            class_weights=self._class_weights() if config.pretrain.class_balanced else None,
            passes=step_passes(config.compile),
        )
        self.batches = {
            "pretrain": self._batches(self.context.splits.pretrain, config.pretrain.mae.batch_size, 1),
        }
        specs = {"pretrain": self._pretrain_spec()}
        if MASK_LEVEL in self.policy.training_levels():
            if self.head is None:
                raise ValueError("a learnable policy needs the level-2 head")
            levels = config.pretrain
            self.batches["finetune"] = self._batches(self.context.splits.finetune, levels.head.batch_size, 2)
            self.batches["mask"] = self._batches(self.context.splits.mask_val, levels.mask.batch_size, 3)
            specs["finetune"] = self._finetune_spec()
            specs["mask"] = self._mask_spec()
        self.mlo = MultiLevelOptimizer(specs, device, self.total_steps, config.pretrain.hypergradient)
        self.health: MaskHealth | None = None
        self.refit_features: RefitFeatures | None = None  # E's features for the head refit
        self.last_refit = 0  # the mask step of the latest head refit
        self.mask_stepped = False  # whether the latest step ended with a mask step
        if self.mlo.is_multilevel:
            assert self.head is not None
            context = self.context
            self.health = MaskHealth(
                self.mae,
                self.policy,
                self.head,
                context.splits.eval,
                context.splits.mask_val,
                config.mask_ratio,
                self.weighting,
                context.mean,
                context.std,
                context.autocast,
                config.pretrain.mask.batch_size,
                config.seed,
            )
            learned = config.pretrain.learned_mask
            if learned.head_refit_every is not None:
                subset = class_capped_subset(context.splits.finetune, learned.head_refit_images, config.seed)
                self.refit_features = RefitFeatures(subset, learned.head_refit_refresh)
        self.best_accuracy: float | None = None
        self.evaluations: list[dict] = []
        self.last_health: dict = {}  # the latest health record (mask_health.py)
        # The policy's statistics as a resumed checkpoint saved them: a record logs them until the
        # policy reports its own (a statistic of its last regulariser batch is not in its weights).
        self.resumed_statistics: dict[str, float] = {}
        self.diagnostics_every = max(1, self.total_steps // 25)  # pretrain steps between records
        self.pending_snr: float | None = None  # the latest step's hypergradient probe, to log
        self.start_step = 0
        self.seconds_before = 0.0
        self._started = time.perf_counter()

    def _class_weights(self) -> torch.Tensor:
        """Inverse class frequencies of the finetune split, ``[classes]``, mean 1 over samples."""
        labels = self.context.splits.finetune.labels
        return class_balanced_weights(labels, self.context.dataset.num_classes).to(self.context.device)

    def _batches(self, split, batch_size: int, stream: int) -> DeviceBatches:
        """Batches of ``split`` with the priors the policy reads, cropped and flipped with
        their images (every level's policy call, the hypergradient's included, sees them)."""
        config = self.context.config
        return DeviceBatches(
            split,
            batch_size,
            self.context.device,
            self.context.mean,
            self.context.std,
            augment=config.pretrain.augment,
            seed=config.seed * 1000 + stream,
            priors=sorted(self.policy.requires),
            rank=rank(),
            world_size=world_size(),
        )

    def level_steps(self, level: str) -> int:
        """Steps level ``level`` takes over the whole run (its cosine schedule's length)."""
        levels = self.context.config.pretrain
        if level == "pretrain":
            return self.total_steps
        if level == "finetune":
            return max(1, self.total_steps // levels.mae.unroll_steps)
        return max(1, self.total_steps // (levels.mae.unroll_steps * levels.head.unroll_steps))

    def _pretrain_spec(self) -> LevelSpec:
        level = self.context.config.pretrain.mae
        policy_part = self.policy_pretrain_parameters
        groups = parameter_groups(self.mae, level.weight_decay)
        groups += parameter_groups(self.policy, level.weight_decay, only=policy_part)
        optimizer = adamw_from_config(groups, level, self.context.fused_adamw)
        return LevelSpec(
            name="pretrain",
            module=self.mae,
            optimizer=optimizer,
            scheduler=cosine_schedule(optimizer, self.level_steps("pretrain")),
            next_batch=self.batches["pretrain"].next,
            loss=self.objectives.pretrain_loss,
            hypergradient_loss=lambda batch: self.objectives.pretrain_loss(batch, "hypergradient"),
            functional=FunctionalLoss(
                self.objectives.pretrain_pair, self.objectives.pretrain_loss_at, self.context.autocast
            ),
            unroll_steps=level.unroll_steps,
            extra_parameters=policy_part,
        )

    def _finetune_spec(self) -> LevelSpec:
        level = self.context.config.pretrain.head
        optimizer = adamw_from_config(self.head, level, self.context.fused_adamw)
        objectives = self.objectives
        return LevelSpec(
            name="finetune",
            module=self.head,
            optimizer=optimizer,
            scheduler=cosine_schedule(optimizer, self.level_steps("finetune")),
            next_batch=self.batches["finetune"].next,
            loss=objectives.finetune_loss,
            hypergradient_loss=objectives.finetune_hypergradient_loss,
            functional=FunctionalLoss(
                objectives.finetune_pair, objectives.finetune_loss_at, self.context.autocast
            ),
            unroll_steps=level.unroll_steps,
        )

    def _mask_spec(self) -> LevelSpec:
        level = self.context.config.pretrain.mask
        pretrain_part = self.policy_pretrain_parameters
        optimizer = adamw_from_config(
            parameter_groups(self.policy, level.weight_decay, exclude=pretrain_part),
            level,
            self.context.fused_adamw,
        )
        # T stays frozen while the masks are random (the random warm-up), then its lr warms up.
        steps, learned = self.level_steps("mask"), self.context.config.pretrain.learned_mask
        frozen = int(learned.random_warmup * steps)
        warmup = int(learned.lr_warmup * (steps - frozen))
        return LevelSpec(
            name="mask",
            module=self.policy,
            optimizer=optimizer,
            scheduler=cosine_schedule(optimizer, steps, warmup_steps=warmup, frozen_steps=frozen),
            next_batch=self.batches["mask"].next,
            loss=self.objectives.mask_loss,
            unroll_steps=level.unroll_steps,
            excluded_parameters=pretrain_part,
        )

    # --- state ------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        modules = {"mae": self.mae, "policy": self.policy}
        if self.head is not None:
            modules["head"] = self.head
        return modules

    def training_state(self, step: int) -> dict:
        levels = self.mlo.levels
        return {
            "stage": "pretrain",
            "step": step,
            "mlo": self.mlo.state_dict(),
            "optimizers": {name: level.optimizer.state_dict() for name, level in levels.items()},
            "schedulers": {name: level.scheduler.state_dict() for name, level in levels.items()},
            "batches": {name: batches.state_dict() for name, batches in self.batches.items()},
            "rng": rng_state(),
            "best_accuracy": self.best_accuracy,
            "evaluation_counts": dict(self.objectives.counts),
            "evaluations": list(self.evaluations),
            "seconds": self.seconds_before + time.perf_counter() - self._started,
            "health": self.health.state_dict() if self.health is not None else None,
            "last_health": dict(self.last_health),
            "last_refit": self.last_refit,
            # What the next record would log of the latest steps, so a resumed run logs the same.
            "last_terms": {
                "policy_pretrain": _as_float(self.objectives.last_policy_pretrain),
                "regularizer": _as_float(self.objectives.last_regularizer),
            },
            "policy_statistics": self._policy_statistics(),
            "refit_features": self.refit_features.state_dict() if self.refit_features is not None else None,
        }

    def load_training_state(self, state: dict) -> None:
        for name, level in self.mlo.levels.items():
            level.optimizer.load_state_dict(state["optimizers"][name])
            level.scheduler.load_state_dict(state["schedulers"][name])
        for name, batches in self.batches.items():
            batches.load_state_dict(state["batches"][name])
        self.mlo.load_state_dict(state["mlo"])
        restore_rng_state(state, self.context.config.seed)
        self.best_accuracy = state["best_accuracy"]
        self.objectives.counts.clear()
        self.objectives.counts.update(state["evaluation_counts"])
        self.evaluations = list(state["evaluations"])
        if self.health is not None and state.get("health"):
            self.health.load_state_dict(state["health"])
        self.last_health = dict(state.get("last_health", {}))
        self.last_refit = state.get("last_refit", 0)
        terms = state.get("last_terms", {})
        self.objectives.last_policy_pretrain = _as_tensor(terms.get("policy_pretrain"))
        self.objectives.last_regularizer = _as_tensor(terms.get("regularizer"))
        self.resumed_statistics = dict(state.get("policy_statistics", {}))
        if self.refit_features is not None and state.get("refit_features"):
            self.refit_features.load_state_dict(state["refit_features"])
        self.seconds_before = state["seconds"]
        self.start_step = state["step"]

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Continue from a stage-1 checkpoint: weights, optimisers, schedules, data order, RNG."""
        checkpoint.load_into(self.modules())
        self.load_training_state(checkpoint.state)

    def save(self, step: int, pointers: tuple[str, ...]) -> None:
        self.context.save_checkpoint(step, self.modules(), self.training_state(step), pointers)

    # --- the loop ----------------------------------------------------------------------------
    def step(self, step: int, probe: bool = False) -> None:
        """Pretrain step ``step`` (1-based) and whatever upper-level steps follow it; the policy
        learns first where training stands (:meth:`MaskPolicy.set_progress`). With ``probe``, a
        mask step taken now also measures its hypergradient's agreement
        (:meth:`_probe_hypergradient`)."""
        checked_set_progress(self.policy, step, self.total_steps)
        mask_steps = self.mlo.levels["mask"].count if self.mlo.is_multilevel else 0
        self.mlo.inspect_next_hypergradient(self._probe_hypergradient if probe else None)
        try:
            self.mlo.step(step)
        finally:
            self.mlo.inspect_next_hypergradient(None)  # the mask level did not step: withdrawn
        self.mask_stepped = self.mlo.is_multilevel and self.mlo.levels["mask"].count > mask_steps
        self._refit_head_when_due()

    def record_due(self, step: int) -> bool:
        """Whether the mask-health record is taken after pretrain step ``step``."""
        return step % self.diagnostics_every == 0 or step == self.total_steps

    def _probe_hypergradient(self, step_hypergradient: list[torch.Tensor]) -> None:
        """Inside a mask step, before T moves: how far its hypergradient agrees with the one on
        the health's fixed batch (``hypergradient/snr``; one more hypergradient, which is not the
        run's cost in the evaluation counts)."""
        assert self.health is not None
        counts = dict(self.objectives.counts)
        with record_function("maskkit.snr_probe"):
            self.pending_snr = self.health.hypergradient_agreement(
                step_hypergradient, self.mlo.hypergradient_on
            )
        self.objectives.counts.clear()
        self.objectives.counts.update(counts)

    def _refit_head_when_due(self) -> None:
        """Every ``head_refit_every`` mask steps, the level-2 head's last layer is refitted to its
        best response (:func:`~maskkit.engine.head_refit.refit_head`)."""
        every = self.context.config.pretrain.learned_mask.head_refit_every
        if self.refit_features is None or every is None:
            return
        mask_steps = self.mlo.levels["mask"].count
        if mask_steps == self.last_refit or mask_steps % every:
            return
        assert self.head is not None
        optimizer = self.mlo.levels["finetune"].optimizer
        with record_function("maskkit.head_refit"):  # a part of its own in benchmarks/steptime
            context = self.context
            features, labels = self.refit_features.update(
                self.mae, context.mean, context.std, context.autocast
            )
            refit_head(self.head, features, labels, optimizer)
        self.last_refit = mask_steps

    def _health_record(self, step: int) -> dict:
        """The learned mask's health (:mod:`~maskkit.engine.mask_health`) at ``step``, logged."""
        assert self.health is not None
        record: dict = {"stage": "pretrain", "step": step}
        snr, self.pending_snr = self.pending_snr, None  # taken inside the mask step just done
        try:
            record.update(self.health.mask_figures())
        except TrainingDivergedError:
            # E diverged in the step just taken: the next step's loss stops the run, after this
            # step's checkpoint (a diagnostic is not the place to stop it).
            return record
        record_index = step // self.diagnostics_every
        if self.health.level2_due(record_index, last=step == self.total_steps):
            record["level2/balanced_accuracy"] = self.health.level2_balanced_accuracy()
        if snr is not None:
            record["hypergradient/snr"] = snr
        self.context.run.log(record)
        return record

    def evaluate(self) -> dict:
        assert self.head is not None
        context = self.context
        return context.evaluate(ViTClassifier(self.mae, self.head), context.splits.eval)

    def run(self) -> PretrainResult:
        context, config = self.context, self.context.config.pretrain
        eval_every = config.eval_every or max(1, self.total_steps // 5)
        checkpoint_every = config.checkpoint_every or eval_every
        log_every = max(1, min(50, self.total_steps // 100))
        images_per_step = config.mae.batch_size
        started = self._started = time.perf_counter()
        window_start, window_steps = started, 0
        title = "MLO pretrain" if self.mlo.is_multilevel else "MAE pretrain"
        if self.start_step == 0:  # a resumed run carries the request in its saved state
            self.mlo.request_path_hypergradients()
            if self.health is not None and self.total_steps > 0:
                self.health.remember_start()
                self.last_health = self._health_record(0)
        with context.progress() as progress:
            task = progress.add_task(title, total=self.total_steps, completed=self.start_step, status="")
            for step in range(self.start_step + 1, self.total_steps + 1):
                health = self.health if self.record_due(step) else None
                self.step(step, probe=health is not None and health.probe_at_next_chance())
                window_steps += 1
                progress.advance(task)
                if step % log_every == 0 or step == self.total_steps:
                    now = time.perf_counter()
                    rate = window_steps * images_per_step / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    record = self._log_record(step, rate, now - started)
                    context.run.log(record)
                    self.mlo.request_path_hypergradients()
                    progress.update(task, status=self._status(record, rate))
                if health is not None:
                    if self.mask_stepped:
                        health.count_chance()
                    self.last_health = self._health_record(step)
                pointers = ("last",)
                if self.mlo.is_multilevel and (step % eval_every == 0 or step == self.total_steps):
                    pointers = self._evaluate_and_log(step, progress)
                if step % checkpoint_every == 0 or step == self.total_steps or len(pointers) > 1:
                    self.save(step, pointers)
        final_masks = self._final_mask_statistics()
        # The learned mask's health at the end (mask_health.py), beside the split's statistics.
        final_masks.update({k: v for k, v in self.last_health.items() if k not in ("stage", "step")})
        self.save(self.total_steps, ("last", "pretrained"))
        return PretrainResult(
            steps=self.total_steps,
            level_steps=self.mlo.step_counts(),
            evaluation_counts=dict(self.objectives.counts),
            seconds=self.seconds_before + time.perf_counter() - started,
            best_eval_accuracy=self.best_accuracy,
            evaluations=list(self.evaluations),
            mask_statistics=final_masks,
        )

    def _status(self, record: dict, rate: float) -> str:
        """The progress bar's status: the level losses, mask health, throughput, val accuracy."""
        losses = {key.split("/")[1]: value for key, value in record.items() if key.startswith("loss/")}
        parts = [f"{name} {value:.4f}" for name, value in losses.items()]
        if "mask/prob_masked" in record:
            parts.append(f"p(masked) {record['mask/prob_masked']:.2f}")
        parts += [f"{key[7:]} {value:.3f}" for key, value in record.items() if key.startswith("policy/")]
        parts.append(f"{rate:.0f} img/s")
        if self.evaluations:
            parts.append(f"val acc {self.evaluations[-1]['accuracy']:.3f}")
        return "  ".join(parts)

    def _final_mask_statistics(self) -> dict[str, float]:
        """Mask statistics of the final policy over the val split, for the summary."""
        context = self.context
        stats = split_mask_statistics(
            self.mae,
            self.policy,
            context.splits.eval,
            context.config.mask_ratio,
            self.weighting,
            context.config.data.eval_batch_size,
            context.mean,
            context.std,
            context.autocast,
            priors=sorted(self.policy.requires),
        )
        stats.update({f"policy/{key}": value for key, value in checked_statistics(self.policy).items()})
        shown = ", ".join(f"{key} {value:.3f}" for key, value in stats.items())
        context.console.print(f"mask statistics on the val split at the end of pretraining: {shown}")
        return stats

    def _evaluate_and_log(self, step: int, progress) -> tuple[str, ...]:
        """Accuracy of E + the level-2 head on the val split, beside the majority-class rate
        (a head at that rate gives the mask level little signal); returns the pointers to set."""
        metrics = self.evaluate()
        accuracy = metrics["accuracy"]
        majority = majority_rate(self.context.splits.eval.labels)
        self.evaluations.append({"step": step, "accuracy": accuracy, "weighted_f1": metrics["weighted_f1"]})
        self.context.run.log(
            {
                "stage": "pretrain",
                "step": step,
                "val/accuracy": accuracy,
                "val/weighted_f1": metrics["weighted_f1"],
                "val/majority_rate": majority,
            }
        )
        improved = self.best_accuracy is None or accuracy > self.best_accuracy
        if improved:
            self.best_accuracy = accuracy
        progress.console.log(
            f"step {step}: level-2 val accuracy {accuracy:.4f} (best {self.best_accuracy:.4f}, "
            f"majority class {majority:.4f})"
        )
        return ("last", "best") if improved else ("last",)

    def _policy_statistics(self) -> dict[str, float]:
        """The policy's statistics, over those a resumed checkpoint saved (which stand in for the
        ones the policy has not computed again since)."""
        return {**self.resumed_statistics, **checked_statistics(self.policy)}

    def _log_record(self, step: int, images_per_s: float, elapsed: float) -> dict:
        record: dict = {"stage": "pretrain", "step": step, "time": round(elapsed, 3)}
        for name, loss in self.mlo.last_losses().items():
            if loss is not None:
                record[f"loss/{name}"] = loss
        if self.objectives.last_pretrain is not None:
            latest = self.objectives.last_pretrain
            decision, error = global_batch(latest.decision, latest.error)
            priors = {name: gather_rows(values) for name, values in latest.batch.priors.items()}
            for key, value in mask_statistics(decision, error, priors).items():
                record[key] = float(value)
        if self.objectives.last_policy_pretrain is not None:
            record["loss/policy_pretrain"] = mean_of(float(self.objectives.last_policy_pretrain))
        for key, value in self._policy_statistics().items():
            record[f"policy/{key}"] = value
        if self.objectives.last_regularizer is not None:
            record["loss/mask_regularizer"] = mean_of(float(self.objectives.last_regularizer))
        for path, norm in self.mlo.hypergradient_norms().items():
            record[f"hypergradient/{path}_norm"] = norm
        for name, level in self.mlo.levels.items():
            record[f"lr/{name}"] = level.optimizer.param_groups[0]["lr"]
        record["images_per_s"] = round(images_per_s, 2)
        return record


def _as_float(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value)


def _as_tensor(value: float | None) -> torch.Tensor | None:
    return None if value is None else torch.tensor(value)


def majority_rate(labels: torch.Tensor) -> float:
    """Share of the most frequent class in ``labels [N]``: the accuracy of a constant guess."""
    return float(torch.bincount(labels).max()) / max(1, len(labels))
