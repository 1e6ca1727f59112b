"""What a run needs from the priors store: its dataset's maps, looked up or built, attached.

:func:`attach_priors` computes each split's :class:`~maskkit.priors.store.PriorKey`, loads the
maps from the store and attaches them to the split (``ImageSplit.priors``), where every subset
and slice keeps them aligned with their images. A split whose maps are not built stops the run
with one line giving the exact ``maskkit priors build`` command, unless the user asked for the
build (``--build-priors``, ``data.build_priors``); ``maskkit priors build`` is this same path with
the build asked for.

It finds providers by name through the plugin manager, so it sits above :mod:`maskkit.plugins`,
while the provider contract and the store (:mod:`maskkit.priors`) sit below it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from maskkit.config import RunConfig
from maskkit.data import ImageSplit, LabelledDataset
from maskkit.errors import ConfigError, DamagedFileError, MaskkitError
from maskkit.plugins import create_provider, provider_info, provider_options
from maskkit.priors.compute import compute_priors
from maskkit.priors.provider import PriorProvider
from maskkit.priors.store import PriorKey, PriorStore, default_store_dir, images_fingerprint
from maskkit.progress import progress_display


class PriorsNotBuiltError(MaskkitError):
    """A run needs priors that the store does not hold yet."""


@dataclass(frozen=True)
class PriorSpec:
    """Which priors, of which data, from which store.

    Attributes:
        provider: the provider's name (``--prior``).
        options: its options as given (``prior_options``).
        dataset: the dataset's name.
        data_dir: the data folder as given (None: the default one).
        image_size: the side S the images are resized to (``model.img_size``).
        subset: at most this many images per split (``data.subset``), or None.
        store_dir: the store's folder as given (None: :func:`default_store_dir`).
        build: compute missing maps instead of stopping.
    """

    provider: str
    options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "dermamnist"
    data_dir: Path | None = None
    image_size: int = 32
    subset: int | None = None
    store_dir: Path | None = None
    build: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> PriorSpec:
        if config.prior is None:
            raise ValueError("the config names no prior provider")
        return cls(
            provider=config.prior,
            options=dict(config.prior_options),
            dataset=config.data.dataset,
            data_dir=config.data.data_dir,
            image_size=config.model.img_size,
            subset=config.data.subset,
            store_dir=config.data.priors_dir,
            build=config.data.build_priors,
        )

    @property
    def store(self) -> PriorStore:
        return PriorStore(self.store_dir or default_store_dir())

    def command(self) -> str:
        """The exact ``maskkit priors build`` command that builds these priors."""
        parts = ["maskkit", "priors", "build", "--provider", self.provider, "--dataset", self.dataset]
        if self.data_dir is not None:
            parts += ["--data-dir", str(self.data_dir)]
        parts += ["--image-size", str(self.image_size)]
        if self.subset is not None:
            parts += ["--subset", str(self.subset)]
        for key, value in sorted(self.options.items()):
            parts += ["--option", f"{key}={_option_text(value)}"]
        if self.store_dir is not None:
            parts += ["--priors-dir", str(self.store_dir)]
        return shlex.join(parts)


def _option_text(value: Any) -> str:
    """``value`` as ``--option`` parses it back (as YAML): plain when that round-trips, else JSON."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def check_prior_choice(config: RunConfig, requires: frozenset[str]) -> None:
    """Refuse a run whose policy needs priors without a provider that gives them, or names a
    provider for a policy that reads none."""
    policy = config.policy
    if not requires:
        if config.prior is not None:
            raise ConfigError(
                f"policy '{policy}' reads no prior, so --prior {config.prior} would be ignored; drop it "
                "(`maskkit policies` shows what each policy needs)"
            )
        return
    needs = ", ".join(sorted(requires))
    if config.prior is None:
        raise ConfigError(
            f"policy '{policy}' reads the prior map {needs}; pick a provider with --prior NAME "
            "(config key `prior`); `maskkit priors list` shows them"
        )
    info = provider_info(config.prior)
    missing = sorted(requires - info.provides)
    if missing:
        raise ConfigError(
            f"policy '{policy}' reads the prior map {', '.join(missing)}, which provider "
            f"'{config.prior}' does not give (it gives {', '.join(sorted(info.provides))}); "
            "pick another with --prior (`maskkit priors list`)"
        )
    if config.pretrain.augment == "randaugment":
        raise ConfigError(
            "pretrain.augment=randaugment would move the images without their priors; use crop_flip "
            "(the default) or none with a policy that reads priors"
        )


def _splits(dataset: LabelledDataset) -> dict[str, ImageSplit]:
    named = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    return {name: split for name, split in named.items() if split is not None}


def prior_key(
    provider: PriorProvider, options: dict[str, Any], dataset: str, name: str, split: ImageSplit
) -> PriorKey:
    """The key of ``split``'s maps under ``provider`` with resolved ``options``."""
    return PriorKey(
        provider=provider.name,
        provider_version=int(type(provider).version),
        options=options,
        fingerprint=provider.fingerprint(),
        dataset=dataset,
        split=name,
        resolution=int(split.images.shape[-1]),
        images=images_fingerprint(split.images),
        count=len(split),
    )


