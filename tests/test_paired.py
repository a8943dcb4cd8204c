"""Paired statistics: a real gain is detected, noise is not, and the exact-p floor is honest."""

import numpy as np
import pytest
from scipy.stats import wilcoxon

from drdm.metrics.paired import paired_difference


def test_a_consistent_gain_holds_and_noise_does_not():
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.05, 12)
    gain = paired_difference(base, base + 0.03 + rng.normal(0, 0.005, 12))
    assert gain.holds and gain.low > 0 and 0.02 < gain.mean < 0.04 and gain.n == 12
    noise = paired_difference(base, base + rng.normal(0, 0.03, 12))
    assert not noise.holds and noise.low < 0 < noise.high


def test_four_seeds_can_never_reach_significance():
    """The exact two-sided Wilcoxon floor with 4 units is 2 / 16 = 0.125, however large the gain."""
    result = paired_difference([0.60, 0.61, 0.62, 0.63], [0.70, 0.72, 0.73, 0.76])
    assert result.p == pytest.approx(0.125) and not result.holds
    assert result.p == pytest.approx(wilcoxon([0.1, 0.11, 0.11, 0.13]).pvalue)


def test_mismatched_arms_are_refused():
    with pytest.raises(ValueError, match="equal 1-D lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
