"""``center``: a Gaussian centre prior, the trivial baseline (the same map for every image)."""

from __future__ import annotations

import numpy as np

from maskkit.hookspecs import hookimpl
from maskkit.priors.provider import FOREGROUND, IMPORTANCE, PriorProvider


class CenterPrior(PriorProvider):
    """``importance = exp(−d² / 2σ²)``, d the distance from the image centre in units of the
    side; ``foreground`` is where the importance reaches ``foreground_level`` (a disk)."""

    name = "center"
    description = "Gaussian centre prior exp(−d²/2σ²), σ a fraction of the side; the trivial baseline."
    provides = frozenset({IMPORTANCE, FOREGROUND})

    def __init__(self, sigma: float = 0.25, foreground_level: float = 0.5) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if not 0 < foreground_level <= 1:
            raise ValueError(f"foreground_level must be in (0, 1], got {foreground_level!r}")
        self.sigma = float(sigma)
        self.foreground_level = float(foreground_level)

    def compute(self, images: np.ndarray) -> dict[str, np.ndarray]:
        count, height, width = images.shape[:3]
        rows = (np.arange(height) + 0.5) / height - 0.5  # pixel centres, in units of the side
        cols = (np.arange(width) + 0.5) / width - 0.5
        distance2 = rows[:, None] ** 2 + cols[None, :] ** 2  # [H, W]
        importance = np.exp(-distance2 / (2 * self.sigma**2))
        importance = np.broadcast_to(importance, (count, height, width)).astype(np.float32)
        foreground = (importance >= self.foreground_level).astype(np.float32)
        return {IMPORTANCE: importance, FOREGROUND: foreground}


@hookimpl
def maskkit_prior_providers() -> list[type[PriorProvider]]:
    return [CenterPrior]
