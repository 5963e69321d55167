"""Precision, recall, density and coverage from k-nearest-neighbour balls.

From Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models" (ICML
2020). With real points X_i (N of them), fake points Y_j (M), and r(Z) the distance
from Z to its k-th nearest neighbour within its own set (itself excluded):

    precision = mean_j [Y_j lies in some ball B(X_i, r(X_i))]
    recall    = mean_i [X_i lies in some ball B(Y_j, r(Y_j))]
    density   = (1 / (k M)) sum_j sum_i [Y_j in B(X_i, r(X_i))]
    coverage  = mean_i [the nearest Y_j lies in B(X_i, r(X_i))]

Precision and recall are those of Kynkäänniemi et al. (NeurIPS 2019). "In a ball" means a
distance strictly below its radius, as in the authors' `prdc` package (torch-fidelity 0.4.0
counts a distance equal to the radius too). Distances are computed in row chunks, so memory
grows as chunk_size * max(N, M) and not N * M.
"""

from __future__ import annotations

import torch

from qcsbm.errors import UsageError
from qcsbm.metrics._arrays import as_matrix, check_int_at_least


def prdc(real_features, fake_features, *, k: int = 3, chunk_size: int = 1024,
         device: str | torch.device = "cpu") -> dict:
    """Return precision, recall, density and coverage of fake points against real points.

    Args:
        real_features: (N, D) features or raw coordinates of real data, N > k.
        fake_features: (M, D) features or raw coordinates of samples, M > k.
        k: neighbour rank that sets each ball's radius.
        chunk_size: rows per block of pairwise distances. A block holds chunk_size * max(N, M)
            float64 values (80 MB for 1024 * 10,000).
        device: where the distances are computed.

    Returns a dict with "precision", "recall", "density", "coverage" (floats), "k",
    "num_real" and "num_fake".
    """
    real = _as_tensor("real_features", real_features, device)
    fake = _as_tensor("fake_features", fake_features, device)
    check_int_at_least("k", k, 1)
    check_int_at_least("chunk_size", chunk_size, 1)
    if real.shape[1] != fake.shape[1]:
        raise UsageError(
            f"real_features has dimension {real.shape[1]} but fake_features has "
            f"{fake.shape[1]}; both must come from the same feature extractor")
    for name, points in (("real_features", real), ("fake_features", fake)):
        if points.shape[0] <= k:
            raise UsageError(
                f"PRDC with k {k} needs more than {k} points, but {name} has "
                f"{points.shape[0]}; pass more points or a smaller k")

    real_radii = nearest_neighbour_radii(real, k, chunk_size=chunk_size)
    fake_radii = nearest_neighbour_radii(fake, k, chunk_size=chunk_size)

    # One pass over real-fake distances, chunked by real rows. Per-fake results accumulate
    # over the chunks, per-real results are complete within each chunk.
    fake_in_real_balls = torch.zeros(fake.shape[0], dtype=torch.int64, device=real.device)
    real_in_fake_balls = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start in range(0, real.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        distances = _pairwise_distances(real[rows], fake)
        fake_in_real_balls += (distances < real_radii[rows, None]).sum(dim=0)
        real_in_fake_balls[rows] = (distances < fake_radii[None, :]).any(dim=1)
        real_covered[rows] = distances.min(dim=1).values < real_radii[rows]

    return {
        "precision": (fake_in_real_balls > 0).double().mean().item(),
        "recall": real_in_fake_balls.double().mean().item(),
        "density": fake_in_real_balls.double().mean().item() / k,
        "coverage": real_covered.double().mean().item(),
        "k": k,
        "num_real": real.shape[0],
        "num_fake": fake.shape[0],
    }


def nearest_neighbour_radii(points: torch.Tensor, k: int, *,
                            chunk_size: int = 1024) -> torch.Tensor:
    """Return each point's distance to its k-th nearest neighbour in `points` (N, D), itself
    excluded, as a tensor (N,)."""
    radii = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for start in range(0, points.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        distances = _pairwise_distances(points[rows], points)

        # The smallest distance of each row is the point to itself, so rank k is index k.
        radii[rows] = distances.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) through ||a||^2 + ||b||^2 - 2 a.b."""
    squared = (a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1) - 2.0 * (a @ b.T)
    return squared.clamp_min_(0.0).sqrt_()


def _as_tensor(name: str, value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return torch.from_numpy(as_matrix(name, value)).to(device)
