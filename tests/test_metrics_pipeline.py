"""Reference statistics, their cache, and all metrics from one feature pass, with a stand-in
extractor in place of Inception-v3."""

import numpy as np
import pytest
import torch
from torch import nn

from qcsbm.errors import UsageError
from qcsbm.metrics import (ReferenceStats, compute_sample_quality, extract_features,
                           feature_statistics, frechet_distance, images_to_tensor,
                           inception_score, reference_stats)


class StandInExtractor(nn.Module):
    """A small fixed network: 4 x 4 average pooling, then random linear maps."""

    name = "stand-in"

    def __init__(self, num_features=12, num_classes=5, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(48, num_features, generator=generator))
        self.register_buffer("classifier", torch.randn(num_features, num_classes,
                                                        generator=generator))
        self.num_calls = 0

    def forward(self, images):
        self.num_calls += 1
        assert images.dtype == torch.uint8
        pooled = nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        features = torch.tanh(pooled @ self.projection)
        return features, 3.0 * features @ self.classifier


def make_images(num_images, seed, low=0, high=256, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, (num_images, 16, 16, channels), dtype=np.uint8)


# --- image conversion and the feature pass ----------------------------------------------------


def test_images_to_tensor_layout():
    images = make_images(2, seed=0)
    tensor = images_to_tensor(images)
    assert tensor.shape == (2, 3, 16, 16)
    assert tensor.dtype == torch.uint8
    assert tensor[1, 2, 5, 7] == images[1, 5, 7, 2]


def test_images_to_tensor_gray_repeated():
    images = make_images(2, seed=1, channels=1)
    tensor = images_to_tensor(images)
    assert tensor.shape == (2, 3, 16, 16)
    for channel in range(3):
        assert torch.equal(tensor[:, channel], torch.from_numpy(images[..., 0]))


def test_images_to_tensor_float_rejected():
    with pytest.raises(UsageError, match="dtype uint8"):
        images_to_tensor(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_images_to_tensor_channels_rejected():
    with pytest.raises(UsageError, match=r"C = 1 or 3, got shape \(2, 8, 8, 2\)"):
        images_to_tensor(np.zeros((2, 8, 8, 2), dtype=np.uint8))


def test_extract_features_batches_agree():
    images = make_images(7, seed=2)
    extractor = StandInExtractor()
    whole_features, whole_logits = extract_features(images, extractor, batch_size=100,
                                                    progress=False)
    batched_features, batched_logits = extract_features(
        [images[:4], images[4:]], extractor, batch_size=3, progress=False)
    # Float32 matrix products may round differently for other batch shapes.
    np.testing.assert_allclose(batched_features, whole_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched_logits, whole_logits, rtol=1e-5, atol=1e-5)
    assert whole_features.shape == (7, 12)
    assert whole_logits.shape == (7, 5)


def test_extract_features_empty_rejected():
    with pytest.raises(UsageError, match="images is empty"):
        extract_features([], StandInExtractor(), progress=False)


# --- reference statistics -------------------------------------------------------------------


def test_reference_stats_cached_once(tmp_path):
    images = make_images(40, seed=3)
    extractor = StandInExtractor()
    first = reference_stats(images, "toy-train", tmp_path, extractor, progress=False)
    assert (tmp_path / "toy-train.stand-in.npz").is_file()
    assert first.num_images == 40

    def must_not_be_read():
        raise AssertionError("cached statistics must not read the images again")
        yield

    second = reference_stats(must_not_be_read(), "toy-train", tmp_path, extractor,
                             progress=False)
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.features, first.features)
    assert second.extractor == "stand-in"


def test_reference_stats_match_features(tmp_path):
    images = make_images(30, seed=4)
    extractor = StandInExtractor()
    stats = reference_stats(images, "toy", tmp_path, extractor, max_stored_features=10,
                            progress=False)
    features, _ = extract_features(images, extractor, progress=False)
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-12)
    assert stats.features.shape == (10, 12)
    assert stats.num_images == 30

    # The stored rows are a subset of the real features.
    for row in stats.features:
        assert np.isclose(features, row).all(axis=1).any()


def test_reference_stats_invalid_key_rejected(tmp_path):
    with pytest.raises(UsageError, match="invalid reference key '../escape'"):
        reference_stats(make_images(4, seed=5), "../escape", tmp_path, StandInExtractor())


def test_reference_stats_broken_cache_file(tmp_path):
    (tmp_path / "toy.stand-in.npz").write_bytes(b"not an npz file")
    with pytest.raises(UsageError, match="cannot be read"):
        reference_stats(make_images(4, seed=6), "toy", tmp_path, StandInExtractor())


