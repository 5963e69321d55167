"""Time the 2spirals oracle: exact scores of the smoothed empirical distribution.

Evaluates `TwoSpirals.score` for a batch of query points against the fixed oracle sample
(default: 10,000 queries x 50,000 points) at several noise levels. Prints one Markdown row per
sigma with the wall and CPU time (all threads) and the throughput in (query, point) pairs per
wall second. The first 100 queries are also checked against a direct float64 evaluation
on the full matrix of coordinate differences.

    python benchmarks/oracle_spirals.py [--queries 10000] [--points 50000] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from qcsbm.data.toy2d import DEFAULT_PAIR_BUDGET, TwoSpirals


def direct_score(x: torch.Tensor, sigma: float, points: torch.Tensor) -> torch.Tensor:
    """Compute the score from the full (B, N) matrix of squared distances, for checking."""
    sq_dist = (x[:, None, :] - points[None]).square().sum(dim=2)
    weights = torch.softmax(-sq_dist / (2 * sigma**2), dim=1)
    return (weights @ points - x) / sigma**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000, help="number of query points")
    parser.add_argument("--points", type=int, default=50_000,
                        help="size of the oracle sample (num_oracle_points)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 3.0],
                        help="noise levels to time")
    parser.add_argument("--pair-budget", type=int, default=DEFAULT_PAIR_BUDGET,
                        help="(query, point) pairs per chunk")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads; default: torch's choice")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dataset = TwoSpirals(num_oracle_points=args.points, pair_budget=args.pair_budget)
    start = time.perf_counter()
    points = dataset.oracle_points
    draw_seconds = time.perf_counter() - start

    # Queries: fresh data samples blurred by unit noise, so they spread beyond the arms.
    generator = torch.Generator().manual_seed(1)
    x = dataset.sample(args.queries, generator, dtype=torch.float64)
    x = x + torch.randn(x.shape, generator=generator, dtype=torch.float64)

    print(f"# 2spirals oracle: {args.queries} queries x {args.points} points, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"drawing the oracle sample: {draw_seconds:.3f} s\n")
    print("| sigma | wall seconds | CPU seconds | pairs / s | max rel. error vs direct "
          "(100 queries) |")
    print("|---|---|---|---|---|")
    for sigma in args.sigmas:
        start, cpu_start = time.perf_counter(), time.process_time()
        score = dataset.score(x, sigma)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start

        check = direct_score(x[:100], sigma, points)
        error = ((score[:100] - check).abs() / check.abs().clamp(min=1.0)).max().item()
        rate = args.queries * args.points / seconds
        print(f"| {sigma:g} | {seconds:.2f} | {cpu_seconds:.2f} | {rate:.3g} | {error:.1e} |")


if __name__ == "__main__":
    main()
