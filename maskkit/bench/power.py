"""The smallest difference a suite could have detected: the minimum detectable effect (MDE).

A suite compares two policies by the paired t-test behind its intervals: over ``n`` seeds the
per-seed differences ``d_s`` have a mean ``d̄`` and a standard deviation ``σ_d``, and
``t = d̄ / (σ_d / √n)`` follows Student's t with ``n − 1`` degrees of freedom when the true
difference is 0. When the true difference is ``δ``, ``t`` follows the **noncentral** t with
``n − 1`` degrees of freedom and noncentrality ``λ = δ √n / σ_d``, so the power of the two-sided
test at level ``α`` is exactly

    power(δ) = P(T > t_{1−α/2}) + P(T < −t_{1−α/2}),   T ~ nct(n − 1, δ √n / σ_d)

(``scipy.stats.nct``; no normal approximation, which would understate the MDE badly at three
seeds). The MDE is the ``δ`` at which the power reaches the target (80 %), found by root finding
(``scipy.optimize.brentq``; the power grows with ``δ``). It scales with ``σ_d``: ``MDE = k(n) · σ_d``
with ``k`` depending on ``n``, ``α`` and the power alone.

``σ_d`` comes from the suite itself: the pooled standard deviation of the paired differences of
every policy to the baseline (:func:`pooled_sd`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import optimize, stats

__all__ = ["mde_factor", "minimum_detectable_effect", "paired_t_power", "pooled_sd"]


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """The power of the two-sided paired t-test at level ``alpha`` over ``n`` pairs whose
    differences have mean ``effect`` and standard deviation ``sd`` (> 0), ``n ≥ 2``."""
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    noncentrality = effect * math.sqrt(n) / sd
    # The lower tail as the upper tail at −λ (the t's symmetry): scipy's nct.cdf far below a large
    # noncentrality can come out NaN, its sf stays finite.
    upper_tail = stats.nct.sf(critical, df, noncentrality)
    lower_tail = stats.nct.sf(critical, df, -noncentrality)
    return float(upper_tail + lower_tail)


def mde_factor(n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """``k(n)``: the minimum detectable effect in units of the differences' standard deviation.

    Args:
        n: pairs (seeds) per comparison.
        alpha: two-sided level of the test.
        power: the probability of rejecting at the MDE.

    Returns:
        ``δ / σ_d`` at which :func:`paired_t_power` equals ``power``; None for ``n < 2`` (no
        test: one pair has no spread).
    """
    if n < 2:
        return None
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha} and power {power}")
    upper = 1.0
    while paired_t_power(upper, 1.0, n, alpha) < power:  # grow the bracket until it holds the root
        upper *= 2
    return float(optimize.brentq(lambda k: paired_t_power(k, 1.0, n, alpha) - power, 0.0, upper, xtol=1e-10))


def minimum_detectable_effect(
    sd: float | None, n: int, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """``k(n) · sd`` (:func:`mde_factor`), in the units of ``sd``; None without ``sd`` or with
    ``n < 2``."""
    factor = mde_factor(n, alpha, power)
    if sd is None or factor is None or not math.isfinite(sd):
        return None
    return factor * sd


def pooled_sd(groups: Iterable[Iterable[float]]) -> float | None:
    """The pooled sample standard deviation of several groups of paired differences:
    ``√(Σ_g Σ_s (d_gs − d̄_g)² / Σ_g (n_g − 1))``, each group around its own mean.

    Args:
        groups: per comparison (a policy against the baseline), its per-seed differences.

    Returns:
        The pooled standard deviation; None when no group has two values.
    """
    squares, degrees = 0.0, 0
    for group in groups:
        values = np.asarray(list(group), dtype=np.float64)
        if len(values) > 1:
            squares += float(((values - values.mean()) ** 2).sum())
            degrees += len(values) - 1
    return math.sqrt(squares / degrees) if degrees else None
