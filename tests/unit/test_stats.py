"""Bootstrap CIs (igpo.stats) on inputs whose answer is known exactly or analytically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from igpo.stats import align, bootstrap_diff, bootstrap_mean, per_question


def test_constant_scores_have_a_zero_width_interval():
    e = bootstrap_mean([0.5] * 10, n_boot=500)
    assert (e.mean, e.lo, e.hi, e.n_questions, e.n_seeds) == (0.5, 0.5, 0.5, 10, 1)


def test_two_questions_give_the_three_point_distribution():
    # resampled means of [0, 1] are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 95 % CI is [0, 1]
    e = bootstrap_mean([0.0, 1.0], n_boot=20_000)
    assert (e.mean, e.lo, e.hi) == (0.5, 0.0, 1.0)


def test_seeds_are_resampled_too():
    # two seeds that disagree everywhere: only seed resampling can move the mean away from 1/2
    e = bootstrap_mean([[0.0] * 50, [1.0] * 50], n_boot=20_000)
    assert (e.mean, e.lo, e.hi, e.n_seeds) == (0.5, 0.0, 1.0, 2)


def test_bernoulli_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.3).astype(float)
    e = bootstrap_mean(x, n_boot=20_000)
    expected = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert e.half_width == pytest.approx(expected, rel=0.08)
    assert e.lo < x.mean() < e.hi


def test_paired_difference_of_identical_runs_is_exactly_zero():
    x = np.random.default_rng(2).random(30)
    e = bootstrap_diff(x, x, n_boot=1000)
    assert (e.mean, e.lo, e.hi) == (0.0, 0.0, 0.0)


def test_paired_difference_cancels_question_difficulty():
    # after = before + 0.1 on every question: unpaired noise would be large, paired noise is zero
    before = np.random.default_rng(3).random(200)
    e = bootstrap_diff(before + 0.1, before, n_boot=2000)
    assert e.mean == pytest.approx(0.1)
    assert e.lo == pytest.approx(0.1) and e.hi == pytest.approx(0.1)


def test_same_seed_same_interval_and_errors():
    x = np.random.default_rng(4).random(50)
    assert bootstrap_mean(x, seed=7) == bootstrap_mean(x, seed=7)
    with pytest.raises(ValueError, match="same questions"):
        bootstrap_diff(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([0.0, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        bootstrap_mean([])


def test_per_question_and_align():
    pq = per_question([("a", 1), ("a", 0), ("b", 1)])
    assert pq == {"a": 0.5, "b": 1.0}
    ids, arr = align([pq, {"b": 0.0, "a": 1.0, "c": 1.0}])
    assert ids == ["a", "b"] and arr.tolist() == [[0.5, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="share no"):
        align([{"a": 1.0}, {"b": 1.0}])
