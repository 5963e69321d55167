"""The Inception-v3 feature extractor: weights lookup, errors and the real network code.

No real weights can be downloaded in tests, so the network code runs with random weights of the
right architecture written to a temporary file. The values it computes are not tested.
"""

import contextlib
import importlib.util
import sys
import urllib.error

import numpy as np
import pytest
import torch

from qcsbm.errors import CheckpointError, UsageError
from qcsbm.metrics import InceptionV3Features, compute_sample_quality, inception_weights_path
from qcsbm.metrics.inception import INCEPTION_WEIGHTS_FILE, INCEPTION_NAME
from qcsbm.metrics.reference import reference_stats

needs_torch_fidelity = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity is not installed (pip install --no-deps torch-fidelity)")


@pytest.fixture(scope="module")
def random_weights_file(tmp_path_factory):
    from qcsbm.metrics.inception import untrained_inception_state_dict

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(untrained_inception_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def random_inception(random_weights_file):
    return InceptionV3Features(random_weights_file)


@pytest.fixture
def single_thread():
    # On a 2-core machine busy with other processes, one thread ran the network about 9 times
    # faster than two. No check here depends on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def threadpool_limits(limits):
    """threadpoolctl's BLAS thread limit where it is installed (scikit-learn brings it)."""
    try:
        from threadpoolctl import threadpool_limits as limit_blas_threads
    except ImportError:
        return contextlib.nullcontext()
    return limit_blas_threads(limits=limits)


def test_missing_weights_path_names_file(tmp_path):
    missing = tmp_path / "absent" / "inception.pth"
    with pytest.raises(UsageError) as error:
        InceptionV3Features(missing)
    message = str(error.value)
    assert str(missing) in message
    assert INCEPTION_WEIGHTS_FILE in message


def test_missing_cache_without_download_names_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UsageError) as error:
        inception_weights_path(download=False)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)
    assert INCEPTION_WEIGHTS_FILE in str(error.value)


def test_failed_download_is_usage_error(tmp_path, monkeypatch):
    def fail_download(url, destination, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail_download)
    with pytest.raises(UsageError, match="download failed.*network unreachable"):
        inception_weights_path()


def test_cached_weights_file_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")
    assert inception_weights_path(download=False) == cached


def test_missing_weights_stops_sample_quality(tmp_path):
    reference = None  # never reached: the extractor is built first
    samples = np.zeros((20, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(UsageError, match="Inception weights file not found"):
        compute_sample_quality(samples, reference, weights_path=tmp_path / "none.pth")


@needs_torch_fidelity
def test_weights_file_with_wrong_keys_rejected(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="does not match"):
        InceptionV3Features(path)


@needs_torch_fidelity
def test_weights_file_not_state_dict_rejected(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        InceptionV3Features(path)


@needs_torch_fidelity
def test_pickled_code_rejected(tmp_path):
    # weights_only=True rejects pickles of arbitrary objects.
    path = tmp_path / "object.pth"
    torch.save({"network": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded as plain tensors"):
        InceptionV3Features(path)


@needs_torch_fidelity
def test_real_network_shapes_and_mode(random_inception, single_thread):
    random_inception.train()
    assert not random_inception.training
    assert not random_inception.network.training
    assert random_inception.name == INCEPTION_NAME
    assert len(random_inception.weights_sha256) == 64

    images = torch.randint(0, 256, (1, 3, 21, 17), dtype=torch.uint8)
    with torch.no_grad():
        features, logits = random_inception(images)
    assert features.shape == (1, 2048)
    assert logits.shape == (1, 1008)
    assert torch.isfinite(features).all()
    assert torch.isfinite(logits).all()


@needs_torch_fidelity
def test_torch_fidelity_package_not_left_behind():
    # Only the Inception module is imported, so torchvision is never needed.
    from qcsbm.metrics.inception import _torch_fidelity_inception_module

    module = _torch_fidelity_inception_module()
    assert hasattr(module, "FeatureExtractorInceptionV3")
    assert "torch_fidelity" not in sys.modules or hasattr(sys.modules["torch_fidelity"],
                                                          "calculate_metrics")


@pytest.mark.slow
@needs_torch_fidelity
def test_real_network_whole_pipeline(random_inception, tmp_path, single_thread):
    # Two 299 x 299 forward passes per image and two 2048-D eigendecompositions.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 12, 12, 1), dtype=np.uint8)
    reference = reference_stats(images, "tiny-gray", tmp_path, random_inception,
                                progress=False)
    assert reference.extractor == INCEPTION_NAME
    assert reference.weights_sha256 == random_inception.weights_sha256

    result = compute_sample_quality(images, reference, extractor=random_inception, k=1,
                                    is_splits=1, kid_subsets=2, progress=False)
    assert result["extractor"] == INCEPTION_NAME
    assert result["extractor_weights_sha256"] == random_inception.weights_sha256
    assert result["num_samples"] == 2
    assert result["fid"] < 1e-6
    assert result["precision"] == 1.0
    assert result["recall"] == 1.0
