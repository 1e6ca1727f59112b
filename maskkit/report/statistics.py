"""Statistics over seeds: mean ± sample standard deviation, and the paired difference of two
policies with its Student-t interval.

Used by ``maskkit bench``'s report (:mod:`maskkit.bench.aggregate`) and by ``maskkit trial``
(:mod:`maskkit.engine.trial`):

- :func:`spread`: mean and sample standard deviation (``ddof=1``; none with one value);
- :func:`paired_difference`: ``d_s = x_policy(s) − x_baseline(s)`` over the seeds ``s`` both
  have, its mean, and the 95 % Student-t interval ``mean(d) ± t(0.975, n − 1) · sd(d) / √n``;
  with fewer than two pairs there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of ``n`` values (``std`` None when ``n < 2``)."""

    mean: float
    std: float | None
    n: int


def spread(values: list[float]) -> Spread | None:
    """The :class:`Spread` of ``values``; None for no values."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return Spread(float(array.mean()), std, len(array))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences ``policy − baseline`` over ``n`` seeds, and its
    ``confidence`` Student-t interval ``(low, high)`` (None when ``n < 2``)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """The paired difference of two policies' values by seed (seed → value), over the seeds
    both have; None when they share none."""
    seeds = sorted(values.keys() & baseline.keys())
    if not seeds:
        return None
    differences = np.asarray([values[seed] - baseline[seed] for seed in seeds], dtype=np.float64)
    mean, n = float(differences.mean()), len(differences)
    if n < 2:
        return PairedDifference(mean, None, None, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * float(differences.std(ddof=1)) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)
