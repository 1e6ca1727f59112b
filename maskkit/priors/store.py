"""The priors store: per-pixel prior maps of one dataset split, computed once and kept on disk.

Where: ``$MASKKIT_PRIORS_DIR`` if set, else ``<user cache dir>/maskkit/priors`` (e.g.
``~/.cache/maskkit/priors`` on Linux), or the folder a run names in ``data.priors_dir``. The data
folder itself is not used, since it may be read-only.

Layout: ``<root>/<dataset>/<provider>/<split>-<S>px-<digest>.safetensors``, one file per split,
holding one ``[N, S, S]`` uint8 tensor per map (``round(255 · value)``) and the key as JSON
metadata. The digest is a hash of the whole :class:`PriorKey`: the provider, its version and
resolved options (and any fingerprint it adds, such as a checkpoint's), the dataset, the split,
the resolution, and a fingerprint of the split's images as read from the data file. Change any of
them and the digest changes, so a stale store is never used; it is simply not found.

Files are written through :func:`maskkit.cache.cached_tensors`: two builds of the same key at
once compute it once, and a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskkit.cache import cached_tensors, load_if_valid
from maskkit.errors import ConfigError, DamagedFileError

#: Environment variable that overrides the default store folder.
PRIORS_DIR_ENV = "MASKKIT_PRIORS_DIR"
#: Bumped when the file layout or the quantisation changes.
FORMAT_VERSION = 1


def default_store_dir() -> Path:
    """``$MASKKIT_PRIORS_DIR`` if set and non-empty, else ``<user cache dir>/maskkit/priors``."""
    env = os.environ.get(PRIORS_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("maskkit")) / "priors"


def images_fingerprint(images: Tensor) -> str:
    """sha256 of ``[N, C, H, W]`` uint8 pixels (and their shape): changes whenever the data does."""
    array = images.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclass(frozen=True)
class PriorKey:
    """Everything the stored maps of one split depend on.

    Attributes:
        provider: the provider's name.
        provider_version: its ``version`` (bumped when its algorithm changes).
        options: its resolved constructor options.
        fingerprint: what else the provider says decides the maps (e.g. a checkpoint's stat).
        dataset: the dataset's name.
        split: ``train``, ``val`` or ``test``.
        resolution: the side S of the square images the maps were computed on.
        images: :func:`images_fingerprint` of the split's images at that resolution.
        count: N, images in the split.
    """

    provider: str
    provider_version: int
    options: dict[str, Any]
    fingerprint: dict[str, Any]
    dataset: str
    split: str
    resolution: int
    images: str
    count: int
    format_version: int = field(default=FORMAT_VERSION)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); raises ConfigError on options that JSON cannot hold."""
        try:
            return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        except TypeError as error:
            raise ConfigError(
                f"the options of prior provider '{self.provider}' must be plain values "
                f"(numbers, strings, lists): {error}"
            ) from None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def relative_path(self) -> Path:
        return (
            Path(self.dataset) / self.provider / f"{self.split}-{self.resolution}px-{self.digest}.safetensors"
        )


@dataclass(frozen=True)
class PriorStore:
    """The store under ``root``."""

    root: Path

    def path(self, key: PriorKey) -> Path:
        return self.root / key.relative_path

    def load(self, key: PriorKey, rebuild_damaged: bool = False) -> dict[str, Tensor] | None:
        """The stored maps of ``key`` (name → ``[N, S, S]`` uint8), or None if not built.

        A file that does not read back (truncated, overwritten) raises
        :class:`~maskkit.errors.DamagedFileError`, unless ``rebuild_damaged``: then it reads as not
        built, and :meth:`build` replaces it.
        """
        path = self.path(key)
        maps = load_if_valid(path)
        if maps is None and path.is_file() and not rebuild_damaged:
            raise DamagedFileError(
                path,
                "not a readable safetensors file",
                "build it again with `maskkit priors build` (the same options), or pass --build-priors",
            )
        return None if maps is None or not _fits(maps, key) else maps

    def build(self, key: PriorKey, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The maps of ``key``, computed by ``compute`` and stored first unless already there."""
        maps = cached_tensors(self.path(key), compute, metadata={"key": key.to_json()})
        if not _fits(maps, key):
            raise ConfigError(f"the priors store file {self.path(key)} does not fit its key; delete it")
        return maps


def _fits(maps: dict[str, Tensor], key: PriorKey) -> bool:
    shape = (key.count, key.resolution, key.resolution)
    return bool(maps) and all(m.dtype == torch.uint8 and tuple(m.shape) == shape for m in maps.values())
