"""intervals.py on cases whose answer is known in closed form: the binomial interval of one seed, the
spread of two seeds, a constant, and paired comparisons that must (and must not) separate; Student's t
quantiles and the interval over seeds (its coverage by simulation)."""

import math
from statistics import NormalDist

import numpy as np
import pytest

import intervals


def test_one_seed_gives_the_binomial_interval():
    n = 4000
    correct = np.zeros((1, n), dtype=bool)
    correct[0, ::2] = True  # exactly half right
    ci = intervals.interval(correct)
    half = 1.96 * np.sqrt(0.25 / n)  # the normal approximation of the binomial, 0.0155
    assert ci["mean"] == 0.5
    assert ci["low"] == pytest.approx(0.5 - half, abs=0.003) and ci["high"] == pytest.approx(0.5 + half, abs=0.003)


def test_seeds_are_resampled_too():
    """Two seeds at 30 % and 70 % on many questions: a replicate draws both seeds the same (a quarter of
    the time each way) or one of each, so the interval spans from 0.3 to 0.7."""
    n = 5000
    correct = np.zeros((2, n), dtype=bool)
    correct[0, : int(0.3 * n)] = True
    correct[1, : int(0.7 * n)] = True
    ci = intervals.interval(correct)
    assert ci["mean"] == pytest.approx(0.5)
    assert ci["low"] == pytest.approx(0.3, abs=0.02) and ci["high"] == pytest.approx(0.7, abs=0.02)
    assert intervals.interval(np.ones((3, 50))) == {"mean": 1.0, "low": 1.0, "high": 1.0}


def test_paired_comparison_separates_what_unpaired_intervals_cannot():
    rng = np.random.default_rng(1)
    b = rng.random((1, 1000)) < 0.5
    a = b.copy()
    wrong = np.nonzero(~b[0])[0][:50]
    a[0, wrong] = True  # a = b, plus 50 more right answers: +5 points, the same questions otherwise
    ca, cb = intervals.interval(a), intervals.interval(b)
    assert ca["low"] < cb["high"]  # the two intervals overlap ...
    diff = intervals.paired(a, b)
    assert diff["difference"] == pytest.approx(0.05) and diff["separates"]  # ... the paired difference does not
    assert diff["low"] > 0.03 and diff["high"] < 0.07
    same = intervals.paired(b, b)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "separates": False}
    noise = intervals.paired(rng.random((3, 300)) < 0.5, rng.random((3, 300)) < 0.5)
    assert not noise["separates"] and noise["low"] < 0 < noise["high"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="seeds, questions"):
        intervals.interval(np.ones(5))
    with pytest.raises(ValueError, match="one shape"):
        intervals.paired(np.ones((2, 5)), np.ones((3, 5)))


def test_t_quantiles_match_the_closed_forms():
    """df 1 is the Cauchy distribution, df 2 has a closed-form CDF, and a large df is the normal."""
    for p in (0.9, 0.975, 0.995):
        assert intervals.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
        a = 2 * p - 1  # df 2: cdf(x) = 1/2 + x / (2 sqrt(2 + x^2))
        assert intervals.t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-6)
        assert intervals.t_quantile(p, 100_000) == pytest.approx(NormalDist().inv_cdf(p), rel=1e-4)
    with pytest.raises(ValueError, match="df >= 1"):
        intervals.t_quantile(0.975, 0)


def test_the_interval_over_seeds_covers_the_mean_95_percent_of_the_time():
    """Three seeds drawn from a normal distribution, many times over: the t interval holds the true mean in
    ~95 % of draws (a normal-quantile interval would hold it in ~88 %); one seed gives no interval."""
    rng = np.random.default_rng(0)
    draws = rng.normal(5.0, 2.0, (4000, 3))
    held = [(ci["low"] <= 5.0 <= ci["high"]) for ci in map(intervals.over_seeds, draws)]
    assert np.mean(held) == pytest.approx(0.95, abs=0.012)
    ci = intervals.over_seeds([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == 1.0
    assert ci["high"] - ci["mean"] == pytest.approx(intervals.t_quantile(0.975, 2) / math.sqrt(3))
    one = intervals.over_seeds([0.4])
    assert one["mean"] == 0.4 and np.isnan(one["low"]) and np.isnan(one["high"])
