"""Run configuration: pydantic models, presets, YAML in and out, CLI overrides.

A run's config is built as: preset YAML (``maskkit/presets/<name>.yaml``) ← the user's YAML
file ← ``--set key.path=value`` and the named CLI options. The result is validated here and
saved beside the run as ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maskkit.errors import ConfigError, UnknownNameError, warn_once
from maskkit.weighting import RENAMED_WEIGHTINGS, WeightingName

PRESETS = ("smoke", "cpu", "paper")
DEFAULT_PRESET = "cpu"

#: The augmentations of a stage (``pretrain.augment``, ``finetune.augment``; :mod:`maskkit.data.batches`).
Augment = Literal["none", "crop_flip", "randaugment"]


class StrictModel(BaseModel):
    """Unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """The MAE's size. ``paper``: ViT-B/2 at 32 px (768×12, decoder 512×8)."""

    img_size: int = Field(32, gt=0)
    patch_size: int = Field(4, gt=0)
    in_chans: int = Field(3, gt=0)
    embed_dim: int = Field(192, gt=0)
    depth: int = Field(6, gt=0)
    num_heads: int = Field(3, gt=0)
    decoder_embed_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_num_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    norm_pix_loss: bool = True

    @model_validator(mode="after")
    def _check_divisibility(self) -> ModelConfig:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"model.img_size {self.img_size} is not divisible by model.patch_size "
                f"{self.patch_size}; pick a patch size that divides the image size"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads {self.num_heads}"
            )
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"model.decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"model.decoder_num_heads {self.decoder_num_heads}"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


