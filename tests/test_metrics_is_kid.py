"""Inception Score and KID against closed forms and direct computations."""

import itertools

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy

from qcsbm.errors import UsageError
from qcsbm.metrics import inception_score, kernel_inception_distance
from qcsbm.metrics.kid import mmd2_unbiased


# --- Inception Score --------------------------------------------------------------------------


def test_inception_score_uniform_logits_is_one():
    mean, std = inception_score(np.zeros((50, 10)), num_splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_distinct_one_hot_is_num_classes():
    # Each consecutive split contains every class once, with (numerically) one-hot predictions.
    num_classes, num_splits = 7, 3
    logits = np.tile(1e4 * np.eye(num_classes), (num_splits, 1))
    mean, std = inception_score(logits, num_splits=num_splits)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_direct_kl():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.standard_normal((40, 6))
    mean, std = inception_score(logits, num_splits=4)

    scores = []
    for split in np.split(softmax(logits, axis=1), 4):
        marginal = split.mean(axis=0)
        scores.append(np.exp(np.mean([entropy(p, marginal) for p in split])))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)
    assert 1.0 <= mean <= 6.0


def test_inception_score_too_few_samples_rejected():
    with pytest.raises(UsageError, match="num_splits 10 needs at least that many samples"):
        inception_score(np.zeros((9, 3)), num_splits=10)


# --- KID ------------------------------------------------------------------------------------


def mmd2_by_loops(x, y):
    """The unbiased MMD^2 written out pair by pair."""
    m, dim = len(x), x.shape[1]

    def kernel(a, b):
        return (a @ b / dim + 1.0) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    within_x = sum(kernel(x[i], x[j]) for i, j in pairs) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    cross = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return within_x + within_y - 2 * cross


def test_kid_full_subsets_match_loops():
    # With subset_size = N every subset is a permutation of the whole set.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 5))
    y = rng.standard_normal((12, 5)) + 0.3
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=12)
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_one_dimensional_closed_form():
    # For d = 1, k(x, y) = x^3 y^3 + 3 x^2 y^2 + 3 x y + 1, so
    # MMD^2 = (E x^3 - E y^3)^2 + 3 (E x^2 - E y^2)^2 + 3 (E x - E y)^2.
    # U[0, 1] against U[0, 2]: 1.75^2 + 3 * 1^2 + 3 * 0.5^2 = 6.8125.
    # Midpoint grids stand in for the uniform laws, so only an O(1/n) error remains.
    n = 2000
    grid = (np.arange(n) + 0.5) / n
    x, y = grid[:, None], 2.0 * grid[:, None]
    mean, _ = kernel_inception_distance(x, y, num_subsets=1, subset_size=n)
    assert mean == pytest.approx(6.8125, rel=0.01)


def test_kid_same_distribution_expectation_zero():
    # Independent repetitions give an honest standard error of the mean.
    rng = np.random.default_rng(4)
    estimates = np.array([mmd2_unbiased(rng.standard_normal((20, 4)),
                                        rng.standard_normal((20, 4))) for _ in range(400)])
    standard_error = estimates.std() / np.sqrt(len(estimates))
    assert abs(estimates.mean()) < 4 * standard_error
    assert (estimates < 0).any()


def test_kid_identical_sets_small_against_shifted():
    rng = np.random.default_rng(5)
    features = rng.standard_normal((300, 8))
    same, _ = kernel_inception_distance(features, features, num_subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(features, features + 1.0, num_subsets=20,
                                           subset_size=100)
    assert abs(same) < 0.05 * shifted


def test_kid_seed_reproducible():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    first = kernel_inception_distance(x, y, num_subsets=5, subset_size=10, seed=7)
    second = kernel_inception_distance(x, y, num_subsets=5, subset_size=10, seed=7)
    assert first == second


def test_kid_too_few_samples_rejected():
    with pytest.raises(UsageError, match="subset_size 1000 needs at least that many samples"):
        kernel_inception_distance(np.zeros((999, 2)), np.zeros((2000, 2)))


def test_kid_subset_size_one_rejected():
    with pytest.raises(UsageError, match="invalid subset_size 1"):
        kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 2)), subset_size=1)


def test_kid_dimension_mismatch_rejected():
    with pytest.raises(UsageError, match="features_a has dimension 2"):
        kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 3)), subset_size=5)
