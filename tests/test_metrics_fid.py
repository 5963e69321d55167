"""Fréchet distance and feature statistics against closed forms and scipy."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import special_ortho_group

from qcsbm.errors import UsageError
from qcsbm.metrics import feature_statistics, frechet_distance


def random_spd(dim, rng):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 10, 100])
def test_identity_vs_four_identity_equals_dim(dim):
    # tr(I) + tr(4I) - 2 tr(2I) = d.
    zero = np.zeros(dim)
    fid = frechet_distance(zero, np.eye(dim), zero, 4 * np.eye(dim))
    assert fid == pytest.approx(dim, rel=1e-12)


def test_commuting_covariances_closed_form():
    # Shared eigenvectors Q: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    dim = 20
    rotation = special_ortho_group.rvs(dim, random_state=1)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1 = rotation @ np.diag(a) @ rotation.T
    sigma2 = rotation @ np.diag(b) @ rotation.T

    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(2)
    dim = 30
    sigma1, sigma2 = random_spd(dim, rng), random_spd(dim, rng)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)

    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(root).real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_identical_statistics_near_zero():
    rng = np.random.default_rng(3)
    features = rng.gamma(2.0, 0.5, size=(3000, 256))
    mu, sigma = feature_statistics(features)
    fid = frechet_distance(mu, sigma, mu, sigma)
    assert isinstance(fid, float)
    assert 0.0 <= fid < 1e-6


def test_singular_covariances_real_and_symmetric():
    # Fewer samples than dimensions: both covariances are singular.
    rng = np.random.default_rng(4)
    mu1, sigma1 = feature_statistics(rng.standard_normal((8, 64)))
    mu2, sigma2 = feature_statistics(rng.standard_normal((8, 64)) + 0.5)

    forward = frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = frechet_distance(mu2, sigma2, mu1, sigma1)
    assert isinstance(forward, float)
    assert np.isfinite(forward)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) < 1e-6


def test_scalar_gaussians_closed_form():
    # d = 1: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    fid = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert fid == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_feature_statistics_chunked_matches_numpy():
    rng = np.random.default_rng(5)
    features = (rng.standard_normal((1001, 7)) + 100.0).astype(np.float32)
    mu, sigma = feature_statistics(features, chunk_size=128)
    reference = features.astype(np.float64)
    np.testing.assert_allclose(mu, reference.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(reference, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_statistics_one_sample_rejected():
    with pytest.raises(UsageError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))


def test_dimension_mismatch_rejected():
    with pytest.raises(UsageError, match="mu2 has dimension 3"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_non_square_covariance_rejected():
    with pytest.raises(UsageError, match="sigma1 must be a square matrix"):
        frechet_distance(np.zeros(2), np.zeros((2, 3)), np.zeros(2), np.eye(2))


def test_nan_mean_rejected():
    with pytest.raises(UsageError, match="mu1 contains NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("num_samples", [5, 200])
def test_covariance_factor_reconstructs(num_samples):
    # 5 samples in 40 dimensions give a singular covariance, 200 a definite one.
    from qcsbm.metrics.fid import _psd_factor

    rng = np.random.default_rng(num_samples)
    _, sigma = feature_statistics(rng.standard_normal((num_samples, 40)))
    factor = _psd_factor(sigma)
    np.testing.assert_allclose(factor @ factor.T, sigma, atol=1e-10)