class OptimizerConfig(StrictModel):
    """AdamW with timm's weight-decay groups (none on biases and norms), cosine schedule."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = Field(128, gt=0)


class LevelConfig(OptimizerConfig):
    """One level of the MLO loop. ``unroll_steps``: steps of this level per step of the level above."""

    unroll_steps: int = Field(1, gt=0)


class HypergradientConfig(StrictModel):
    """How the mask level's hypergradient approximates each best-response Jacobian, for every
    level it passes through (``maskkit/engine/hypergradient.py``).

    ``estimator``: a name of that module's ``ESTIMATORS`` registry. ``darts`` (first order, a unit
    inner step) evaluates each mixed second-derivative product exactly in forward mode
    (``darts_mode: exact``) or by betty's central difference (``finite-difference``); ``cg``
    replaces the unit step by conjugate-gradient steps toward the inverse Hessian. (betty's
    ``neumann`` is not offered: it diverges on the MAE; see docs/mlo.md.)
    """

    estimator: str = "darts"
    darts_mode: Literal["exact", "finite-difference"] = "exact"
    darts_alpha: float = Field(0.01, gt=0, description="finite-difference darts only: ε = α / ‖v‖")
    cg_iterations: int = Field(1, gt=0)

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        # The registry needs torch; it is read when a config is validated, not when this imports.
        from maskkit.engine.hypergradient import ESTIMATORS

        if name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
        return name


class LearnedMaskConfig(StrictModel):
    """How stage 1 treats every learned (level-3) mask policy built on
    :class:`maskkit.masking.LearnedMasking` (``docs/mlo.md``, "Keeping the learned mask alive").

    The defaults keep the mask from saturating; ``paper`` turns them all off (the reference:
    raw σ(logits), deterministic top-k, no warm-ups, no refit).

    - ``logit_bound`` b: the logits are standardised per image and bounded, ``b·tanh(ẑ/b)``, so a
      probability stays within σ(±b); 0 keeps the raw logits.
    - ``selection``: ``sample`` masks the top-k of ``z/T + Gumbel`` (Plackett–Luce sampling
      without replacement) in training, so every patch is masked now and then and no saturated
      state is a fixed point; ``top-k`` masks the k highest logits (the reference). Evaluation
      and diagnostics always use the top-k, the mode.
    - ``temperature``: T at the start and at the end of stage 1 (linear in between).
    - ``fan_in_scaling``: ``mlo``'s first layer sees tokens normalised per token and steps in
      units of 1/√fan-in (an equalised learning rate), so one AdamW step cannot move a hidden
      unit by lr·‖x‖₁.
    - ``centre_tokens``: ``mlo``'s tokens minus each slot's mean token (the batch's in training, a
      running mean in evaluation) before that normalisation
      (:class:`~maskkit.masking.SlotCentring`), so the position embedding every image shares does
      not drown what differs between images and the mask can depend on the image.
    - ``diversity`` λ and ``shared_map_cap`` s₀: the level-3 objective gains
      ``λ·max(0, share − s₀)``, where ``share`` is the part of T's per-image standardised
      logits that is one map for every image of the batch
      (:func:`~maskkit.masking.shared_map_share`, logged as ``policy/shared_map_share``; the
      term goes through the policy's ``regularizer``, logged as ``loss/mask_regularizer``). A
      hinge: it leaves T alone while its mask depends on the image enough (the ``cpu`` preset's
      ``mlo``, whose share is mostly under 0.5: the hinge acted at a few steps of seeds 0 and 2
      and at none of seed 1) and pushes a mask that is mostly one map for all (the ViT-S/2 width's)
      back to the cap. λ = 0 adds nothing; s₀ = 0 penalises the whole share,
      which at the ``cpu`` preset (λ = 0.3) cost T what it had learned (``docs/mlo.md``,
      "Measured: a diversity term" and "Measured: the diversity term as a hinge").
    - ``random_warmup``: share of stage 1 that masks uniformly at random with T frozen, so E and
      the level-2 head reach a useful state before T learns from them.
    - ``lr_warmup``: share of the mask level's steps (after the random warm-up) over which its lr
      rises linearly from 0.
    - ``head_refit_every``: every this many mask steps, the level-2 head's last layer is refitted
      by a converged class-balanced logistic regression (its best response) on E's features of
      a fixed subset of ``head_refit_images`` images of the finetune split that keeps every
      class up to a common cap (:func:`maskkit.data.class_capped_subset`); None never refits.
      The features are kept between refits, and each refit recomputes a rotating share
      ``head_refit_refresh`` of them (:class:`maskkit.engine.head_refit.RefitFeatures`).
    """

    logit_bound: float = Field(3.0, ge=0)
    selection: Literal["sample", "top-k"] = "sample"
    temperature: tuple[float, float] = (1.0, 0.5)
    fan_in_scaling: bool = True
    centre_tokens: bool = True
    diversity: float = Field(1.0, ge=0)
    shared_map_cap: float = Field(0.5, ge=0, lt=1)
    random_warmup: float = Field(0.1, ge=0, lt=1)
    lr_warmup: float = Field(0.1, ge=0, lt=1)
    head_refit_every: int | None = Field(5, gt=0)
    head_refit_images: int = Field(512, gt=0)
    head_refit_refresh: float = Field(1.0, gt=0, le=1)

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError(f"temperatures must be above 0, got {list(value)}")
        return value


#: The key under ``pretrain`` of each MLO level's settings, by the level's name in the loop (the
#: names of betty's problems, of the checkpoints' optimiser states and of ``level_steps``):
#: level 1 the MAE (E + decoder), level 2 the classification head C, level 3 the mask policy T.
LEVEL_KEYS = {"pretrain": "mae", "finetune": "head", "mask": "mask"}

#: Level keys of ``pretrain`` renamed in 2026-12 (old name → new name): ``pretrain.pretrain`` and
#: ``pretrain.finetune`` read like the stages ``pretrain`` and ``finetune`` they sit in or beside.
RENAMED_LEVEL_KEYS = {"pretrain": "mae", "finetune": "head"}

#: The one warning of a config with the old level keys (:data:`RENAMED_LEVEL_KEYS`).
RENAMED_LEVELS_WARNING = (
    "config: pretrain.pretrain and pretrain.finetune are now called pretrain.mae and pretrain.head; "
    "read under the new names, update the config"
)


def current_level_keys(section: Any) -> tuple[Any, bool]:
    """``section`` (a raw ``pretrain`` mapping) with its old level keys under their new names
    (:data:`RENAMED_LEVEL_KEYS`), and whether it had any. A level given under both names is a
    ``ValueError`` (pydantic reports it as ``pretrain: ...``)."""
    if not isinstance(section, dict):
        return section, False
    renamed = {old: new for old, new in RENAMED_LEVEL_KEYS.items() if old in section}
    both = [
        f"pretrain.{old} and pretrain.{new} are one level under its old and new name; keep pretrain.{new}"
        for old, new in renamed.items()
        if new in section
    ]
    if both:
        raise ValueError("; ".join(both))
    if not renamed:
        return section, False
    return {renamed.get(key, key): value for key, value in section.items()}, True


#: Keys of ``pretrain.mask`` that moved to ``pretrain.hypergradient`` (old name → new name).
_MOVED_ESTIMATOR_KEYS = {
    "hypergradient": "estimator",
    "darts_mode": "darts_mode",
    "darts_alpha": "darts_alpha",
    "cg_iterations": "cg_iterations",
}


class PretrainConfig(StrictModel):
    """Stage 1: MAE pretraining, three-level MLO when the policy is learnable.

    ``mae``, ``head`` and ``mask`` are the settings of the MLO levels: level 1, the MAE level (E +
    decoder); level 2, the head level (the classification head C); level 3, the mask level (the
    policy T). ``epochs`` counts passes of level 1 over all training images; ``steps`` (level-1
    steps) overrides it when set, and ``steps: 0`` skips stage 1 altogether: stage 2 then
    trains the freshly initialised ViT from scratch (the no-pretraining baseline; the policy takes
    no part). ``weighting`` says how a policy's weights enter the
    pretrain loss (``maskkit/weighting.py``; ``reference`` is the paper's code).
    ``class_balanced`` weights the level-2 and level-3 cross-entropies by inverse class
    frequency. ``learned_mask`` says how a learned mask policy is kept from saturating and how
    the level-2 head is kept near its best response (:class:`LearnedMaskConfig`).
    """

    epochs: float = Field(1.0, gt=0)
    weighting: WeightingName = "tempered"
    tempered_alpha: float = Field(0.5, ge=0, le=1, description="α of the tempered weighting")
    class_balanced: bool = True
    steps: int | None = Field(None, ge=0, description="0: no pretraining, a ViT from scratch")
    augment: Augment = "crop_flip"
    eval_every: int | None = Field(None, gt=0, description="pretrain steps between evaluations")
    checkpoint_every: int | None = Field(None, gt=0, description="pretrain steps between checkpoints")
    mae: LevelConfig = Field(
        LevelConfig(lr=1e-3, unroll_steps=2),
        description="level 1: the MAE (E + decoder), masked reconstruction",
    )
    head: LevelConfig = Field(LevelConfig(lr=1e-3), description="level 2: the classification head C")
    mask: LevelConfig = Field(LevelConfig(lr=1e-3), description="level 3: the mask policy T")
    hypergradient: HypergradientConfig = HypergradientConfig()
    learned_mask: LearnedMaskConfig = LearnedMaskConfig()

    @field_validator("weighting", mode="before")
    @classmethod
    def _renamed_weighting(cls, name: Any) -> Any:
        if isinstance(name, str) and name in RENAMED_WEIGHTINGS:
            warn_once(
                f"config: pretrain.weighting '{name}' is now called '{RENAMED_WEIGHTINGS[name]}'; "
                "update the config"
            )
            return RENAMED_WEIGHTINGS[name]
        return name

    @model_validator(mode="before")
    @classmethod
    def _renamed_levels(cls, raw: Any) -> Any:
        """Old configs keep loading: ``pretrain.pretrain`` is read as ``pretrain.mae`` and
        ``pretrain.finetune`` as ``pretrain.head``, with a one-line warning; both names of a level
        at once are refused."""
        raw, renamed = current_level_keys(raw)
        if renamed:
            warn_once(RENAMED_LEVELS_WARNING)
        return raw

    @classmethod
    def with_current_keys(cls, raw: Any) -> Any:
        """A raw ``pretrain`` mapping with every old key under its new name, each kind warned
        about once: what validation does first, here for one config layer at a time
        (:func:`merge_config_layers`)."""
        return cls._moved_keys(cls._renamed_levels(raw))

    def level(self, name: str) -> LevelConfig:
        """The settings of the MLO level ``name`` (``pretrain``, ``finetune`` or ``mask``, the
        level's name in the loop; :data:`LEVEL_KEYS`)."""
        return getattr(self, LEVEL_KEYS[name])

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Old configs keep loading: ``pretrain.mask.hypergradient|darts_mode|darts_alpha|
        cg_iterations`` are read as ``pretrain.hypergradient.*``, with a one-line warning."""
        if not isinstance(raw, dict) or not isinstance(raw.get("mask"), dict):
            return raw
        moved = {old: new for old, new in _MOVED_ESTIMATOR_KEYS.items() if old in raw["mask"]}
        if not moved:
            return raw
        raw = {**raw, "mask": dict(raw["mask"])}
        target = dict(raw.get("hypergradient") or {})
        for old, new in moved.items():
            target.setdefault(new, raw["mask"].pop(old))
        raw["hypergradient"] = target
        names = ", ".join(f"pretrain.mask.{old} → pretrain.hypergradient.{new}" for old, new in moved.items())
        warn_once(f"config: renamed keys read under their new names ({names}); update the config")
        return raw

    @model_validator(mode="after")
    def _score_function_samples(self) -> PretrainConfig:
        """``score-function`` differentiates the sampling distribution: a deterministic top-k has
        none (refused here, before a run starts, rather than at the first mask step)."""
        if self.weighting == "score-function" and self.learned_mask.selection != "sample":
            raise ValueError(
                "pretrain.weighting 'score-function' needs sampled masks: set pretrain.learned_mask."
                "selection=sample, or use another weighting (tempered, straight-through)"
            )
        return self


class FinetuneConfig(StrictModel):
    """Stage 2: end-to-end fine-tuning of encoder + linear head (the seed's recipe)."""

    epochs: float = Field(100.0, ge=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = Field(64, gt=0)
    augment: Augment = "randaugment"
    cutout: int = Field(0, ge=0, description="side in pixels of one zeroed square per image (0 = off)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    warmup_epochs: float = Field(0.0, ge=0)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    class_balanced: bool = Field(
        False,
        description="weight each image's cross-entropy by N / (K · n_c), its class's inverse frequency "
        "in the training split normalised to mean 1 (maskkit.engine.class_weights)",
    )


class TrialProtocolConfig(StrictModel):
    """The trial as a protocol: with ``protocols: true`` and ``forks`` above 0, after the linear
    probe and k-NN the run's policy is tried against ``random`` from the run's own ``pretrained``
    checkpoint, ``forks`` pairs of ``steps`` pretrain steps (``maskkit trial``'s method,
    :mod:`maskkit.engine.protocols.paired_trial`; docs/bench.md). A run without stage 1 skips it."""

    forks: int = Field(0, ge=0, description="fork pairs (0: off; else at least 2, for an interval)")
    steps: int = Field(20, gt=0, description="pretrain steps per arm and fork")
    probe_images: int = Field(2000, gt=1, description="training images of the probe")
    lr: float | None = Field(None, ge=0, description="the arms' lr; default: the run's pretrain lr")
    lr_schedule: Literal["constant", "decay"] = Field(
        "decay", description="the arms' lr over their steps: decay linearly to 0, or constant"
    )

    @model_validator(mode="after")
    def _an_interval(self) -> TrialProtocolConfig:
        if self.forks == 1:
            raise ValueError("forks must be 0 (off) or at least 2: the interval is over the forks")
        return self


class DataConfig(StrictModel):
    dataset: str = "dermamnist"
    data_dir: Path | None = Field(None, description="default: $MASKKIT_DATA_DIR, else a user cache folder")
    download: bool = False
    train_portion: float = Field(0.8, gt=0, lt=1)
    mask_source: Literal["train_tail", "val"] = "train_tail"
    val_portion: float = Field(
        0.1, gt=0, lt=1, description="share of train held out for selection when the dataset has no val split"
    )
    subset: int | None = Field(None, gt=0, description="keep at most this many images per split")
    eval_batch_size: int = Field(256, gt=0)
    priors_dir: Path | None = Field(
        None, description="the priors store; default: $MASKKIT_PRIORS_DIR, else a user cache folder"
    )
    build_priors: bool = Field(
        False, description="compute missing priors instead of stopping (--build-priors)"
    )


#: ``mlo``'s former policy option, now ``pretrain.learned_mask.centre_tokens``.
MOVED_MLO_OPTION = "centre_tokens"
#: The one warning of a config that still sets it as a policy option.
MOVED_MLO_OPTION_WARNING = (
    "config: policy_options.centre_tokens is now pretrain.learned_mask.centre_tokens "
    "(on by default); read there, update the config"
)


class RunConfig(StrictModel):
    """Everything a run needs; saved as ``config.yaml`` in the run dir."""

    preset: str = DEFAULT_PRESET
    policy: str = "random"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    prior: str | None = Field(None, description="the prior provider of a policy that reads priors (--prior)")
    prior_options: dict[str, Any] = Field(default_factory=dict)
    mask_ratio: float = Field(0.75, ge=0, lt=1)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(
        False,
        description="torch.compile stage 1's once-differentiated passes (the pretrain step's "
        "reconstruction, the level-2 and level-3 features; maskkit.engine.compiled); off by default: "
        "on the 2-core CPU its compile time outweighs its gain (docs/benchmarks.md)",
    )
    fused_adamw: bool | Literal["auto"] = Field(
        "auto",
        description="AdamW's fused kernel for every optimiser of the run, the same update to float "
        "rounding (not bit for bit); auto: on the CPU, where it measured faster, and torch's default "
        "elsewhere (docs/benchmarks.md). Fixed for a run: a resumed run's optimisers keep the kernel "
        "they were saved with",
    )
    tensorboard: bool = Field(
        False,
        description="also write TensorBoard events to RUN_DIR/tensorboard (needs maskkit[tensorboard])",
    )
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="where metrics go besides metrics.jsonl (--logger): csv (RUN_DIR/metrics.csv), "
        "tensorboard, wandb, mlflow (maskkit.loggers; wandb and mlflow need maskkit[wandb|mlflow])",
    )
    protocols: bool = Field(
        False,
        description="also score the frozen pretrained encoder by a linear probe and k-NN (protocols.json)",
    )
    trial: TrialProtocolConfig = TrialProtocolConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_centre_tokens(cls, raw: Any) -> Any:
        """``mlo``'s policy option ``centre_tokens`` (2026-12-06) is now
        ``pretrain.learned_mask.centre_tokens``: an old config keeps loading, with a one-line
        warning."""
        if not isinstance(raw, dict) or raw.get("policy") != "mlo":
            return raw
        options = raw.get("policy_options")
        if not isinstance(options, dict) or MOVED_MLO_OPTION not in options:
            return raw
        warn_once(MOVED_MLO_OPTION_WARNING)
        options = {key: value for key, value in options.items() if key != MOVED_MLO_OPTION}
        pretrain = raw.get("pretrain") or {}
        learned_mask = dict(pretrain.get("learned_mask") or {})
        learned_mask[MOVED_MLO_OPTION] = raw["policy_options"][MOVED_MLO_OPTION]
        return {**raw, "policy_options": options, "pretrain": {**pretrain, "learned_mask": learned_mask}}

    @model_validator(mode="after")
    def _check_tokens_kept(self) -> RunConfig:
        num_patches = self.model.num_patches
        if int(num_patches * (1 - self.mask_ratio)) < 1:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} keeps no token of {num_patches} patches; "
                f"use a ratio below {1 - 1 / num_patches:.4f}"
            )
        return self


def deep_merge(base: dict, *overrides: dict) -> dict:
    """``base`` with each override merged in turn (nested mappings merge key by key)."""
    merged = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def merge_config_layers(base: dict, *layers: dict) -> dict:
    """``base`` with each config layer (a YAML file, a ``--set``, a suite's config) merged in turn,
    each layer's old ``pretrain`` keys read under their new names first: an old key then
    overrides the same setting of the layers below (a preset's, under its new name) rather than
    meeting it as a second name of it. A layer that gives a level under both names is left as it
    is, for validation to refuse."""
    current = []
    for layer in layers:
        if isinstance(layer.get("pretrain"), dict):
            with contextlib.suppress(ValueError):
                layer = {**layer, "pretrain": PretrainConfig.with_current_keys(layer["pretrain"])}
        current.append(layer)
    return deep_merge(base, *current)


def preset_dict(name: str) -> dict:
    """The raw YAML of a built-in preset."""
    if name not in PRESETS:
        raise UnknownNameError("preset", name, list(PRESETS))
    text = resources.files("maskkit").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, with readable errors."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
    return loaded


def parse_override(assignment: str) -> dict:
    """``"pretrain.mask.lr=1e-4"`` → ``{"pretrain": {"mask": {"lr": 1e-4}}}`` (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY.PATH=VALUE, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    tree: dict = {}
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def format_validation_error(
    error: ValidationError,
    subject: str = "config",
    keys_hint: str = "`maskkit config show` lists valid keys",
    model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: ``key.path: message (got value)``, after ``invalid <subject>:``;
    an unknown key's message names the nearest valid keys of ``model`` (when given) and points
    at ``keys_hint``."""
    from maskkit.config_keys import key_suggestion

    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            meant = key_suggestion(model, item["loc"]) if model is not None else ""
            message = f"unknown key ({meant or 'check the spelling; '}{keys_hint})"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "extra_forbidden" else f" (got {got!r})"
        problems.append(f"{location}: {message}{shown}")
    return f"invalid {subject}: " + "; ".join(problems)


def build_config(
    preset: str = DEFAULT_PRESET,
    config_file: Path | None = None,
    overrides: list[dict] | None = None,
) -> RunConfig:
    """Merge preset ← file ← overrides and validate."""
    layers = [read_yaml(config_file)] if config_file is not None else []
    raw = merge_config_layers(preset_dict(preset), *layers, *(overrides or []))
    raw["preset"] = raw.get("preset", preset)
    return validate_config(raw)


def validate_config(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model=RunConfig)) from None


def config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """The keys where two config dicts (``model_dump(mode="json")``) differ, each as
    ``key.path (saved A, given B)``."""
    keys = []
    for key in saved.keys() | given.keys():
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} (saved {a!r}, given {b!r})")
    return keys


#: What a resumed run may change (``maskkit train --resume ... --set``): how it computes or
#: reports, not what it computes (the priors store's key pins the priors themselves, wherever the
#: store is).
ADJUSTABLE_ON_RESUME = (
    "precision",
    "device",
    "compile",
    "tensorboard",
    "loggers",
    "data.build_priors",
    "data.priors_dir",
)


def batch_sizes(config: RunConfig, multilevel: bool) -> dict[str, int]:
    """The global batch sizes a run uses, by config key; ``multilevel``: the policy is trained at
    the mask level, so the run has all three levels of stage 1
    (:meth:`maskkit.policy.MaskPolicy.training_levels`)."""
    sizes = {"pretrain.mae.batch_size": config.pretrain.mae.batch_size}
    if multilevel:
        sizes["pretrain.head.batch_size"] = config.pretrain.head.batch_size
        sizes["pretrain.mask.batch_size"] = config.pretrain.mask.batch_size
    if config.finetune.epochs > 0:
        sizes["finetune.batch_size"] = config.finetune.batch_size
    return sizes


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


#: ``pretrain.learned_mask`` of a run saved before the section existed (2026-12): none of it.
LEGACY_LEARNED_MASK = {
    "logit_bound": 0,
    "selection": "top-k",
    "fan_in_scaling": False,
    "centre_tokens": False,
    "diversity": 0,
    "shared_map_cap": 0,
    "random_warmup": 0,
    "lr_warmup": 0,
    "head_refit_every": None,
}


def load_run_config(path: Path) -> RunConfig:
    """Read a saved ``config.yaml``. A run saved before ``pretrain.learned_mask`` existed is read
    as it ran: with none of it (:data:`LEGACY_LEARNED_MASK`); one saved before
    ``pretrain.learned_mask.centre_tokens``, ``.diversity`` or ``.shared_map_cap`` existed
    (2026-12-06/07) ran without them."""
    raw = read_yaml(path)
    pretrain = raw.get("pretrain")
    if isinstance(pretrain, dict):
        learned_mask = pretrain.get("learned_mask", LEGACY_LEARNED_MASK)
        if isinstance(learned_mask, dict):
            learned_mask = {"centre_tokens": False, "diversity": 0, "shared_map_cap": 0, **learned_mask}
        raw = {**raw, "pretrain": {**pretrain, "learned_mask": learned_mask}}
    return validate_config(raw)
