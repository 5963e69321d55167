"""Fréchet distance between Gaussian fits of two feature sets (FID on Inception features).

For N(mu1, S1) and N(mu2, S2) (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", NeurIPS 2017):

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

For any factor F with S1 = F F^T, S1 S2 is similar to the symmetric PSD matrix F^T S2 F, so
tr((S1 S2)^(1/2)) is the sum of the square roots of that matrix's eigenvalues. F is the
Cholesky factor of S1, or its symmetric square root from an eigendecomposition when S1 is
singular, as it is for fewer samples than feature dimensions. Either way no complex arithmetic
of a general matrix square root is needed.
"""

from __future__ import annotations

import logging

import numpy as np

from qcsbm.errors import UsageError
from qcsbm.metrics._arrays import as_covariance, as_matrix, as_vector

logger = logging.getLogger(__name__)


def feature_statistics(features, *, chunk_size: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean (D,) and the unbiased covariance (D, D) of features (N, D), N >= 2.

    Accumulates in float64 over row chunks, so float32 features are never copied whole.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise UsageError(f"features must have shape (N, D), got shape {features.shape}")
    num_samples, dim = features.shape
    if num_samples < 2:
        raise UsageError(
            f"feature statistics need at least 2 samples, got {num_samples}; "
            "pass more images")
    if num_samples < dim:
        logger.warning(
            "covariance of %d features from only %d samples is singular; FID from it is "
            "strongly biased upwards", dim, num_samples)

    # Two passes, the mean first and then centred outer products, so float64 accuracy is kept
    # even when the mean is large against the spread.
    starts = range(0, num_samples, chunk_size)
    mu = sum(as_matrix("features", features[s:s + chunk_size]).sum(axis=0) for s in starts)
    mu = mu / num_samples

    scatter = np.zeros((dim, dim))
    for start in starts:
        centred = as_matrix("features", features[start:start + chunk_size]) - mu
        scatter += centred.T @ centred
    return mu, scatter / (num_samples - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Return the squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D), symmetric positive semi-definite. Small
            negative eigenvalues from rounding are treated as zero.

    Computed in float64. The result is clipped at 0, because rounding can make it about
    -1e-12 for identical statistics.
    """
    mu1, mu2 = as_vector("mu1", mu1), as_vector("mu2", mu2)
    sigma1, sigma2 = as_covariance("sigma1", sigma1), as_covariance("sigma2", sigma2)
    dim = mu1.shape[0]
    for name, array in (("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if array.shape[0] != dim:
            raise UsageError(
                f"{name} has dimension {array.shape[0]} but mu1 has {dim}; "
                "both statistics must come from the same feature extractor")

    # tr((S1 S2)^(1/2)) = tr((F^T S2 F)^(1/2)) for S1 = F F^T.
    factor = _psd_factor(sigma1)
    product = factor.T @ sigma2 @ factor
    trace_sqrt_product = np.sqrt(_psd_eigenvalues(product)).sum()

    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product
    return max(float(distance), 0.0)


def _psd_eigenvalues(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric part of `matrix`, with negative rounding noise set to 0."""
    symmetric = 0.5 * (matrix + matrix.T)
    return np.clip(np.linalg.eigvalsh(symmetric), 0.0, None)


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
    """Return F with F F^T = matrix for a PSD matrix: the Cholesky factor, which is several times
    cheaper, or the symmetric square root when the matrix is singular."""
    symmetric = 0.5 * (matrix + matrix.T)
    try:
        return np.linalg.cholesky(symmetric)
    except np.linalg.LinAlgError:
        pass
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T
