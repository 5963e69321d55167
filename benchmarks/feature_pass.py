"""Time the parts of a sample-quality evaluation: Inception-v3 feature pass, FID, KID, PRDC.

The feature pass runs torch-fidelity's FID Inception-v3 code. Without --weights it uses random
weights of the same architecture: speed does not depend on the values, but the features are
meaningless. FID, KID and PRDC run on random features of Inception's size (2048).

    python benchmarks/feature_pass.py                      # all parts, CPU-sized defaults
    python benchmarks/feature_pass.py --prdc-points 10000  # PRDC at 10,000 x 10,000 points

Prints one JSON object: seconds per part, images per second, and the peak resident memory of
the process after each part (ru_maxrss, so it only grows).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qcsbm.metrics import (InceptionV3Features, extract_features, feature_statistics,
                           frechet_distance, kernel_inception_distance, prdc)


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_feature_pass(args) -> dict:
    if args.weights is None:
        from qcsbm.metrics.inception import untrained_inception_state_dict

        folder = tempfile.TemporaryDirectory()
        weights = Path(folder.name) / "random-inception.pth"
        torch.save(untrained_inception_state_dict(seed=0), weights)
    else:
        weights = args.weights
    extractor = InceptionV3Features(weights).to(args.device)

    rng = np.random.default_rng(0)
    shape = (args.num_images, args.image_size, args.image_size, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)

    # One warm-up batch so that one-time setup is not timed.
    extract_features(images[:1], extractor, device=args.device, progress=False)
    start = time.perf_counter()
    extract_features(images, extractor, batch_size=args.batch_size, device=args.device,
                     progress=False)
    seconds = time.perf_counter() - start
    return {"feature_pass_s": seconds, "images_per_s": args.num_images / seconds,
            "random_weights": args.weights is None}


def time_statistics(args) -> dict:
    rng = np.random.default_rng(1)
    real = rng.random((args.stat_points, args.dim)).astype(np.float32)
    fake = (rng.random((args.stat_points, args.dim)) + 0.01).astype(np.float32)

    start = time.perf_counter()
    mu_real, sigma_real = feature_statistics(real)
    mu_fake, sigma_fake = feature_statistics(fake)
    frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
    fid_seconds = time.perf_counter() - start

    subset_size = min(1000, args.stat_points)
    start = time.perf_counter()
    kernel_inception_distance(real, fake, num_subsets=args.kid_subsets, subset_size=subset_size)
    kid_seconds = time.perf_counter() - start
    return {"fid_s": fid_seconds, "kid_s": kid_seconds, "kid_subsets": args.kid_subsets,
            "kid_subset_size": subset_size, "peak_rss_after_stats_mib": peak_rss_mib()}


def time_prdc(args) -> dict:
    rng = np.random.default_rng(2)
    real = rng.standard_normal((args.prdc_points, args.dim)).astype(np.float32)
    fake = rng.standard_normal((args.prdc_points, args.dim)).astype(np.float32)
    rss_before = peak_rss_mib()

    start = time.perf_counter()
    prdc(real, fake, k=3, device=args.device)
    seconds = time.perf_counter() - start
    return {"prdc_s": seconds, "prdc_points": args.prdc_points,
            "peak_rss_before_prdc_mib": rss_before, "peak_rss_after_prdc_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None,
                        help="real Inception weights file; random weights when omitted")
    parser.add_argument("--device", default="cpu", help="torch device of the network and PRDC")
    parser.add_argument("--num-images", type=int, default=32, help="images in the timed pass")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension for the stats")
    parser.add_argument("--stat-points", type=int, default=2000,
                        help="feature rows per set for FID and KID")
    parser.add_argument("--kid-subsets", type=int, default=10, help="KID subsets timed")
    parser.add_argument("--prdc-points", type=int, default=2000,
                        help="points per set for PRDC (10000 for the full-size case)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["features", "stats", "prdc"],
                        help="parts not to run")
    args = parser.parse_args()

    result = {"device": args.device, "torch_threads": torch.get_num_threads()}
    if "features" not in args.skip:
        result.update(time_feature_pass(args))
    if "stats" not in args.skip:
        result.update(time_statistics(args))
    if "prdc" not in args.skip:
        result.update(time_prdc(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
