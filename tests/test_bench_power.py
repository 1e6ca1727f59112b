"""The minimum detectable effect of a paired t-test: checked against a simulation of the test and
against the normal closed form it tends to with many pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from maskkit.bench.power import mde_factor, minimum_detectable_effect, paired_t_power, pooled_sd

# Normal quantiles z(0.975) and z(0.80), from a printed table (not from scipy).
Z_975, Z_80 = 1.959964, 0.841621


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_simulated_paired_t_test_rejects_80_percent_of_the_time_at_the_mde(n):
    sd = 0.7
    effect = minimum_detectable_effect(sd, n)
    rng = np.random.default_rng(n)
    trials = 40_000
    differences = rng.normal(effect, sd, size=(trials, n))
    t = differences.mean(axis=1) / (differences.std(axis=1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    # Binomial standard error at 40 000 trials: 0.002; a one-sided test or a missing √n would be
    # far off (at three seeds the one-sided MDE has a two-sided power of about 0.56).
    assert rejected == pytest.approx(0.80, abs=0.01)
    # Half the effect is detected far less often: the MDE is not just any effect.
    half = rng.normal(effect / 2, sd, size=(trials, n))
    t_half = half.mean(axis=1) / (half.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t_half) > stats.t.ppf(0.975, n - 1)) < 0.6


def test_many_pairs_approach_the_normal_closed_form():
    # With n large the t is normal: δ = (z(1 − α/2) + z(power)) · σ / √n (the other tail ~ 0).
    n = 5000
    assert mde_factor(n) == pytest.approx((Z_975 + Z_80) / math.sqrt(n), rel=1e-3)


def test_the_mde_scales_with_the_spread_and_shrinks_with_seeds():
    assert minimum_detectable_effect(0.02, 3) == pytest.approx(2 * minimum_detectable_effect(0.01, 3))
    factors = [mde_factor(n) for n in (2, 3, 5, 10)]
    assert factors == sorted(factors, reverse=True)
    # With three seeds the suite needs more than three standard deviations of the differences;
    # docs/bench.md quotes these factors.
    assert [round(mde_factor(n), 2) for n in (2, 3, 5, 10)] == [11.55, 3.26, 1.68, 1.0]
    assert paired_t_power(mde_factor(3), 1.0, 3) == pytest.approx(0.8, abs=1e-8)


def test_no_mde_without_two_seeds_or_a_spread():
    assert mde_factor(1) is None
    assert minimum_detectable_effect(None, 3) is None
    assert minimum_detectable_effect(0.01, 1) is None
    with pytest.raises(ValueError, match="alpha"):
        mde_factor(3, alpha=0.5, power=0.4)


def test_pooled_sd_weights_each_group_by_its_degrees_of_freedom():
    # Groups (1, 2, 3) and (10, 14): squares 2 and 8 over 2 + 1 degrees of freedom.
    assert pooled_sd([[1.0, 2.0, 3.0], [10.0, 14.0], [5.0]]) == pytest.approx(math.sqrt(10 / 3))
    assert pooled_sd([[1.0], []]) is None
