"""The settings one invocation compares: unroll, the ``darts`` product's evaluation, how often
the mask level updates, and named sets of config values (``--setting``).

``--unroll 1/1/1,2/1/1 --darts-mode exact,finite-difference --mask-every 1,2`` gives every
combination (8 here), each a :class:`Variant`. Learnable policies run once per variant; a fixed
policy (``random``) has the pretrain level alone, which none of these settings changes per
pretrain step, so it runs once and is the MAE baseline of every variant.

``--setting eager compile=false --setting compiled compile=true`` adds an axis of named settings,
each a set of config values (any key of the run config); every policy runs once per named
setting (they may change the pretrain level too).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from maskkit.config import LEVEL_KEYS, deep_merge, parse_override

LEVELS = ("pretrain", "finetune", "mask")
DARTS_MODES = ("exact", "finite-difference")


@dataclass(frozen=True)
class Variant:
    """One combination of the compared MLO settings (``None``: the config's own).

    Attributes:
        unroll: ``"p/f/m"``, the unroll steps of the pretrain, finetune and mask levels.
        darts_mode: ``pretrain.hypergradient.darts_mode``, how each ``darts`` product is evaluated.
        mask_every: ``pretrain.head.unroll_steps`` (applied after ``unroll``): the mask level
            then updates once every ``mask_every`` finetune steps, i.e. every
            ``p · mask_every`` pretrain steps, the amortisation knob.
    """

    unroll: str | None = None
    darts_mode: str | None = None
    mask_every: int | None = None
    setting: NamedSetting | None = None

    @property
    def label(self) -> str:
        """``compiled, unroll 1/1/1, finite-difference, mask every 2`` (the settings it sets), or
        ``as configured``."""
        parts = [self.setting.name] if self.setting is not None else []
        if self.unroll is not None:
            parts.append(f"unroll {self.unroll}")
        if self.darts_mode is not None:
            parts.append(self.darts_mode)
        if self.mask_every is not None:
            parts.append(f"mask every {self.mask_every}")
        return ", ".join(parts) or "as configured"

    def config_override(self) -> dict[str, Any]:
        """The override of the run config's ``pretrain`` section that this variant makes."""
        levels: dict[str, dict[str, Any]] = {}
        if self.unroll is not None:
            for level, steps in zip(LEVELS, parse_unroll(self.unroll), strict=True):
                levels.setdefault(LEVEL_KEYS[level], {})["unroll_steps"] = steps
        if self.mask_every is not None:
            levels.setdefault("head", {})["unroll_steps"] = self.mask_every
        if self.darts_mode is not None:
            levels.setdefault("hypergradient", {})["darts_mode"] = self.darts_mode
        return levels

    def overrides(self) -> dict[str, Any]:
        """Every override of the run config this variant makes (the named setting's last)."""
        override: dict[str, Any] = {"pretrain": self.config_override()}
        if self.setting is not None:
            override = deep_merge(override, self.setting.override())
        return override

    @property
    def changes_pretrain_level(self) -> bool:
        """Whether a fixed policy (the pretrain level alone) must run once per variant too:
        only a named setting may change it."""
        return self.setting is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass(frozen=True)
class NamedSetting:
    """``--setting NAME KEY=VALUE ...``: config values under a name.

    Attributes:
        name: the label of the setting in the tables.
        assignments: ``KEY.PATH=VALUE`` strings, each as ``--set`` takes it.
    """

    name: str
    assignments: tuple[str, ...]

    def override(self) -> dict[str, Any]:
        """The assignments as one nested override of the run config."""
        return deep_merge({}, *(parse_override(item) for item in self.assignments))


def parse_settings(values: list[list[str]] | None) -> list[NamedSetting]:
    """``--setting`` values (each ``[NAME, KEY=VALUE, ...]``) as :class:`NamedSetting` s; raises
    ``ValueError`` for a malformed or repeated one."""
    settings = []
    for value in values or []:
        name, *assignments = value
        if "=" in name:
            raise ValueError(f"--setting takes a name first, then KEY=VALUE pairs; got '{name}' as the name")
        if not assignments or any("=" not in item for item in assignments):
            raise ValueError(f"--setting {name}: give one or more KEY=VALUE after the name")
        if any(setting.name == name for setting in settings):
            raise ValueError(f"--setting {name} is given twice")
        settings.append(NamedSetting(name, tuple(assignments)))
    return settings


def parse_unroll(text: str) -> tuple[int, int, int]:
    """``"2/1/1"`` → ``(2, 1, 1)``; raises ``ValueError`` for anything else."""
    parts = text.split("/")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"an unroll is three positive integers p/f/m such as 2/1/1, got '{text}'")
    return int(parts[0]), int(parts[1]), int(parts[2])


def split_list(text: str | None) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; ``None`` → ``[]``."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def expand_variants(
    unroll: str | None,
    darts_mode: str | None,
    mask_every: str | None,
    settings: list[NamedSetting] | None = None,
) -> list[Variant]:
    """Every combination of the comma-separated values given and the named ``settings`` (one
    variant of the config's own settings when none is given). Raises ``ValueError`` for a
    malformed value."""
    unrolls = split_list(unroll)
    for item in unrolls:
        parse_unroll(item)
    modes = split_list(darts_mode)
    for item in modes:
        if item not in DARTS_MODES:
            raise ValueError(f"--darts-mode takes {' or '.join(DARTS_MODES)}, got '{item}'")
    everies = []
    for item in split_list(mask_every):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--mask-every takes positive integers, got '{item}'")
        everies.append(int(item))
    axes: list[list[Any]] = [settings or [None], unrolls or [None], modes or [None], everies or [None]]
    return [Variant(u, d, k, s) for s, u, d, k in itertools.product(*axes)]
