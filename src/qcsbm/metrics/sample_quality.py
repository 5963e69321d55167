"""FID, IS, KID and PRDC of generated images from one feature pass."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qcsbm.errors import UsageError
from qcsbm.metrics._arrays import check_int_at_least
from qcsbm.metrics.fid import feature_statistics, frechet_distance
from qcsbm.metrics.inception import default_extractor, extract_features, extractor_identity
from qcsbm.metrics.inception_score import inception_score
from qcsbm.metrics.kid import kernel_inception_distance
from qcsbm.metrics.prdc import prdc
from qcsbm.metrics.reference import ReferenceStats

logger = logging.getLogger(__name__)


def compute_sample_quality(samples, reference: ReferenceStats, *,
                           extractor: nn.Module | None = None,
                           weights_path: str | Path | None = None, download: bool = True,
                           k: int = 3, is_splits: int = 10, kid_subsets: int = 100,
                           kid_subset_size: int = 1000, prdc_max_samples: int = 10_000,
                           batch_size: int = 100, device: str | torch.device = "cpu",
                           progress: bool = True, seed: int = 0) -> dict:
    """Return FID, Inception Score, KID and PRDC of uint8 samples against reference statistics.

    Args:
        samples: uint8 images (N, H, W, C), C = 1 or 3, N >= max(2, is_splits, k + 1).
        reference: statistics from `reference_stats`, made with the same extractor.
        extractor: None for the FID Inception-v3 network (`weights_path`, `download` as in
            `InceptionV3Features`). Any other extractor is a test hook: its name goes into
            the result, and its scores are not comparable to published ones.
        k: neighbour rank of the PRDC balls.
        is_splits: splits of the Inception Score.
        kid_subsets, kid_subset_size: KID subsets. The size is lowered to the number of
            samples or of stored reference features when either is smaller, which changes the
            variance of KID and not its expectation. The size used is in the result.
        prdc_max_samples: PRDC uses the first this many samples against the stored reference
            features, because its cost grows with the square of the count.
        seed: seed of the KID subset draws.

    Returns a dict with "fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision",
    "recall", "density", "coverage", and the settings behind them: "num_samples",
    "num_reference", "k", "kid_subset_size", "kid_subsets", "is_splits",
    "prdc_num_samples", "prdc_num_reference", "extractor", "extractor_weights_sha256" ("" for
    an extractor without a weights file).
    """
    num_samples = _check_sample_count(samples, k=k, is_splits=is_splits)
    check_int_at_least("kid_subsets", kid_subsets, 1)
    check_int_at_least("kid_subset_size", kid_subset_size, 2)
    check_int_at_least("prdc_max_samples", prdc_max_samples, k + 1)

    # Build or check the extractor before the feature pass, so a mismatch fails at once.
    if extractor is None:
        extractor = default_extractor(weights_path, download=download, device=device)
    else:
        extractor = extractor.to(device)
    _check_same_extractor(extractor, reference)

    # One pass gives features for FID, KID, PRDC and logits for IS.
    features, logits = extract_features(samples, extractor, batch_size=batch_size,
                                        device=device, progress=progress)

    mu, sigma = feature_statistics(features)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    is_mean, is_std = inception_score(logits, num_splits=is_splits)

    subset_size = min(kid_subset_size, num_samples, reference.features.shape[0])
    kid_mean, kid_std = kernel_inception_distance(
        features, reference.features, num_subsets=kid_subsets, subset_size=subset_size,
        seed=seed)

    prdc_features = features[:prdc_max_samples]
    prdc_result = prdc(reference.features, prdc_features, k=k, device=device)

    result = {
        "fid": fid, "is_mean": is_mean, "is_std": is_std,
        "kid_mean": kid_mean, "kid_std": kid_std,
        "precision": prdc_result["precision"], "recall": prdc_result["recall"],
        "density": prdc_result["density"], "coverage": prdc_result["coverage"],
        "num_samples": num_samples, "num_reference": reference.num_images,
        "k": k, "is_splits": is_splits,
        "kid_subsets": kid_subsets, "kid_subset_size": subset_size,
        "prdc_num_samples": prdc_result["num_fake"],
        "prdc_num_reference": prdc_result["num_real"],
        "extractor": reference.extractor,
        "extractor_weights_sha256": extractor_identity(extractor)[1],
    }
    logger.info("sample quality of %d samples: FID %.3f, IS %.3f, KID %.5f", num_samples,
                fid, is_mean, kid_mean)
    return result


def _check_sample_count(samples, *, k: int, is_splits: int) -> int:
    """Return the number of samples after checking it before any expensive work."""
    check_int_at_least("k", k, 1)
    check_int_at_least("is_splits", is_splits, 1)
    if not hasattr(samples, "shape") or len(samples.shape) != 4:
        raise UsageError(
            f"samples must be a uint8 array (N, H, W, C), got "
            f"{getattr(samples, 'shape', type(samples).__name__)}")
    num_samples = int(samples.shape[0])
    minimum = max(2, is_splits, k + 1)
    if num_samples < minimum:
        raise UsageError(
            f"sample quality with is_splits {is_splits} and k {k} needs at least {minimum} "
            f"samples, got {num_samples}; pass more samples")
    return num_samples


def _check_same_extractor(extractor: nn.Module, reference: ReferenceStats) -> None:
    name, weights_sha256 = extractor_identity(extractor)
    if name != reference.extractor:
        raise UsageError(
            f"reference statistics come from extractor {reference.extractor!r} but the "
            f"samples would use {name!r}; compute the reference with the same extractor")
    if weights_sha256 and reference.weights_sha256 and weights_sha256 != reference.weights_sha256:
        raise UsageError(
            f"reference statistics come from weights with sha256 {reference.weights_sha256} "
            f"but the extractor loaded {weights_sha256}; delete the cached reference file or "
            "use the same weights file")
