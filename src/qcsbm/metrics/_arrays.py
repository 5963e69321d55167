"""Input checks shared by the metrics: convert to float64 numpy arrays or raise UsageError."""

import numpy as np

from qcsbm.errors import UsageError


def as_matrix(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise UsageError(f"{name} must have shape (N, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UsageError(f"{name} contains NaN or infinite values")
    return array


def as_vector(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise UsageError(f"{name} must have shape (D,), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UsageError(f"{name} contains NaN or infinite values")
    return array


def as_covariance(name: str, value) -> np.ndarray:
    array = np.atleast_2d(np.asarray(value, dtype=np.float64))
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise UsageError(f"{name} must be a square matrix (D, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UsageError(f"{name} contains NaN or infinite values")
    return array


def check_int_at_least(name: str, value, minimum: int) -> None:
    """Raise UsageError unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"invalid {name} {value!r}; expected an integer >= {minimum}")
