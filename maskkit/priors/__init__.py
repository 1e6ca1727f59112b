"""Semantic priors: per-pixel importance maps from prior-provider plugins, stored once per
dataset split, carried with their images through augmentation, pooled to the patch grid.

- :mod:`maskkit.priors.provider`: the provider contract (a plugin kind, like policies).
- :mod:`maskkit.priors.compute`: running a provider over a split.
- :mod:`maskkit.priors.store`: the on-disk store and its key.
- :mod:`maskkit.priors.alignment`: per-pixel maps → ``[B, L]`` on the patch grid.

Nothing here looks a provider up by name: the package sits below the plugin manager
(:mod:`maskkit.plugins`), which imports the contract. What a run needs from the store (the
provider found by name, the store looked up or built for its dataset) is
:mod:`maskkit.engine.priors`, above it (``docs/architecture.md``).
"""

from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider

__all__ = ["FOREGROUND", "IMPORTANCE", "PriorProvider"]
