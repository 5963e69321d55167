"""Kernel Inception Distance: the unbiased squared MMD with a cubic polynomial kernel.

From Bińkowski et al., "Demystifying MMD GANs" (ICLR 2018): with features of
dimension d,

    k(x, y) = (x . y / d + 1)^3,

and for subsets X, Y of m samples each,

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2.

The estimate is averaged over random subsets drawn without replacement. It is unbiased, so
it can be slightly negative when both sets come from one distribution. The kernel and the
defaults (100 subsets of 1000 samples) are those of torch-fidelity 0.4.0.
"""

from __future__ import annotations

import numpy as np

from qcsbm.errors import UsageError
from qcsbm.metrics._arrays import as_matrix, check_int_at_least


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return the kernel matrix (x_i . y_j / d + 1)^3 for x (N, d) and y (M, d)."""
    dim = x.shape[1]
    return (x @ y.T / dim + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Return the unbiased squared MMD between two sets of equal size m >= 2."""
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)

    # Off-diagonal means drop the k(x_i, x_i) terms that bias the V-statistic.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = 100,
                              subset_size: int = 1000,
                              seed: int | np.random.Generator = 0) -> tuple[float, float]:
    """Return the mean and standard deviation of the unbiased KID over random subsets.

    Args:
        features_a, features_b: feature sets (N_a, D) and (N_b, D), each with at least
            `subset_size` rows.
        num_subsets: number of subset pairs averaged.
        subset_size: samples per subset, at least 2. Smaller subsets change the variance of
            the estimate but not its expectation.
        seed: seed or numpy Generator for the subset draws.
    """
    features_a = as_matrix("features_a", features_a)
    features_b = as_matrix("features_b", features_b)
    check_int_at_least("num_subsets", num_subsets, 1)
    check_int_at_least("subset_size", subset_size, 2)
    if features_a.shape[1] != features_b.shape[1]:
        raise UsageError(
            f"features_a has dimension {features_a.shape[1]} but features_b has "
            f"{features_b.shape[1]}; both must come from the same feature extractor")
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.shape[0] < subset_size:
            raise UsageError(
                f"KID with subset_size {subset_size} needs at least that many samples, but "
                f"{name} has {features.shape[0]}; pass more samples or a smaller subset_size")

    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for index in range(num_subsets):
        subset_a = rng.choice(features_a.shape[0], subset_size, replace=False)
        subset_b = rng.choice(features_b.shape[0], subset_size, replace=False)
        estimates[index] = mmd2_unbiased(features_a[subset_a], features_b[subset_b])
    return float(estimates.mean()), float(estimates.std())