def _first_maps_of_whole(
    store: PriorStore,
    provider: PriorProvider,
    options: dict[str, Any],
    whole: LabelledDataset,
    name: str,
    split: ImageSplit,
) -> dict | None:
    """The maps of ``split``, the first images of ``whole``'s split ``name`` (``data.subset``),
    cut from the whole split's stored maps; None when those are not stored (or unreadable: they
    are the whole split's to rebuild, not this run's). A provider computes each image's maps from
    that image alone (:meth:`~maskkit.priors.provider.PriorProvider.compute`), so they are the
    maps the subset would get on its own."""
    source = _splits(whole).get(name)
    count = len(split)
    if source is None or len(source) <= count or not torch.equal(source.images[:count], split.images):
        return None
    maps = store.load(prior_key(provider, options, whole.name, name, source), rebuild_damaged=True)
    return None if maps is None else {key: values[:count].clone() for key, values in maps.items()}


def attach_priors(
    dataset: LabelledDataset, spec: PriorSpec, console: Console, whole: LabelledDataset | None = None
) -> LabelledDataset:
    """``dataset`` with the maps of ``spec.provider`` attached to each split.

    Loads them from the store; missing ones are built there first when ``spec.build``, with a
    progress bar per split (plain progress lines when the output is no terminal), else
    :class:`PriorsNotBuiltError` names the command that builds them. When ``dataset`` holds the
    first images of each split of ``whole`` (``data.subset``), a split whose own maps are not
    stored is served from the whole split's maps: priors built once for a dataset serve its
    smoke runs too.
    """
    options = provider_options(spec.provider, spec.options)
    provider = create_provider(spec.provider, spec.options)
    store = spec.store
    keys = {
        name: prior_key(provider, options, dataset.name, name, split)
        for name, split in _splits(dataset).items()
    }
    try:  # a damaged store file is rebuilt when building, else named with the command that does
        maps = {name: store.load(key, rebuild_damaged=spec.build) for name, key in keys.items()}
    except DamagedFileError as error:
        fix = f"build it again with `{spec.command()}`, or pass --build-priors"
        raise DamagedFileError(error.path, error.problem, fix) from None
    if whole is not None and whole is not dataset:
        for name, split in _splits(dataset).items():
            if maps[name] is None:
                maps[name] = _first_maps_of_whole(store, provider, options, whole, name, split)
    missing = [name for name, found in maps.items() if found is None]
    if missing and not spec.build:
        raise PriorsNotBuiltError(
            f"the '{spec.provider}' priors of {dataset.name} ({', '.join(missing)} at "
            f"{dataset.image_size} px) are not built yet in the store {store.root}; build them with "
            f"`{spec.command()}`, or pass --build-priors to build them now (priors built without "
            "--subset serve every subset too)"
        )
    if missing:
        splits = _splits(dataset)
        with progress_display(console) as progress:
            for name in missing:
                split = splits[name]
                task = progress.add_task(f"{spec.provider} priors, {name}", total=len(split), status="")
                started = time.perf_counter()
                maps[name] = store.build(
                    keys[name],
                    lambda split=split, task=task: compute_priors(
                        provider, split.images, lambda done, task=task: progress.advance(task, done)
                    ),
                )
                progress.update(task, completed=len(split))
                console.print(
                    f"{spec.provider} priors of {dataset.name} {name} ({len(split)} images): "
                    f"{time.perf_counter() - started:.1f} s → {store.path(keys[name])}",
                    highlight=False,
                    soft_wrap=True,
                )

    return _with_maps(dataset, maps)


def _with_maps(dataset: LabelledDataset, maps: dict[str, dict]) -> LabelledDataset:
    """``dataset`` with ``maps[split name]`` (name → ``[N, S, S]`` uint8) attached to each split."""

    def attached(name: str, split: ImageSplit | None) -> ImageSplit | None:
        return None if split is None else dataclasses.replace(split, priors=dict(maps[name]))

    return dataclasses.replace(
        dataset,
        train=attached("train", dataset.train),
        val=attached("val", dataset.val),
        test=attached("test", dataset.test),
    )


def computed_priors(dataset: LabelledDataset, provider: PriorProvider) -> LabelledDataset:
    """``dataset`` with ``provider``'s maps computed now and attached, without the store: for
    synthetic data (benchmarks, tests) that no one will see twice."""
    return _with_maps(
        dataset, {name: compute_priors(provider, split.images) for name, split in _splits(dataset).items()}
    )


def store_paths(dataset: LabelledDataset, spec: PriorSpec) -> dict[str, Path]:
    """Where each split's maps of ``spec`` are (or would be) stored."""
    options = provider_options(spec.provider, spec.options)
    provider = create_provider(spec.provider, spec.options)
    return {
        name: spec.store.path(prior_key(provider, options, dataset.name, name, split))
        for name, split in _splits(dataset).items()
    }