# --- all metrics from one pass -----------------------------------------------------------------


def test_sample_quality_same_set(tmp_path):
    images = make_images(60, seed=7)
    extractor = StandInExtractor()
    reference = reference_stats(images, "toy", tmp_path, extractor, progress=False)
    calls_before = extractor.num_calls

    result = compute_sample_quality(images, reference, extractor=extractor, k=3, is_splits=5,
                                    kid_subsets=10, batch_size=20, progress=False)
    assert extractor.num_calls - calls_before == 3  # one pass of 60 images in batches of 20
    assert result["fid"] < 1e-6
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
    assert result["coverage"] == 1.0
    assert result["num_samples"] == 60
    assert result["num_reference"] == 60
    assert result["k"] == 3
    assert result["kid_subset_size"] == 60
    assert result["extractor"] == "stand-in"
    assert result["extractor_weights_sha256"] == ""


def test_sample_quality_matches_direct_metrics(tmp_path):
    reference_images = make_images(50, seed=8)
    samples = make_images(30, seed=9, low=0, high=128)
    extractor = StandInExtractor()
    reference = reference_stats(reference_images, "toy", tmp_path, extractor, progress=False)

    result = compute_sample_quality(samples, reference, extractor=extractor, is_splits=3,
                                    kid_subsets=5, progress=False)
    features, logits = extract_features(samples, extractor, progress=False)
    mu, sigma = feature_statistics(features)
    assert result["fid"] == pytest.approx(frechet_distance(mu, sigma, reference.mu,
                                                           reference.sigma), rel=1e-10)
    assert result["is_mean"] == pytest.approx(inception_score(logits, num_splits=3)[0],
                                              rel=1e-10)
    assert result["fid"] > 0.1
    assert result["kid_mean"] > 0
    assert result["kid_subset_size"] == 30


def test_sample_quality_far_samples_zero_precision(tmp_path):
    reference = reference_stats(make_images(40, seed=10, high=20), "dark", tmp_path,
                                StandInExtractor(), progress=False)
    bright = make_images(40, seed=11, low=235)
    result = compute_sample_quality(bright, reference, extractor=StandInExtractor(),
                                    is_splits=4, kid_subsets=5, progress=False)
    assert result["precision"] == 0.0
    assert result["coverage"] == 0.0


def test_sample_quality_too_few_samples_before_pass(tmp_path):
    extractor = StandInExtractor()
    reference = reference_stats(make_images(20, seed=12), "toy", tmp_path, extractor,
                                progress=False)
    calls_before = extractor.num_calls
    with pytest.raises(UsageError, match="needs at least 10 samples, got 9"):
        compute_sample_quality(make_images(9, seed=13), reference, extractor=extractor,
                               progress=False)
    assert extractor.num_calls == calls_before


def test_sample_quality_other_extractor_rejected(tmp_path):
    reference = ReferenceStats(mu=np.zeros(12), sigma=np.eye(12), features=np.zeros((20, 12)),
                               num_images=20, extractor="inception-v3-fid", weights_sha256="")
    with pytest.raises(UsageError, match="extractor 'inception-v3-fid'.*'stand-in'"):
        compute_sample_quality(make_images(20, seed=14), reference,
                               extractor=StandInExtractor(), progress=False)


def test_sample_quality_float_samples_rejected(tmp_path):
    extractor = StandInExtractor()
    reference = reference_stats(make_images(20, seed=15), "toy", tmp_path, extractor,
                                progress=False)
    with pytest.raises(UsageError, match="dtype uint8"):
        compute_sample_quality(np.zeros((20, 16, 16, 3)), reference, extractor=extractor,
                               progress=False)


def test_reference_stats_round_trip(tmp_path):
    stats = ReferenceStats(mu=np.arange(3.0), sigma=np.eye(3), features=np.ones((4, 3)),
                           num_images=9, extractor="stand-in", weights_sha256="ab")
    stats.save(tmp_path / "stats.npz")
    loaded = ReferenceStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.num_images == 9
    assert loaded.extractor == "stand-in"
    assert loaded.weights_sha256 == "ab"


def test_sample_quality_other_weights_rejected():
    extractor = StandInExtractor()
    extractor.weights_sha256 = "b" * 64
    reference = ReferenceStats(mu=np.zeros(12), sigma=np.eye(12), features=np.zeros((20, 12)),
                               num_images=20, extractor="stand-in", weights_sha256="a" * 64)
    with pytest.raises(UsageError, match="weights with sha256 a+ but the extractor loaded b+"):
        compute_sample_quality(make_images(20, seed=16), reference, extractor=extractor,
                               progress=False)
