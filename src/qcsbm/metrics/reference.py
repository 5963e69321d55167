"""Reference statistics of a data set, computed once per (data set, split, extractor) and cached.

A cache file `<key>.<extractor name>.npz` contains the mean and covariance of all reference
features (FID), a random subset of the features themselves (KID and PRDC) and the number of
images. It also stores the extractor's name and weights hash, so that statistics from
different networks are never compared.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcsbm.errors import CheckpointError, UsageError
from qcsbm.metrics._arrays import check_int_at_least
from qcsbm.metrics.fid import feature_statistics
from qcsbm.metrics.inception import (INCEPTION_NAME, default_extractor, extract_features,
                                     extractor_identity)

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a reference data set."""

    mu: np.ndarray  # (D,) mean of all reference features
    sigma: np.ndarray  # (D, D) unbiased covariance of all reference features
    features: np.ndarray  # (K, D) float32, a random subset of at most max_stored_features rows
    num_images: int  # images behind mu and sigma
    extractor: str  # the feature extractor's name
    weights_sha256: str  # sha256 of the extractor's weights file, "" if it has none

    def save(self, path: str | Path) -> None:
        """Write the statistics to an .npz file, atomically (a temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as file:
            np.savez(file, mu=self.mu, sigma=self.sigma, features=self.features,
                     num_images=self.num_images, extractor=self.extractor,
                     weights_sha256=self.weights_sha256)
        os.replace(file.name, path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read statistics written by `save`; raise CheckpointError for a broken file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(mu=data["mu"], sigma=data["sigma"], features=data["features"],
                           num_images=int(data["num_images"]), extractor=str(data["extractor"]),
                           weights_sha256=str(data["weights_sha256"]))
        except (OSError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"reference statistics file {path} cannot be read ({error}); delete it so that "
                "it is computed again") from error


def reference_stats(images, key: str, cache_dir: str | Path, extractor: nn.Module | None = None,
                    *, weights_path: str | Path | None = None, download: bool = True,
                    max_stored_features: int = 10_000, batch_size: int = 100,
                    device: str | torch.device = "cpu", progress: bool = True,
                    seed: int = 0) -> ReferenceStats:
    """Return the reference statistics for `key`, computing and caching them on first use.

    Args:
        images: uint8 images (N, H, W, C), or an iterable of such batches. It is read only
            when the cache has no file for `key` and this extractor.
        key: names the data set and split, for example "cifar10-train"; letters, digits,
            ".", "_" and "-".
        cache_dir: folder of the .npz cache files.
        extractor: None for the FID Inception-v3 network (`weights_path`, `download` as in
            `InceptionV3Features`). Any other extractor is a test hook: its statistics are
            cached under its own name and are not comparable to published ones.
        max_stored_features: features kept for KID and PRDC (10,000 is the usual PRDC size).
        seed: seed of the draw of the stored features.
    """
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise UsageError(
            f"invalid reference key {key!r}; expected letters, digits, '.', '_' and '-', "
            "starting with a letter or digit")
    check_int_at_least("max_stored_features", max_stored_features, 2)
    extractor_name = INCEPTION_NAME if extractor is None else extractor_identity(extractor)[0]
    path = Path(cache_dir) / f"{key}.{extractor_name}.npz"
    if path.is_file():
        logger.info("using cached reference statistics %s", path)
        return ReferenceStats.load(path)

    # Cache miss: one feature pass over the whole reference set.
    if extractor is None:
        extractor = default_extractor(weights_path, download=download, device=device)
    else:
        extractor = extractor.to(device)
    features, _ = extract_features(images, extractor, batch_size=batch_size, device=device,
                                   progress=progress)
    mu, sigma = feature_statistics(features)
    num_images = features.shape[0]

    rng = np.random.default_rng(seed)
    if features.shape[0] > max_stored_features:
        kept = np.sort(rng.choice(features.shape[0], max_stored_features, replace=False))
        features = features[kept]

    _, weights_sha256 = extractor_identity(extractor)
    stats = ReferenceStats(mu=mu, sigma=sigma, features=features.astype(np.float32),
                           num_images=num_images,
                           extractor=extractor_name, weights_sha256=weights_sha256)
    stats.save(path)
    logger.info("wrote reference statistics of %d images to %s", stats.num_images, path)
    return stats
