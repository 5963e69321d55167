"""Precision, recall, density and coverage against a brute-force computation."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from qcsbm.errors import UsageError
from qcsbm.metrics import prdc


def prdc_brute_force(real, fake, k):
    """PRDC from full distance matrices, following the definitions of Naeem et al. (2020)."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    cross = cdist(real, fake)
    in_real_balls = cross < real_radii[:, None]
    return {
        "precision": in_real_balls.any(axis=0).mean(),
        "recall": (cross < fake_radii[None, :]).any(axis=1).mean(),
        "density": in_real_balls.sum(axis=0).mean() / k,
        "coverage": (cross.min(axis=1) < real_radii).mean(),
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force_chunked(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((60, 2))
    fake = 0.8 * rng.standard_normal((45, 2)) + 0.4
    result = prdc(real, fake, k=k, chunk_size=7)
    expected = prdc_brute_force(real, fake, k)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name


def test_prdc_high_dimensional_matches_brute_force():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((80, 64))
    fake = rng.standard_normal((70, 64)) * 1.1
    result = prdc(real, fake, k=3, chunk_size=16)
    expected = prdc_brute_force(real, fake, 3)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name


def test_prdc_identical_sets():
    rng = np.random.default_rng(11)
    points = rng.standard_normal((200, 16))
    result = prdc(points, points.copy())
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
    assert result["coverage"] == 1.0
    assert result["density"] == pytest.approx(prdc_brute_force(points, points, 3)["density"])


def test_prdc_far_disjoint_sets_zero():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((50, 2))
    fake = rng.standard_normal((40, 2)) + 1000.0
    result = prdc(real, fake, k=3)
    assert result["precision"] == 0.0
    assert result["recall"] == 0.0
    assert result["density"] == 0.0
    assert result["coverage"] == 0.0


def test_prdc_records_k_and_counts():
    rng = np.random.default_rng(13)
    result = prdc(rng.standard_normal((30, 2)), rng.standard_normal((20, 2)), k=4)
    assert result["k"] == 4
    assert result["num_real"] == 30
    assert result["num_fake"] == 20


def test_prdc_raw_coordinates_half_covered():
    # Fake points cover only the left half of a real grid: precision stays 1, coverage drops.
    grid = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0)), axis=-1).reshape(-1, 2)
    left = grid[grid[:, 0] < 10]
    result = prdc(grid, left, k=3)
    assert result["precision"] == 1.0
    assert 0.45 <= result["coverage"] <= 0.6
    assert result["recall"] == pytest.approx(prdc_brute_force(grid, left, 3)["recall"])


def test_prdc_too_few_points_rejected():
    with pytest.raises(UsageError, match="needs more than 3 points, but fake_features has 3"):
        prdc(np.zeros((10, 2)), np.zeros((3, 2)), k=3)


def test_prdc_dimension_mismatch_rejected():
    with pytest.raises(UsageError, match="real_features has dimension 2"):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)))
