"""Semantic priors: per-pixel importance maps from prior-provider plugins, stored once per
dataset split, carried with their images through augmentation, pooled to the patch grid.

- :mod:`maskkit.priors.provider`: the provider contract (a plugin kind, like policies).
- :mod:`maskkit.priors.compute`: running a provider over a split.
- :mod:`maskkit.priors.store`: the on-disk store and its key.
- :mod:`maskkit.priors.attach`: what a run needs: the store looked up (or built) for its dataset.
- :mod:`maskkit.priors.alignment`: per-pixel maps → ``[B, L]`` on the patch grid.
"""

from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider

__all__ = ["FOREGROUND", "IMPORTANCE", "PriorProvider"]
