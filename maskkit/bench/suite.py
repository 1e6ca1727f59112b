"""A benchmark suite file: its schema and its validation.

A suite names a grid of policies × datasets × seeds and the one config every cell shares (a
preset and overrides, as ``maskkit train --preset P --config FILE`` would take them). The grid
itself sets each cell's policy, dataset and seed, so those keys are refused in the shared
config: the only things that differ between two cells of a suite are the ones the grid names.
``docs/bench.md`` documents the format; ``benchmarks/*.yaml`` are examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from maskkit.config import DEFAULT_PRESET, PRESETS, StrictModel, format_validation_error
from maskkit.errors import ConfigError

from .executors.settings import RaySettings, SlurmSettings

#: The policy label of the no-pretraining baseline: the ViT trained from scratch by stage 2 alone.
NONE_POLICY = "none"
#: What ``maskkit policies`` says of it, under its table (it is no policy, so not a row).
NONE_POLICY_NOTE = (
    f"{NONE_POLICY}: a maskkit bench suite may also name this baseline, no pretraining at all "
    "(the ViT trained from scratch by fine-tuning alone; docs/bench.md)"
)
#: Labels become folder and file names.
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
#: Config keys the grid sets per cell, refused in a suite's shared config.
GRID_KEYS = (
    "policy",
    "policy_options",
    "prior",
    "prior_options",
    "seed",
    "protocols",
    "data.dataset",
    "data.data_dir",
)
KEYS_HINT = "docs/bench.md lists the keys of a suite file"
#: Config sections a policy entry may not override: the cells of a seed share them.
PAIRED_SECTIONS = ("model", "data")


class DatasetEntry(StrictModel):
    """One dataset of the grid.

    ``data_dir`` is read relative to the suite's data folder (``data_dir`` of the suite, or
    ``--data-dir``) unless it is absolute; without it the data folder itself is used.
    ``config`` overrides the shared config for this dataset's cells, all policies alike.
    """

    name: str | None = Field(None, pattern=LABEL_PATTERN, description="label; default: the dataset")
    dataset: str
    data_dir: Path | None = None
    subset: int | None = Field(None, gt=0, description="keep at most this many images per split")
    prior: str | None = Field(None, description="prior provider of the guided policies on this dataset")
    prior_options: dict[str, Any] = Field(default_factory=dict)
    per_class: bool = Field(False, description="a per-class table of this dataset in the report")
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.dataset


class PolicyEntry(StrictModel):
    """One policy of the grid: a policy name (or ``none``), its options, the prior provider a
    guided policy reads (default: the dataset's, else the suite's), and ``config``: overrides
    for this policy's cells only (for example ``pretrain.weighting``), merged over the suite's and
    the dataset's. It may not change ``model`` or ``data``: the cells of a seed start from the
    same encoder, head and images, which is what makes the comparison paired."""

    name: str | None = Field(None, pattern=LABEL_PATTERN, description="label; default: the policy")
    policy: str
    policy_options: dict[str, Any] = Field(default_factory=dict)
    prior: str | None = None
    prior_options: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.policy


class Suite(StrictModel):
    """A whole suite file."""

    name: str = Field(pattern=LABEL_PATTERN)
    description: str = ""
    output: Path | None = Field(None, description="default: runs/bench/<name>")
    data_dir: Path | None = Field(None, description="default: $MASKKIT_DATA_DIR, else a user cache folder")
    preset: str = DEFAULT_PRESET
    config: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(min_length=1)
    baseline: str | None = Field(None, description="the policy differences are taken to; default: random")
    prior: str | None = None
    prior_options: dict[str, Any] = Field(default_factory=dict)
    datasets: list[DatasetEntry] = Field(min_length=1)
    policies: list[PolicyEntry] = Field(min_length=1)
    slurm: SlurmSettings | None = Field(None, description="how --executor slurm submits the cells")
    ray: RaySettings | None = Field(None, description="how --executor ray runs the cells")

    @field_validator("policies", mode="before")
    @classmethod
    def _names_are_entries(cls, value: Any) -> Any:
        """``- mlo`` is short for ``- {policy: mlo}``."""
        if isinstance(value, list):
            return [{"policy": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset; one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _check_grid(self) -> Suite:
        for kind, labels in (
            ("dataset", [entry.label for entry in self.datasets]),
            ("policy", [entry.label for entry in self.policies]),
        ):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise ValueError(f"{kind} label(s) {', '.join(repeated)} appear twice; give each a `name`")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds repeat")
        if self.baseline is not None and self.baseline not in self.policy_labels:
            raise ValueError(f"baseline '{self.baseline}' is not a policy of the suite")
        return self

    @property
    def policy_labels(self) -> list[str]:
        return [entry.label for entry in self.policies]

    @property
    def dataset_labels(self) -> list[str]:
        return [entry.label for entry in self.datasets]

    @property
    def baseline_label(self) -> str | None:
        """The policy every other is compared with, seed by seed: ``baseline``, else ``random``
        when the grid has it."""
        if self.baseline is not None:
            return self.baseline
        return "random" if "random" in self.policy_labels else None

    def output_dir(self) -> Path:
        return self.output if self.output is not None else Path("runs") / "bench" / self.name


def _grid_keys_in(config: dict[str, Any], where: str) -> None:
    """Refuse a shared config that sets what the grid decides."""
    for dotted in GRID_KEYS:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(
                f"{where} sets {dotted}, which the grid decides per cell; use the suite's "
                "`datasets`, `policies` and `seeds` instead"
            )


def read_suite_yaml(path: Path) -> dict:
    """The mapping a suite file holds; a missing file, bad YAML (with its line and column in
    ``path``) or a non-mapping is a :class:`~maskkit.errors.ConfigError` naming the suite file."""
    try:
        with Path(path).open(encoding="utf-8") as handle:  # a stream: YAML's marks name the file
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"suite file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"suite file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"suite file {path} must hold a mapping, not {type(loaded).__name__}")
    return loaded


def load_suite(path: Path) -> Suite:
    """Read and validate a suite file: one :class:`~maskkit.errors.ConfigError` naming every
    problem of its schema. (Policy, dataset and config values are checked when the grid is
    expanded, :func:`maskkit.bench.cells.expand_grid`.)"""
    raw = read_suite_yaml(path)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, f"suite file {path}", KEYS_HINT)) from None
    _grid_keys_in(suite.config, f"suite file {path}: config")
    for entry in suite.datasets:
        _grid_keys_in(entry.config, f"suite file {path}: datasets[{entry.label}].config")
    for policy in suite.policies:
        where = f"suite file {path}: policies[{policy.label}].config"
        _grid_keys_in(policy.config, where)
        shared = sorted(key for key in PAIRED_SECTIONS if key in policy.config)
        if shared:
            raise ConfigError(
                f"{where} sets {', '.join(shared)}, which every cell of a seed shares (the paired "
                "comparison needs the same encoder, head and images); set it in the suite's "
                "`config` or a dataset's"
            )
    return suite
