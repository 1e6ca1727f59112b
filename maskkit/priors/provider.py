"""The prior-provider contract: images in, per-pixel importance maps in [0, 1] out.

A provider is a plugin like a policy (hook ``maskkit_prior_providers``, entry-point group
``maskkit``). It turns a chunk of images into named per-pixel maps: always ``importance``, and
``foreground`` (a binary lesion or object map) where that makes sense. Policies name the maps
they read in ``MaskPolicy.requires``; ``--prior NAME`` picks the provider that supplies them.

Maps are computed once per dataset split and stored (:mod:`maskkit.priors.store`), so a
provider may be slow (SAM) but must be deterministic: the same images and options give the same
maps.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

import numpy as np

from maskkit.errors import PluginError

#: The map every provider gives: per-pixel importance in [0, 1] (1 = most important).
IMPORTANCE = "importance"
#: The optional binary map: 1 on the foreground (lesion, object), 0 on the background.
FOREGROUND = "foreground"


class PriorProvider(abc.ABC):
    """Base class of every prior provider.

    Subclasses set ``name``, ``description`` and ``provides``, take their options as keyword
    arguments of ``__init__`` (with defaults), and implement :meth:`compute`. Constructors must be
    cheap and check their options (a bad option fails before anything is computed); load models
    lazily in :meth:`compute`.

    The store's key holds every constructor argument, defaults filled in (see
    :func:`resolved_options`), the class's ``version`` and :meth:`fingerprint`, so changing any
    of them never reuses stale maps. Bump ``version`` when the algorithm changes.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset({IMPORTANCE})
    version: ClassVar[int] = 1

    def fingerprint(self) -> dict[str, Any]:
        """What else decides the maps besides the options, e.g. a checkpoint file's size and
        time (JSON-serialisable). Empty by default."""
        return {}

    @abc.abstractmethod
    def compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per-pixel maps of a chunk of images.

        Each image's maps must depend on that image alone, not on the others of the chunk: the
        store serves a subset of a split (``data.subset``) from the first maps of the whole split.

        Args:
            images: ``[N, H, W, 3]`` uint8 RGB.

        Returns:
            One ``[N, H, W]`` float array in [0, 1] per name in ``provides`` (binary maps as 0/1).
        """


def resolved_options(provider_class: type[PriorProvider], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the constructor's defaults filled in, sorted by name: what the store's key
    holds, so that passing a default explicitly and leaving it out give the same key.

    Raises:
        TypeError: an option the constructor does not take.
    """
    bound = inspect.signature(provider_class).bind(**options)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in inspect.signature(provider_class).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return dict(sorted(arguments.items()))


class MalformedPriorError(PluginError):
    """A provider returned maps that break the contract."""


def check_maps(maps: object, provider: PriorProvider, count: int, height: int, width: int) -> None:
    """Raise :class:`MalformedPriorError` unless ``maps`` holds every name in ``provides`` as a
    finite ``[count, height, width]`` array in [0, 1]."""

    def fail(problem: str) -> None:
        raise MalformedPriorError(
            f"prior provider '{provider.name}' returned malformed maps: {problem}. Fix the plugin."
        )

    if not isinstance(maps, dict):
        fail(f"expected a dict of arrays, got {type(maps).__name__}")
    for name in sorted(provider.provides):
        if name not in maps:
            fail(f"the '{name}' map is missing (it returned {sorted(maps)})")
        values = np.asarray(maps[name])
        if values.shape != (count, height, width):
            fail(f"'{name}' has shape {list(values.shape)}, expected {[count, height, width]}")
        if not np.isfinite(values).all():
            fail(f"'{name}' holds non-finite values")
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < -1e-6 or high > 1 + 1e-6:
            fail(f"'{name}' holds values in [{low:.3g}, {high:.3g}], outside [0, 1]")
